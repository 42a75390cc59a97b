"""Piper synthesis on the bundled voice: sentences, streaming order, cancellation, bad text."""

from __future__ import annotations

import time

import numpy as np
import pytest

from audio.codecs import read_wav
from audio.settings import TtsSettings
from audio.tts import (
    PiperSynthesizer,
    TextTooLongError,
    split_sentences,
    synthesize,
    synthesize_to_wav,
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
