"""The engine in its own process (`llm.engine.process`): the shipped model, a real child."""

from __future__ import annotations

import asyncio

import pytest

from llm.engine import DiffusionEngine
from llm.engine_process import EngineProcessError, ProcessEngine, start_engine
from llm.settings import LLMSettings

GREETING = [{"role": "system", "content": "You are a friendly voice assistant."},
            {"role": "user", "content": "Hi there, how are you doing today?"}]


@pytest.fixture(scope="module")
def remote():
    engine = start_engine(LLMSettings(engine={"process": True}))
    assert isinstance(engine, ProcessEngine)
    yield engine
    engine.close()


def test_a_reply_from_the_engine_process_is_the_in_process_reply(remote):
    local = DiffusionEngine.from_settings(LLMSettings())
    try:
        want, want_stats = local.generate(GREETING)
    finally:
        local.close()
    spans = list(remote.stream(GREETING))
    got = remote.stream(GREETING, session_id="a")
    kept_spans = list(got)
    assert "".join(s.text for s in kept_spans) == want == "".join(s.text for s in spans)
    assert [t for s in spans for t in s.token_ids] == [t for s in kept_spans for t in s.token_ids]
    assert got.stats.finish_reason == want_stats.finish_reason == "eot"
    assert got.stats.nfe == want_stats.nfe
    assert remote.accepts_drafts == local.accepts_drafts


LONG = [{"role": "user", "content": "Tell me something interesting about the ocean."}]


def test_cancel_from_the_event_loop_reaches_the_engine_process(remote):
    full = remote.generate(LONG)[1]
    assert full.finish_reason == "eot" and full.nfe > 20  # a reply of many steps

    async def cancel_at_once():
        stream = remote.stream(LONG)
        stream.cancel()
        return [span async for span in stream], stream.stats

    spans, stats = asyncio.run(cancel_at_once())
    assert stats.finish_reason == "cancelled" and stats.nfe < full.nfe
    assert remote.generate(GREETING)[1].finish_reason == "eot"  # the process serves on


def test_an_ended_session_is_forgotten_in_the_engine_process(remote):
    first = remote.generate(GREETING, session_id="call")[1]
    again = remote.generate(GREETING, session_id="call")[1]
    assert again.cached_prompt_tokens == first.prompt_tokens - 1  # the conversation was kept
    remote.end_session("call")
    assert remote.generate(GREETING, session_id="call")[1].cached_prompt_tokens == 0


def test_a_closed_engine_process_refuses_requests_and_a_failed_start_says_why():
    engine = ProcessEngine(LLMSettings())
    engine.close()
    with pytest.raises(EngineProcessError, match="exited"):
        engine.stream(GREETING)
    with pytest.raises(EngineProcessError, match="failed to start"):
        ProcessEngine(LLMSettings(model="/nonexistent/model"))
