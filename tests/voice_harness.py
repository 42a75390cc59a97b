"""An in-process caller for an AgentSession: a real-time microphone and speaker on our audio I/O."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
from livekit import rtc
from livekit.agents.voice.transcription import TranscriptSynchronizer

from agent.audio_io import PacedAudioOutput, QueueAudioInput
from agent.session import Models, build_session, start_session
from agent.settings import Settings
from agent.webrtc import SESSION_CLOSE_TIMEOUT_S

MIC_RATE = 16000
SPEAKER_RATE = 48000
FRAME_MS = 20


class Caller:
    """Streams speech (then silence) into the session in real time and plays its output."""

    def __init__(self, settings: Settings, models: Models, **session_kw) -> None:
        self.session, self.agent = build_session(settings, models, **session_kw)
        self.audio_in = QueueAudioInput()
        self.audio_out = PacedAudioOutput(sample_rate=SPEAKER_RATE, frame_ms=FRAME_MS)
        self.heard: list[tuple[float, np.ndarray]] = []  # (monotonic time, chunk) with audio
        self.last_speech_end: float | None = None
        self._speech: list[np.ndarray] = []
        self._tasks: list[asyncio.Task] = []
        self.events: list[tuple[str, object]] = []
        self.playouts: list = []  # PlaybackFinishedEvent per reply
        for name in ("conversation_item_added", "agent_state_changed", "user_input_transcribed",
                     "agent_false_interruption"):
            self.session.on(name, lambda ev, n=name: self.events.append((n, ev)))

    async def __aenter__(self) -> Caller:
        # as the transports do: text paced with playout, so history = what was heard
        self.sync = sync = TranscriptSynchronizer(
            next_in_chain_audio=self.audio_out, next_in_chain_text=None
        )
        self.session.output.transcription = sync.text_output
        self.audio_out.on("playback_finished", self.playouts.append)
        await start_session(self.session, self.agent, audio_in=self.audio_in,
                            audio_out=sync.audio_output)
        self._tasks = [asyncio.create_task(self._mic()), asyncio.create_task(self._speaker())]
        return self

    async def __aexit__(self, *exc) -> None:
        # as the transports do: close the session while the speaker still pulls (a reply in
        # progress can then finish its playout), and give up on it after a bound
        self.audio_in.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.session.aclose(), SESSION_CLOSE_TIMEOUT_S)
        await self.sync.aclose()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def say(self, pcm: np.ndarray) -> None:
        """Queue 16 kHz int16 speech; the mic sends it next, in real time."""
        step = MIC_RATE * FRAME_MS // 1000
        self._speech.extend(pcm[i:i + step] for i in range(0, len(pcm) - step + 1, step))

    async def _mic(self) -> None:
        step = MIC_RATE * FRAME_MS // 1000
        silence = np.zeros(step, dtype=np.int16)
        t_next = time.monotonic()
        while True:
            chunk = self._speech.pop(0) if self._speech else silence
            if np.any(chunk):  # speech, not the silence padding around it
                self.last_speech_end = time.monotonic()
            self.audio_in.push(rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, step))
            t_next += FRAME_MS / 1000
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def _speaker(self) -> None:
        while True:
            chunk = await self.audio_out.next_chunk()
            if np.any(chunk):
                self.heard.append((time.monotonic(), chunk))

    def messages(self, role: str) -> list:
        return [ev.item for n, ev in self.events
                if n == "conversation_item_added" and getattr(ev.item, "role", None) == role]

    async def wait_for(self, predicate, within: float) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.02)
