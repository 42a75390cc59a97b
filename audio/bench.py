"""`diffvoice bench-audio`: speech I/O latency and accuracy on this machine's CPU.

Measures, in one run:

- when the speculative decode can start: the VAD's pause after the last loud sample, Silero's
  silence alone vs the energy rule (offline, over a -60 dBFS noise floor);
- final-transcript latency of the streaming recognizer fed in real time, speculative final vs
  a plain decode started when the utterance ends (same utterances, same run). Two clocks:
  after the end-of-utterance decision (the VAD's `min_silence_ms` has passed: the moment a turn
  can end) and after the last speech sample;
- Piper first-audio latency of a streamed reply vs synthesising the whole reply first;
- word error rate of Piper-spoken sentences recognised by Whisper, clean and with white noise
  at 20 dB SNR.

`--json PATH` keys (latencies in milliseconds, lists are per utterance/sentence):
  machine: {cpu, cores, python, load_avg_1min}   settings: {asr, vad, tts} as used
  final_after_endpoint_ms: {speculative: [..], plain: [..], speculative_p50, plain_p50, ratio}
  final_after_speech_ms:   {speculative: [..], plain: [..], speculative_p50, plain_p50, ratio}
  speculation: {reused, discarded}       utterance_s: [..]   decode_ms_p50 (offline decode)
  pause: {noise_floor_dbfs, utterances, silero: {..}, energy: {..}}: when the speculative
    decode may start, Silero's silence alone vs with `asr.speculation_energy_drop_db`; each
    {after_speech_ms: [..] (last pause event after the last loud sample), after_speech_p50,
    inside (pauses opened before the last loud sample)}
  tts_first_audio_ms: [..], tts_first_audio_p50, tts_whole_reply_ms_p50, tts_ratio
  wer_clean, wer_noisy_20db, wer_sentences
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from audio.codecs import frames
from audio.settings import AsrSettings, TtsSettings, VadSettings
from audio.speech_eval import SENTENCES, add_noise, pad, speech_bounds, spoken_16k
from audio.speech_eval import word_error_rate as wer
from audio.vad import END_LAG_S, SAMPLE_RATE

LATENCY_UTTERANCES = 8  # real-time runs per mode: ~4 s each
LEAD_S, TAIL_S = 0.3, 1.2  # silence around each utterance: enough for the endpoint
PAUSE_FLOOR_DBFS = -60.0  # a microphone's noise floor under the pause timing's utterances
LOUD = 500 / 32768  # "the last loud sample", as `diffvoice bench` measures from it
FRAME_MS = 20
# replies as an LLM writes them: a short first sentence, then longer ones
REPLIES = [
    "Sure. The pharmacy on Main Street closes at 6 pm on Sundays. Do you want directions?",
    "Of course! I set a timer for 10 minutes. I will let you know when it is done.",
    "Good question. Canberra is the capital of Australia, not Sydney as many people think.",
    "Okay. Your table for two is booked for 7:30 tonight. Anything else I can do?",
    "Hello! I'm doing well, thank you. How can I help you today?",
    "No problem. I sent John a message saying you will be about 15 minutes late.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")


def _p50(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


async def _one_utterance(model, asr: AsrSettings, vad: VadSettings, text: str) -> dict:
    """Feed one padded utterance in real time; times of speech end, endpoint, final."""
    from audio.asr import StreamingRecognizer

    speech = spoken_16k(text)
    _, true_end = speech_bounds(speech)
    audio = pad(speech, LEAD_S, TAIL_S)
    rec = StreamingRecognizer(model, asr, vad)
    t0 = time.perf_counter()
    for i, frame in enumerate(frames(audio, SAMPLE_RATE, FRAME_MS)):
        rec.push(frame)
        await asyncio.sleep(max(0.0, t0 + (i + 1) * FRAME_MS / 1000 - time.perf_counter()))
    rec.end_input()
    finals = [ev async for ev in rec if ev.kind == "final"]
    if not finals:
        raise RuntimeError("no final transcript for a benchmark utterance")
    final = finals[-1]
    # the VAD decides once min_silence has passed since the silence it saw begin
    endpoint = t0 + final.end_s + END_LAG_S + vad.min_silence_ms / 1000
    return {
        "after_endpoint_ms": (final.t_wall_s - endpoint) * 1000,
        "after_speech_ms": (final.t_wall_s - (t0 + LEAD_S + true_end)) * 1000,
        "speculative": final.speculative, "stats": rec.stats, "seconds": true_end,
    }


def _pauses(asr: AsrSettings, vad: VadSettings) -> dict:
    """When the speculative decode may start: the recognizer VAD's last pause event after the
    last loud sample (|x| > LOUD), Silero's silence alone vs with the energy rule, over the
    sentences with a microphone's noise floor; plus pauses opened inside the utterances."""
    from audio.vad import StreamingVad

    out: dict = {"noise_floor_dbfs": PAUSE_FLOOR_DBFS, "utterances": len(SENTENCES)}
    drop = asr.speculation_energy_drop_db
    for label, energy in (("silero", None), ("energy", drop or None)):
        after, inside = [], 0
        for i, text in enumerate(SENTENCES):
            audio = pad(spoken_16k(text), LEAD_S, TAIL_S)
            audio += np.random.default_rng(i).normal(0.0, 10 ** (PAUSE_FLOOR_DBFS / 20),
                                                     len(audio)).astype(np.float32)
            last_loud = np.flatnonzero(np.abs(audio) > LOUD)[-1] / SAMPLE_RATE
            v, pushed, pauses = StreamingVad(vad, asr.speculation_silence_ms, energy), 0, []
            for f in frames(audio, SAMPLE_RATE, FRAME_MS):
                pushed += len(f)
                pauses += [pushed / SAMPLE_RATE for e in v.push(f) if e.kind == "pause"]
            inside += sum(t < last_loud for t in pauses)
            after += [(pauses[-1] - last_loud) * 1000] if pauses else []
        out[label] = {"after_speech_ms": [round(x, 1) for x in after],
                      "after_speech_p50": _p50(after), "inside": inside}
    return {"pause": out}


