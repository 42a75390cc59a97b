"""Piper synthesis on the bundled voice: sentences, streaming order, cancellation, bad text."""

from __future__ import annotations

import time

import numpy as np
import pytest

from audio.codecs import read_wav
from audio.settings import TtsSettings
from audio.tts import (
    AUDIBLE_LEVEL,
    DECODER_CONTEXT_FRAMES,
    PiperSynthesizer,
    TextTooLongError,
    _load_voice,
    _vits_parts,
    bundled_voice_paths,
    split_sentences,
    synthesize,
    synthesize_to_wav,
    trim_lead_in,
)


@pytest.fixture(scope="module")
def synth() -> PiperSynthesizer:
    return PiperSynthesizer.load(TtsSettings())


def test_a_voice_that_is_not_there_is_named_by_its_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="tts.voice_path"):
        PiperSynthesizer.load(TtsSettings(voice_path=str(tmp_path / "absent.onnx")))
    voice, _ = bundled_voice_paths()
    with pytest.raises(FileNotFoundError, match="tts.config_path"):
        PiperSynthesizer.load(TtsSettings(voice_path=voice,
                                          config_path=str(tmp_path / "absent.json")))
    with pytest.raises(ValueError, match="set both"):  # the bundled voice has its own config
        TtsSettings(config_path=str(tmp_path / "mine.json"))


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
    assert len(chunks) >= 5  # each sentence in one or more pieces
    assert times[0] < times[-1] / 3  # "Hi." is out long before the whole reply
    first_ms = 1000 * len(chunks[0]) / synth.sample_rate
    frame_ms = 1000 * synth.voice.config.hop_length / synth.sample_rate
    # a piece of "Hi." (with its end when less than the decoder's context is left), not more
    assert first_ms <= TtsSettings().first_chunk_ms + DECODER_CONTEXT_FRAMES * frame_ms


def test_a_sentence_in_pieces_is_the_whole_sentence_at_the_stream_gain():
    from piper import SynthesisConfig

    # Piper's lead-in kept: a trim could start a sample apart on audio that differs by 1 LSB
    settings = TtsSettings(noise_scale=0.0, noise_w_scale=0.0, lead_in_ms=None)
    still = PiperSynthesizer.load(settings)
    assert still.parts is not None and still.voice.session is None  # cut: one copy of weights
    piper_voice = _load_voice(*bundled_voice_paths(), True)  # Piper's own, whole-graph session
    noiseless = {"noise_scale": 0.0, "noise_w_scale": 0.0}
    at_gain = SynthesisConfig(**noiseless, normalize_audio=False, volume=settings.stream_gain)
    rate = still.sample_rate

    def piper(text: str, config: SynthesisConfig) -> np.ndarray:
        return np.concatenate([c.audio_int16_array for c in piper_voice.synthesize(text, config)])

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return len(a) == len(b) and np.abs(a.astype(int) - b.astype(int)).max() <= 1

    for text in ["Okay.", "I really like the greatest showman that I have ever seen in my life.",
                 "I have a few friends. I have two of them, and they have a dog."]:
        pieces = list(still.pieces(text))
        assert close(np.concatenate(pieces), piper(text, at_gain))
        # a whole sentence through the parts is Piper's own, scaled as Piper scales it
        assert close(still.synthesize_sentence(text), piper(text, SynthesisConfig(**noiseless)))
        if sum(map(len, pieces)) > rate:  # a long sentence: a short first piece, then longer
            assert len(pieces) >= 3 and len(pieces[0]) < len(pieces[1])
            assert 1000 * len(pieces[0]) / rate <= settings.first_chunk_ms + 15


async def test_whole_sentences_when_pieces_are_off_or_the_voice_cannot_be_cut(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    whole = PiperSynthesizer.load(TtsSettings(first_chunk_ms=0))
    assert whole.parts is None
    chunks = [pcm async for pcm in whole.stream("Hello there. How are you doing today?")]
    assert len(chunks) == 2 and np.abs(chunks[0]).max() > 30000  # Piper's own, peak-normalised
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    assert _vits_parts(str(tmp_path / "other.onnx")) is None


async def test_closing_the_stream_stops_synthesis(synth, monkeypatch):
    made: list[tuple[str, int]] = []
    real = synth.pieces

    def counting(sentence: str):
        for i, pcm in enumerate(real(sentence)):
            made.append((sentence, i))
            yield pcm

    monkeypatch.setattr(synth, "pieces", counting)
    stream = synth.stream("One, two, three, four and five. Two. Three. Four. Five. Six.")
    async for _ in stream:
        break
    await stream.aclose()
    assert made == [("One, two, three, four and five.", 0)]  # not even its next piece


def test_synthesize_helpers(tmp_path):
    pcm, rate = synthesize("Hello there.")
    assert rate == 22050 and len(pcm) > rate // 4
    path = synthesize_to_wav("Hello there.", tmp_path / "hello.wav")
    again, wav_rate = read_wav(path)
    assert wav_rate == rate and abs(len(again) - len(pcm)) < rate // 4  # Piper samples noise
