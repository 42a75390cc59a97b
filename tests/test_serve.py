"""`diffvoice serve` in-process: WebRTC callers, signalling faults, guards, freed resources."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import real_parts
import websockets
from agent_fakes import FakeEngine, FakeSTT, FakeTTS
from livekit.plugins import silero
from speech_samples import spoken
from webrtc_client import WebRTCCaller

from agent.serve import BrowserServer
from agent.session import Models
from agent.settings import Settings, load_settings
from agent.signalling import SignallingError, check_bind, check_port_free, parse_message
from agent.webrtc import OfferError, check_offer, set_jitter_prefetch

# fixtures with the real models, shared by the modules that need them
real_settings = real_parts.real_settings
real_models = real_parts.real_models
QUESTION = "What is the weather like today?"


def _settings(*extra: str, tmp_path=None) -> Settings:
    log = f'"{tmp_path / "turns.jsonl"}"' if tmp_path else '""'
    return load_settings(overrides=[
        "server.port=0", "session.turn_detector=\"vad\"", "session.aec_warmup_s=0.0",
        "session.greeting=\"Hello there, how can I help you today?\"",
        f"server.metrics_log={log}", *extra,
    ])


@pytest.fixture(scope="module")
def vad():
    return silero.VAD.load(min_silence_duration=0.3)


def _models(vad, engine=None) -> Models:
    return Models(engine=engine or FakeEngine(reply=["It is sunny. "]),
                  stt=FakeSTT([QUESTION] * 20), tts=FakeTTS(), vad=vad, turn_detector=None)


async def _server(settings: Settings, models: Models) -> tuple[BrowserServer, str]:
    server = BrowserServer(settings, models)
    await server.start()
    return server, f"ws://127.0.0.1:{server.signalling.port}/ws"


async def _wait(predicate, within: float) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - polling state owned by other libraries
            await asyncio.sleep(0.05)


# ---- pure checks ------------------------------------------------------------------------
def test_offer_checks():
    with pytest.raises(OfferError, match="no audio"):
        check_offer("v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
    with pytest.raises(OfferError, match="Opus"):
        check_offer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n")
    check_offer("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n")


async def test_the_microphone_jitter_prefetch_is_set_before_media_flows():
    from aiortc import RTCPeerConnection

    caller, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTransceiver("audio")
        await caller.setLocalDescription(await caller.createOffer())
        await server.setRemoteDescription(caller.localDescription)
        assert set_jitter_prefetch(server, 2)
        (transceiver,) = server.getTransceivers()
        buffer = transceiver.receiver._RTCRtpReceiver__jitter_buffer
        assert buffer._prefetch == 2 and buffer.capacity == 16
    finally:
        await caller.close()
        await server.close()


def test_message_parsing():
    assert parse_message('{"type": "bye"}') == {"type": "bye"}
    huge_int, deep = '{"n": ' + "9" * 5000 + "}", "[" * 100_000
    for bad in ("{", "[]", '{"type": "hack"}', '{"type": "offer"}', b"\x00", huge_int, deep):
        with pytest.raises(SignallingError):  # sent back to the page, not a dead handler
            parse_message(bad)


def test_non_loopback_bind_needs_token():
    s = load_settings(overrides=['server.host="0.0.0.0"'])
    with pytest.raises(ValueError, match="access_token"):
        check_bind(s.server)
    check_bind(load_settings(overrides=['server.host="0.0.0.0"', 'server.access_token="t"']).server)


# ---- a conversation over WebRTC ---------------------------------------------------------
@pytest.mark.slow
async def test_webrtc_caller_talks_with_the_agent(vad, tmp_path):
    server, url = await _server(_settings(tmp_path=tmp_path), _models(vad))
    caller = WebRTCCaller(url, jitter_prefetch=1)  # a browser-like receive buffer
    try:
        await caller.connect()
        (transceiver,) = caller.pc.getTransceivers()
        assert transceiver.receiver._RTCRtpReceiver__jitter_buffer._prefetch == 1
        await _wait(lambda: caller.audible_frames > 10, within=10)  # the greeting
        heard_greeting = caller.audible_frames
        caller.mic.say(spoken(QUESTION))
        await _wait(lambda: len(caller.of_type("turn_metrics")) >= 2, within=20)
        await _wait(lambda: caller.audible_frames > heard_greeting + 10, within=10)
    finally:
        await caller.close()
        await server.close()
    finals = [e["text"] for e in caller.of_type("user_transcript") if e["final"]]
    assert finals == [QUESTION]
    assert "sunny" in "".join(e["text"] for e in caller.of_type("agent_text"))
    metrics = caller.of_type("turn_metrics")[-1]
    # e2e needs LiveKit's user-turn timestamps, which a fast scripted STT can race past
    assert {"llm_ttft_s", "tts_ttfb_s"} <= metrics.keys()
    logged = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert logged and "llm_ttft_s" in logged[-1] and "text" not in logged[-1]


@pytest.mark.slow
async def test_two_visitors_then_everything_freed(vad):
    engine = FakeEngine(reply=["It is sunny. "])
    server, url = await _server(_settings(), _models(vad, engine))
    tasks_before = len(asyncio.all_tasks())
    threads_before = _threads()
    callers = [WebRTCCaller(url), WebRTCCaller(url)]
    try:
        for c in callers:
            await c.connect()
        for c in callers:
            c.mic.say(spoken(QUESTION))
        await _wait(lambda: all(_said(c, "sunny") for c in callers), within=20)
        assert len({m[0]["content"] for m in engine.requests}) == 1  # same system prompt
        assert len(server.visitors) == 2
        ids = sorted(v.id for v in server.visitors)
        await callers[0].close()  # hang up mid-conversation: the other goes on
        await _wait(lambda: sum(not v.closed.is_set() for v in server.visitors) == 1, within=10)
        gone = next(v.id for v in server.visitors if v.closed.is_set())
        assert engine.ended == [gone]  # its kept K/V are given back, the other's are not
        callers[1].mic.say(spoken(QUESTION))
        await _wait(lambda: len(callers[1].of_type("turn_metrics")) >= 3, within=20)
    finally:
        for c in callers:
            await c.close()
    await _wait(lambda: all(v.closed.is_set() for v in server.visitors), within=10)
    await server.close()
    await asyncio.sleep(0.5)
    assert all(v.pc.connectionState == "closed" for v in server.visitors)
    assert sorted(engine.ended) == ids
    assert len(asyncio.all_tasks()) <= tasks_before + 1  # this test's own task may remain
    assert _threads() <= threads_before


def _threads() -> set[str]:
    """Live threads, less the event loop's default executor (a bounded, reused pool)."""
    return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def _said(caller: WebRTCCaller, word: str) -> bool:
    return word in "".join(e["text"] for e in caller.of_type("agent_text"))


