"""Streaming recognition on the real models: tiny.en + Silero, speech spoken by Piper."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from audio import asr
from audio.asr import (
    AsrEvent,
    DecodeAbandoned,
    LocalAgreement,
    StreamingRecognizer,
    load_whisper,
    repeats_itself,
    transcribe,
)
from audio.codecs import frames, resample
from audio.settings import AsrSettings, VadSettings
from audio.speech_eval import (
    SENTENCES,
    add_noise,
    pad,
    speech_bounds,
    spoken_16k,
    word_error_rate,
)
from audio.vad import CONFIRM_WINDOWS, SAMPLE_RATE, WINDOW_S, StreamingVad

ASR = AsrSettings()
VAD = VadSettings()


@pytest.fixture(scope="module")
def whisper():
    return load_whisper(ASR)


def trimmed(text: str) -> np.ndarray:
    audio = spoken_16k(text)
    start, end = speech_bounds(audio)
    return audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]


async def run_stream(
    rec: StreamingRecognizer, audio: np.ndarray, *, realtime: bool, rate: int = SAMPLE_RATE
) -> tuple[list[AsrEvent], float]:
    """Feed `audio` (in real time or as fast as possible); returns events and the start time."""
    t0 = time.perf_counter()

    async def feed() -> None:
        frame_ms = 20 if realtime else 1000
        for i, frame in enumerate(frames(audio, rate, frame_ms)):
            rec.push(frame)
            if realtime:
                await asyncio.sleep(max(0.0, t0 + (i + 1) * frame_ms / 1000 - time.perf_counter()))
        rec.end_input()

    feeder = asyncio.create_task(feed())
    events = [ev async for ev in rec]
    await feeder
    return events, t0


def kinds(events: list[AsrEvent]) -> list[str]:
    return [e.kind for e in events]


# -- LocalAgreement --------------------------------------------------------------------------
def test_local_agreement_commits_only_the_agreed_prefix():
    la = LocalAgreement()
    assert not la.update("the quick brown")
    assert la.update("The quick brow fox") and la.text == "The quick"
    assert not la.update("a quick brown fox")  # contradicts the shown text: it stays
    assert la.text == "The quick"
    assert not la.update("the quick brown fox jumps")  # agrees with nothing before it
    # shown words keep their first spelling: the text only grows at its end
    assert la.update("the quick brown fox jumped") and la.text == "The quick brown fox"
    assert la.update("The quick, brown fox jumped over") and la.text == "The quick brown fox jumped"


# -- offline round trip ----------------------------------------------------------------------
@pytest.mark.slow
def test_round_trip_wer_clean_and_noisy(whisper):
    # all sentences in one recording: Whisper's cost is per 30 s window, so this takes a few
    # windows instead of one decode per sentence (and exercises the long-audio chunking)
    gap = np.zeros(int(0.6 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([np.concatenate([spoken_16k(s), gap]) for s in SENTENCES])
    reference = " ".join(SENTENCES)
    assert len(SENTENCES) >= 20
    assert word_error_rate([reference], [transcribe(whisper, audio, ASR)]) <= 0.10
    noisy = add_noise(audio, 20.0, seed=0)
    assert word_error_rate([reference], [transcribe(whisper, noisy, ASR)]) <= 0.10


def test_fitted_encoder_window_transcribes_like_the_full_one(whisper):
    # short turns one by one, as the agent decodes them: a window fitted to each (default) and
    # Whisper's fixed 30 s window must agree on what was said
    texts = SENTENCES[::3]
    audios = [pad(spoken_16k(t), 0.1, 0.2) for t in texts]
    full = AsrSettings(min_window_s=30.0)
    fitted = [transcribe(whisper, a, ASR) for a in audios]
    assert ASR.min_window_s < 30
    assert word_error_rate(texts, fitted) <= 0.05
    assert word_error_rate([transcribe(whisper, a, full) for a in audios], fitted) <= 0.05
    assert transcribe(whisper, np.zeros(SAMPLE_RATE, np.float32), ASR) == ""


def test_a_fitted_window_that_loops_falls_back_to_the_full_one(whisper):
    # a 2 s window makes Whisper repeat short turns ("Okay. Okay. Okay."): such a decode is
    # redone on 30 s, so the text is still right
    tight = AsrSettings(min_window_s=2.0)
    for text in ["Okay.", "Do you have any hobbies?", "How do I make a cup of tea?"]:
        heard = transcribe(whisper, pad(spoken_16k(text), 0.1, 0.2), tight)
        assert word_error_rate([text], [heard]) <= 0.2 and not repeats_itself(heard)


def test_an_unsure_fitted_decode_is_redone_only_when_asked(whisper, monkeypatch):
    audio = pad(spoken_16k("Do you like music?"), 0.1, 0.2)
    assert transcribe(whisper, audio, ASR, retry=False) == "Do you like music?"
    monkeypatch.setattr(asr, "_decode_fitted", lambda *a: None)  # as a cut-off fragment fails
    full = whisper.transcribe
    calls = []
    monkeypatch.setattr(whisper, "transcribe", lambda *a, **k: calls.append(1) or full(*a, **k))
    assert transcribe(whisper, audio, ASR, retry=False) is None and not calls
    assert transcribe(whisper, audio, ASR) == "Do you like music?" and calls


def test_a_stopped_decode_makes_no_further_model_call(whisper, monkeypatch):
    import threading

    stop = threading.Event()
    features = whisper.feature_extractor
    # the stop comes while the features are computed: the encoder is not run
    monkeypatch.setattr(whisper, "feature_extractor", lambda *a, **k: stop.set() or features(
        *a, **k))
    with pytest.raises(DecodeAbandoned):
        transcribe(whisper, trimmed(SENTENCES[0]), ASR, retry=False, stop=stop)
    monkeypatch.setattr(whisper, "feature_extractor", features)
    with pytest.raises(DecodeAbandoned):  # and the full window's decode is not started
        transcribe(whisper, trimmed(SENTENCES[0]), ASR.model_copy(update={"min_window_s": 30}),
                   stop=stop)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_a_language_the_model_does_not_know_is_refused_at_load(whisper):
    assert "en" in whisper.supported_languages
    with pytest.raises(ValueError, match="asr.language='xx'"):
        load_whisper(ASR.model_copy(update={"language": "xx"}))
    with pytest.raises(FileNotFoundError, match="asr.model_path"):  # not a hub id either
        load_whisper(ASR.model_copy(update={"model_path": "no-such-folder"}))


def test_a_speech_model_that_fails_to_load_leaves_no_engine_running(monkeypatch):
    from agent import session
    from agent.settings import load_settings

    def engines() -> int:
        return sum(t.name == "diffusion-engine" for t in threading.enumerate())

    before = engines()  # other tests' engines, if any
    monkeypatch.setattr("audio.plugins.build_stt", lambda settings: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        session.load_models(load_settings(None, []))
    deadline = time.monotonic() + 5
    while engines() > before:
        assert time.monotonic() < deadline, "the engine's worker outlived the failed load"
        time.sleep(0.05)


def test_loading_whisper_keeps_numpy_blas_on_the_calling_thread(monkeypatch):
    from threadpoolctl import threadpool_limits

    for name in asr.BLAS_THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    threadpool_limits(limits=2, user_api="blas")
    assert _blas_threads() and set(_blas_threads()) == {2}
    asr.limit_blas_threads.cache_clear()
    asr._load.cache_clear()
    load_whisper(ASR)
    assert set(_blas_threads()) == {1}


def test_a_blas_pool_sized_by_the_environment_is_left_alone(monkeypatch):
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    threadpool_limits(limits=2, user_api="blas")
    asr.limit_blas_threads.cache_clear()
    asr.limit_blas_threads()
    assert set(_blas_threads()) == {2}
    threadpool_limits(limits=1, user_api="blas")


def test_repeats_itself():
    assert repeats_itself("How do I make a cup of tea? How do I make")
    assert repeats_itself("No... No... No...") and repeats_itself("Okay. Okay.")
    assert not repeats_itself("I think I will go to the park, and you?")
    # a phrase said twice later in a long turn is speech, not a loop
    assert not repeats_itself("So I went to the shop and then I went to the shop again")
    # also what a person may say: such a turn only costs a second decode on 30 s
    assert repeats_itself("No, no.")
    assert not repeats_itself("") and not repeats_itself("Yes.")


# -- VAD -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", SENTENCES[:4])
def test_vad_boundaries_within_100_ms(text):
    audio = pad(trimmed(text), 1.0, 1.0)
    true_start, true_end = speech_bounds(audio)
    vad = StreamingVad(VAD)
    events = [ev for f in frames(audio, SAMPLE_RATE, 20) for ev in vad.push(f)]
    starts = [e.t_s for e in events if e.kind == "start"]
    ends = [e.t_s for e in events if e.kind == "end"]
    assert len(starts) == 1 and len(ends) == 1, events
    assert abs(starts[0] - true_start) <= 0.1
    assert abs(ends[0] - true_end) <= 0.1


def noise_floor(audio: np.ndarray, dbfs: float = -60.0, seed: int = 0) -> np.ndarray:
    """A microphone's white noise floor under speech and silence alike."""
    noise = np.random.default_rng(seed).normal(0.0, 10 ** (dbfs / 20), len(audio))
    return (audio + noise).astype(np.float32)


