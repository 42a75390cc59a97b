"""`DiffusionLLM`: the diffusion engine as a LiveKit Agents `llm.LLM`.

chat context (instructions + history) -> engine messages -> committed spans -> `llm.ChatChunk`s

A masked-diffusion model denoises a block of the reply in parallel; the engine hands out a span
only once every token in it is final, so each chunk is text that will never change and TTS can
speak the first sentence while later blocks are still being denoised. LiveKit measures time to
the first chunk with content as the LLM's TTFT, which here is the time to the first committed
span. Closing the stream (an interruption) cancels the engine row, which stops within one
denoising step.

Drafts: the last finished reply is kept keyed by its request (the messages). LiveKit's
preemptive generation can ask for the same context twice (a draft started on the interim
transcript, then the confirmed turn); a repeat of a finished request replays the draft without
running the model. When the new request differs only in the latest user text and the engine
`accepts_drafts` (`llm.engine.draft_reuse`), the draft's tokens go with the request and the
engine re-denoises from them instead of starting from masks; the log line of each reply says
which path it took (`path=replay|draft|fresh`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from livekit.agents import APIConnectionError, llm
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)

logger = logging.getLogger(__name__)

Message = dict[str, str]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class EngineStreamLike(Protocol):
    """What the plugin needs of `llm.engine.EngineStream`."""

    stats: Any

    def __aiter__(self) -> AsyncIterator[Any]: ...
    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the plugin needs of `llm.engine.DiffusionEngine`."""

    def stream(
        self, messages: list[Message], *, session_id: str | None = None, decode: Any = None
    ) -> EngineStreamLike: ...


def engine_accepts_drafts(engine: Any) -> bool:
    """Capability flag: `stream(..., draft=token_ids)` re-denoises from a draft."""
    return bool(getattr(engine, "accepts_drafts", False))


def chat_ctx_to_messages(chat_ctx: llm.ChatContext, system_prompt: str) -> list[Message]:
    """LiveKit's chat items -> engine messages; the agent's instructions become the system turn.

    Tool calls and handoff items have no text and are skipped; consecutive system texts merge.
    """
    messages: list[Message] = []
    for item in chat_ctx.items:
        if item.type != "message" or item.role not in _ROLES:
            continue
        text = (item.text_content or "").strip()
        if not text:
            continue
        role = _ROLES[item.role]
        if role == "system" and messages and messages[-1]["role"] == "system":
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


Key = tuple[tuple[str, str], ...]


def _key(messages: Sequence[Message]) -> Key:
    return tuple((m["role"], m["content"]) for m in messages)


def only_last_user_text_differs(old: Key, new: Key) -> bool:
    """Same history, and both end in a user message whose text changed (a partial transcript
    and its final version)."""
    return (
        len(old) == len(new) > 0 and old[:-1] == new[:-1] and old[-1] != new[-1]
        and old[-1][0] == new[-1][0] == "user"
    )


@dataclass
class Draft:
    """A finished reply and the request that produced it."""

    key: Key
    spans: list[str] = field(default_factory=list)
    token_ids: tuple[int, ...] = ()  # the reply's tokens, to re-denoise a near request from


@dataclass
class DraftStats:
    """How often drafts were replayed; exposed for tests and the bench."""

    reused: int = 0  # replayed for an identical request
    reseeded: int = 0  # passed to the engine for a request differing in the latest user text
    discarded: int = 0
    generated: int = 0


