"""`WhisperSTT`: the streaming recognizer (`audio.asr`) as a livekit-agents `stt.STT`.

A real streaming plugin (capabilities `streaming=True, interim_results=True`): its
RecognizeStream emits START_OF_SPEECH when the VAD opens an utterance, INTERIM_TRANSCRIPT as
the agreed prefix grows, PREFLIGHT_TRANSCRIPT when the decode started at the first silence is
done (LiveKit starts its preemptive reply on it), FINAL_TRANSCRIPT then END_OF_SPEECH when the
utterance closes. The final is usually that same decode, so it is there as soon as the
recognizer's VAD ends the utterance — before LiveKit's endpointing delay runs out and the turn
detector decides.

    session = AgentSession(stt=WhisperSTT(AsrSettings(), VadSettings()), vad=..., ...)
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from livekit import rtc
from livekit.agents import APIConnectionError, APIConnectOptions, stt, utils
from livekit.agents.language import LanguageCode
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from audio.asr import AsrEvent, StreamingRecognizer, load_whisper, transcribe
from audio.codecs import int16_to_float, resample
from audio.settings import AsrSettings, VadSettings
from audio.vad import SAMPLE_RATE

logger = logging.getLogger(__name__)

_EVENT_TYPES = {
    "start": stt.SpeechEventType.START_OF_SPEECH,
    "interim": stt.SpeechEventType.INTERIM_TRANSCRIPT,
    "preflight": stt.SpeechEventType.PREFLIGHT_TRANSCRIPT,
    "final": stt.SpeechEventType.FINAL_TRANSCRIPT,
    "end": stt.SpeechEventType.END_OF_SPEECH,
}


def frame_to_float(frame: rtc.AudioFrame) -> np.ndarray:
    """An int16 LiveKit frame (any channel count) -> mono float32 at the frame's rate."""
    pcm = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
    return int16_to_float(pcm[:, 0]) if frame.num_channels == 1 else (
        pcm.astype(np.float32).mean(axis=1) / 32768.0
    )


class WhisperSTT(stt.STT):
    """faster-whisper (bundled tiny.en by default), streaming with interim results."""

    def __init__(self, asr: AsrSettings, vad: VadSettings, *, model=None) -> None:
        super().__init__(
            capabilities=stt.STTCapabilities(streaming=True, interim_results=True)
        )
        self.asr_settings, self.vad_settings = asr, vad
        self._model = model if model is not None else load_whisper(asr)

    @property
    def model(self) -> str:
        return self.asr_settings.model_path or "whisper-tiny.en"

    @property
    def provider(self) -> str:
        return "faster-whisper"

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        frame = rtc.combine_audio_frames(buffer)
        audio = resample(frame_to_float(frame), frame.sample_rate, SAMPLE_RATE)
        text = await asyncio.to_thread(transcribe, self._model, audio, self.asr_settings)
        language = LanguageCode(self.asr_settings.language)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            alternatives=[stt.SpeechData(language=language, text=text)],
        )

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> WhisperRecognizeStream:
        return WhisperRecognizeStream(stt=self, conn_options=conn_options)


class WhisperRecognizeStream(stt.RecognizeStream):
    """Frames in (resampled to 16 kHz by the base class), speech events out."""

    def __init__(self, *, stt: WhisperSTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=stt, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._whisper = stt

    async def _run(self) -> None:
        w = self._whisper
        rec = StreamingRecognizer(w._model, w.asr_settings, w.vad_settings)
        feeder = asyncio.create_task(self._feed(rec))
        try:
            async for ev in rec:
                self._send(ev)
        except Exception as e:
            # retryable: LiveKit runs the stream again on the same input (and recreates it
            # once the retries are spent); any other error would leave the session deaf
            raise APIConnectionError(f"speech recognition failed: {type(e).__name__}") from e
        finally:
            await utils.aio.cancel_and_wait(feeder)
            await rec.aclose()

    async def _feed(self, rec: StreamingRecognizer) -> None:
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                rec.flush()
            else:
                rec.push(frame_to_float(item))
        rec.end_input()

    def _send(self, ev: AsrEvent) -> None:
        offset = self.start_time_offset
        data = stt.SpeechData(
            language=LanguageCode(self._whisper.asr_settings.language),
            text=ev.text,
            start_time=offset + ev.start_s,
            end_time=offset + ev.end_s,
            confidence=0.0 if ev.kind == "interim" else 1.0,
        )
        alternatives = [data] if ev.kind in ("interim", "preflight", "final") else []
        self._event_ch.send_nowait(
            stt.SpeechEvent(type=_EVENT_TYPES[ev.kind], alternatives=alternatives)
        )
        if ev.kind == "final":
            usage = stt.RecognitionUsage(audio_duration=max(0.0, ev.end_s - ev.start_s))
            self._event_ch.send_nowait(
                stt.SpeechEvent(
                    type=stt.SpeechEventType.RECOGNITION_USAGE, recognition_usage=usage
                )
            )
