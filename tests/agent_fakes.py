"""Scripted stand-ins with controlled timing, for unit tests of the turn logic only."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FakeSpan:
    text: str
    token_ids: tuple[int, ...]
    t_s: float
    nfe: int


@dataclass(frozen=True)
class FakeStats:
    prompt_tokens: int
    cached_prompt_tokens: int
    reply_tokens: int
    nfe: int
    ttfs_s: float | None
    total_s: float
    finish_reason: str


class FakeEngineStream:
    """Denoises on its own task like the engine's worker: one span per `steps_per_span` steps of
    `step_s`; `cancel()` is seen at the next step boundary."""

    def __init__(self, engine: FakeEngine, spans: list[str]) -> None:
        self.engine = engine
        self.stats: FakeStats | None = None
        self.cancelled_at: float | None = None
        self.steps_after_cancel = 0
        self._t0 = time.perf_counter()
        self._out: asyncio.Queue[FakeSpan | Exception | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._denoise(spans))

    def cancel(self) -> None:
        if self.cancelled_at is None and self.stats is None:
            self.cancelled_at = time.perf_counter()

    async def _denoise(self, spans: list[str]) -> None:
        reason = "eot"
        for text in spans:
            for _ in range(self.engine.steps_per_span):
                if self.cancelled_at is not None:
                    reason = "cancelled"
                    break
                await asyncio.sleep(self.engine.step_s)
                if self.cancelled_at is not None:
                    self.steps_after_cancel += 1
            if reason == "cancelled" or self.cancelled_at is not None:
                reason = "cancelled"
                break
            if self.engine.fail:
                self._out.put_nowait(RuntimeError("scripted engine failure"))
                reason = "error"
                break
            self._out.put_nowait(FakeSpan(text, (1,), time.perf_counter() - self._t0, 1))
        total = time.perf_counter() - self._t0
        self.stats = FakeStats(10, 0, 5, 3, None, total, reason)
        self._out.put_nowait(None)

    def __aiter__(self) -> FakeEngineStream:
        return self

    async def __anext__(self) -> FakeSpan:
        item = await self._out.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item


@dataclass
class FakeEngine:
    """`DiffusionEngine.stream` with a scripted reply per call."""

    reply: list[str] = field(default_factory=lambda: ["Hello there. ", "How are you?"])
    step_s: float = 0.01
    steps_per_span: int = 2
    fail: bool = False
    requests: list[list[dict]] = field(default_factory=list)
    streams: list[FakeEngineStream] = field(default_factory=list)

    def stream(self, messages, *, session_id=None, decode=None) -> FakeEngineStream:
        self.requests.append([dict(m) for m in messages])
        s = FakeEngineStream(self, list(self.reply))
        self.streams.append(s)
        return s
