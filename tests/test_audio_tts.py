"""Piper synthesis on the bundled voice: sentences, streaming order, cancellation, bad text."""

from __future__ import annotations

import time

import numpy as np
import pytest

from audio.codecs import read_wav
from audio.settings import TtsSettings
from audio.tts import (
    AUDIBLE_LEVEL,
    PiperSynthesizer,
    TextTooLongError,
    split_sentences,
    synthesize,
    synthesize_to_wav,
    trim_lead_in,
)


@pytest.fixture(scope="module")
def synth() -> PiperSynthesizer:
    return PiperSynthesizer.load(TtsSettings())


def test_split_sentences_bounds_length_and_drops_empty_pieces():
    text = "Hello there! How are you? " + "one, two, three, " * 40 + "done. ... !!"
    parts = split_sentences(text, 60)
    assert parts[:2] == ["Hello there!", "How are you?"]
    assert all(len(p) <= 60 for p in parts)
    assert parts[-1].endswith("done.")
    assert split_sentences("", 60) == [] and split_sentences("... !!", 60) == []


def test_a_sentence_becomes_speech(synth):
    pcm = synth.synthesize("The meeting is at 3:30 pm.")
    seconds = len(pcm) / synth.sample_rate
    assert pcm.dtype == np.int16 and synth.sample_rate == 22050
    assert 1.0 < seconds < 5.0 and np.abs(pcm).max() > 3000


def _lead_in_ms(pcm: np.ndarray, rate: int) -> float:
    return 1000 * int(np.argmax(np.abs(pcm.astype(np.int32)) > AUDIBLE_LEVEL)) / rate


def test_without_piper_noise_a_text_sounds_the_same_every_time(synth):
    still = PiperSynthesizer.load(TtsSettings(noise_scale=0.0, noise_w_scale=0.0))
    text = "Can you recommend a good book to read?"
    first, again = still.synthesize(text), still.synthesize(text)
    assert len(first) > 0 and np.array_equal(first, again)
    # the voice's own noise: timbre and durations drawn anew per call
    assert not np.array_equal(synth.synthesize(text), synth.synthesize(text))


def test_the_voice_starts_within_the_configured_lead_in(synth):
    untrimmed = PiperSynthesizer.load(TtsSettings(lead_in_ms=None))
    for text in ["I think so.", "Yes, I do.", "Okay."]:
        raw, trimmed = untrimmed.synthesize(text), synth.synthesize(text)
        assert _lead_in_ms(raw, synth.sample_rate) > 20  # Piper's own lead-in
        assert _lead_in_ms(trimmed, synth.sample_rate) <= TtsSettings().lead_in_ms + 0.1
        assert np.abs(trimmed).max() > 3000  # the speech itself is kept (synthesis is random)


def test_trim_lead_in_keeps_the_onset_and_leaves_silence_alone():
    rate = 1000
    pcm = np.zeros(100, dtype=np.int16)
    assert trim_lead_in(pcm, rate, 10) is pcm  # never audible: unchanged
    pcm[50:] = 1000
    out = trim_lead_in(pcm, rate, 10)
    assert len(out) == 60 and out[10] == 1000 and not out[:10].any()
    assert len(trim_lead_in(pcm[45:], rate, 10)) == 55  # less lead-in than kept: nothing cut


def test_unspeakable_and_empty_text_give_no_audio(synth):
    for text in ["", "   ", "🎉👍", "**", "```code only```"]:
        assert len(synth.synthesize(text)) == 0


def test_huge_text_is_refused_clearly(synth):
    with pytest.raises(TextTooLongError, match="max_text_chars"):
        synth.synthesize("word " * 10_000)


async def test_stream_yields_the_first_sentence_before_the_rest_is_made(synth):
    text = "Hi. " + " ".join(["This is a much longer sentence that takes a while."] * 4)
    t0 = time.perf_counter()
    times, chunks = [], []
    async for pcm in synth.stream(text):
        times.append(time.perf_counter() - t0)
        chunks.append(pcm)
    assert len(chunks) == 5
    assert times[0] < times[-1] / 3  # "Hi." is out long before the whole reply
    assert len(chunks[0]) < len(chunks[1])


async def test_closing_the_stream_stops_synthesis(synth, monkeypatch):
    made: list[str] = []
    real = synth.synthesize_sentence

    def counting(sentence: str) -> np.ndarray:
        made.append(sentence)
        return real(sentence)

    monkeypatch.setattr(synth, "synthesize_sentence", counting)
    stream = synth.stream("One. Two. Three. Four. Five. Six.")
    async for _ in stream:
        break
    await stream.aclose()
    assert made == ["One."]


def test_synthesize_helpers(tmp_path):
    pcm, rate = synthesize("Hello there.")
    assert rate == 22050 and len(pcm) > rate // 4
    path = synthesize_to_wav("Hello there.", tmp_path / "hello.wav")
    again, wav_rate = read_wav(path)
    assert wav_rate == rate and abs(len(again) - len(pcm)) < rate // 4  # Piper samples noise
