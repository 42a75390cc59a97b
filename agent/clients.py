"""Callers that talk to the agent the way a person does, for `diffvoice bench` and the tests.

Each caller streams speech in real time (20 ms frames on the wall clock), records when every
audible sample of the agent's reply reached it, and collects the server's per-turn events
(`user_transcript`, `agent_text`, `agent_state`, `turn_metrics`; see `agent.metrics`):

    caller = WebRTCCaller("ws://127.0.0.1:8080/ws")      # or InProcessCaller(settings, models)
    await caller.connect()
    t_end = await caller.speak(pcm16k)                    # time of the last speech sample
    t_heard = caller.heard.first_audible_s(after_s=t_end) # first audible agent sample
    await caller.close()

All times are `time.monotonic()` seconds on the caller's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np
import websockets
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agent.webrtc import set_jitter_prefetch
from audio.codecs import resample
from audio.speech_eval import MicNoise

RATE = 48000  # WebRTC Opus
FRAME = RATE // 50  # 20 ms
FRAME_S = 0.02  # every caller's microphone frame
MIC_RATE = 16000  # what callers are given to say
# int16 level above which a sample counts as sound: about -36 dBFS, well above Opus's noise floor
AUDIBLE_LEVEL = 500


def last_sound_index(pcm: np.ndarray, level: int = AUDIBLE_LEVEL) -> int:
    """Index of the last sample louder than `level` (-1 if none)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
    return int(loud[-1]) if len(loud) else -1


class HeardAudio:
    """When each audible chunk of the agent's audio reached the caller."""

    def __init__(self, level: int = AUDIBLE_LEVEL) -> None:
        self.level = level
        self.chunks: list[tuple[float, int, np.ndarray]] = []  # (t_s, rate, int16 samples)

    def add(self, t_s: float, pcm: np.ndarray, rate: int) -> None:
        if np.abs(pcm.astype(np.int32)).max(initial=0) > self.level:
            self.chunks.append((t_s, rate, pcm))

    def __len__(self) -> int:
        return len(self.chunks)

    def first_audible_s(self, after_s: float = 0.0) -> float | None:
        """Time of the first sample above the level in a chunk received after `after_s`; a
        sample plays `index / rate` after its chunk arrived."""
        for t_s, rate, pcm in self.chunks:
            if t_s < after_s:
                continue
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > self.level)
            return t_s + float(loud[0]) / rate
        return None

    def last_audible_s(self, after_s: float, before_s: float) -> float | None:
        return last_audible_s(self.chunks, self.level, after_s, before_s)


def last_audible_s(chunks: list[tuple[float, int, np.ndarray]], level: int, after_s: float,
                   before_s: float) -> float | None:
    """Time of the last sample above `level` in the (arrival time, rate, samples) chunks that
    arrived between `after_s` and `before_s`; None when none was audible then."""
    for t_s, rate, pcm in reversed(chunks):
        if after_s <= t_s <= before_s:
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > level)
            if len(loud):
                return t_s + float(loud[-1]) / rate
    return None


UtteranceEnd = tuple[int, float, "asyncio.Future[float]"]


def advance_ends(ends: list[UtteranceEnd], now: float) -> list[UtteranceEnd]:
    """One 20 ms frame was just sent at `now`: resolve the utterance whose last loud frame it
    was and count the others down. A microphone sends a frame once its 20 ms are captured, so
    the sample at `offset_s` in it was said at now - 20 ms + offset_s."""
    pending = []
    for left, offset_s, done in ends:
        if left > 0:
            pending.append((left - 1, offset_s, done))
        elif not done.done():
            done.set_result(now - FRAME_S + offset_s)
    return pending


