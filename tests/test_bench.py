"""`diffvoice bench`: breakdown arithmetic, inputs, and the command end to end on real models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent import bench, bench_report
from agent.cli import main
from agent.clients import HeardAudio, SpeechTrack, advance_ends, last_sound_index
from audio.codecs import write_wav
from audio.speech_eval import MicNoise

SERVER = {"end_of_utterance_delay_s": 0.5, "transcription_delay_s": 0.3, "llm_ttft_s": 0.2,
          "tts_ttfb_s": 0.1, "e2e_latency_s": 0.9}


def test_breakdown_lays_server_stages_end_to_end():
    b = bench.breakdown_s(1.2, SERVER)
    assert b == pytest.approx({"endpoint_s": 0.2, "transcript_s": 0.3, "llm_s": 0.2,
                               "tts_s": 0.1, "transport_playout_s": 0.4})
    assert sum(b.values()) == pytest.approx(1.2)


def test_breakdown_counts_only_llm_time_after_the_turn_decision():
    # preemptive generation: the LLM started before the turn ended; e2e bounds what is left
    b = bench.breakdown_s(1.0, {**SERVER, "llm_ttft_s": 0.7, "e2e_latency_s": 0.8})
    assert b["llm_s"] == pytest.approx(0.3) and b["tts_s"] == pytest.approx(0.0)
    assert sum(b.values()) == pytest.approx(1.0)
    assert bench.breakdown_s(1.0, {"end_of_utterance_delay_s": 0.5}) is None


def test_hops_split_transport_on_a_shared_clock():
    m = {**SERVER, "user_stopped_speaking_at": 1000.15, "agent_started_speaking_at": 1001.05}
    # monotonic 10.0 = Unix 1000.0: speech ended at 10.0, the first audible sample at 11.2
    h = bench.hops_s(m, t_end=10.0, t_heard=11.2, wall_offset_s=990.0)
    assert h == pytest.approx({"speech_end_lag_s": 0.15, "playout_s": 0.15})
    assert bench.hops_s(SERVER, 10.0, 11.2, 990.0) is None


def test_heard_audio_times_the_first_loud_sample():
    heard = HeardAudio(level=500)
    quiet, loud = np.zeros(480, np.int16), np.zeros(480, np.int16)
    loud[240:] = 4000
    heard.add(1.0, quiet, 48000)
    heard.add(2.0, loud, 48000)
    assert len(heard) == 1
    assert heard.first_audible_s(after_s=0.5) == pytest.approx(2.005)
    assert heard.first_audible_s(after_s=2.5) is None
    assert last_sound_index(loud) == 479 and last_sound_index(quiet) == -1


def test_stretch_pause_lengthens_the_longest_pause_between_words():
    word, rate = np.full(1600, 3000, np.int16), 16000  # 100 ms words
    gap = lambda ms: np.zeros(ms * rate // 1000, np.int16)  # noqa: E731
    pcm = np.concatenate([gap(200), word, gap(60), word, gap(150), word, gap(300)])
    out = bench.stretch_pause(pcm, 400, level=500)
    assert len(out) == len(pcm) + 250 * rate // 1000  # the 150 ms pause became 400 ms
    loud = np.flatnonzero(out > 500)
    pauses = np.diff(loud)[np.diff(loud) > 1] - 1
    assert sorted(pauses) == [60 * rate // 1000, 400 * rate // 1000]
    # leading and trailing silence are not pauses; a long enough pause is left alone
    assert bench.stretch_pause(pcm, 100, level=500) is pcm
    assert bench.stretch_pause(np.concatenate([gap(50), word, gap(50)]), 400, 500).size == 3200


class _Caller:
    """Timing logic only: an agent first heard at `t_audible` (monotonic clock)."""

    def __init__(self, t_audible: float | None, speech_s: float) -> None:
        self.heard, self.events, self.speech_s = HeardAudio(level=500), [], speech_s
        self.lost: str | None = None
        if t_audible is not None:
            self.heard.add(t_audible, np.full(480, 4000, np.int16), 48000)

    async def speak(self, pcm) -> float:
        import asyncio
        import time

        await asyncio.sleep(self.speech_s)
        return time.monotonic()


async def test_an_agent_heard_before_the_last_word_is_a_cut_in():
    import time

    from agent.settings import BenchSettings

    b = BenchSettings(settle_s=0.0, reply_timeout_s=0.05, metrics_timeout_s=0.05)
    utt = bench.Utterance("Is it going to rain?", np.zeros(160, np.int16))
    rec = await bench.measure_turn(_Caller(time.monotonic() + 0.05, 0.2), utt, b)
    assert rec["status"] == "cut_in" and rec["latency_s"] is None
    assert rec["t_first_audible_s"] < rec["t_speech_end_s"]
    assert set(rec) | {"config"} <= bench_report.TURN_KEYS
    late = await bench.measure_turn(_Caller(None, 0.05), utt, b)
    assert late["status"] == "dropped"  # never heard: not a cut-in
    s = bench_report.summarize([{**rec, "cold": False}, {**late, "cold": False}])
    assert s["cut_in_turns"] == 1 and s["dropped_turns"] == 1 and s["warm"]["n"] == 0
    assert s["reply_words"] == {"median": None, "max": None}  # nothing was answered


async def test_after_a_cut_in_the_rest_of_the_turn_is_answered_before_the_next_one():
    import asyncio
    import time

    from agent.settings import BenchSettings

    caller = _Caller(time.monotonic() + 0.05, 0.2)  # cut in before the last word

    async def server() -> None:  # the words after the cut-in: answered, then their metrics
        await asyncio.sleep(0.3)
        caller.heard.add(time.monotonic(), np.full(480, 4000, np.int16), 48000)
        await asyncio.sleep(0.2)
        caller.events.append({"type": "turn_metrics", "e2e_latency_s": 0.5})

    b = BenchSettings(settle_s=0.0, reply_timeout_s=2.0, metrics_timeout_s=2.0)
    task = asyncio.create_task(server())
    utt = bench.Utterance("Is it going to rain?", np.zeros(160, np.int16))
    rec = await bench.measure_turn(caller, utt, b)
    assert rec["status"] == "cut_in" and task.done()  # the next turn starts after them
    assert caller.events[-1]["type"] == "turn_metrics"


async def test_a_caller_whose_server_went_away_fails_at_once_not_after_the_timeouts():
    import asyncio
    import time

    from agent.settings import BenchSettings

    b = BenchSettings(settle_s=0.0, reply_timeout_s=30.0, metrics_timeout_s=60.0)
    utt = bench.Utterance("Is it going to rain?", np.zeros(160, np.int16))
    caller = _Caller(None, 0.05)  # no reply will ever be heard

    async def server_dies() -> None:
        await asyncio.sleep(0.2)
        caller.lost = "the server closed the signalling connection"

    task = asyncio.create_task(server_dies())
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="signalling"):
        await bench.measure_turn(caller, utt, b)
    assert time.monotonic() - t0 < 1.0 and task.done()

    class Gone(_Caller):  # connects, then the server is gone before its greeting
        async def connect(self) -> None:
            self.lost = "the WebRTC connection failed"

        async def close(self) -> None:
            pass

    class Progress:
        def update(self, n: int) -> None:
            pass

    t0 = time.monotonic()
    turns = await bench.run_caller(lambda ci: Gone(None, 0.0), [[utt, utt]], b,
                                   {"progress": Progress()}, first_is_cold=True)
    assert [t["status"] for t in turns] == ["failed", "failed"]
    assert all("WebRTC connection failed" in t["error"] for t in turns)
    assert time.monotonic() - t0 < 1.0


async def test_an_in_process_caller_knows_when_its_session_ended_itself():
    from agent_fakes import FakeEngine, FakeSTT, FakeTTS
    from livekit.plugins import silero

    from agent.clients import InProcessCaller
    from agent.session import Models
    from agent.settings import Settings

    settings = Settings.model_validate({"session": {"turn_detector": "vad", "greeting": "",
                                                    "aec_warmup_s": 0.0}})
    models = Models(engine=FakeEngine(), stt=FakeSTT([]), tts=FakeTTS(), vad=silero.VAD.load(),
                    turn_detector=None)
    caller = InProcessCaller(settings, models)
    await caller.connect()
    assert caller.lost is None
    await caller.session.aclose()  # as LiveKit does after repeated unrecoverable errors
    assert caller.lost == "the session closed (user_initiated)"
    await caller.close()


async def test_a_running_servers_greeting_is_heard_out_before_the_first_turn():
    import asyncio
    import time

    from agent.settings import BenchSettings

    caller = _Caller(None, 0.0)

    async def server() -> None:  # media flows, the session starts, then it greets
        await asyncio.sleep(0.1)
        caller.events.append({"type": "agent_state", "state": "listening"})
        await asyncio.sleep(0.4)  # synthesising the greeting: still "listening", no sound
        caller.events.append({"type": "agent_state", "state": "speaking"})
        for _ in range(5):
            caller.heard.add(time.monotonic(), np.full(480, 4000, np.int16), 48000)
            await asyncio.sleep(0.04)
        caller.events.append({"type": "agent_state", "state": "listening"})

    b = BenchSettings(settle_s=0.15, reply_timeout_s=2.0)
    task = asyncio.create_task(server())
    t0 = time.monotonic()
    await bench._wait_greeting(caller, b)
    greeted = caller.heard.chunks[-1][0]
    assert task.done() and time.monotonic() >= greeted + b.settle_s
    assert time.monotonic() - t0 < 1.5
    mute = _Caller(None, 0.0)  # a server that does not greet: its first turn waits a while
    mute.events.append({"type": "agent_state", "state": "listening"})
    t0 = time.monotonic()
    await bench._wait_greeting(mute, BenchSettings(settle_s=0.0, greeting_timeout_s=0.2))
    assert 0.2 <= time.monotonic() - t0 < 1.0
    silent = _Caller(None, 0.0)  # a server whose session never starts
    with pytest.raises(TimeoutError):
        await bench._wait_greeting(silent, BenchSettings(settle_s=0.0, reply_timeout_s=0.1))


async def test_a_self_started_servers_greeting_is_heard_out_on_any_transport():
    """No agent state needed (the phone line has none): the greeting's audio, then quiet."""
    import asyncio
    import time

    from agent.settings import BenchSettings

    caller = _Caller(None, 0.0)

    async def server() -> None:
        await asyncio.sleep(0.1)
        for _ in range(5):
            caller.heard.add(time.monotonic(), np.full(480, 4000, np.int16), 48000)
            await asyncio.sleep(0.04)

    b = BenchSettings(settle_s=0.15, reply_timeout_s=2.0)
    task = asyncio.create_task(server())
    await bench._wait_greeted(caller, b, time.monotonic())
    assert task.done() and time.monotonic() >= caller.heard.chunks[-1][0] + b.settle_s
    with pytest.raises(TimeoutError, match="no greeting"):  # a greeting that never comes
        await bench._wait_greeted(_Caller(None, 0.0), BenchSettings(reply_timeout_s=0.1),
                                  time.monotonic())