def _time_decode(model, asr: AsrSettings, text: str) -> float:
    """One offline decode of the utterance: the cost a plain final pays after the endpoint."""
    from audio.asr import transcribe

    t0 = time.perf_counter()
    transcribe(model, spoken_16k(text), asr)
    return (time.perf_counter() - t0) * 1000


async def _latency(model, asr: AsrSettings, vad: VadSettings) -> dict:
    """Both modes over the same utterances, interleaved so machine load hits both alike."""
    texts = [s for s in SENTENCES if 1.0 <= len(spoken_16k(s)) / SAMPLE_RATE <= 5.0]
    texts = texts[:LATENCY_UTTERANCES]
    plain_asr = asr.model_copy(update={"speculative_final": False})
    runs: dict[str, list[dict]] = {"speculative": [], "plain": []}
    for text in texts:
        runs["speculative"].append(await _one_utterance(model, asr, vad, text))
        runs["plain"].append(await _one_utterance(model, plain_asr, vad, text))
    out: dict = {"utterance_s": [round(r["seconds"], 2) for r in runs["plain"]]}
    for clock in ("after_endpoint_ms", "after_speech_ms"):
        spec = [r[clock] for r in runs["speculative"]]
        plain = [r[clock] for r in runs["plain"]]
        out[f"final_{clock}"] = {
            "speculative": [round(x, 1) for x in spec], "plain": [round(x, 1) for x in plain],
            "speculative_p50": _p50(spec), "plain_p50": _p50(plain),
            "ratio": _p50(spec) / _p50(plain) if _p50(plain) else float("nan"),
        }
    out["decode_ms_p50"] = _p50([_time_decode(model, asr, t) for t in texts])
    out["speculation"] = {
        "reused": sum(r["stats"].speculative_reused for r in runs["speculative"]),
        "discarded": sum(r["stats"].speculative_discarded for r in runs["speculative"]),
    }
    return out