def vad_events(vad: StreamingVad, audio: np.ndarray) -> list[tuple[str, float, float]]:
    """(kind, event time, stream time when the event came out) over 20 ms frames."""
    out, pushed = [], 0
    for f in frames(audio, SAMPLE_RATE, 20):
        pushed += len(f)
        out += [(e.kind, e.t_s, pushed / SAMPLE_RATE) for e in vad.push(f)]
    return out


def test_energy_pause_comes_sooner_than_silero_and_at_the_speech_end():
    gains = []
    for text in SENTENCES[:6]:
        audio = noise_floor(pad(trimmed(text), 0.5, 1.0))
        _, true_end = speech_bounds(audio)
        last = {}
        for drop in (None, 30.0):
            events = vad_events(StreamingVad(VAD, ASR.speculation_silence_ms, drop), audio)
            assert [e[0] for e in events][-2:] == ["pause", "end"], events
            last[drop] = events[-2]
        gains.append(last[None][2] - last[30.0][2])  # how much sooner it came out
        assert abs(last[30.0][1] - true_end) <= 0.05  # placed where the speech ended
    assert min(gains) >= 0 and np.median(gains) >= 0.04, gains


def test_energy_pause_withdrawn_when_the_level_rises_again():
    first, second = trimmed("Please remind me to call my sister"), trimmed("after lunch.")
    gap_s = 0.1  # a breath between words: too short for Silero's probability to fall
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    audio = noise_floor(pad(np.concatenate([first, gap, second]), 0.5, 1.0))
    gap_start = 0.5 + len(first) / SAMPLE_RATE
    events = vad_events(StreamingVad(VAD, ASR.speculation_silence_ms, 30.0), audio)
    in_gap = [i for i, e in enumerate(events) if e[0] == "pause" and abs(e[1] - gap_start) < 0.04]
    assert in_gap, events
    kind, t_s, _ = events[in_gap[0] + 1]
    assert kind == "resume" and t_s <= gap_start + gap_s + WINDOW_S
    assert [e[0] for e in events].count("end") == 1