# ---- faults and guards ------------------------------------------------------------------
async def test_bad_signalling_messages_get_clear_errors(vad):
    settings = _settings("server.max_message_bytes=2048")
    server, url = await _server(settings, _models(vad))
    try:
        async with websockets.connect(url) as ws:
            await ws.send("not json")
            assert "malformed JSON" in json.loads(await ws.recv())["message"]
            await ws.send(json.dumps({"type": "offer", "sdp": "v=0\r\n"}))
            assert "no audio" in json.loads(await ws.recv())["message"]
        async with websockets.connect(url) as ws:
            await ws.send("x" * 4096)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009  # message too big
    finally:
        await server.close()
    assert not any(not v.closed.is_set() for v in server.visitors)


async def test_unsupported_codec_is_refused(vad):
    server, url = await _server(_settings(), _models(vad))
    caller = WebRTCCaller(url)
    try:
        caller.pc.addTrack(caller.mic)
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        sdp = "\r\n".join(line for line in caller.pc.localDescription.sdp.split("\r\n")
                          if "opus" not in line.lower())
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": sdp}))
            assert "Opus" in json.loads(await ws.recv())["message"]
    finally:
        await caller.close()
        await server.close()


async def test_token_origin_and_session_cap(vad):
    settings = _settings('server.access_token="s3cret"', "server.max_sessions=1")
    server, url = await _server(settings, _models(vad))
    try:
        for bad in (url, url + "?token=wrong"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(bad)
            assert refused.value.response.status_code == 403
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(url + "?token=s3cret", origin="http://evil.example")
        async with websockets.connect(url + "?token=s3cret") as first:
            async with websockets.connect(url + "?token=s3cret") as second:
                assert "busy" in json.loads(await second.recv())["message"]
            await first.send(json.dumps({"type": "bye"}))
    finally:
        await server.close()


@pytest.mark.slow
async def test_peer_that_never_completes_ice_is_dropped(vad):
    settings = _settings("server.ice_timeout_s=1.0", "server.max_sessions=1")
    server, url = await _server(settings, _models(vad))
    caller = WebRTCCaller(url)
    try:
        caller.pc.addTrack(caller.mic)
        caller.pc.createDataChannel("events")
        await caller.pc.setLocalDescription(await caller.pc.createOffer())
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "offer", "sdp": caller.pc.localDescription.sdp}))
            assert json.loads(await ws.recv())["type"] == "answer"  # never applied: no ICE
            assert "timed out" in json.loads(await ws.recv())["message"]
            with pytest.raises(websockets.ConnectionClosedOK):  # the server hangs up the page
                async with asyncio.timeout(5):
                    await ws.recv()
        await _wait(lambda: all(v.closed.is_set() for v in server.visitors), within=5)
        await _wait(lambda: not server.signalling.active, within=5)  # its place is free
        async with websockets.connect(url) as again:
            await again.send(json.dumps({"type": "bye"}))
    finally:
        await caller.close()
        await server.close()


