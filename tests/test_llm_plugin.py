"""DiffusionLLM: chat context -> engine request, committed spans -> chunks, cancel, drafts."""

from __future__ import annotations

import asyncio

import pytest
from agent_fakes import FakeEngine
from livekit.agents import APIConnectionError, llm

from agent.llm_plugin import DiffusionLLM, chat_ctx_to_messages, only_last_user_text_differs


def _ctx(*turns: tuple[str, str]) -> llm.ChatContext:
    ctx = llm.ChatContext.empty()
    for role, text in turns:
        ctx.add_message(role=role, content=text)
    return ctx


async def _collect(stream: llm.LLMStream) -> list[llm.ChatChunk]:
    async with stream:
        return [chunk async for chunk in stream]


def test_messages_from_chat_context():
    ctx = _ctx(("system", "Be brief."), ("user", "hi"), ("assistant", "Hello."), ("user", "  "))
    assert chat_ctx_to_messages(ctx, "unused") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    # no instructions in the context: the configured system prompt leads
    assert chat_ctx_to_messages(_ctx(("user", "hi")), "Persona.")[0] == {
        "role": "system", "content": "Persona."
    }


async def test_streams_committed_spans_and_reports_ttft():
    engine = FakeEngine(reply=["One. ", "Two."], step_s=0.02, steps_per_span=3)
    plugin = DiffusionLLM(engine, system_prompt="P.")
    metrics: list = []
    plugin.on("metrics_collected", metrics.append)
    chunks = await _collect(plugin.chat(chat_ctx=_ctx(("user", "count"))))
    texts = [c.delta.content for c in chunks if c.delta and c.delta.content]
    assert texts == ["One. ", "Two."]
    assert engine.requests[0] == [
        {"role": "system", "content": "P."}, {"role": "user", "content": "count"}
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    await asyncio.sleep(0.05)
    (m,) = metrics
    # TTFT is the first committed span (three 20 ms steps), not the whole reply (six)
    assert m.ttft >= 0.05 and m.ttft < 0.75 * m.duration


async def test_close_cancels_engine_within_one_step():
    engine = FakeEngine(reply=["A. ", "B. ", "C. ", "D."], step_s=0.03, steps_per_span=2)
    plugin = DiffusionLLM(engine)
    stream = plugin.chat(chat_ctx=_ctx(("user", "go")))
    first = await stream.__anext__()
    assert first.delta.content == "A. "
    await stream.aclose()
    (es,) = engine.streams
    assert es.cancelled_at is not None
    await asyncio.sleep(0.1)  # let the engine reach its next step check
    assert es.steps_after_cancel <= 1
    assert es.stats is not None and es.stats.finish_reason == "cancelled"
    assert plugin.draft is None  # a cancelled reply is no draft


async def test_identical_request_replays_draft_and_different_one_discards_it():
    engine = FakeEngine(reply=["Sure. "])
    plugin = DiffusionLLM(engine)
    ctx = _ctx(("user", "what time is it"))
    await _collect(plugin.chat(chat_ctx=ctx))
    replay = await _collect(plugin.chat(chat_ctx=ctx.copy()))
    assert [c.delta.content for c in replay if c.delta] == ["Sure. "]
    assert len(engine.requests) == 1 and plugin.draft_stats.reused == 1
    await _collect(plugin.chat(chat_ctx=_ctx(("user", "what time is it now"))))
    assert len(engine.requests) == 2 and plugin.draft_stats.discarded == 1


async def test_drafts_off_always_generates():
    engine = FakeEngine(reply=["Sure. "])
    plugin = DiffusionLLM(engine, reuse_drafts=False)
    ctx = _ctx(("user", "hi"))
    await _collect(plugin.chat(chat_ctx=ctx))
    await _collect(plugin.chat(chat_ctx=ctx))
    assert len(engine.requests) == 2


async def test_engine_failure_is_a_clear_llm_error():
    plugin = DiffusionLLM(FakeEngine(fail=True))
    errors: list = []
    plugin.on("error", errors.append)
    with pytest.raises(APIConnectionError, match="diffusion engine failed"):
        await _collect(plugin.chat(chat_ctx=_ctx(("user", "hi"))))
    assert errors and not errors[0].recoverable


class DraftFakeEngine(FakeEngine):
    """A FakeEngine that re-denoises from drafts: records the draft of every request."""

    accepts_drafts = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.drafts: list[tuple[int, ...]] = []

    def stream(self, messages, *, session_id=None, decode=None, draft=()):
        self.drafts.append(tuple(draft))
        return super().stream(messages, session_id=session_id, decode=decode)


def test_only_last_user_text_differs():
    base = (("system", "P."), ("user", "hi"), ("assistant", "Hello."))
    assert only_last_user_text_differs((*base, ("user", "what's the")),
                                       (*base, ("user", "what's the weather")))
    assert not only_last_user_text_differs((*base, ("user", "a")), (*base, ("user", "a")))
    assert not only_last_user_text_differs((("system", "P."), ("user", "a")),
                                           (("system", "Q."), ("user", "b")))
    assert not only_last_user_text_differs((*base, ("user", "a")), (("user", "b"),))
    assert not only_last_user_text_differs((*base[:2],), (base[0], ("assistant", "hi")))


async def test_draft_passed_only_when_the_latest_user_text_differs():
    engine = DraftFakeEngine(reply=["It is ", "sunny."])
    plugin = DiffusionLLM(engine, system_prompt="P.")
    await _collect(plugin.chat(chat_ctx=_ctx(("user", "what's the weather"))))
    await _collect(plugin.chat(chat_ctx=_ctx(("user", "what's the weather like today"))))
    assert engine.drafts == [(), (1, 1)]  # the first reply's token ids (two spans of one)
    assert plugin.draft_stats.reseeded == 1
    # the same request again: replayed, the engine is not asked
    await _collect(plugin.chat(chat_ctx=_ctx(("user", "what's the weather like today"))))
    assert len(engine.drafts) == 2 and plugin.draft_stats.reused == 1
    # more history (an earlier turn was answered): a new request, no draft
    longer = _ctx(("user", "what's the weather like today"), ("assistant", "It is sunny."),
                  ("user", "and tomorrow"))
    await _collect(plugin.chat(chat_ctx=longer))
    assert engine.drafts[-1] == () and plugin.draft_stats.reseeded == 1


async def test_no_draft_when_drafts_are_off_or_the_engine_does_not_take_them():
    engine = DraftFakeEngine(reply=["Sure. "])
    plugin = DiffusionLLM(engine, reuse_drafts=False)
    for text in ("what time", "what time is it"):
        await _collect(plugin.chat(chat_ctx=_ctx(("user", text))))
    assert engine.drafts == [(), ()]
    engine.accepts_drafts = False  # e.g. llm.engine.draft_reuse = false
    plugin = DiffusionLLM(engine)
    for text in ("what time", "what time is it"):
        await _collect(plugin.chat(chat_ctx=_ctx(("user", text))))
    assert engine.drafts[2:] == [(), ()] and plugin.draft_stats.reseeded == 0


async def test_close_cancels_a_reseeded_reply_within_one_step():
    engine = DraftFakeEngine(reply=["A. ", "B. ", "C. ", "D."], step_s=0.03, steps_per_span=2)
    plugin = DiffusionLLM(engine)
    await _collect(plugin.chat(chat_ctx=_ctx(("user", "go"))))
    stream = plugin.chat(chat_ctx=_ctx(("user", "go on")))
    first = await stream.__anext__()
    assert first.delta.content == "A. " and engine.drafts[-1] == (1, 1, 1, 1)
    await stream.aclose()
    es = engine.streams[-1]
    assert es.cancelled_at is not None
    await asyncio.sleep(0.1)  # let the engine reach its next step check
    assert es.steps_after_cancel <= 1
    assert es.stats is not None and es.stats.finish_reason == "cancelled"
    assert plugin.draft is not None and plugin.draft.key[-1] == ("user", "go")  # still the old