def test_energy_pause_needs_silero_to_hear_the_silence_too():
    """Timing logic alone: a level fall that Silero never follows (a soft word) is withdrawn
    within CONFIRM_WINDOWS; once Silero has heard the silence, a louder breath does not end
    the pause, only Silero's speech probability does."""
    vad = StreamingVad(VAD, 64, 30.0)
    loud, soft, speech, silent = -20.0, -60.0, 0.9, 0.05

    def feed(prob: float, level: float, n: int) -> list[str]:
        kinds = []
        for _ in range(n):
            kinds += [e.kind for e in vad._step(prob, level)]
            vad._windows += 1
        return kinds

    assert feed(speech, loud, 4) == ["start"]
    assert feed(speech, soft, 2) == ["pause"]  # two quiet windows: Silero still hears speech
    assert feed(speech, soft, CONFIRM_WINDOWS) == []  # its usual lag: the pause holds
    assert feed(speech, soft, 1) == ["resume"]  # no later: a soft word, not a silence
    assert feed(speech, loud, 2) == []
    assert feed(speech, soft, 2) == ["pause"]
    assert feed(silent, soft, 1) == []  # Silero agrees
    assert feed(silent, loud, 2) == []  # a breath: still Silero's silence
    assert feed(speech, soft, 1) == ["resume"]  # Silero hears speech again


# -- streaming -------------------------------------------------------------------------------
async def test_interims_before_speech_end_and_speculative_final_reused(whisper):
    text = (
        "I think the meeting has been moved to Thursday morning after the long holiday "
        "because most of the team will be travelling back from the coast on Wednesday."
    )
    speech = trimmed(text)
    audio = pad(speech, 0.5, 1.0)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, t0 = await run_stream(rec, audio, realtime=True)
    speech_end_wall = t0 + 0.5 + len(speech) / SAMPLE_RATE
    assert kinds(events)[0] == "start" and kinds(events)[-2:] == ["final", "end"]
    interims = [e for e in events if e.kind == "interim"]
    assert interims and interims[0].t_wall_s < speech_end_wall
    texts = [e.text for e in interims]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # no flicker
    final = events[-2]
    assert final.speculative and rec.stats.speculative_reused == 1
    assert word_error_rate([text], [final.text]) <= 0.15


