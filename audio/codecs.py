"""PCM helpers: resampling (soxr), G.711 mu-law, int16/float conversion, WAV files, framing.

Conventions: mono audio; int16 arrays for transport and files, float32 in [-1, 1] for models.

    pcm16 = resample(read_wav("q.wav")[0], 22050, 16000)   # int16 in, int16 out
    ulaw = mulaw_encode(resample(pcm16, 16000, 8000))      # telephony payload (bytes)
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soxr

INT16_SCALE = 32768.0
# G.711 mu-law (ITU-T G.711): bias added before the segment search, and the clip level
_MULAW_BIAS = 0x21  # 14-bit bias (0x84 >> 2)
_MULAW_CLIP = 8159  # 14-bit clip level
_MULAW_DECODE_BIAS = 0x84  # decoding yields 16-bit samples


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1)."""
    return (np.asarray(pcm, dtype=np.int16).astype(np.float32)) / INT16_SCALE


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    """float samples (clipped to [-1, 1]) -> int16."""
    x = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return np.round(x * (INT16_SCALE - 1)).astype(np.int16)


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono audio with soxr (high quality); keeps the dtype (int16 or float32)."""
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if src_rate == dst_rate or len(pcm) == 0:
        return np.asarray(pcm).copy()
    if pcm.dtype == np.int16:
        return soxr.resample(pcm, src_rate, dst_rate, quality="HQ")
    return soxr.resample(np.asarray(pcm, dtype=np.float32), src_rate, dst_rate, quality="HQ")


class StreamResampler:
    """Chunk-by-chunk resampling with filter state kept across chunks (no clicks at edges)."""

    def __init__(self, src_rate: int, dst_rate: int, dtype: str = "int16") -> None:
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self._stream = (
            None if src_rate == dst_rate
            else soxr.ResampleStream(src_rate, dst_rate, 1, dtype=dtype, quality="HQ")
        )

    def push(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return np.asarray(pcm).copy()
        return self._stream.resample_chunk(pcm, last=last)


def _mulaw_encode_table() -> np.ndarray:
    """mu-law byte for every int16 value (65536 entries), computed once (14-bit G.711 input)."""
    x14 = np.arange(-32768, 32768, dtype=np.int32) >> 2
    sign = np.where(x14 < 0, 0x00, 0x80)  # mu-law stores the sign bit inverted
    mag = np.minimum(np.where(x14 < 0, -x14, x14), _MULAW_CLIP) + _MULAW_BIAS
    segment = np.maximum(np.floor(np.log2(mag)).astype(np.int32) - 5, 0)
    code = np.where(segment > 7, 0x7F, segment << 4 | (mag >> (segment + 1)) & 0x0F)  # 0..127
    return (code ^ 0x7F | sign).astype(np.uint8)


def _mulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + _MULAW_DECODE_BIAS) << exponent) - _MULAW_DECODE_BIAS
    return np.where(sign != 0, -mag, mag).astype(np.int16)


_ENCODE = _mulaw_encode_table()
_DECODE = _mulaw_decode_table()


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 mu-law bytes (one byte per sample)."""
    idx = np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768
    return _ENCODE[idx].tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV -> (int16 mono samples, sample rate); stereo is averaged to mono.
    Anything else (another format, a truncated file) is a ValueError naming the file."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
            channels, rate = w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({str(e) or 'no RIFF header'})") from e
    whole = len(raw) // (2 * channels) * (2 * channels)  # a file cut mid-frame keeps what is whole
    data = np.frombuffer(raw[:whole], dtype=np.int16)
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return data, rate


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write mono audio (int16, or float in [-1, 1]) as a 16-bit PCM WAV."""
    if pcm.dtype != np.int16:
        pcm = float_to_int16(pcm)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def frames(pcm: np.ndarray, sample_rate: int, frame_ms: int = 20) -> Iterator[np.ndarray]:
    """Consecutive frames of `frame_ms`; the last one is zero-padded to full length."""
    n = sample_rate * frame_ms // 1000
    if n <= 0:
        raise ValueError(f"frame of {frame_ms} ms at {sample_rate} Hz has no samples")
    for i in range(0, len(pcm), n):
        chunk = pcm[i : i + n]
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), dtype=pcm.dtype)])
        yield chunk
