"""One browser visitor: an aiortc peer connection bridged to its own `AgentSession`.

    browser mic --Opus 48 kHz--> pump_microphone --16 kHz mono--> QueueAudioInput --> session
    session --TTS 48 kHz--> PacedAudioOutput --20 ms chunks--> AgentAudioTrack --Opus--> browser
    session events --> TurnReporter --JSON--> data channel "events" --> page

Signalling is not here (see `agent/signalling.py`): a `Visitor` takes an SDP offer and returns
the answer. ICE is not trickled: aiortc gathers its candidates before answering, and no STUN
server is configured, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import __version__ as aiortc_version
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from livekit import rtc
from livekit.agents.voice.transcription import TranscriptSynchronizer

from agent.audio_io import PacedAudioOutput, QueueAudioInput
from agent.metrics import ClientTextOutput, TurnReporter
from agent.session import Models, build_session, start_session
from agent.settings import Settings

logger = logging.getLogger(__name__)

WEBRTC_SAMPLE_RATE = 48000  # Opus always runs at 48 kHz in WebRTC
SESSION_CLOSE_TIMEOUT_S = 5.0
# events kept for a data channel that has not opened yet (a greeting's text and state changes)
MAX_PENDING_EVENTS = 256
AUDIO_JITTER_CAPACITY = 16  # packets, as aiortc sizes its audio jitter buffer
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"  # aiortc keeps it private (name-mangled)
_OPUS_RTPMAP = re.compile(r"^a=rtpmap:\d+ opus/48000", re.IGNORECASE | re.MULTILINE)

Notify = Callable[[dict[str, Any]], Awaitable[None]]


class OfferError(ValueError):
    """An SDP offer this server cannot answer; the message is safe to show the client."""


def check_offer(sdp: str) -> None:
    """Reject offers without an audio section or without Opus before aiortc sees them."""
    if "m=audio" not in sdp:
        raise OfferError("the offer has no audio section: the agent needs a microphone track")
    if not _OPUS_RTPMAP.search(sdp):
        raise OfferError("unsupported audio codecs: the server needs Opus")


class AgentAudioTrack(MediaStreamTrack):
    """An aiortc audio track whose frames come from a `PacedAudioOutput` in real time."""

    kind = "audio"

    def __init__(self, output: PacedAudioOutput) -> None:
        super().__init__()
        self.output = output
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        samples = await self.output.next_chunk()  # (n,) int16
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.output.rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.output.rate)
        self._pts += len(samples)
        return frame


def set_jitter_prefetch(pc: RTCPeerConnection, frames: int) -> bool:
    """Make the peer's audio receivers release a packet once `frames` later ones arrived
    (aiortc fixes 4, i.e. 80 ms before the agent hears anything). Call before media flows.
    False (and a warning) if this aiortc version keeps its jitter buffer elsewhere."""
    receivers = [t.receiver for t in pc.getTransceivers() if t.kind == "audio"]
    for receiver in receivers:
        if not isinstance(getattr(receiver, _JITTER_ATTR, None), JitterBuffer):
            logger.warning("aiortc %s: cannot set the jitter prefetch; keeping its default",
                           aiortc_version)
            return False
        setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=AUDIO_JITTER_CAPACITY,
                                                     prefetch=frames))
    return True


def av_to_mono(frame: av.AudioFrame) -> rtc.AudioFrame:
    """A decoded (packed s16) WebRTC frame -> a mono LiveKit frame at the same rate."""
    channels = len(frame.layout.channels)
    pcm = frame.to_ndarray().reshape(-1, channels)  # (n, C) int16
    mono = pcm.mean(axis=1).astype(np.int16) if channels > 1 else pcm[:, 0]
    return rtc.AudioFrame(
        data=mono.tobytes(), sample_rate=frame.sample_rate, num_channels=1,
        samples_per_channel=len(mono),
    )


async def pump_microphone(track: MediaStreamTrack, audio_in: QueueAudioInput, rate: int) -> None:
    """Remote Opus track -> resampled mono frames pushed into the session's input."""
    resampler: rtc.AudioResampler | None = None
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            break
        if not isinstance(frame, av.AudioFrame):
            continue
        mono = av_to_mono(frame)
        if mono.sample_rate == rate:
            audio_in.push(mono)
            continue
        if resampler is None:
            resampler = rtc.AudioResampler(mono.sample_rate, rate, num_channels=1)
        for out in resampler.push(mono):
            audio_in.push(out)
    audio_in.close()