async def test_preflight_is_the_speculative_final_sent_before_the_silence_ends(whisper):
    vad = VAD.model_copy(update={"min_silence_ms": 1200})  # the decode surely ends inside it
    rec = StreamingRecognizer(whisper, ASR, vad)
    events, _ = await run_stream(rec, pad(trimmed(SENTENCES[3]), 0.3, 2.0), realtime=True)
    assert kinds(events)[-3:] == ["preflight", "final", "end"]
    preflight, final = events[-3], events[-2]
    # the pause the energy began sits within a window of the silence Silero ends the turn on
    assert preflight.text == final.text and abs(preflight.end_s - final.end_s) <= 0.07
    assert final.t_wall_s - preflight.t_wall_s > 0.1  # sent before the VAD ended it
    off = StreamingRecognizer(whisper, ASR.model_copy(update={"preflight": False}), vad)
    events, _ = await run_stream(off, pad(trimmed(SENTENCES[3]), 0.3, 2.0), realtime=False)
    assert "preflight" not in kinds(events)


async def test_speculative_final_discarded_when_speech_resumes(whisper):
    first, second = "Please remind me to call my sister", "after lunch on Friday."
    # a pause longer than the speculation silence, well short of the end of an utterance
    gap_ms = (ASR.speculation_silence_ms + VAD.min_silence_ms) / 2
    assert ASR.speculation_silence_ms + 64 < gap_ms < VAD.min_silence_ms - 64
    gap = np.zeros(int(gap_ms / 1000 * SAMPLE_RATE), np.float32)
    audio = pad(np.concatenate([trimmed(first), gap, trimmed(second)]), 0.3, 1.0)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, audio, realtime=True)
    finals = [e for e in events if e.kind == "final"]
    assert rec.stats.speculative_discarded >= 1
    # one final for the whole utterance; whether it was speculative depends on whether the
    # discarded decode still held the model when the real silence began (machine load)
    assert len(finals) == 1
    assert rec.stats.speculative_reused + rec.stats.plain_finals == 1
    assert word_error_rate([f"{first} {second}"], [finals[0].text]) <= 0.15


async def test_without_speculation_the_final_is_decoded_after_the_end(whisper):
    settings = ASR.model_copy(update={"speculative_final": False})
    rec = StreamingRecognizer(whisper, settings, VAD)
    events, _ = await run_stream(rec, pad(trimmed(SENTENCES[0]), 0.3, 0.8), realtime=False)
    finals = [e for e in events if e.kind == "final"]
    assert len(finals) == 1 and not finals[0].speculative
    assert rec.stats.plain_finals == 1 and rec.stats.speculative_reused == 0


async def test_an_unsure_speculation_is_decoded_again_at_the_end(whisper, monkeypatch):
    # interims and the speculative final skip the 30 s redo of an unsure decode (it held the
    # model for ~1 s after a fragment cut at a mid-sentence pause); the final still gets it
    monkeypatch.setattr(asr, "_decode_fitted", lambda *a: None)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, pad(trimmed(SENTENCES[3]), 0.3, 1.0), realtime=True)
    finals = [e for e in events if e.kind == "final"]
    assert "preflight" not in kinds(events) and "interim" not in kinds(events)
    assert len(finals) == 1 and not finals[0].speculative
    assert rec.stats.unsure_decodes >= 1 and rec.stats.plain_finals == 1
    assert rec.stats.speculative_reused == 0
    assert word_error_rate([SENTENCES[3]], [finals[0].text]) <= 0.15


