"""The engine in its own process (`llm.engine.process`): the shipped model, a real child."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_a_bad_request_fails_alone_and_the_engine_process_serves_on(remote):
    good = remote.stream(GREETING)
    bad = remote.stream([{"role": "tool", "content": "42"}])  # a role no chat template has
    with pytest.raises(RuntimeError, match="TokenizerError: unknown chat role 'tool'"):
        list(bad)
    assert "".join(s.text for s in good) and good.stats.finish_reason == "eot"
    assert remote.generate(GREETING)[1].finish_reason == "eot"


# a parent that starts an engine process, says its pid and waits to be killed
PARENT = """
import time
from llm.engine_process import ProcessEngine
from llm.settings import LLMSettings
engine = ProcessEngine(LLMSettings(model="random:tiny", dtype="float32", threads=1))
print(engine._proc.pid, flush=True)
time.sleep(600)
"""
ORPHAN_EXIT_S = 10.0  # the child looks for its parent every second


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_engine_process_exits_when_its_parent_is_killed():
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=root, stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)  # no clean-up of any kind
        parent.wait()
        deadline = time.monotonic() + ORPHAN_EXIT_S
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(child)
    finally:
        parent.kill()
        parent.wait()
        if child is not None and running(child):
            os.kill(child, signal.SIGKILL)


def test_a_closed_engine_process_refuses_requests_and_a_failed_start_says_why():
    engine = ProcessEngine(LLMSettings())
    engine.close()
    with pytest.raises(EngineProcessError, match="exited"):
        engine.stream(GREETING)
    with pytest.raises(EngineProcessError, match="failed to start"):
        ProcessEngine(LLMSettings(model="/nonexistent/model"))