class SpeechTrack(MediaStreamTrack):
    """A microphone that speaks queued 48 kHz audio in real time, silence otherwise."""

    kind = "audio"

    def __init__(self, noise: MicNoise | None = None, level: int = AUDIBLE_LEVEL) -> None:
        super().__init__()
        self.noise = noise or MicNoise(None)
        self.level = level  # a sample above it is speech (its last one ends the utterance)
        self.queue: list[np.ndarray] = []
        self.last_speech_end: float | None = None
        # (frames left until the utterance's last loud one, its offset in that frame, done)
        self._ends: list[UtteranceEnd] = []
        self._pts = 0
        self._t0: float | None = None

    def say(self, pcm16k: np.ndarray) -> asyncio.Future[float]:
        """Queue 16 kHz speech; the future gets the time its last loud sample was sent."""
        pcm = resample(pcm16k, MIC_RATE, RATE)
        frames = [pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]
        last = last_sound_index(np.concatenate(frames), self.level) if frames else -1
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        last = max(last, 0)
        self._ends.append((len(self.queue) + last // FRAME, (last % FRAME) / RATE, done))
        self.queue.extend(frames)
        return done

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        wait = self._t0 + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.queue.pop(0) if self.queue else np.zeros(FRAME, dtype=np.int16)
        now = time.monotonic()
        if not self.queue and np.any(chunk):
            self.last_speech_end = now
        self._ends = advance_ends(self._ends, now)
        chunk = self.noise.add(chunk)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._pts, Fraction(1, RATE)
        self._pts += FRAME
        return frame


class WebRTCCaller:
    """Signalling + peer + data channel events + received agent audio."""

    def __init__(self, url: str, *, level: int = AUDIBLE_LEVEL, noise: MicNoise | None = None,
                 jitter_prefetch: int | None = None) -> None:
        self.url = url
        self.jitter_prefetch = jitter_prefetch  # None: aiortc's own receive buffer
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SpeechTrack(noise, level)
        self.events: list[dict] = []
        self.signals: list[dict] = []
        self.heard = HeardAudio(level)
        self.audible_frames = 0
        self.first_audio_at: float | None = None
        self.ws: Any = None
        self.lost: str | None = None  # why the connection is gone, once it is
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> None:
        self.pc.addTrack(self.mic)
        self.pc.on("connectionstatechange", self._state_changed)
        if self.jitter_prefetch is not None:  # before any media can arrive
            set_jitter_prefetch(self.pc, self.jitter_prefetch)
        channel = self.pc.createDataChannel("events")
        channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.pc.on("track", lambda t: self._tasks.append(asyncio.create_task(self._listen(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.ws = await websockets.connect(self.url)
        await self.ws.send(json.dumps({"type": "offer", "sdp": self.pc.localDescription.sdp}))
        answer = json.loads(await self.ws.recv())
        if answer.get("type") != "answer":
            raise ConnectionError(f"signalling refused the offer: {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        self._tasks.append(asyncio.create_task(self._signals()))

    async def speak(self, pcm16k: np.ndarray) -> float:
        """Say 16 kHz speech in real time; returns when its last loud sample was sent."""
        return await self.mic.say(pcm16k)

    async def _signals(self) -> None:
        try:
            async for raw in self.ws:
                self.signals.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        self.lost = self.lost or "the server closed the signalling connection"

    def _state_changed(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.lost = self.lost or f"the WebRTC connection {self.pc.connectionState}"

    async def _listen(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.AudioFrame):
                continue
            now = time.monotonic()
            pcm = frame.to_ndarray().reshape(-1)  # packed s16, channels interleaved
            if np.abs(pcm.astype(np.int32)).max(initial=0) > self.heard.level:
                self.audible_frames += 1
                if self.first_audio_at is None:
                    self.first_audio_at = now
            self.heard.add(now, pcm, frame.sample_rate * len(frame.layout.channels))

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class InProcessCaller:
    """The session on our own audio input/output in this process: the pipeline, no transport.

    The microphone and speaker run on the loop's clock exactly like a transport would drive
    `QueueAudioInput` and `PacedAudioOutput`; events are the dicts a page would receive.
    """

    def __init__(self, settings: Any, models: Any, *, session_id: str = "bench",
                 level: int = AUDIBLE_LEVEL, noise: MicNoise | None = None) -> None:
        from agent.audio_io import PacedAudioOutput, QueueAudioInput

        self.settings = settings
        self.noise = noise or MicNoise(None)
        self.models = models
        self.session_id = session_id
        self.audio_in = QueueAudioInput(label=f"bench-in-{session_id}")
        self.audio_out = PacedAudioOutput(sample_rate=RATE, label=f"bench-out-{session_id}")
        self.events: list[dict] = []
        self.heard = HeardAudio(level)
        self._speech: list[np.ndarray] = []
        self._ends: list[UtteranceEnd] = []
        self._tasks: list[asyncio.Task] = []
        self.session: Any = None
        self._sync: Any = None
        self.lost: str | None = None  # no connection to lose, but a session can end itself

    async def connect(self) -> None:
        from livekit.agents.voice.transcription import TranscriptSynchronizer

        from agent.metrics import ClientTextOutput, TurnReporter
        from agent.session import build_session, start_session

        self.session, agent = build_session(self.settings, self.models,
                                            session_id=self.session_id)
        TurnReporter(self.session_id, self.events.append,
                     audio_out=self.audio_out).attach(self.session)
        self.session.on("close", self._closed)
        self._sync = sync = TranscriptSynchronizer(
            next_in_chain_audio=self.audio_out, next_in_chain_text=None)
        self.session.output.transcription = ClientTextOutput(
            self.events.append, next_in_chain=sync.text_output)
        await start_session(self.session, agent, audio_in=self.audio_in,
                            audio_out=sync.audio_output, greeting=self.settings.session.greeting)
        self._tasks = [asyncio.create_task(self._mic()), asyncio.create_task(self._speaker())]

    def _closed(self, event: Any) -> None:
        self.lost = self.lost or f"the session closed ({event.reason.value})"

    async def speak(self, pcm16k: np.ndarray) -> float:
        step = MIC_RATE // 50
        frames = [pcm16k[i:i + step] for i in range(0, len(pcm16k) - step + 1, step)]
        loud = last_sound_index(np.concatenate(frames), self.heard.level) if frames else -1
        last = max(loud, 0)
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._ends.append((len(self._speech) + last // step, (last % step) / MIC_RATE, done))
        self._speech.extend(frames)
        return await done

    async def _mic(self) -> None:
        from livekit import rtc

        step = MIC_RATE // 50
        silence = np.zeros(step, dtype=np.int16)
        t_next = time.monotonic()
        while True:
            chunk = self.noise.add(self._speech.pop(0) if self._speech else silence)
            self.audio_in.push(rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, step))
            self._ends = advance_ends(self._ends, time.monotonic())
            t_next += FRAME_S
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def _speaker(self) -> None:
        while True:
            chunk = await self.audio_out.next_chunk()
            self.heard.add(time.monotonic(), chunk, RATE)

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.audio_in.close()
        if self.session is not None:
            await self.session.aclose()
        if self._sync is not None:
            await self._sync.aclose()


class _LineHeard:
    """`HeardAudio`'s reading side over a simulated phone line's playout log."""

    def __init__(self, caller: Any, level: int) -> None:
        self.caller = caller
        self.level = level

    @property
    def chunks(self) -> list[tuple[float, int, np.ndarray]]:
        return [(c.t_start_s, 8000, c.pcm) for c in self.caller.heard]

    def __len__(self) -> int:
        return len(self.caller.heard)

    def first_audible_s(self, after_s: float = 0.0) -> float | None:
        return self.caller.first_audible_s(after_s=after_s, threshold=self.level)

    def last_audible_s(self, after_s: float, before_s: float) -> float | None:
        return last_audible_s(self.chunks, self.level, after_s, before_s)


class TwilioBenchCaller:
    """A phone call over Twilio Media Streams (`diffvoice phone`), timed at the caller's playout.

    The protocol has no channel for the server's turn metrics and texts, so they are read from
    the call's events on a server running in this process (`server`, an
    `agent.phone.PhoneServer` with `keep_events`).
    """

    def __init__(self, url: str, server: Any, *, level: int = AUDIBLE_LEVEL,
                 noise: MicNoise | None = None) -> None:
        from agent.twilio_caller import TwilioCaller

        self.caller = TwilioCaller(url, noise=noise)
        self.server = server
        self.heard = _LineHeard(self.caller, level)

    async def connect(self) -> None:
        await self.caller.connect()
        await self.caller.start()
        self.caller.start_line()

    async def speak(self, pcm16k: np.ndarray) -> float:
        """Say it on the line; returns when its last loud sample was said: the line sends a
        frame once its 20 ms are captured, so that sample was said the line audio after it
        (the last frame's padding included) before the last frame went out."""
        from agent.twilio_caller import SAMPLE_RATE, line_audio

        line = line_audio(pcm16k, MIC_RATE)
        last = max(last_sound_index(line, self.heard.level), 0)
        t_sent = await self.caller.send_pcm(pcm16k, MIC_RATE)
        return t_sent - (len(line) - 1 - last) / SAMPLE_RATE

    @property
    def lost(self) -> str | None:
        return "the phone server ended the call" if self.caller.closed.is_set() else None

    @property
    def events(self) -> list[dict]:
        for call in list(self.server.calls):
            if call.stats.call_sid == self.caller.call_sid and call.events is not None:
                return call.events
        return []

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.caller.stop()
        await self.caller.close()


Caller = WebRTCCaller | InProcessCaller | TwilioBenchCaller
CallerFactory = Callable[[int], Caller]
