"""`diffvoice bench`: end-to-end turn latency as a caller hears it, with the server's breakdown.

    spoken turns (Piper, cached) --real time--> caller --WebRTC / Twilio / in-process--> session
    caller: t_end = last loud user sample sent ... t_heard = first audible agent sample received
    server: turn_metrics over the data channel (LiveKit per-turn delays, one server clock);
            for Twilio, read off the call in this process (the protocol carries no metrics)

Per turn the client latency is `t_heard - t_end`. The server's stages for the same turn, all
durations measured by LiveKit on the server clock from the VAD's end of speech, are laid end to
end: final transcript (VAD silence window + STT), endpoint wait (turn decision after it), first
committed LLM span, TTS first audio; the rest of the client latency is transport/playout (network,
jitter buffer, playout clock, the TTS's leading near-silence). So the stages sum to the client
latency by construction, and a stage reads as "time spent here before the caller heard anything".
A server in this process shares the caller's clock, so transport/playout is also split at its
two ends (`hops_s`): the lag until the server's VAD reports the end of speech, and the playout
after the server's output starts the reply.

The first turn after the pipeline starts is "cold", the rest "warm". `--compare A B C` runs each
config in turn (self-started server each) and prints ratios against A; `--sessions N` runs 1..N
simultaneous callers and reports latency against N and any dropped turns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import os
import platform
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent import bench_report as report
from agent.clients import MIC_RATE, InProcessCaller, TwilioBenchCaller, WebRTCCaller
from agent.settings import BenchSettings, Settings, load_settings
from audio.settings import TtsSettings
from audio.speech_eval import MicNoise
from llm.settings import UsageError, usage_errors

logger = logging.getLogger(__name__)

# varied questions and remarks a caller might say; 3-12 words, ~1-3 s spoken
BUILTIN_TURNS = (
    "Hi there, how are you doing today?",
    "What is the weather like today?",
    "Can you recommend a good book to read?",
    "I just got back from a long walk.",
    "What time do you usually wake up?",
    "Tell me something interesting about the ocean.",
    "Do you like music?",
    "My favourite food is pizza.",
    "How do I make a cup of tea?",
    "What should I cook for dinner tonight?",
    "I am feeling a bit tired.",
    "Where would you go on holiday?",
    "Thanks, that was really helpful.",
    "Can you tell me a joke?",
    "What is your favourite movie?",
    "I have a meeting tomorrow morning.",
    "How far away is the moon?",
    "Do you have any hobbies?",
    "It is raining outside again.",
    "What is a good way to relax after work?",
    "I started learning to play the guitar.",
    "Which season do you like best?",
    "Could you help me plan my weekend?",
    "Okay, goodbye for now.",
)
LEAD_SILENCE_S = 0.2  # before each utterance, so the VAD sees a clean onset
# TtsSettings that change a synthesised text's audio, besides the voice and its speed
SPEECH_FIELDS = {"config_path", "noise_scale", "noise_w_scale", "lead_in_ms",
                 "max_sentence_chars"}
QUIET_POLL_S = 0.05
# said over a reply: still audible this long after it could have stopped, it played on
TALKED_OVER_S = 0.3
# after a reply that played on: an answer to what was said over it starts within this, or none
ANSWER_START_S = 3.0
# the reply spoken over went silent at least this long before its answer's playback start (the
# answer waits for the caller's turn to end)
ANSWER_MARGIN_S = 0.2


@dataclass(frozen=True)
class Utterance:
    text: str  # what is said (the WAV's name for recorded inputs)
    pcm: np.ndarray  # (n,) int16 mono at MIC_RATE
    over: Utterance | None = None  # said over the reply (`bench.barge_in_ms`), if anything


Conversation = list[Utterance]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="signalling URL of a running `diffvoice serve` "
                        "(ws://HOST:PORT/ws); default: start the server in this process")
    parser.add_argument("--transport", choices=("webrtc", "twilio", "inprocess"),
                        help="overrides bench.transport")
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument("--inputs", type=Path, help="a folder of WAV files, one turn each")
    inputs.add_argument("--conversation", type=Path,
                        help="a TOML file of multi-turn scripts (see docs/benchmarks.md)")
    parser.add_argument("--turns", type=int, help="turns per session (overrides bench.turns)")
    parser.add_argument("--compare", nargs="+", metavar="CONFIG",
                        help="run each config (name in configs/ or TOML path); ratios vs the first")
    parser.add_argument("--sessions", type=int, default=1,
                        help="run 1..N simultaneous callers and report latency against N")
    parser.add_argument("--out", type=Path, help="report folder (overrides bench.out_dir)")


# ---- inputs ---------------------------------------------------------------------------------
def spoken(text: str, settings: Settings) -> np.ndarray:
    """`text` spoken by the configured Piper voice at MIC_RATE, cached as a WAV."""
    from audio.codecs import read_wav, resample, write_wav

    path = Path(settings.bench.cache_dir) / f"{speech_key(text, settings.tts)}.wav"
    if not path.is_file():
        from audio.tts import synthesize

        pcm, rate = synthesize(text, settings.tts)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, resample(pcm, rate, MIC_RATE), MIC_RATE)
    pcm, rate = read_wav(path)
    lead = np.zeros(int(LEAD_SILENCE_S * MIC_RATE), dtype=np.int16)
    return np.concatenate([lead, resample(pcm, rate, MIC_RATE)])


def speech_key(text: str, tts: TtsSettings) -> str:
    """The cache name of `text` spoken with `tts`: every setting that changes the audio is in
    it (those left at their defaults are not spelled out, so the cached files of default
    settings keep their names)."""
    changed = tts.model_dump(exclude_defaults=True, include=SPEECH_FIELDS)
    spec = f"{text}|{tts.voice_path}|{tts.length_scale}" + "".join(
        f"|{k}={v}" for k, v in sorted(changed.items()))
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def stretch_pause(pcm: np.ndarray, pause_ms: int, level: int) -> np.ndarray:
    """`pcm` with its longest pause between words (10 ms frames under `level` after the first
    loud frame and before the last) lengthened to `pause_ms` by silence in its middle; as is
    when it has no such pause or that one is already as long."""
    step = MIC_RATE // 100
    n = len(pcm) // step
    loud = np.flatnonzero(np.abs(pcm[:n * step].astype(np.int32)).reshape(n, step).max(1) > level)
    gaps = np.diff(loud) - 1  # quiet frames between consecutive loud ones
    if not len(gaps) or gaps.max() <= 0:
        return pcm
    k = int(gaps.argmax())
    extra = int(pause_ms * MIC_RATE / 1000) - int(gaps[k]) * step
    if extra <= 0:
        return pcm
    at = (int(loud[k]) + 1 + int(gaps[k]) // 2) * step
    return np.concatenate([pcm[:at], np.zeros(extra, dtype=pcm.dtype), pcm[at:]])


def wav_utterance(path: Path) -> Utterance:
    from audio.codecs import read_wav, resample

    pcm, rate = read_wav(path)
    return Utterance(path.name, resample(pcm, rate, MIC_RATE))


def _chunks(items: list[Utterance], size: int) -> list[Conversation]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def load_conversations(args: argparse.Namespace, settings: Settings) -> list[Conversation]:
    """The built-in set, `--inputs DIR` or `--conversation FILE`, cut to `bench.turns`."""
    per = settings.bench.turns_per_conversation
    if args.conversation is not None:
        convs = conversation_file(args.conversation, settings)
    elif args.inputs is not None:
        wavs = sorted(args.inputs.glob("*.wav"))
        if not wavs:
            raise FileNotFoundError(f"no .wav files in {args.inputs}")
        convs = _chunks([wav_utterance(p) for p in wavs], per)
    else:
        convs = _chunks([Utterance(t, spoken(t, settings)) for t in BUILTIN_TURNS], per)
    b = settings.bench
    if b.pause_ms is not None:
        convs = [[Utterance(u.text, stretch_pause(u.pcm, b.pause_ms, b.audible_level))
                  for u in conv] for conv in convs]
    if b.barge_in_ms is not None:
        over = Utterance(b.barge_in_text, spoken(b.barge_in_text, settings))
        convs = [[replace(u, over=over) for u in conv] for conv in convs]
    return limit_turns(convs, b.turns)


class ScriptConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    turns: list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]] = Field(
        min_length=1)


class Script(BaseModel):
    """A `--conversation` file: one or more `[[conversation]]` tables, nothing else."""
    model_config = ConfigDict(extra="forbid")
    conversation: list[ScriptConversation] = Field(min_length=1)


def conversation_file(path: Path, settings: Settings) -> list[Conversation]:
    """`[[conversation]] turns = ["text", "recorded.wav", ...]`; a `.wav` item is a file
    relative to the script, anything else is spoken by Piper. A malformed script is a
    ValueError naming the file."""
    try:
        script = Script.model_validate(tomllib.loads(path.read_text()))
    except ValueError as e:  # TOMLDecodeError and pydantic's ValidationError are ValueErrors
        raise ValueError(f"{path}: not a conversation script: {e}") from e
    return [[wav_utterance(path.parent / t) if t.endswith(".wav")
             else Utterance(t, spoken(t, settings)) for t in conv.turns]
            for conv in script.conversation]


def limit_turns(convs: list[Conversation], turns: int) -> list[Conversation]:
    if turns <= 0:
        return convs
    out: list[Conversation] = []
    left = turns
    for conv in convs:
        if left <= 0:
            break
        out.append(conv[:left])
        left -= len(out[-1])
    return out


# ---- one turn ---------------------------------------------------------------------------------
def breakdown_s(latency_s: float, m: dict[str, Any]) -> dict[str, float] | None:
    """Server stages laid end to end from the VAD's end of speech, plus transport/playout =
    the client latency not spent on the server. None when the server did not report the turn's
    LLM and TTS times.

    With preemptive generation the LLM starts before the turn ends, so only the part of its
    time after the turn decision (bounded by LiveKit's e2e latency) is on the critical path.
    """
    eou, ttft, ttfb = (m.get(k) for k in ("end_of_utterance_delay_s", "llm_ttft_s", "tts_ttfb_s"))
    if eou is None or ttft is None or ttfb is None:
        return None
    transcript = min(m.get("transcription_delay_s") or 0.0, eou)
    e2e = m.get("e2e_latency_s")
    after_turn = max(e2e - eou, 0.0) if e2e is not None else ttft + ttfb
    llm = min(ttft, after_turn)
    tts = min(ttfb, after_turn - llm)
    stages = {"endpoint_s": eou - transcript, "transcript_s": transcript, "llm_s": llm,
              "tts_s": tts}
    stages["transport_playout_s"] = latency_s - sum(stages.values())
    return stages


def hops_s(m: dict[str, Any], t_end: float, t_heard: float,
           wall_offset_s: float) -> dict[str, float] | None:
    """Two hops inside transport/playout, for a server on this machine's clock (`wall_offset_s`
    = Unix time minus the caller's monotonic clock): `speech_end_lag_s`, from the caller's last
    loud sample to the end of speech the server's VAD reports (uplink and the VAD's lag; the
    server's timers count from there), and `playout_s`, from the reply's playback start as the
    server's output reports it to the first audible sample at the caller (WebRTC: from the first
    sample handed to the transport, so network, jitter buffer and the voice's lead-in; phone:
    from the first echoed mark, already at the line's playout, so the lead-in alone). None when
    the server did not report both times."""
    stopped, started = m.get("user_stopped_speaking_at"), m.get("agent_started_speaking_at")
    if stopped is None or started is None:
        return None
    return {"speech_end_lag_s": stopped - (t_end + wall_offset_s),
            "playout_s": t_heard + wall_offset_s - started}


async def _poll(caller: Any) -> None:
    """One poll interval of a wait; a caller whose connection is gone fails its turn at once
    instead of waiting out the timeouts."""
    if caller.lost is not None:
        raise ConnectionError(caller.lost)
    await asyncio.sleep(QUIET_POLL_S)


async def _wait_metrics(caller: Any, start: int, timeout_s: float) -> int | None:
    """The index of the first `turn_metrics` event at or after index `start`, or None at the
    timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for i in range(start, len(caller.events)):
            if caller.events[i]["type"] == "turn_metrics":
                return i
        await _poll(caller)
    return None


async def _wait_audible(caller: Any, after_s: float, timeout_s: float) -> float | None:
    """The first audible agent sample after `after_s`, or None at the timeout."""
    deadline = time.monotonic() + timeout_s
    while (t := caller.heard.first_audible_s(after_s=after_s)) is None:
        if time.monotonic() > deadline:
            return None
        await _poll(caller)
    return t


async def _wait_quiet(caller: Any, bench: BenchSettings) -> None:
    """Until the agent is listening and no agent audio arrived for `settle_s`."""
    deadline = time.monotonic() + bench.reply_timeout_s + bench.metrics_timeout_s
    while time.monotonic() < deadline:
        states = [e["state"] for e in caller.events if e["type"] == "agent_state"]
        last_audio = caller.heard.chunks[-1][0] if len(caller.heard) else 0.0
        idle = not states or states[-1] == "listening"
        if idle and time.monotonic() - last_audio >= bench.settle_s:
            return
        await _poll(caller)


async def _wait_greeting(caller: Any, bench: BenchSettings) -> None:
    """On a fresh connection to a running server: until its session has started (the first
    agent state arrives once media flows) and any greeting has been spoken; the first turn
    spoken sooner would talk over the greeting and be measured as a cut-in."""
    deadline = time.monotonic() + bench.reply_timeout_s
    while not any(e["type"] == "agent_state" for e in caller.events):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server's session did not start in {bench.reply_timeout_s} s")
        await _poll(caller)
    # a greeting is being synthesised meanwhile (the state stays "listening"): on this fresh
    # connection any agent sound is the greeting
    await _wait_audible(caller, 0.0, bench.greeting_timeout_s)
    await _wait_quiet(caller, bench)


async def _wait_greeted(caller: Any, bench: BenchSettings, after_s: float) -> None:
    """On a fresh connection to a server of our own that greets (any transport: no agent
    state needed): until the greeting has been heard, then until it has ended."""
    if await _wait_audible(caller, after_s, bench.reply_timeout_s) is None:
        raise TimeoutError(f"no greeting was heard in {bench.reply_timeout_s} s")
    await _wait_quiet(caller, bench)


async def _settle_cut_in(caller: Any, bench: BenchSettings, t_end: float) -> None:
    """The words the caller said after the agent cut in are a turn of their own: wait out its
    reply (heard after `t_end`) and its metrics, so that neither lands in the next turn."""
    if await _wait_audible(caller, t_end, bench.reply_timeout_s) is not None:
        await _wait_metrics(caller, len(caller.events), bench.metrics_timeout_s)
    await _wait_quiet(caller, bench)


def _texts(events: list[dict[str, Any]]) -> tuple[str, str]:
    heard = " ".join(e["text"] for e in events if e["type"] == "user_transcript" and e["final"])
    reply = "".join(e["text"] for e in events if e["type"] == "agent_text")
    return heard.strip(), reply.strip()


async def measure_turn(caller: Any, utt: Utterance, bench: BenchSettings, *,
                       same_clock: bool = False,
                       interrupt_s: float | None = None) -> dict[str, Any]:
    """Speak one turn, wait for its reply to finish, and return the turn's record; with
    `same_clock` (a server in this process) its transport/playout is split by `hops_s`. A turn
    with `utt.over` says it over the reply `bench.barge_in_ms` after the reply became audible
    (`barge_in` in the record) to a session that stops for `interrupt_s` of speech (None: not
    known; the reply then counts as talked over only past the caller's last word)."""
    start = len(caller.events)
    t_start = time.monotonic()
    t_end = await caller.speak(utt.pcm)
    early = caller.heard.first_audible_s(after_s=t_start)
    if early is not None and early < t_end:  # the agent took the turn before its last word
        await _settle_cut_in(caller, bench, t_end)
        return _record(utt, caller.events[start:], "cut_in", t_end, early)
    t_heard = await _wait_audible(caller, t_end, bench.reply_timeout_s)
    over = None
    if t_heard is not None and utt.over is not None:
        over = await speak_over(caller, utt.over, t_heard + (bench.barge_in_ms or 0) / 1000,
                                interrupt_s)
    # LiveKit reports a turn's metrics when its reply has finished playing: a long reply on a
    # busy machine takes a while, so only a reply that never became audible is dropped
    wait_s = bench.reply_timeout_s + (bench.metrics_timeout_s if t_heard is not None else 0.0)
    at = await _wait_metrics(caller, start, wait_s)
    metrics = None if at is None else caller.events[at]
    answer = None
    if over is not None and at is not None:
        answer = await _wait_answer(caller, at + 1, bench,
                                    expected=bool(metrics.get("interrupted")))
    await _wait_quiet(caller, bench)
    ok = t_heard is not None and metrics is not None
    # with an overlap: the caller's words until they spoke over the reply, the agent's until
    # the reply's metrics (its item is added when it stops); the overlap and its answer after
    events = caller.events
    split = at if over is not None and at is not None else len(events)
    rec = _record(utt, events[start:split], "ok" if ok else "dropped", t_end, t_heard)
    rec["latency_s"] = None if t_heard is None else t_heard - t_end
    rec["server_s"] = {k: v for k, v in (metrics or {}).items() if k.endswith("_s")}
    offset = time.time() - time.monotonic() if same_clock else None
    if ok:
        rec["breakdown_s"] = breakdown_s(rec["latency_s"], rec["server_s"])
        if offset is not None:
            rec["hops_s"] = hops_s(metrics, t_end, t_heard, offset)
    if over is not None:
        rec["recognised_text"] = _texts(events[start:over.events_at])[0]
        rec["barge_in"] = barge_in_record(over, caller.heard, metrics, answer, offset,
                                          _texts(events[over.events_at:])[0],
                                          _texts(events[split:])[1])
    return rec


@dataclass(frozen=True)
class Overlap:
    """What the caller said over the agent's reply, and when."""
    text: str
    events_at: int  # index of the first server event after the caller began
    t_start_s: float  # the caller's first loud sample
    t_end_s: float  # and last
    # when the reply could have stopped at the soonest: the caller's last word, or the
    # session's minimum interruption after their first
    could_stop_s: float


async def speak_over(caller: Any, utt: Utterance, at_s: float,
                     interrupt_s: float | None) -> Overlap:
    """Say `utt` so that its first loud sample goes out at `at_s` (caller clock);
    `interrupt_s` is the session's minimum speech to interrupt, if known."""
    first_s, last_s = loud_bounds_s(utt.pcm, MIC_RATE, caller.heard.level)
    await asyncio.sleep(max(0.0, at_s - first_s - time.monotonic()))
    events_at = len(caller.events)
    t_end = await caller.speak(utt.pcm)
    t_start = t_end - (last_s - first_s)
    could_stop = t_end if interrupt_s is None else min(t_end, t_start + interrupt_s)
    return Overlap(utt.text, events_at, t_start, t_end, could_stop)


def loud_bounds_s(pcm: np.ndarray, rate: int, level: int) -> tuple[float, float]:
    """Offsets (s) of the first and the last sample of `pcm` above `level`."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return (float(loud[0]) / rate, float(loud[-1]) / rate) if len(loud) else (0.0, 0.0)


async def _wait_answer(caller: Any, after: int, bench: BenchSettings, *,
                       expected: bool) -> dict[str, Any] | None:
    """After a reply spoken over has finished: until the agent has answered what was said over
    it; the answer's metrics (the first after event `after`), or None. An interrupted reply is
    answered; after one that played on, an answer may or may not come: wait for it only if it
    starts soon."""
    if not expected:
        t_done = time.monotonic()
        if await _wait_audible(caller, t_done + TALKED_OVER_S, ANSWER_START_S) is None:
            return None
    at = await _wait_metrics(caller, after, bench.reply_timeout_s + bench.metrics_timeout_s)
    return None if at is None else caller.events[at]


def barge_in_record(o: Overlap, heard: Any, metrics: dict[str, Any] | None,
                    answer: dict[str, Any] | None, wall_offset_s: float | None,
                    recognised: str = "", reply: str = "") -> dict[str, Any]:
    """The `barge_in` of a turn record: whether the agent stopped for what the caller said
    over its reply (`status`), how soon the caller heard it stop for good (`stop_s`, from their
    first loud sample to the reply's last audible one) and, on one clock with the server, where
    that time went (`hops_s`); what was recognised of it and the agent's `answer`."""
    m = metrics or {}
    until = _reply_heard_until(o, answer, wall_offset_s)
    t_stop = heard.last_audible_s(o.t_start_s, until)
    status = _overlap_status(o, t_stop, m)
    stopped, paused = status == "stopped", status == "paused"
    rec = {"text": o.text, "status": status, "recognised_text": recognised, "reply_text": reply,
           "stop_s": t_stop - o.t_start_s if stopped else None,
           "pause_s": longest_gap_s(heard.chunks, o.t_start_s, until) if paused else None,
           "hops_s": None, "t_start_s": o.t_start_s, "t_stop_s": t_stop if stopped else None}
    stopped_at, speech_at = m.get("reply_stopped_at"), m.get("overlap_speech_at")
    if stopped and wall_offset_s is not None and stopped_at is not None and speech_at is not None:
        rec["hops_s"] = {"onset_s": speech_at - (o.t_start_s + wall_offset_s),
                         "decide_s": stopped_at - speech_at,
                         "playout_s": t_stop + wall_offset_s - stopped_at}
    return rec


def longest_gap_s(chunks: list[tuple[float, int, np.ndarray]], after_s: float,
                  before_s: float) -> float:
    """The longest silence between two audible chunks that arrived between `after_s` and
    `before_s` (0 for fewer than two)."""
    spans = [(t, t + len(pcm) / rate) for t, rate, pcm in chunks if after_s <= t <= before_s]
    return max((b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)), default=0.0)


def _reply_heard_until(o: Overlap, answer: dict[str, Any] | None,
                       wall_offset_s: float | None) -> float:
    """Caller time until which the agent's audio is the reply spoken over, not the answer:
    shortly before the answer's playback start on a shared clock (the phone path reports it
    once the line has played its first frame); without one, just past the caller's last word
    (a reply stopped later than that is not seen)."""
    if wall_offset_s is None:
        return o.t_end_s + TALKED_OVER_S
    started = (answer or {}).get("agent_started_speaking_at")
    return math.inf if started is None else started - wall_offset_s - ANSWER_MARGIN_S


def _overlap_status(o: Overlap, t_stop: float | None, m: dict[str, Any]) -> str:
    if t_stop is None:
        return "ended"  # silent when the caller began: nothing to stop
    if m.get("interrupted"):
        return "stopped"
    if m.get("reply_stopped_at") is not None:
        return "paused"  # it went silent, then resumed: a false interruption
    if t_stop >= o.could_stop_s + TALKED_OVER_S:
        return "talked_over"  # audible well past the moment it could have stopped
    return "ended"  # it ended on its own before it could have been stopped


def _record(utt: Utterance, events: list[dict[str, Any]], status: str, t_end: float | None,
            t_heard: float | None) -> dict[str, Any]:
    """A turn's record without latency or server times (what a measured turn adds)."""
    recognised, reply = _texts(events)
    return {"prompt_text": utt.text, "recognised_text": recognised, "reply_text": reply,
            "status": status, "latency_s": None, "breakdown_s": None, "hops_s": None,
            "server_s": {}, "barge_in": None, "t_speech_end_s": t_end,
            "t_first_audible_s": t_heard}


# ---- sessions -----------------------------------------------------------------------------------
async def run_caller(caller: Any, convs: list[Conversation], bench: BenchSettings,
                     tags: dict[str, Any], *, first_is_cold: bool, same_clock: bool = False,
                     greets: bool = False, interrupt_s: float | None = None,
                     start_after_s: float = 0.0) -> list[dict[str, Any]]:
    """One simulated person, who calls `start_after_s` after the level began: each
    conversation on a fresh connection, turns in order, the first after the greeting of a
    server of our own that `greets` (another server's greeting, if any, once its session
    starts); `interrupt_s` as `measure_turn` takes it."""
    turns: list[dict[str, Any]] = []
    await asyncio.sleep(start_after_s)
    for ci, conv in enumerate(convs):
        c = caller(ci)
        try:
            t_connect = time.monotonic()
            await c.connect()
            if not same_clock:
                await _wait_greeting(c, bench)
            else:
                await (_wait_greeted(c, bench, t_connect) if greets else _wait_quiet(c, bench))
            for ti, utt in enumerate(conv):
                rec = await measure_turn(c, utt, bench, same_clock=same_clock,
                                         interrupt_s=interrupt_s)
                cold = first_is_cold and ci == 0 and ti == 0
                turns.append({**tags, "conversation": ci, "turn": ti, "cold": cold, **rec})
                tags["progress"].update(1)
        except Exception as e:  # a failed connection or turn is a result, not a crash
            lost = isinstance(e, ConnectionError)  # the server went away: no traceback to read
            logger.warning("bench caller failed: %s", e if lost else type(e).__name__,
                           exc_info=not lost)
            done = {(t["conversation"], t["turn"]) for t in turns}
            turns += [_failed(tags, ci, ti, u, e) for ti, u in enumerate(conv)
                      if (ci, ti) not in done]
        finally:
            with contextlib.suppress(Exception):
                await c.close()
    return turns


def _failed(tags: dict[str, Any], ci: int, ti: int, utt: Utterance, e: Exception) -> dict:
    return {**tags, "conversation": ci, "turn": ti, "cold": False,
            **_record(utt, [], "failed", None, None), "error": f"{type(e).__name__}: {e}"}


def caller_factory(settings: Settings, models: Any, server: Any, url: str | None,
                   session: int) -> Any:
    level, dbfs = settings.bench.audible_level, settings.bench.noise_floor_dbfs
    if settings.bench.transport == "inprocess":
        return lambda ci: InProcessCaller(settings, models, session_id=f"bench-{session}-{ci}",
                                          level=level, noise=MicNoise(dbfs, seed=ci))
    assert url is not None
    if settings.bench.transport == "twilio":
        return lambda ci: TwilioBenchCaller(url, server, level=level,
                                            noise=MicNoise(dbfs, seed=ci))
    prefetch = settings.bench.caller_jitter_prefetch_frames
    return lambda ci: WebRTCCaller(url, level=level, noise=MicNoise(dbfs, seed=ci),
                                   jitter_prefetch=prefetch)


async def start_server(settings: Settings, models: Any) -> tuple[Any, str | None]:
    """The transport's server (WebRTC's in a process of its own unless
    `bench.server_process` is off): (server, caller URL); (None, None) in-process."""
    if settings.bench.transport == "webrtc" and settings.bench.server_process:
        from agent.bench_server import ServerProcess

        child = ServerProcess(settings)
        return child, await child.start()
    if settings.bench.transport == "webrtc":
        from agent.serve import BrowserServer

        web = BrowserServer(settings, models)
        await web.start()
        return web, f"ws://127.0.0.1:{web.signalling.port}/ws"
    if settings.bench.transport == "twilio":
        from agent.phone import PhoneServer

        phone = PhoneServer(settings, models, keep_events=True)
        return phone, f"ws://127.0.0.1:{await phone.start()}"
    return None, None


async def stop_server(server: Any) -> None:
    if server is not None:
        await (server.close() if hasattr(server, "close") else server.aclose())


async def run_level(settings: Settings, models: Any, server: Any, url: str | None,
                    convs: list[Conversation], n: int, tags: dict[str, Any], *,
                    cold: bool) -> list[dict[str, Any]]:
    """`n` callers at once, each through every conversation."""
    same_clock = server is not None or settings.bench.transport == "inprocess"
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run_caller(
            caller_factory(settings, models, server, url, s), convs, settings.bench,
            {**tags, "sessions": n, "session": s}, first_is_cold=cold, same_clock=same_clock,
            greets=bool(settings.session.greeting.strip()),
            interrupt_s=settings.session.min_interruption_duration_s,
            start_after_s=s * settings.bench.stagger_s))
            for s in range(n)]
    turns = [t for task in tasks for t in task.result()]
    for t in turns:
        t.pop("progress", None)
    return turns


