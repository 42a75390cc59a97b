"""Streaming voice activity detection: Silero VAD (ONNX) plus a hysteresis state machine.

One 32 ms window (512 samples at 16 kHz) per model call; the model keeps its recurrent state
between calls, so audio can be pushed in any chunk size. Events carry stream times in seconds:

    vad = StreamingVad(VadSettings(), speculation_silence_ms=64)
    for ev in vad.push(pcm_16k_float32):   # VadEvent(kind="start", t_s=1.02) ...
        ...

Kinds: "start" (speech began at t_s), "pause" (a short silence began at t_s: a speculative
final can start), "resume" (speech again before the silence was long enough), "end" (the
silence that began at t_s lasted `min_silence_ms`: the utterance is over).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from audio.settings import VadSettings

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW = 512  # samples per Silero call at 16 kHz (32 ms)
WINDOW_S = WINDOW / SAMPLE_RATE
# Silero's probability falls ~1.5 windows after the last phoneme (its context and recurrent
# state carry the sound): measured +48 ms mean, +82 ms 95th percentile over 48 Piper
# utterances. The end of speech is reported one window earlier, centring the error on zero.
END_LAG_S = WINDOW_S

VadKind = Literal["start", "pause", "resume", "end"]


@dataclass(frozen=True)
class VadEvent:
    kind: VadKind
    t_s: float  # stream time of the boundary (speech onset, or the onset of the silence)


@functools.lru_cache(maxsize=4)
def _onnx_session(model_path: str):  # -> onnxruntime.InferenceSession
    """One ONNX session per model file for the whole process (sessions are thread-safe)."""
    from livekit.plugins.silero import onnx_model

    return onnx_model.new_inference_session(force_cpu=True, onnx_file_path=model_path or None)


def new_silero_model(settings: VadSettings):  # -> onnx_model.OnnxModel
    """A per-stream Silero model (own recurrent state) on the shared ONNX session."""
    from livekit.plugins.silero import onnx_model

    return onnx_model.OnnxModel(
        onnx_session=_onnx_session(settings.model_path), sample_rate=SAMPLE_RATE
    )


class StreamingVad:
    """Speech/silence segmentation of a 16 kHz float32 stream. Not thread-safe: one owner."""

    def __init__(self, settings: VadSettings, speculation_silence_ms: int | None = None) -> None:
        if settings.deactivation_threshold > settings.activation_threshold:
            raise ValueError("deactivation_threshold must not exceed activation_threshold")
        self.settings = settings
        self._model = new_silero_model(settings)
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows = 0  # windows processed = stream time / WINDOW_S
        self.speaking = False
        self._run = 0  # consecutive windows against the current state
        self._run_start_s = 0.0
        self._paused = False
        self._pause_windows = (
            None if speculation_silence_ms is None
            else max(1, round(speculation_silence_ms / 1000 / WINDOW_S))
        )
        self.probabilities: list[float] = []  # per window, for chunk-boundary choice

    @property
    def in_silence(self) -> bool:
        """Speaking, but the latest windows were silent (a pause may be starting)."""
        return self.speaking and self._run > 0

    @property
    def t_s(self) -> float:
        return self._windows * WINDOW_S

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        """Feed 16 kHz float32 samples; returns the events completed by them."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        events: list[VadEvent] = []
        while len(self._pending) >= WINDOW:
            window, self._pending = self._pending[:WINDOW], self._pending[WINDOW:]
            prob = float(self._model(window[None, :]))
            self.probabilities.append(prob)
            events.extend(self._step(prob))
            self._windows += 1
        return events

    def _step(self, prob: float) -> list[VadEvent]:
        s = self.settings
        against = prob < s.deactivation_threshold if self.speaking else (
            prob >= s.activation_threshold
        )
        if not against:
            self._run = 0
            if self._paused:
                self._paused = False
                return [VadEvent("resume", self.t_s)]
            return []
        if self._run == 0:
            self._run_start_s = self.t_s
        self._run += 1
        run_ms = self._run * WINDOW_S * 1000
        if not self.speaking:
            if run_ms >= s.min_speech_ms:
                self.speaking, self._run = True, 0
                return [VadEvent("start", self._run_start_s)]
            return []
        if run_ms >= s.min_silence_ms:
            self.speaking, self._run, self._paused = False, 0, False
            return [VadEvent("end", self._run_start_s - END_LAG_S)]
        if self._pause_windows is not None and self._run == self._pause_windows:
            self._paused = True
            return [VadEvent("pause", self._run_start_s - END_LAG_S)]
        return []