async def test_a_final_decode_stops_the_interims_of_every_caller_on_the_model(monkeypatch):
    # timing logic alone (a fake decode): the sessions of a process share one Whisper model,
    # which decodes one thing at a time; a caller's final must not queue behind another
    # caller's interim
    class Model:
        pass

    interim_started, finals_seen = threading.Event(), []

    def fake_transcribe(model, audio, settings, retry=True, stop=None):
        if stop is None:
            finals_seen.append(asr._model_queue(model).finals)
            return "the final"
        interim_started.set()
        if stop.wait(5):
            raise DecodeAbandoned
        return "an interim"

    monkeypatch.setattr(asr, "transcribe", fake_transcribe)
    model = Model()
    a, b = StreamingRecognizer(model, ASR, VAD), StreamingRecognizer(model, ASR, VAD)
    try:
        a._utt = utt = asr._Utterance(start=0)
        interim = asyncio.create_task(a._interim(utt, 0, threading.Event()))
        assert await asyncio.to_thread(interim_started.wait, 5)
        t0 = time.perf_counter()
        assert await b._decode(0, 0) == "the final"
        await asyncio.wait_for(interim, 1)
        assert time.perf_counter() - t0 < 1.0
        assert a.stats.interims_abandoned == 1 and finals_seen == [1]
        assert asr._model_queue(model).finals == 0 and not asr._model_queue(model).interims
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_speculation_discarded_by_speech_stops_at_its_next_model_call(monkeypatch):
    # timing logic alone (a fake decode): speech resumed after a pause, so the speculative
    # final would miss what follows; it must free the model for the next pause's speculation
    class Model:
        pass

    started, decodes = threading.Event(), []

    def fake_transcribe(model, audio, settings, retry=True, stop=None):
        decodes.append(asr._model_queue(model).finals)
        started.set()
        # the first decode holds the model until it is stopped; a later one returns at once
        # unless it was stopped before it started (were it to wait too, it would race the 5 s
        # the test gives it)
        if stop is not None and (stop.wait(5) if len(decodes) == 1 else stop.is_set()):
            raise DecodeAbandoned
        return "the whole turn"

    monkeypatch.setattr(asr, "transcribe", fake_transcribe)
    rec = StreamingRecognizer(Model(), ASR, VAD)
    try:
        rec._utt = asr._Utterance(start=0)
        rec._speculate(0)
        first = rec._speculating
        assert await asyncio.to_thread(started.wait, 5)
        rec._speculate(0)  # a second pause while the first decodes: deferred
        t0 = time.perf_counter()
        rec._discard_speculation()  # the voice came back
        assert await asyncio.wait_for(first, 1) is None
        assert time.perf_counter() - t0 < 1.0
        assert rec._speculating is None and rec._utt.deferred_pause is None
        assert rec.stats.speculative_discarded == rec.stats.speculations_abandoned == 1
        assert decodes == [1]  # a speculation stops other callers' interims, as a final does
        rec._speculate(0)  # the pause that lasts is decoded to the end
        assert await asyncio.wait_for(rec._utt.speculation, 5) == "the whole turn"
    finally:
        await rec.aclose()


# -- bad input -------------------------------------------------------------------------------
async def test_an_interim_still_decoding_at_the_pause_is_abandoned(whisper, monkeypatch):
    # an interim that is still busy when the speech pauses (a slow CPU) must not hold Whisper
    # while the final is decoded: it stops before its next model call
    fitted = asr._decode_fitted

    def slow_interim(model, audio, settings, stop=None):
        if stop is not None:  # interims pass a stop event
            stop.wait(10)
        return fitted(model, audio, settings, stop)

    monkeypatch.setattr(asr, "_decode_fitted", slow_interim)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, pad(trimmed(SENTENCES[3]), 0.3, 1.0), realtime=True)
    finals = [e for e in events if e.kind == "final"]
    assert rec.stats.interims_abandoned >= 1 and rec.stats.interim_decodes == 0
    assert "interim" not in kinds(events)
    assert len(finals) == 1 and finals[0].speculative
    assert word_error_rate([SENTENCES[3]], [finals[0].text]) <= 0.15


async def test_silence_only_gives_no_events(whisper):
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, np.zeros(3 * SAMPLE_RATE, np.float32), realtime=False)
    assert events == []


async def test_noise_only_ends_cleanly(whisper):
    noise = np.random.default_rng(0).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, noise, realtime=False)
    assert kinds(events).count("start") == kinds(events).count("end")


async def test_clipped_speech_is_still_recognised(whisper):
    text = SENTENCES[1]
    clipped = np.clip(spoken_16k(text) * 8.0, -1.0, 1.0)
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, pad(clipped, 0.3, 0.8), realtime=False)
    finals = [e.text for e in events if e.kind == "final"]
    assert word_error_rate([text], [" ".join(finals)]) <= 0.25


@pytest.mark.parametrize("rate", [8000, 48000])
async def test_other_sample_rates_are_resampled(whisper, rate):
    text = SENTENCES[2]
    audio = resample(pad(spoken_16k(text), 0.3, 0.8), SAMPLE_RATE, rate)
    rec = StreamingRecognizer(whisper, ASR, VAD, sample_rate=rate)
    events, _ = await run_stream(rec, audio, realtime=False, rate=rate)
    finals = [e.text for e in events if e.kind == "final"]
    assert word_error_rate([text], [" ".join(finals)]) <= 0.15


