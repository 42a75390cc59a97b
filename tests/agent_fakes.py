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
        self.released_at: list[float] = []  # time.monotonic() of each span handed out
        self._t0 = time.perf_counter()
        self.failing = engine.fail or engine.fail_next > 0
        engine.fail_next = max(0, engine.fail_next - 1)
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
            if self.failing:
                self._out.put_nowait(RuntimeError("scripted engine failure"))
                reason = "error"
                break
            self._out.put_nowait(FakeSpan(text, (1,), time.perf_counter() - self._t0, 1))
            self.released_at.append(time.monotonic())
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
    fail_next: int = 0  # this many requests fail, then the engine works again
    requests: list[list[dict]] = field(default_factory=list)
    streams: list[FakeEngineStream] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # sessions said to be over

    def stream(self, messages, *, session_id=None, decode=None) -> FakeEngineStream:
        self.requests.append([dict(m) for m in messages])
        s = FakeEngineStream(self, list(self.reply))
        self.streams.append(s)
        return s

    def end_session(self, session_id: str) -> None:
        self.ended.append(session_id)


# ---- speech stand-ins ------------------------------------------------------------------------
import numpy as np  # noqa: E402
from livekit import rtc  # noqa: E402
from livekit.agents import APIConnectOptions, stt, tts, utils  # noqa: E402

FAKE_TTS_RATE = 24000
TONE_HZ = 440.0


class FakeSTT(stt.STT):
    """Batch STT (wrapped by LiveKit's VAD adapter): returns the next scripted transcript after
    `delay_s`, whatever the audio; "" models a cough (speech with no words)."""

    def __init__(self, transcripts: list[str], delay_s: float = 0.05) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self.transcripts = list(transcripts)
        self.delay_s = delay_s
        self.calls = 0

    async def _recognize_impl(self, buffer, *, language=None, conn_options=None):
        await asyncio.sleep(self.delay_s)
        self.calls += 1
        text = self.transcripts.pop(0) if self.transcripts else ""
        alt = stt.SpeechData(language="en", text=text)
        return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[alt])


class FakeTTS(tts.TTS):
    """A tone `seconds_per_char` long per character of text, first audio after `ttfb_s`."""

    def __init__(self, *, seconds_per_char: float = 0.03, ttfb_s: float = 0.02) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=FAKE_TTS_RATE, num_channels=1,
        )
        self.seconds_per_char = seconds_per_char
        self.ttfb_s = ttfb_s
        self.texts: list[str] = []

    def synthesize(self, text: str, *, conn_options=None) -> FakeChunkedStream:
        self.texts.append(text)
        return FakeChunkedStream(tts=self, input_text=text,
                                 conn_options=conn_options or APIConnectOptions())


class FakeChunkedStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        fake: FakeTTS = self._tts  # type: ignore[assignment]
        output_emitter.initialize(request_id=utils.shortuuid(), sample_rate=FAKE_TTS_RATE,
                                  num_channels=1, mime_type="audio/pcm")
        await asyncio.sleep(fake.ttfb_s)
        n = int(len(self.input_text) * fake.seconds_per_char * FAKE_TTS_RATE)
        t = np.arange(n) / FAKE_TTS_RATE
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)
        step = FAKE_TTS_RATE // 50
        for i in range(0, n, step):
            output_emitter.push(pcm[i:i + step].tobytes())
        output_emitter.flush()


def pcm_frames(pcm: np.ndarray, rate: int, frame_ms: int = 20) -> list[rtc.AudioFrame]:
    step = rate * frame_ms // 1000
    return [
        rtc.AudioFrame(data=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=1,
                       samples_per_channel=len(pcm[i:i + step]))
        for i in range(0, len(pcm) - step + 1, step)
    ]
