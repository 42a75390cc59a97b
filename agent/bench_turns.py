"""`diffvoice bench-turns`: how the end-of-turn model scores finished and unfinished turns.

The session's end-of-turn model (`session.turn_detector`) is asked once its VAD has counted
200 ms of silence (`MIN_SILENCE_DURATION_MS`) and, below `session.turn_end_threshold`, holds the
turn open for up to `session.max_endpointing_delay_s`: LiveKit's local "v1-mini" hears the last
1.2 s of the caller's audio; ours ("text", `agent/turn_detector.py`) reads the deployment's
Whisper transcript of the audio so far. A threshold trades two errors: a finished turn held
open (the caller waits) and an unfinished one let through (the agent cuts in at a pause).

This command measures both for the configured voice and VAD. Turns (the bench's 24 built-in
ones and 22 more) are spoken by the Piper voice; each is also cut off mid-sentence twice, after
about 40% and 70% of its words, once spoken on its own (its prosody falls at the end, the hard
case for an audio-only model) and once cut out of the complete recording at its quietest 20 ms
near that point. Each clip is followed by 1.5 s of digital silence, and again by a microphone
noise floor (`--noise-dbfs`, over the whole clip); the session's own Silero VAD finds the moment
the session would ask, and the model scores the audio up to it. Printed per threshold: the share
of complete turns held open and of cut turns let through, and the ROC AUC (how well the score
separates the two).

    diffvoice bench-turns [--noise-dbfs -55] [--turns N] [--json PATH]

JSON keys: `machine`, `settings` (`turn_detector`, `threshold` in use, `vad`, `noise_dbfs`),
`conditions` {"digital" | "noise": {`auc`, `thresholds`: [{`threshold`, `complete_held`,
`cut_through`}], `complete`, `cut`: {`n`, `median`}}}, `clips` [{`text`, `kind` ("complete",
"prefix" or "cut"), `words`, `condition`, `p_end` (null when the VAD never ended the clip's
speech), `silence_s` (the VAD's silence before it asked, from the last loud sample),
`transcript` (what the text detector read; null for v1-mini)}].
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.bench import BUILTIN_TURNS, machine, spoken
from agent.clients import MIC_RATE, last_sound_index
from agent.settings import MAX_NOISE_FLOOR_DBFS, Settings
from audio.speech_eval import MicNoise
from llm.settings import UsageError

EXTRA_TURNS = (
    "I was wondering if you could help me with something.",
    "What's the weather like in London this weekend?",
    "Have you ever been to Japan?",
    "My sister is getting married next month.",
    "Do you think it's a good idea to learn Spanish?",
    "I need to buy a present for my dad.",
    "What do you usually do on weekends?",
    "Sorry, I didn't catch that.",
    "Yeah, I think so.",
    "Tell me about your favourite place.",
    "How long does it take to get to the airport?",
    "That sounds like a lot of fun.",
    "Could you explain how the internet works?",
    "I'm thinking about getting a dog.",
    "What's the best way to learn to cook?",
    "My brother and I went to the beach yesterday.",
    "Is it going to rain tomorrow?",
    "I don't really know what to say.",
    "Why is the sky blue?",
    "I love watching old movies with my family.",
    "Can you remind me what we talked about?",
    "No, that's not what I meant.",
)
CUT_AT = (0.4, 0.7)  # share of the words kept in a cut-off turn
TAIL_S = 1.5  # silence after each clip: more than the VAD needs to end the speech
AUDIBLE = 320  # int16 level of the last "loud" sample (about -40 dBFS)
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.36, 0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise-dbfs", type=float, default=-55.0,
                        help="the noisy condition's microphone noise floor (dBFS RMS)")
    parser.add_argument("--turns", type=int, help="only the first N turns (default: all 46)")
    parser.add_argument("--json", type=Path, help="write every clip's score and the tables")


def cut_words(text: str) -> list[int]:
    """How many words each cut-off version keeps (at least one, never all)."""
    n = len(text.split())
    return sorted({min(n - 1, max(1, round(share * n))) for share in CUT_AT}) if n > 1 else []


def prefix(text: str, words: int) -> str:
    """The first `words` words, as a speaker trailing off would leave them."""
    return " ".join(text.split()[:words]).rstrip(",.?!")


def quiet_cut(pcm: np.ndarray, share: float) -> np.ndarray:
    """The recording up to its quietest 20 ms within 10% of the speech around `share` of it,
    faded out over 5 ms (a cut inside a word would click)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > AUDIBLE)
    start, end = (int(loud[0]), int(loud[-1])) if len(loud) else (0, len(pcm))
    frame, span = MIC_RATE // 50, end - start
    lo, hi = start + int((share - 0.1) * span), start + int((share + 0.1) * span)
    energy = [float(np.mean(pcm[k:k + frame].astype(np.float64) ** 2))
              for k in range(lo, max(lo + 1, hi - frame), frame // 4)]
    at = lo + int(np.argmin(energy)) * (frame // 4) + frame // 2
    out = pcm[:at].astype(np.float32)
    fade = min(len(out), MIC_RATE // 200)
    out[len(out) - fade:] *= np.linspace(1.0, 0.0, fade)
    return out.astype(np.int16)


def clips(settings: Settings, turns: int | None = None) -> list[dict[str, Any]]:
    """Every complete, prefix and cut turn, int16 at MIC_RATE, without the trailing silence."""
    out = []
    for text in (*BUILTIN_TURNS, *EXTRA_TURNS)[:turns]:
        full = spoken(text, settings)
        n = len(text.split())
        out.append({"text": text, "kind": "complete", "words": n, "pcm": full})
        for k in cut_words(text):
            short = prefix(text, k)
            out.append({"text": short, "kind": "prefix", "words": k,
                        "pcm": spoken(short, settings)})
            out.append({"text": short, "kind": "cut", "words": k,
                        "pcm": quiet_cut(full, k / n)})
    return out


async def vad_asks_at(vad: Any, clip: np.ndarray) -> int | None:
    """The sample where the session would ask the model: the first VAD window with 200 ms of
    silence in the speech segment the VAD ends last (later speech cancels a request)."""
    from livekit import rtc
    from livekit.agents.inference.eot.base import MIN_SILENCE_DURATION_MS
    from livekit.agents.vad import VADEventType

    stream = vad.stream()
    frame = MIC_RATE // 50
    for k in range(0, len(clip), frame):
        chunk = clip[k:k + frame]
        stream.push_frame(rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, len(chunk)))
    stream.end_input()
    speaking, pending, asked = False, None, None
    async for ev in stream:
        if ev.type == VADEventType.START_OF_SPEECH:
            speaking, pending = True, None
        elif ev.type == VADEventType.INFERENCE_DONE and speaking:
            if ev.raw_accumulated_speech > 0.0:
                pending = None
            if ev.raw_accumulated_silence >= MIN_SILENCE_DURATION_MS / 1000 and pending is None:
                pending = ev.samples_index
        elif ev.type == VADEventType.END_OF_SPEECH:
            speaking, asked = False, pending
    await stream.aclose()
    return asked


def audio_scorer() -> Callable[[np.ndarray], tuple[float, str | None]]:
    """LiveKit's v1-mini: p(end) from the last 1.2 s of the audio heard so far."""
    from livekit.local_inference import EOT, EOT_MAX_SAMPLES

    model = EOT()
    return lambda heard: (float(model.predict(np.ascontiguousarray(heard[-EOT_MAX_SAMPLES:]))),
                          None)


def text_scorer(settings: Settings,
                detector: Any) -> Callable[[np.ndarray], tuple[float, str | None]]:
    """Our text detector: p(end) of the deployment's Whisper transcript of the audio so far."""
    from audio.asr import load_whisper, transcribe

    whisper = load_whisper(settings.asr)

    def p_end(heard: np.ndarray) -> tuple[float, str | None]:
        text = transcribe(whisper, heard.astype(np.float32) / 32768.0, settings.asr)
        return detector.scorer.p_end([{"role": "user", "content": text}]), text

    return p_end


async def score(settings: Settings, items: list[dict[str, Any]], noise_dbfs: float,
                p_end_of: Callable[[np.ndarray], tuple[float, str | None]]) -> list[dict[str, Any]]:
    """Each clip's p(end) where the session would ask, over digital silence and a noise floor."""
    from audio.plugins import build_vad

    vad = build_vad(settings)
    rows = []
    for seed, item in enumerate(items):
        pcm = item.pop("pcm")
        last_loud = last_sound_index(pcm, AUDIBLE) + 1
        clip = np.concatenate([pcm, np.zeros(int(TAIL_S * MIC_RATE), np.int16)])
        for condition, dbfs in (("digital", None), ("noise", noise_dbfs)):
            heard = MicNoise(dbfs, seed).add(clip)
            at = await vad_asks_at(vad, heard)
            p_end = silence_s = transcript = None
            if at is not None:
                p_end, transcript = await asyncio.to_thread(p_end_of, heard[:at])
                silence_s = round((at - last_loud) / MIC_RATE, 3)
            rows.append({**item, "condition": condition, "p_end": p_end, "silence_s": silence_s,
                         "transcript": transcript})
    return rows


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a complete turn scores above a cut one), ties counting half."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean()) if pos.size and neg.size else 0.0


def summarise(rows: list[dict[str, Any]], in_use: float) -> dict[str, Any]:
    out = {}
    for condition in ("digital", "noise"):
        scored = [r for r in rows if r["condition"] == condition and r["p_end"] is not None]
        complete = [r["p_end"] for r in scored if r["kind"] == "complete"]
        cut = [r["p_end"] for r in scored if r["kind"] != "complete"]
        table = [{"threshold": t,
                  "complete_held": float(np.mean([p < t for p in complete])) if complete else 0.0,
                  "cut_through": float(np.mean([p >= t for p in cut])) if cut else 0.0}
                 for t in sorted({*THRESHOLDS, in_use})]
        out[condition] = {
            "auc": auc(complete, cut), "thresholds": table,
            "complete": {"n": len(complete), "median": float(np.median(complete or [0.0]))},
            "cut": {"n": len(cut), "median": float(np.median(cut or [0.0]))},
        }
    return out


def report(summary: dict[str, Any], in_use: float, noise_dbfs: float) -> None:
    for condition, s in summary.items():
        where = "digital silence" if condition == "digital" else f"{noise_dbfs:g} dBFS noise floor"
        print(f"== {where}: {s['complete']['n']} complete turns (median p(end) "
              f"{s['complete']['median']:.2f}), {s['cut']['n']} cut off (median "
              f"{s['cut']['median']:.2f}); ROC AUC {s['auc']:.2f}")
        print("   threshold   complete turns held   cut-off turns let through")
        for row in s["thresholds"]:
            mark = "  <- in use" if abs(row["threshold"] - in_use) < 1e-9 else ""
            print(f"   {row['threshold']:9.3f}   {row['complete_held']:19.0%}   "
                  f"{row['cut_through']:25.0%}{mark}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.session.turn_detector == "vad":
        raise UsageError("session.turn_detector is 'vad': no model to score")
    if args.turns is not None and args.turns < 1:
        raise UsageError("--turns must be at least 1")
    if args.noise_dbfs > MAX_NOISE_FLOOR_DBFS:
        raise UsageError(f"--noise-dbfs must be at most {MAX_NOISE_FLOOR_DBFS:g}")
    from livekit.agents.language import LanguageCode

    from agent.session import load_turn_detector

    detector = load_turn_detector(settings.session)
    items = clips(settings, args.turns)  # Piper synthesis (cached), before the loop runs
    text = settings.session.turn_detector == "text"
    p_end_of = text_scorer(settings, detector) if text else audio_scorer()

    async def main() -> tuple[list[dict[str, Any]], float]:
        in_use = await detector.unlikely_threshold(LanguageCode(settings.asr.language))
        return await score(settings, items, args.noise_dbfs, p_end_of), float(in_use)

    rows, in_use = asyncio.run(main())
    summary = summarise(rows, in_use)
    report(summary, in_use, args.noise_dbfs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": machine(),
            "settings": {"turn_detector": settings.session.turn_detector, "threshold": in_use,
                         "vad": settings.vad.model_dump(), "noise_dbfs": args.noise_dbfs},
            "conditions": summary, "clips": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
