"""`diffvoice livekit`: the worker's job entry point builds the shared session; no server here.

A LiveKit server is not available offline, so the entry point runs with a fake job context
whose room is a real, never-connected `rtc.Room`: LiveKit's RoomIO attaches to it exactly as
it would in a dispatched job.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from livekit import rtc
from livekit.agents import AgentServer, JobExecutorType

from agent import livekit_worker
from agent.cli import main
from agent.livekit_worker import REQUIRED_ENV, DiffvoiceWorker
from agent.llm_plugin import DiffusionLLM
from agent.session import Models, build_session
from agent.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
from agent_fakes import FakeEngine, FakeSTT, FakeTTS  # noqa: E402


@pytest.fixture(scope="module")
def models() -> Models:
    from livekit.plugins import silero

    return Models(engine=FakeEngine(reply=["Hello."]), stt=FakeSTT([]), tts=FakeTTS(),
                  vad=silero.VAD.load(), turn_detector=None)


def _settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({
        "session": {"turn_detector": "vad", "greeting": "Hi there."},
        "phone": {"metrics_log": str(tmp_path / "turns.jsonl")},
    })


def _fake_job(job_id: str = "AJ_test") -> SimpleNamespace:
    return SimpleNamespace(job=SimpleNamespace(id=job_id), room=rtc.Room())


def test_missing_environment_exits_with_a_message_naming_each_variable(monkeypatch, capsys):
    for name in REQUIRED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIVEKIT_URL", "ws://127.0.0.1:7880")
    assert main(["livekit", "start"]) == 2
    err = capsys.readouterr().err
    assert "LIVEKIT_API_KEY" in err and "LIVEKIT_API_SECRET" in err
    assert "set LIVEKIT_URL" not in err  # the one that is set is not asked for
    assert livekit_worker.missing_env({n: "x" for n in REQUIRED_ENV}) == []
    assert livekit_worker.missing_env({"LIVEKIT_URL": ""}) == list(REQUIRED_ENV)


async def test_the_job_session_is_the_shared_factorys(tmp_path, models):
    settings = _settings(tmp_path)
    worker = DiffvoiceWorker(settings, models)
    session, agent = worker.new_session(_fake_job())
    reference, reference_agent = build_session(settings, models, session_id="other")
    assert isinstance(session.llm, DiffusionLLM)
    assert session.stt is models.stt and session.tts is models.tts and session.vad is models.vad
    assert session.options == reference.options
    assert agent.instructions == reference_agent.instructions == settings.llm.system_prompt


async def test_the_entry_point_starts_the_session_on_the_jobs_room(tmp_path, models):
    worker = DiffvoiceWorker(_settings(tmp_path), models)
    job = _fake_job("AJ_room")
    await worker.entrypoint(job)
    session = worker.sessions["AJ_room"]
    try:
        assert session.input.audio is not None and session.output.audio is not None  # RoomIO
        assert session.agent_state in ("listening", "speaking", "thinking")
        for digit in "12#":  # a SIP caller's keypad, as LiveKit reports it
            job.room.emit("sip_dtmf_received", rtc.SipDTMF(code=0, digit=digit))
        async with asyncio.timeout(5):
            pressed = "I pressed 1 2 on the keypad."
            while not any(pressed in str(r) for r in models.engine.requests):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polls the scripted engine
    finally:
        await session.aclose()
    assert "AJ_room" not in worker.sessions


async def test_the_server_runs_jobs_in_threads_sharing_the_models(tmp_path, models):
    server = DiffvoiceWorker(_settings(tmp_path), models).server(
        ws_url="ws://127.0.0.1:7880", api_key="key", api_secret="secret")
    assert isinstance(server, AgentServer)
    # AgentServer has no public accessor for these; the thread executor is what lets every
    # job share one engine and one set of speech models
    assert server._job_executor_type == JobExecutorType.THREAD
    assert server._entrypoint_fnc is not None and server._agent_name == ""


_RUN_WORKER = """
import argparse, sys
sys.path.insert(0, "tests")
from agent_fakes import FakeEngine, FakeSTT, FakeTTS
import agent.session
from agent import livekit_worker
from agent.settings import Settings
agent.session.load_models = lambda settings: agent.session.Models(
    engine=FakeEngine(), stt=FakeSTT([]), tts=FakeTTS(), vad=None, turn_detector=None)
settings = Settings.model_validate({"session": {"turn_detector": "vad"}})
sys.exit(livekit_worker.run(argparse.Namespace(mode="start"), settings))
"""


def _read_until(proc, needle: str, timeout_s: float) -> str:
    import threading

    lines: list[str] = []
    found = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if needle in line.lower():
                found.set()
        found.set()  # the process ended

    threading.Thread(target=pump, daemon=True).start()
    found.wait(timeout_s)
    proc.terminate()
    proc.wait(10)
    return "".join(lines)


@pytest.mark.slow
def test_start_hands_over_to_livekits_worker_which_dials_the_server(tmp_path):
    """With the variables set, `start` reaches LiveKit's worker loop, which tries LIVEKIT_URL
    (a closed port here) and retries; the process is then stopped."""
    import os
    import subprocess

    env = {**os.environ, "LIVEKIT_URL": "ws://127.0.0.1:9", "LIVEKIT_API_KEY": "key",
           "LIVEKIT_API_SECRET": "secret"}
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", _RUN_WORKER], env=env,
                            cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # read until the worker has tried the server (slow to import on a loaded machine), then stop
    out = _read_until(proc, "failed to connect to livekit", timeout_s=90)
    assert "starting worker" in out
    assert "failed to connect to livekit" in out
