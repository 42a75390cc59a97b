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
import math
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
# a pause the energy began is withdrawn if Silero has not heard silence this long after it
# (its probability falls a median 81 ms, 95th percentile ~130 ms, after the last loud sample)
ENERGY_CONFIRM_S = 0.16
CONFIRM_WINDOWS = round(ENERGY_CONFIRM_S / WINDOW_S)
LEVEL_SUBBLOCK = 128  # samples: 8 ms

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
    """Speech/silence segmentation of a 16 kHz float32 stream. Not thread-safe: one owner.

    With `energy_drop_db`, a pause is also seen where the signal's level falls that far below
    the utterance's loudest speech window for `speculation_silence_ms`: ~65 ms after the last
    loud sample instead of the ~145 ms Silero's probability takes to fall (its context and
    recurrent state carry the sound). Until Silero hears the silence too (within
    `ENERGY_CONFIRM_S`) such a pause is withdrawn ("resume") when the level rises again, and
    when Silero keeps hearing speech (a soft word the energy rule took for silence); after,
    only Silero ends it, as any pause. The end of the utterance is Silero's: only the
    speculative decode starts sooner.
    """

    def __init__(
        self,
        settings: VadSettings,
        speculation_silence_ms: int | None = None,
        energy_drop_db: float | None = None,
    ) -> None:
        if settings.deactivation_threshold > settings.activation_threshold:
            raise ValueError("deactivation_threshold must not exceed activation_threshold")
        self.settings = settings
        self.energy_drop_db = energy_drop_db
        self._model = new_silero_model(settings)
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows = 0  # windows processed = stream time / WINDOW_S
        self.speaking = False
        self._run = 0  # consecutive windows against the current state
        self._run_start_s = 0.0
        self._pause: _Pause | None = None  # a pause event was sent and no resume since
        self._pause_windows = (
            None if speculation_silence_ms is None
            else max(1, round(speculation_silence_ms / 1000 / WINDOW_S))
        )
        self._peak_db = -math.inf  # loudest speech window of this utterance
        self._quiet = 0  # consecutive windows below the energy threshold

    @property
    def in_silence(self) -> bool:
        """Speaking, but the latest windows were silent (a pause may be starting)."""
        return self.speaking and (self._run > 0 or self._quiet > 0)

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
            events.extend(self._step(prob, level_db(window)))
            self._windows += 1
        return events

    def _step(self, prob: float, level: float) -> list[VadEvent]:
        s = self.settings
        if not self.speaking:
            if prob < s.activation_threshold:
                self._run = 0
                return []
            if self._run == 0:
                self._run_start_s = self.t_s
            self._run += 1
            if self._run * WINDOW_S * 1000 < s.min_speech_ms:
                return []
            self.speaking, self._run, self._peak_db, self._quiet = True, 0, level, 0
            return [VadEvent("start", self._run_start_s)]
        if prob >= s.activation_threshold:
            self._peak_db = max(self._peak_db, level)
        quiet = self.energy_drop_db is not None and level < self._peak_db - self.energy_drop_db
        self._quiet = self._quiet + 1 if quiet else 0
        if prob >= s.deactivation_threshold:
            self._run = 0
        else:
            if self._run == 0:
                self._run_start_s = self.t_s
            self._run += 1
        if self._run * WINDOW_S * 1000 >= s.min_silence_ms:
            self.speaking, self._run, self._pause, self._quiet = False, 0, None, 0
            return [VadEvent("end", self._run_start_s - END_LAG_S)]
        if self._pause is not None:
            return self._check_pause(quiet)
        return self._check_quiet()

    def _check_quiet(self) -> list[VadEvent]:
        """A pause begins: Silero's silence, or (sooner) the energy's, long enough."""
        if self._pause_windows is None:
            return []
        if self._run == self._pause_windows:
            self._pause = _Pause(windows=0, confirmed=True)
            return [VadEvent("pause", self._run_start_s - END_LAG_S)]
        if self._quiet == self._pause_windows:
            self._pause = _Pause(windows=0, confirmed=self._run > 0)  # begun by the level
            return [VadEvent("pause", self.t_s - (self._quiet - 1) * WINDOW_S)]
        return []

    def _check_pause(self, quiet: bool) -> list[VadEvent]:
        """Speech again ends the pause: Silero's probability back up or, while Silero has not
        yet heard the silence the energy began, the level back up or Silero late to fall."""
        p = self._pause
        assert p is not None
        p.windows += 1
        p.confirmed = p.confirmed or self._run > 0
        if p.confirmed:
            speech = self._run == 0
        else:
            speech = not quiet or p.windows > CONFIRM_WINDOWS
        if not speech:
            return []
        self._pause = None
        return [VadEvent("resume", self.t_s)]


@dataclass
class _Pause:
    windows: int  # since the pause began
    confirmed: bool  # Silero has heard silence in it (from the start, unless the level began it)


def level_db(window: np.ndarray) -> float:
    """Level of a window in dB relative to full scale (digital silence: -120): the loudest
    8 ms of it, so a stop consonant's short release burst after its silent closure counts as
    sound, not as the silence before it."""
    power = np.square(window, dtype=np.float64).reshape(-1, LEVEL_SUBBLOCK).mean(axis=1)
    return 10.0 * math.log10(float(power.max()) + 1e-12)