async def test_staggered_callers_call_one_after_another(monkeypatch):
    """With `bench.stagger_s`, caller s connects s * stagger_s after the level starts."""
    import time

    from agent.settings import Settings

    connected: dict[int, float] = {}

    class Dialler(_Caller):
        def __init__(self, session: int):
            super().__init__(None, 0.0)
            self.session = session

        async def connect(self) -> None:
            connected[self.session] = time.monotonic()

        async def close(self) -> None:
            pass

    async def turn(caller, utt, b, **kw):
        return {"status": "ok"}

    async def quiet(caller, b):
        pass

    monkeypatch.setattr(bench, "caller_factory",
                        lambda settings, models, server, url, s: lambda ci: Dialler(s))
    monkeypatch.setattr(bench, "measure_turn", turn)
    monkeypatch.setattr(bench, "_wait_quiet", quiet)
    utt = bench.Utterance("Hi.", np.zeros(160, np.int16))
    settings = Settings.model_validate({"bench": {"transport": "inprocess", "stagger_s": 0.15},
                                        "session": {"greeting": ""}})

    class Progress:
        def update(self, n: int) -> None:
            pass

    t0 = time.monotonic()
    turns = await bench.run_level(settings, None, None, None, [[utt]], 3,
                                  {"progress": Progress()}, cold=False)
    assert [t["session"] for t in turns] == [0, 1, 2] and all(t["status"] == "ok" for t in turns)
    starts = [connected[s] - t0 for s in range(3)]
    assert starts[0] < 0.1 and 0.15 <= starts[1] < 0.25 and 0.3 <= starts[2] < 0.4


