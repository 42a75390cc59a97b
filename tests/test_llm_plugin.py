"""DiffusionLLM: chat context -> engine request, committed spans -> chunks, cancel, drafts."""

from __future__ import annotations

import asyncio

import pytest
from agent_fakes import FakeEngine
from livekit.agents import APIConnectionError, llm

from agent.llm_plugin import DiffusionLLM, chat_ctx_to_messages


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
