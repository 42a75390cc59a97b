"""A Python WebRTC caller for `diffvoice serve`: streams speech in real time like a browser."""

from __future__ import annotations

import asyncio
import json
import time
from fractions import Fraction

import av
import numpy as np
import websockets
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from audio.codecs import resample

RATE = 48000
FRAME = RATE // 50  # 20 ms


class SpeechTrack(MediaStreamTrack):
    """A microphone that speaks queued 48 kHz audio in real time, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[np.ndarray] = []
        self.last_speech_end: float | None = None
        self._pts = 0
        self._t0: float | None = None

    def say(self, pcm16k: np.ndarray) -> None:
        pcm = resample(pcm16k, 16000, RATE)
        self.queue.extend(pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        wait = self._t0 + self._pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = self.queue.pop(0) if self.queue else np.zeros(FRAME, dtype=np.int16)
        if not self.queue and np.any(chunk):
            self.last_speech_end = time.monotonic()
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._pts, Fraction(1, RATE)
        self._pts += FRAME
        return frame


class WebRTCCaller:
    """Signalling + peer + data channel events + received agent audio."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = SpeechTrack()
        self.events: list[dict] = []
        self.signals: list[dict] = []
        self.audible_frames = 0
        self.first_audio_at: float | None = None
        self.ws = None
        self._tasks: list[asyncio.Task] = []

    async def connect(self) -> None:
        self.pc.addTrack(self.mic)
        channel = self.pc.createDataChannel("events")
        channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.pc.on("track", lambda t: self._tasks.append(asyncio.create_task(self._listen(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.ws = await websockets.connect(self.url)
        await self.ws.send(json.dumps({"type": "offer", "sdp": self.pc.localDescription.sdp}))
        answer = json.loads(await self.ws.recv())
        assert answer["type"] == "answer", answer
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        self._tasks.append(asyncio.create_task(self._signals()))

    async def _signals(self) -> None:
        try:
            async for raw in self.ws:
                self.signals.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass

    async def _listen(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if np.abs(frame.to_ndarray()).max() > 500:
                self.audible_frames += 1
                if self.first_audio_at is None:
                    self.first_audio_at = time.monotonic()

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