async def run_config(settings: Settings, models: Any, url: str | None,
                     convs: list[Conversation], sessions: int, name: str,
                     progress: Any) -> dict[str, Any]:
    """Every concurrency level of one config; a self-started server when needed."""
    server = None
    if url is None:
        server, url = await start_server(settings, models)
    levels, turns = [], []
    try:
        for n in range(1, sessions + 1):
            tags = {"config": name, "progress": progress}
            got = await run_level(settings, models, server, url, convs, n, tags, cold=n == 1)
            levels.append({"sessions": n, "summary": report.summarize(got)})
            turns += got
    finally:
        await stop_server(server)
    return {"config": name, "transport": settings.bench.transport, "levels": levels,
            "turns": turns, "summary": report.summarize([t for t in turns if t["sessions"] == 1]),
            "settings": _settings_digest(settings)}


def _settings_digest(settings: Settings) -> dict[str, Any]:
    return {"llm": {"model": settings.llm.model, "device": settings.llm.device,
                    "decode": settings.llm.decode.model_dump()},
            "session": settings.session.model_dump(), "asr": settings.asr.model_dump()}


# ---- the command --------------------------------------------------------------------------------
def bench_settings(settings: Settings, args: argparse.Namespace, self_started: bool) -> Settings:
    """CLI flags over the settings; a self-started server listens on any free loopback port
    and greets as deployed, so a conversation's first turn follows the greeting as on a call
    (the end-of-turn model scores the caller's first words after it)."""
    s = settings.model_copy(deep=True)
    if args.transport:
        s.bench.transport = args.transport
    if args.turns is not None:
        s.bench.turns = args.turns
    if args.out is not None:
        s.bench.out_dir = str(args.out)
    if self_started:
        s.server.port = 0
        s.server.metrics_log = ""
        s.phone.port = 0
        s.phone.metrics_log = ""
    return s


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "load_before": list(os.getloadavg())}