@pytest.mark.slow
async def test_a_conversation_the_server_ends_hangs_up_the_page(vad):
    server, url = await _server(_settings("server.max_sessions=1"), _models(vad))
    caller = WebRTCCaller(url)
    try:
        await caller.connect()
        await _wait(lambda: any(v.session is not None for v in server.visitors), within=10)
        (visitor,) = server.visitors
        await visitor.session.aclose()  # as a session ends on a fatal error
        await _wait(lambda: caller.ws.close_code is not None, within=5)  # the page hangs up
        assert caller.ws.close_code == 1000 and caller.ws.close_reason == "conversation ended"
        await _wait(lambda: not server.signalling.active, within=5)  # and its place is free
    finally:
        await caller.close()
        await server.close()


async def test_page_is_served(vad):
    server, url = await _server(_settings(), _models(vad))
    base = url.replace("ws://", "http://").removesuffix("/ws")
    try:
        body = await asyncio.to_thread(_get, base + "/")
        assert "diffvoice" in body
        assert "RTCPeerConnection" in await asyncio.to_thread(_get, base + "/app.js")
        with pytest.raises(Exception, match="404"):
            await asyncio.to_thread(_get, base + "/../agent/serve.py")
    finally:
        await server.close()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.mark.slow
async def test_webrtc_caller_with_the_real_models(real_settings, real_models):
    server, url = await _server(real_settings, real_models)
    caller = WebRTCCaller(url)
    try:
        await caller.connect()
        caller.mic.say(spoken(QUESTION))
        await _wait(lambda: caller.of_type("turn_metrics"), within=30)
        reply = "".join(e["text"] for e in caller.of_type("agent_text"))
        if reply.strip():
            await _wait(lambda: caller.audible_frames > 5, within=10)
    finally:
        await caller.close()
        await server.close()
    finals = [e["text"] for e in caller.of_type("user_transcript") if e["final"]]
    assert any("weather" in f.lower() for f in finals)  # Whisper heard the question over Opus
    assert caller.of_type("agent_text"), "no committed reply text reached the page"
    assert "llm_ttft_s" in caller.of_type("turn_metrics")[-1]


@pytest.mark.slow
async def test_a_failing_turn_hurts_no_other_visitor(vad):
    engine = FakeEngine(reply=["It is sunny. "], fail_next=1)
    settings = _settings('session.greeting=""')
    server, url = await _server(settings, _models(vad, engine))
    callers = [WebRTCCaller(url), WebRTCCaller(url)]
    try:
        for c in callers:
            await c.connect()
        callers[0].mic.say(spoken(QUESTION))
        await _wait(lambda: callers[0].of_type("error"), within=20)  # the first request fails
        callers[1].mic.say(spoken(QUESTION))
        await _wait(lambda: _said(callers[1], "sunny"), within=20)
        callers[0].mic.say(spoken(QUESTION))  # and the failed conversation goes on
        await _wait(lambda: _said(callers[0], "sunny"), within=20)
    finally:
        for c in callers:
            await c.close()
        await server.close()
    assert "error" in callers[0].of_type("error")[0]["message"]


def test_serve_command_refuses_an_open_bind_without_token(capsys):
    from agent.cli import main

    assert main(["serve", "--set", 'server.host="0.0.0.0"']) == 2  # before any model loads
    assert "access_token" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "setting"), [("serve", "server.port"),
                                                  ("phone", "phone.port")])
def test_a_port_another_server_holds_is_refused_before_the_models_load(command, setting,
                                                                      capsys):
    import socket

    from agent.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([command, "--set", f"{setting}={port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and setting in err
    check_port_free("127.0.0.1", port, setting)  # free again: no error


@pytest.mark.slow
def test_serve_command_runs_and_stops_on_ctrl_c(real_settings):
    import os
    import signal
    import subprocess
    import sys

    model = f'llm.model="{real_settings.llm.model}"'
    cmd = [sys.executable, "-m", "agent.cli", "serve", "--set", model,
           "--set", "server.port=0", "--set", 'server.metrics_log=""']
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()  # models load first; then the URL
        assert line.startswith("diffvoice: open http://localhost:"), line
        url = line.split()[2]
        assert "diffvoice" in _get(url)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
