"""The speech plugins an `AgentSession` is built from, one builder each, from `Settings`.

    session = AgentSession(stt=build_stt(s), tts=build_tts(s), vad=build_vad(s), llm=...)

Models load once per process (blocking: call before the loop or from a thread); every session
built afterwards shares them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from livekit.agents import stt, tts, vad
from livekit.agents.types import NOT_GIVEN

from audio.livekit_stt import WhisperSTT
from audio.livekit_tts import PiperTTS, streaming_piper_tts

if TYPE_CHECKING:
    from agent.settings import Settings

__all__ = ["PiperTTS", "WhisperSTT", "build_stt", "build_tts", "build_vad"]


def build_stt(settings: Settings) -> stt.STT:
    return WhisperSTT(settings.asr, settings.vad)


def build_tts(settings: Settings) -> tts.TTS:
    return streaming_piper_tts(settings.tts)


def build_vad(settings: Settings) -> vad.VAD:
    """LiveKit's Silero VAD (in-process, offline) with the same thresholds as the recognizer."""
    from livekit.plugins import silero

    v = settings.vad
    return silero.VAD.load(
        min_speech_duration=v.min_speech_ms / 1000,
        min_silence_duration=v.min_silence_ms / 1000,
        prefix_padding_duration=v.prefix_padding_ms / 1000,
        activation_threshold=v.activation_threshold,
        deactivation_threshold=v.deactivation_threshold,
        sample_rate=16000,
        force_cpu=True,
        onnx_file_path=v.model_path or NOT_GIVEN,
    )