class Visitor:
    """One connected page: its peer connection, session, data channel and tasks."""

    def __init__(self, settings: Settings, models: Models, notify: Notify) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.settings = settings
        self.models = models
        self.notify = notify
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.audio_in = QueueAudioInput(label=f"webrtc-in-{self.id}")
        self.audio_out = PacedAudioOutput(
            sample_rate=WEBRTC_SAMPLE_RATE, label=f"webrtc-out-{self.id}"
        )
        self.track = AgentAudioTrack(self.audio_out)
        self.reporter = TurnReporter(self.id, self.send_event, settings.server.metrics_log,
                                     audio_out=self.audio_out)
        self.session: Any = None
        self.sync: TranscriptSynchronizer | None = None
        self.channel: RTCDataChannel | None = None
        self.closed = asyncio.Event()
        self._pending: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._connected = asyncio.Event()
        self._close_task: asyncio.Future[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def accept_offer(self, sdp: str) -> str:
        """Validate and answer an offer, then start the conversation; returns the answer SDP."""
        check_offer(sdp)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            set_jitter_prefetch(self.pc, self.settings.server.jitter_prefetch_frames)
            self.pc.addTrack(self.track)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except (ValueError, AttributeError, KeyError) as e:
            raise OfferError(f"cannot negotiate this offer: {e}") from e
        self._spawn(self._run(), "visitor")
        return self.pc.localDescription.sdp

    async def _run(self) -> None:
        """Start the conversation once media flows, so the greeting is not spoken to no one."""
        try:
            await asyncio.wait_for(self._connected.wait(), self.settings.server.ice_timeout_s)
        except TimeoutError:
            await self._ice_timed_out()
            return
        await self._start_session()

    async def _start_session(self) -> None:
        self.session, agent = build_session(self.settings, self.models, session_id=self.id)
        self.reporter.attach(self.session)
        self.session.on("error", self._on_session_error)
        self.session.on("close", self._on_session_close)
        # the synchroniser paces the reply text with playout, so an interrupted reply's history
        # ends where the visitor stopped hearing it; the page still gets text as committed
        self.sync = sync = TranscriptSynchronizer(
            next_in_chain_audio=self.audio_out, next_in_chain_text=None
        )
        self.session.output.transcription = ClientTextOutput(
            self.send_event, next_in_chain=sync.text_output
        )
        await start_session(
            self.session, agent, audio_in=self.audio_in, audio_out=sync.audio_output,
            greeting=self.settings.session.greeting,
        )

    async def close(self) -> None:
        """Free everything this visitor holds; safe to call more than once."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self.audio_in.close()
        self.track.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.session.aclose(), SESSION_CLOSE_TIMEOUT_S)
        if self.sync is not None:
            await self.sync.aclose()
        await self.pc.close()
        self.closed.set()
        logger.info("visitor %s closed", self.id)

    # -- events -------------------------------------------------------------------------
    def send_event(self, event: dict[str, Any]) -> None:
        """Send one event to the page over the data channel (queued until it opens)."""
        text = json.dumps(event)
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(text)
            except ConnectionError as e:  # SCTP went away between the check and the send
                logger.debug("visitor %s: event dropped: %s", self.id, e)
        elif not self._closing and len(self._pending) < MAX_PENDING_EVENTS:
            self._pending.append(text)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self.channel = channel

        @channel.on("open")
        def _flush() -> None:
            self._flush_pending()

        if channel.readyState == "open":
            self._flush_pending()

    def _flush_pending(self) -> None:
        assert self.channel is not None
        for text in self._pending:
            self.channel.send(text)
        self._pending.clear()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind != "audio":
            return
        rate = self.settings.server.input_sample_rate
        self._spawn(pump_microphone(track, self.audio_in, rate), "mic-pump")

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        logger.info("visitor %s connection %s", self.id, state)
        if state == "connected":
            self._connected.set()
        if state in ("failed", "closed"):
            self._spawn_close()

    def _on_session_error(self, ev: Any) -> None:
        recoverable = getattr(ev.error, "recoverable", True)
        logger.warning("visitor %s turn error (%s): %s", self.id,
                       "recovering" if recoverable else "fatal", type(ev.error).__name__)
        self.send_event({"type": "error", "message": "the agent hit an error in this turn"})

    def _on_session_close(self, ev: Any) -> None:
        if getattr(ev, "error", None) is not None:
            self.send_event({"type": "error", "message": "the conversation ended on an error"})
        self._spawn_close()

    async def _ice_timed_out(self) -> None:
        logger.warning("visitor %s: ICE did not complete in %.0f s", self.id,
                       self.settings.server.ice_timeout_s)
        with contextlib.suppress(Exception):
            await self.notify({"type": "error", "message": "connection timed out (ICE)"})
        self._spawn_close()

    # -- tasks --------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.id}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("visitor %s task %s failed", self.id, task.get_name(),
                         exc_info=task.exception())

    def _spawn_close(self) -> None:
        if not self._closing:
            # held outside self._tasks, which close() cancels; the server awaits `closed`
            self._close_task = asyncio.ensure_future(self.close())
