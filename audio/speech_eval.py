"""Spoken test material and scoring: Piper-spoken sentences, noise at a given SNR, WER.

Used by the audio tests and by `diffvoice bench-audio`; also handy for other stages' tests
that need a real spoken question:

    audio = spoken_16k("What time is it?")          # float32, 16 kHz, Piper's voice
    noisy = add_noise(audio, snr_db=20.0, seed=0)
    wer = word_error_rate(["hello there"], ["hello their"])   # 0.5
"""

from __future__ import annotations

import functools
import re

import numpy as np

from audio.codecs import int16_to_float, resample
from audio.normalize import normalize
from audio.vad import SAMPLE_RATE

# conversational sentences of 1-5 s, the lengths a voice agent hears
SENTENCES = [
    "Hello, how are you doing today?",
    "Can you tell me what the weather will be like tomorrow?",
    "I would like to book a table for two people tonight.",
    "What time does the pharmacy close on Sunday?",
    "Please remind me to call my sister after lunch.",
    "The train to Boston leaves from platform four.",
    "My favorite color is green, what is yours?",
    "Could you play some quiet music while I read?",
    "I think the meeting has been moved to Thursday morning.",
    "How long does it take to drive to the airport?",
    "Turn off the lights in the kitchen, please.",
    "Tell me a short story about a brave little dog.",
    "We need more milk, eggs and bread from the store.",
    "Is it going to rain this weekend?",
    "Thank you so much for your help.",
    "What is the capital city of Australia?",
    "I lost my keys somewhere in the house yesterday.",
    "Set a timer for ten minutes.",
    "Do you know any good recipes for dinner?",
    "The children are playing football in the park.",
    "Send a message to John saying I will be late.",
    "How many days are left until the end of the month?",
    "Let's talk about something else.",
    "Good night, see you tomorrow.",
]

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def words_of(text: str) -> list[str]:
    """Text -> comparable words: numbers spelled out, lower case, no punctuation."""
    spoken = normalize(text).lower().replace("-", " ")
    return _NON_WORD.sub(" ", spoken).split()


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: total word edits / total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    pairs = zip(references, hypotheses, strict=True)
    edits = sum(_edit_distance(words_of(r), words_of(h)) for r, h in pairs)
    total = sum(len(words_of(r)) for r in references)
    return edits / max(1, total)


@functools.lru_cache(maxsize=64)
def _spoken(text: str) -> np.ndarray:
    from audio.settings import TtsSettings
    from audio.tts import PiperSynthesizer

    # without Piper's per-call noise: the same text is the same audio in every run and machine
    synth = PiperSynthesizer.load(TtsSettings(noise_scale=0.0, noise_w_scale=0.0))
    audio = resample(int16_to_float(synth.synthesize(text)), synth.sample_rate, SAMPLE_RATE)
    audio.setflags(write=False)
    return audio


def spoken_16k(text: str) -> np.ndarray:
    """`text` spoken by the bundled Piper voice, identically every time (no sampled timbre or
    duration noise): float32 at 16 kHz (cached, read-only)."""
    return _spoken(text)


def speech_bounds(audio: np.ndarray, level: float = 0.01) -> tuple[float, float]:
    """(first, last) time in seconds where |audio| exceeds `level`: the true speech span."""
    loud = np.nonzero(np.abs(audio) > level)[0]
    if len(loud) == 0:
        return 0.0, 0.0
    return loud[0] / SAMPLE_RATE, (loud[-1] + 1) / SAMPLE_RATE


def pad(audio: np.ndarray, before_s: float, after_s: float) -> np.ndarray:
    z = np.zeros
    return np.concatenate([
        z(int(before_s * SAMPLE_RATE), np.float32), audio, z(int(after_s * SAMPLE_RATE), np.float32)
    ])


def add_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White Gaussian noise at `snr_db` relative to the power of the speech part."""
    start, end = (int(t * SAMPLE_RATE) for t in speech_bounds(audio))
    power = float(np.mean(audio[start:end] ** 2)) if end > start else 1e-6
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)),
                                               len(audio))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


class MicNoise:
    """A microphone's noise floor for simulated callers: white Gaussian noise at `dbfs` (RMS,
    relative to int16 full scale) added to every int16 frame sent, speech and pauses alike.
    `dbfs` None sends frames unchanged (digital silence between words)."""

    def __init__(self, dbfs: float | None, seed: int = 0) -> None:
        self.rms = None if dbfs is None else 32767.0 * 10 ** (dbfs / 20)
        self._rng = np.random.default_rng(seed)

    def add(self, chunk: np.ndarray) -> np.ndarray:
        if self.rms is None:
            return chunk
        noisy = chunk.astype(np.float32) + self._rng.normal(0.0, self.rms, len(chunk))
        return np.clip(np.round(noisy), -32768, 32767).astype(np.int16)