async def _tts(settings: TtsSettings) -> dict:
    """First audio of a streamed reply vs synthesising the whole reply before playing."""
    from audio.tts import PiperSynthesizer

    synth = PiperSynthesizer.load(settings)
    synth.synthesize("Warm up.")
    first, whole = [], []
    for text in REPLIES:
        t0 = time.perf_counter()
        stream = synth.stream(text)
        async for _ in stream:
            first.append((time.perf_counter() - t0) * 1000)
            break
        await stream.aclose()
        t0 = time.perf_counter()
        await asyncio.to_thread(synth.synthesize, text)
        whole.append((time.perf_counter() - t0) * 1000)
    return {
        "tts_first_audio_ms": [round(x, 1) for x in first],
        "tts_first_audio_p50": _p50(first), "tts_whole_reply_ms_p50": _p50(whole),
        "tts_ratio": _p50(first) / _p50(whole),
    }


def _wer(model, asr: AsrSettings) -> dict:
    from audio.asr import transcribe

    clean = [transcribe(model, spoken_16k(s), asr) for s in SENTENCES]
    noisy = [transcribe(model, add_noise(spoken_16k(s), 20.0, seed=i), asr)
             for i, s in enumerate(SENTENCES)]
    return {"wer_clean": wer(SENTENCES, clean), "wer_noisy_20db": wer(SENTENCES, noisy),
            "wer_sentences": len(SENTENCES)}


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1min": os.getloadavg()[0]}  # other processes' load skews every latency


def _report(r: dict) -> None:
    for clock, label in (("after_endpoint_ms", "after the end-of-utterance decision"),
                         ("after_speech_ms", "after the last speech sample")):
        f = r[f"final_{clock}"]
        print(f"final transcript {label}: speculative p50 {f['speculative_p50']:.0f} ms, "
              f"plain p50 {f['plain_p50']:.0f} ms, ratio {f['ratio']:.2f}")
    print(f"one offline decode of an utterance: p50 {r['decode_ms_p50']:.0f} ms")
    print(f"speculative finals reused {r['speculation']['reused']}, "
          f"discarded on resumed speech {r['speculation']['discarded']}")
    p = r["pause"]
    print(f"speculative decode starts after the last loud sample (p50, {p['utterances']} "
          f"utterances over a {p['noise_floor_dbfs']:.0f} dBFS floor): Silero "
          f"{p['silero']['after_speech_p50']:.0f} ms, with the energy rule "
          f"{p['energy']['after_speech_p50']:.0f} ms; pauses inside utterances "
          f"{p['silero']['inside']} vs {p['energy']['inside']}")
    print(f"Piper first audio p50 {r['tts_first_audio_p50']:.0f} ms vs whole reply "
          f"{r['tts_whole_reply_ms_p50']:.0f} ms (ratio {r['tts_ratio']:.2f})")
    print(f"WER over {r['wer_sentences']} sentences: clean {r['wer_clean']:.1%}, "
          f"20 dB SNR noise {r['wer_noisy_20db']:.1%}")
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average at the start "
          f"{m['load_avg_1min']:.1f}")


def run(args: argparse.Namespace, settings) -> int:
    import logging

    from audio.asr import load_whisper

    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # one line per decode
    model = load_whisper(settings.asr)
    results: dict = {"machine": _machine(), "settings": {
        "asr": settings.asr.model_dump(), "vad": settings.vad.model_dump(),
        "tts": settings.tts.model_dump()}}
    results.update(asyncio.run(_latency(model, settings.asr, settings.vad)))
    results.update(_pauses(settings.asr, settings.vad))
    results.update(asyncio.run(_tts(settings.tts)))
    results.update(_wer(model, settings.asr))
    _report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0