def run_one(settings: Settings, args: argparse.Namespace, name: str, progress: Any,
            convs: list[Conversation]) -> dict[str, Any]:
    """Load this config's models (main thread: LiveKit plugins insist), bench, free them."""
    models = None
    if needs_models(settings, args.url):
        from agent.session import load_models

        models = load_models(settings)
    try:
        return asyncio.run(run_config(settings, models, args.url, convs, args.sessions, name,
                                      progress))
    finally:
        if models is not None:
            models.close()


def needs_models(settings: Settings, url: str | None) -> bool:
    """Whether the models run in the bench's process (its server, or no transport)."""
    transport = settings.bench.transport
    if transport == "webrtc":
        return url is None and not settings.bench.server_process
    return True


def run(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    if args.sessions < 1:
        raise UsageError("--sessions must be >= 1")
    if args.turns is not None and args.turns < 0:
        raise UsageError("--turns must be >= 0 (0: every turn)")
    names = args.compare or [args.config]
    configs = [bench_settings(settings if not args.compare else
                              load_settings(n, args.overrides), args, args.url is None)
               for n in names]
    if args.url is not None and (len(configs) > 1 or configs[0].bench.transport != "webrtc"):
        raise UsageError("--url takes a running `diffvoice serve` (webrtc) and one config; "
                         "--compare and the twilio transport start their own servers")
    with usage_errors(OSError, ValueError):
        convs = load_conversations(args, configs[0])
    per_run = sum(map(len, convs)) * sum(range(1, args.sessions + 1))
    info = machine()
    with tqdm(total=per_run * len(configs), desc="turns", unit="turn", file=sys.stderr) as bar:
        runs = [run_one(s, args, n, bar, convs) for s, n in zip(configs, names, strict=True)]
    info["load_after"] = list(os.getloadavg())
    return write_reports(runs, info, Path(configs[0].bench.out_dir))


def write_reports(runs: list[dict[str, Any]], info: dict[str, Any], out: Path) -> int:
    text = "\n".join(report.run_text(r) for r in runs)
    rows = report.comparison(runs) if len(runs) > 1 else []
    if rows:
        text += "\n" + report.comparison_text(rows)
    load = f"load average {info['load_before'][0]:.2f} -> {info['load_after'][0]:.2f}"
    text += f"\n{info['cpu']}, {info['cores']} cores, {load}"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
           "command": ["diffvoice", "bench", *sys.argv[2:]], "machine": info, "runs": runs,
           "comparison": rows, "text": text}
    report.write_json(doc, out / "bench.json")
    report.plot_png(runs, out / "bench.png")
    (out / "bench.html").write_text(report.html_report(doc, out / "bench.png"))
    print(f"reports: {out / 'bench.json'}, {out / 'bench.png'}, {out / 'bench.html'}")
    return exit_status(runs)


def exit_status(runs: list[dict[str, Any]]) -> int:
    """1 when a turn failed at any concurrency level (a run's summary is level 1's only)."""
    failed = sum(level["summary"]["failed_turns"] for r in runs for level in r["levels"])
    return 1 if failed else 0