async def test_push_after_close_is_an_error(whisper):
    rec = StreamingRecognizer(whisper, ASR, VAD)
    await rec.aclose()
    with pytest.raises(RuntimeError):
        rec.push(np.zeros(320, np.float32))


@pytest.mark.slow
async def test_five_minute_monologue_is_finalised_in_chunks(whisper):
    pieces, total, i = [], 0, 0
    gap = np.zeros(int(0.15 * SAMPLE_RATE), np.float32)  # too short to end the utterance
    while total < 300 * SAMPLE_RATE:
        pieces += [trimmed(SENTENCES[i % len(SENTENCES)]), gap]
        total += len(pieces[-2]) + len(gap)
        i += 1
    rec = StreamingRecognizer(whisper, ASR, VAD)
    events, _ = await run_stream(rec, pad(np.concatenate(pieces), 0.3, 1.0), realtime=False)
    finals = [e for e in events if e.kind == "final"]
    assert rec.stats.chunks >= 10 and len(finals) >= 11
    assert all(e.end_s - e.start_s <= ASR.max_chunk_s + 0.01 for e in finals)
    assert kinds(events)[-1] == "end"
    words = sum(len(e.text.split()) for e in finals)
    reference = sum(len(SENTENCES[k % len(SENTENCES)].split()) for k in range(i))
    assert words >= 0.8 * reference


async def test_long_speech_pushed_in_one_buffer_is_still_finalised_in_chunks(whisper):
    # the VAD sees the utterance end before any chunk was cut: the end must cut it first
    texts = [SENTENCES[k % len(SENTENCES)] for k in range(12)]
    gap = np.zeros(int(0.15 * SAMPLE_RATE), np.float32)
    speech = np.concatenate([p for t in texts for p in (trimmed(t), gap)])
    assert len(speech) > ASR.max_chunk_s * SAMPLE_RATE
    # a silence this long cannot end the utterance in a gap between sentences
    rec = StreamingRecognizer(whisper, ASR, VAD.model_copy(update={"min_silence_ms": 800}))
    rec.push(pad(speech, 0.3, 1.0))
    rec.end_input()
    finals = [e async for e in rec if e.kind == "final"]
    assert len(finals) >= 2 and rec.stats.chunks >= 1
    assert all(e.end_s - e.start_s <= ASR.max_chunk_s + 0.01 for e in finals)
    assert word_error_rate([" ".join(texts)], [" ".join(e.text for e in finals)]) <= 0.2


async def test_flush_finalises_the_utterance_in_progress(whisper):
    rec = StreamingRecognizer(whisper, ASR, VAD)
    rec.push(pad(trimmed(SENTENCES[4]), 0.3, 0.2))  # too little silence for the VAD to end it
    rec.flush()
    events = []
    async for ev in rec:
        events.append(ev)
        if ev.kind == "end":
            break
    assert kinds(events)[0] == "start" and kinds(events)[-2:] == ["final", "end"]
    assert word_error_rate([SENTENCES[4]], [events[-2].text]) <= 0.2
    await rec.aclose()


async def test_push_rejects_audio_that_is_not_mono_pcm(whisper):
    rec = StreamingRecognizer(whisper, ASR, VAD)
    with pytest.raises(ValueError, match="mono"):
        rec.push(np.zeros((320, 2), np.float32))
    with pytest.raises(ValueError, match="mono"):
        rec.push(np.zeros(320, np.int32))
    await rec.aclose()


def test_bench_audio_times_the_pause_with_and_without_the_energy_rule():
    from audio.bench import _pauses

    p = _pauses(ASR, VAD)["pause"]
    assert p["utterances"] == len(SENTENCES)
    for mode in ("silero", "energy"):
        assert len(p[mode]["after_speech_ms"]) == len(SENTENCES)
        # a stop consonant's faint release can follow the energy pause (Whisper hears the word
        # without it), so a pause may come out shortly before the last loud sample
        assert all(-100 < ms < 300 for ms in p[mode]["after_speech_ms"])
    assert p["energy"]["after_speech_p50"] < p["silero"]["after_speech_p50"]
    off = _pauses(ASR.model_copy(update={"speculation_energy_drop_db": 0.0}), VAD)["pause"]
    assert off["energy"]["after_speech_ms"] == off["silero"]["after_speech_ms"]