def test_the_plot_shows_latency_against_callers_for_a_sessions_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def turn(n: int, latency: float | None) -> dict:
        status = "ok" if latency is not None else "dropped"
        b = None if latency is None else {s: latency / len(bench_report.STAGES)
                                          for s in bench_report.STAGES}
        return {"sessions": n, "cold": False, "status": status, "latency_s": latency,
                "breakdown_s": b}

    by_level = {1: [0.6, 0.62], 2: [0.7, 0.9], 3: [1.1, None]}  # the third level lost a turn
    turns = [turn(n, lat) for n, lats in by_level.items() for lat in lats]
    levels = [{"sessions": n, "summary": bench_report.summarize([t for t in turns
                                                                 if t["sessions"] == n])}
              for n in by_level]
    run = {"config": "a", "turns": turns, "levels": levels}
    fig, ax = plt.subplots()
    bench_report._latency_by_callers(ax, [run])
    p50, p95, ring = ax.lines
    assert list(p50.get_xdata()) == [1, 2, 3]
    assert list(p50.get_ydata()) == pytest.approx([610, 800, 1100])
    assert p95.get_ydata()[1] == pytest.approx(890)
    assert list(ring.get_xdata()) == [3]  # only the level that lost a turn is ringed
    plt.close(fig)
    bench_report.plot_png([run], tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_whose_turns_all_failed_still_plots_without_warnings(tmp_path):
    import warnings

    failed = {"sessions": 1, "cold": False, "status": "failed", "latency_s": None,
              "breakdown_s": None}
    run = {"config": "a", "turns": [failed],
           "levels": [{"sessions": 1, "summary": bench_report.summarize([failed])}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bench_report.plot_png([run], tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_mic_noise_floor_is_at_its_level_and_off_by_default():
    silence = np.zeros(48000, np.int16)
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    assert rms(MicNoise(-40).add(silence)) == pytest.approx(327.7, rel=0.05)
    assert MicNoise(None).add(silence) is silence
    loud = np.full(480, 32767, np.int16)
    assert MicNoise(-30).add(loud).max() == 32767  # saturates, never wraps
    assert not np.array_equal(MicNoise(-40, seed=1).add(silence), MicNoise(-40).add(silence))


async def test_webrtc_microphone_sends_its_noise_floor_between_words():
    track = SpeechTrack(MicNoise(-50))
    frame = (await track.recv()).to_ndarray()
    assert 80 < np.sqrt(np.mean(frame.astype(np.float64) ** 2)) < 130  # -50 dBFS: ~104
    assert track.last_speech_end is None  # the noise floor is not speech
    track.stop()


def test_a_failed_turn_at_any_level_fails_the_bench():
    def level(n: int, failed: int) -> dict:
        return {"sessions": n, "summary": {"failed_turns": failed}}

    run = {"summary": {"failed_turns": 0}, "levels": [level(1, 0), level(2, 0)]}
    assert bench.exit_status([run]) == 0
    run["levels"].append(level(3, 2))  # the server died while three callers talked
    assert bench.exit_status([run]) == 1


def test_a_microphone_frame_is_sent_once_its_20_ms_are_captured():
    import asyncio

    async def resolve() -> float:
        done = asyncio.get_running_loop().create_future()
        ends = [(1, 0.005, done)]  # the last loud sample: 5 ms into the second frame from now
        ends = advance_ends(ends, now=10.0)
        assert ends and not done.done()
        assert advance_ends(ends, now=10.02) == []
        return await done

    # that frame went out at 10.02 s, when its 20 ms were captured: the sample was said at 10.005
    assert asyncio.run(resolve()) == pytest.approx(10.005)


async def test_the_microphone_ends_speech_at_the_bench_s_audible_level():
    # 0.1 s at 4000, then 0.1 s at 1000: above the level 500, under 2000
    pcm = np.concatenate([np.full(1600, 4000), np.full(1600, 1000), np.zeros(1600)])
    default, strict = SpeechTrack(), SpeechTrack(level=2000)
    default.say(pcm.astype(np.int16))
    strict.say(pcm.astype(np.int16))
    assert (strict._ends[0][0], default._ends[0][0]) == (4, 9)  # the 20 ms frame of its end


def test_stats_and_limits():
    st = bench_report.latency_stats([0.1, 0.2, 0.3, 0.4])
    assert st["n"] == 4 and st["p50"] == pytest.approx(0.25) and st["max"] == 0.4
    assert bench_report.latency_stats([])["p50"] is None
    u = bench.Utterance("x", np.zeros(10, np.int16))
    convs = bench.limit_turns([[u, u, u], [u, u]], 4)
    assert [len(c) for c in convs] == [3, 1]


def test_conversation_file_reads_wavs(tmp_path):
    write_wav(tmp_path / "a.wav", (np.sin(np.arange(8000) / 5) * 8000).astype(np.int16), 8000)
    script = tmp_path / "script.toml"
    script.write_text('[[conversation]]\nturns = ["a.wav", "a.wav"]\n')
    convs = bench.conversation_file(script, None)  # WAV items need no synthesis
    assert len(convs) == 1 and len(convs[0]) == 2
    assert len(convs[0][0].pcm) == 16000  # resampled to the mic rate
    (tmp_path / "notes.wav").write_text("not audio")
    bad = {
        "title = 'nothing'\n": "conversation",  # no conversation at all
        "[[conversation]]\nturn = ['hi']\n": "turn",  # a misspelt key is not ignored
        "[[conversation]]\nturns = []\n": "turns",
        "[[conversation]]\nturns = ['  ']\n": "turns",
        "[[conversation]]\nturns = [1]\n": "turns",
        "[[conversation]\nturns = ['hi']\n": "conversation script",  # not TOML
        "[[conversation]]\nturns = ['notes.wav']\n": "notes.wav: not a PCM WAV",
    }
    for text, named in bad.items():
        script.write_text(text)
        with pytest.raises(ValueError, match=named) as err:
            bench.conversation_file(script, None)
        assert err.match(str(script) if "notes.wav" not in text else "notes.wav")


def _check_report(out, transport: str, turns: int) -> None:
    doc = json.loads((out / "bench.json").read_text())
    assert {"version", "created", "command", "machine", "runs", "comparison", "text"} <= set(doc)
    (run,) = doc["runs"]
    assert run["transport"] == transport and len(run["turns"]) == turns
    for t in run["turns"]:
        assert set(t) == bench_report.TURN_KEYS, set(t) ^ bench_report.TURN_KEYS
        assert t["status"] == "ok", t
        assert t["latency_s"] > 0 and t["recognised_text"] and t["reply_text"]
        b = t["breakdown_s"]
        assert set(b) == set(bench_report.STAGES)
        assert all(b[s] >= 0 for s in bench_report.STAGES[:-1])
        assert math.isclose(sum(b.values()), t["latency_s"], rel_tol=0.1)
        # the server runs in this process: transport/playout is split on the shared clock, and
        # the two hops fit inside it (LiveKit's e2e runs between them and bounds the stages)
        h = t["hops_s"]
        assert set(h) == set(bench_report.HOPS) and h["playout_s"] > 0
        assert h["speech_end_lag_s"] + h["playout_s"] <= b["transport_playout_s"] + 0.005
        if transport != "twilio":  # a paced output (the phone line paces itself)
            assert t["server_s"]["reply_gaps_s"] >= 0
    assert [t["cold"] for t in run["turns"]] == [True] + [False] * (turns - 1)
    summary = run["summary"]
    assert summary["warm"]["n"] == turns - 1 and summary["cold"]["n"] == 1
    assert summary["gap_turns"] == sum(t["server_s"].get("reply_gaps_s", 0) > 0
                                       for t in run["turns"])
    words = [len(t["reply_text"].split()) for t in run["turns"]]
    assert summary["reply_words"] == {"median": float(np.median(words)), "max": max(words)}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "bench.html").read_text()
    assert "data:image/png;base64," in page and run["turns"][0]["prompt_text"] in page


# fast replies: the assertions are about measurement, not about what the agent says
_QUICK = ["--set", "llm.decode.max_new_tokens=24", "--set", "bench.settle_s=0.3",
          "--set", 'session.turn_detector="vad"']


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["inprocess", "webrtc", "twilio"])
def test_bench_command_end_to_end(transport, tmp_path, capsys):
    out = tmp_path / "bench"
    # a caller's microphone has a noise floor, as a real one does
    noise = ["--set", "bench.noise_floor_dbfs=-60"] if transport != "inprocess" else []
    rc = main(["bench", "--transport", transport, "--turns", "3", "--out", str(out), *_QUICK,
               *noise])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "p50=" in printed and "transport/playout" in printed
    _check_report(out, transport, 3)


def test_spoken_turns_are_cached_per_synthesis_setting():
    from audio.settings import TtsSettings

    default = bench.speech_key("Hello there.", TtsSettings())
    assert default == bench.speech_key("Hello there.", TtsSettings(clause_split_chars=80))
    others = {bench.speech_key("Hello there.", TtsSettings(**change))
              for change in ({"noise_scale": 0.0}, {"noise_w_scale": 0.0}, {"lead_in_ms": None},
                             {"length_scale": 1.2}, {"max_sentence_chars": 40})}
    assert len(others) == 5 and default not in others


async def test_a_server_process_that_cannot_start_says_why(tmp_path):
    import socket

    from agent.bench_server import ServerProcess, ServerProcessError
    from agent.settings import load_settings

    settings = load_settings(None, [f'llm.model="{tmp_path / "missing"}"'])
    child = ServerProcess(settings)
    with pytest.raises(ServerProcessError, match="loading the models failed.*missing"):
        await child.start()
    assert not child._proc.is_alive()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ServerProcess(load_settings(None, ["server.host=\"127.0.0.1\"",
                                                  f"server.port={port}"]))
        with pytest.raises(ServerProcessError, match="listening failed"):
            await busy.start()
    assert not busy._proc.is_alive()


def test_heard_audio_times_the_last_loud_sample_in_a_window():
    heard = HeardAudio(level=500)
    loud = np.zeros(480, np.int16)
    loud[:120] = 4000  # loud for the chunk's first 2.5 ms
    heard.add(1.0, loud, 48000)
    heard.add(1.02, loud, 48000)
    heard.add(3.0, loud, 48000)
    assert heard.last_audible_s(0.5, 2.0) == pytest.approx(1.02 + 119 / 48000)
    assert heard.last_audible_s(1.0, 1.01) == pytest.approx(1.0 + 119 / 48000)
    assert heard.last_audible_s(1.5, 2.9) is None


def _overlap(**kw) -> bench.Overlap:
    o = {"text": "Sorry, wait.", "events_at": 0, "t_start_s": 10.0, "t_end_s": 11.5,
         "could_stop_s": 10.5}
    return bench.Overlap(**{**o, **kw})


def _heard(*times: float) -> HeardAudio:
    heard = HeardAudio(level=500)
    for t in times:  # 10 ms chunks, loud throughout
        heard.add(t, np.full(480, 4000, np.int16), 48000)
    return heard


def test_a_reply_spoken_over_is_stopped_paused_talked_over_or_ended():
    # monotonic 10.0 = Unix 1000.0; the VAD heard the caller at 1000.1, the output stopped at
    # 1000.62, the caller heard the reply's last sound at 10.7 and the answer from 11.9 on
    reply = _heard(9.5, 10.0, 10.69, 11.9)  # the answer heard a little before it was reported
    answer = {"agent_started_speaking_at": 1001.95}
    m = {"interrupted": True, "reply_stopped_at": 1000.62, "overlap_speech_at": 1000.1}
    rec = bench.barge_in_record(_overlap(), reply, m, answer, 990.0, "Sorry, wait.", "Sure.")
    assert rec["status"] == "stopped" and rec["stop_s"] == pytest.approx(0.7, abs=1e-3)
    assert rec["hops_s"] == pytest.approx({"onset_s": 0.1, "decide_s": 0.52, "playout_s": 0.08},
                                           abs=1e-3)
    assert sum(rec["hops_s"].values()) == pytest.approx(rec["stop_s"])
    assert (rec["recognised_text"], rec["reply_text"]) == ("Sorry, wait.", "Sure.")
    # on another clock: only what was heard until just after the caller's last word counts
    other = bench.barge_in_record(_overlap(), reply, m, answer, None)
    assert other["stop_s"] == pytest.approx(0.7, abs=1e-3) and other["hops_s"] is None
    late = bench.barge_in_record(_overlap(t_end_s=10.3), _heard(10.0, 10.69), m, None, None)
    assert late["stop_s"] == pytest.approx(0.01, abs=1e-3)  # stopped after 10.6: not seen
    resumed = bench.barge_in_record(_overlap(), reply, {**m, "interrupted": False}, None, 990.0)
    assert resumed["status"] == "paused" and resumed["stop_s"] is None
    assert resumed["pause_s"] == pytest.approx(11.9 - 10.70, abs=1e-3)  # the longest silence
    # not stopped: heard well past the moment it could have been (10.5 + 0.3), or not
    played = {"interrupted": False}
    over = bench.barge_in_record(_overlap(), _heard(10.0, 10.81), played, None, 990.0)
    assert over["status"] == "talked_over" and over["stop_s"] is None
    for heard in (_heard(9.5, 10.79), _heard(9.5)):  # it ended by itself, or before the caller
        ended = bench.barge_in_record(_overlap(), heard, played, None, 990.0)
        assert ended["status"] == "ended" and ended["stop_s"] is None and ended["hops_s"] is None
    turns = [{"status": "ok", "barge_in": r} for r in (rec, resumed, over)] + [
        {"status": "ok", "barge_in": None}]
    s = bench_report.barge_in_summary(turns)
    assert s["turns"] == 3 and s["statuses"] == {"stopped": 1, "paused": 1, "talked_over": 1,
                                                 "ended": 0}
    assert s["pause"]["n"] == 1 and s["stop"]["n"] == 1
    assert s["hop_mean_s"]["decide_s"] == pytest.approx(0.52, abs=1e-3)
    assert bench_report.barge_in_summary(turns[3:]) is None


@pytest.mark.slow
@pytest.mark.parametrize("interruptions", [True, False])
def test_bench_speaks_over_the_replies(interruptions, tmp_path, capsys):
    """In-process, on the shipped models: the caller says something over each reply; with
    interruptions the agent stops for it (and answers it), without them it talks on."""
    from agent.settings import load_settings

    out = tmp_path / "bench"
    rc = main(["bench", "--transport", "inprocess", "--turns", "2", "--out", str(out), *_QUICK,
               "--set", "bench.barge_in_ms=300",
               "--set", f"session.allow_interruptions={str(interruptions).lower()}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "spoken over 2 replies" in printed
    least_s = load_settings(None, []).session.min_interruption_duration_s
    (run,) = json.loads((out / "bench.json").read_text())["runs"]
    overs = [t["barge_in"] for t in run["turns"]]
    assert all(t["status"] == "ok" for t in run["turns"]), run["turns"]
    assert {o["status"] for o in overs} <= {"stopped", "ended"} if interruptions else {
        o["status"] for o in overs} <= {"talked_over", "ended"}
    halted = [o for o in overs if o["status"] != "ended"]
    assert halted, overs  # at least one reply was still playing when the caller began
    for o in halted:
        if interruptions:
            assert "wait" in o["recognised_text"].lower(), o
            # the output stops once the VAD has heard the session's minimum of speech; the
            # caller may hear the last sound sooner, when the reply was between two words
            h = o["hops_s"]
            assert h["onset_s"] > 0 and h["decide_s"] > 0
            assert h["onset_s"] + h["decide_s"] > 0.8 * least_s, (h, least_s)
            assert 0.1 < o["stop_s"] < 3.0 and o["reply_text"], o  # and it was answered
        else:
            assert o["stop_s"] is None and o["hops_s"] is None
    for t in run["turns"]:  # the reply spoken over is the turn's; the answer is the overlap's
        assert t["reply_text"] and t["reply_text"] != t["barge_in"]["reply_text"]
        assert "wait" not in t["recognised_text"].lower()
    summary = run["summary"]["barge_in"]
    assert summary["turns"] == 2 and sum(summary["statuses"].values()) == 2