class DiffusionLLM(llm.LLM):
    """A LiveKit `llm.LLM` over a `DiffusionEngine`; one instance per conversation.

    >>> agent_llm = DiffusionLLM(engine, system_prompt=settings.llm.system_prompt,
    ...                          session_id="visitor-1")
    >>> AgentSession(llm=agent_llm, ...)
    """

    def __init__(
        self,
        engine: EngineLike,
        *,
        system_prompt: str = "",
        session_id: str | None = None,
        decode: Any = None,
        reuse_drafts: bool = True,
        model_name: str = "diffvoice",
    ) -> None:
        super().__init__()
        self.engine = engine
        self.system_prompt = system_prompt
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.decode = decode
        self.reuse_drafts = reuse_drafts
        self.draft: Draft | None = None
        self.draft_stats = DraftStats()
        self._model_name = model_name

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "diffvoice"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> DiffusionLLMStream:
        # a diffusion chat model has no tool calling: tools are ignored, never an error
        return DiffusionLLMStream(
            self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )

    def end_conversation(self) -> None:
        """The conversation is over: the engine gives its kept K/V back now, not when its cache
        would have evicted them (the session factory calls this when the session closes)."""
        self.draft = None
        end = getattr(self.engine, "end_session", None)  # an engine may keep nothing
        if end is not None:
            end(self.session_id)

    async def aclose(self) -> None:
        self.end_conversation()
        await super().aclose()

    def cached_draft(self, messages: list[Message]) -> Draft | None:
        """The finished draft for exactly this request, if drafts are on and one is kept."""
        if not self.reuse_drafts or self.draft is None:
            return None
        if self.draft.key == _key(messages):
            self.draft_stats.reused += 1
            return self.draft
        self.draft_stats.discarded += 1
        self.draft = None
        return None

    def draft_seed(self, messages: list[Message]) -> tuple[int, ...]:
        """The kept draft's tokens when this request differs from its request only in the latest
        user text and the engine re-denoises from drafts; () otherwise."""
        draft = self.draft
        if not self.reuse_drafts or draft is None or not draft.token_ids:
            return ()
        if not engine_accepts_drafts(self.engine):
            return ()
        if not only_last_user_text_differs(draft.key, _key(messages)):
            return ()
        self.draft_stats.reseeded += 1
        return draft.token_ids


class DiffusionLLMStream(llm.LLMStream):
    """One reply: engine spans in, `ChatChunk`s out; closing it cancels the engine row."""

    def __init__(self, llm_: DiffusionLLM, **kwargs: Any) -> None:
        super().__init__(llm_, **kwargs)
        self._dllm = llm_
        self._id = uuid.uuid4().hex[:12]

    async def _run(self) -> None:
        messages = chat_ctx_to_messages(self._chat_ctx, self._dllm.system_prompt)
        seed = self._dllm.draft_seed(messages)
        draft = None if seed else self._dllm.cached_draft(messages)
        if draft is not None:
            for text in draft.spans:
                self._send_text(text)
            logger.debug("reply done: path=replay, %d spans", len(draft.spans))
            return
        await self._generate(messages, seed)

    async def _generate(self, messages: list[Message], seed: tuple[int, ...]) -> None:
        t0 = time.perf_counter()
        kw = {"draft": seed} if seed else {}
        stream = self._dllm.engine.stream(
            messages, session_id=self._dllm.session_id, decode=self._dllm.decode, **kw
        )
        spans: list[str] = []
        ids: list[int] = []
        try:
            async for span in stream:
                ids += span.token_ids
                if span.text:
                    spans.append(span.text)
                    self._send_text(span.text)
        except Exception as e:
            raise APIConnectionError(
                f"diffusion engine failed: {type(e).__name__}", retryable=False
            ) from e
        finally:
            stream.cancel()  # no-op when finished; stops the row within one step otherwise
        self._finish(Draft(_key(messages), spans, tuple(ids)), stream.stats,
                     time.perf_counter() - t0)

    def _finish(self, reply: Draft, stats: Any, total_s: float) -> None:
        self._dllm.draft_stats.generated += 1
        reason = getattr(stats, "finish_reason", None)
        if reason == "error":
            raise APIConnectionError("diffusion engine reported an error", retryable=False)
        if reason in ("eot", "length"):
            self._dllm.draft = reply
        if stats is not None:
            self._send_usage(stats)
        seeded = getattr(stats, "draft_tokens", 0)
        logger.debug(
            "reply done: path=%s, %d spans, %.3f s, finish=%s, ttfs=%s, nfe=%s, draft kept %s/%d",
            "draft" if seeded else "fresh", len(reply.spans), total_s, reason,
            getattr(stats, "ttfs_s", None), getattr(stats, "nfe", None),
            getattr(stats, "draft_kept", 0), seeded,
        )

    def _send_text(self, text: str) -> None:
        delta = llm.ChoiceDelta(role="assistant", content=text)
        self._event_ch.send_nowait(llm.ChatChunk(id=self._id, delta=delta))

    def _send_usage(self, stats: Any) -> None:
        usage = llm.CompletionUsage(
            completion_tokens=stats.reply_tokens,
            prompt_tokens=stats.prompt_tokens,
            prompt_cached_tokens=stats.cached_prompt_tokens,
            total_tokens=stats.prompt_tokens + stats.reply_tokens,
        )
        self._event_ch.send_nowait(llm.ChatChunk(id=self._id, usage=usage))
