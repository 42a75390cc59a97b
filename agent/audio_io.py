"""Transport-agnostic audio input and output for an `AgentSession`.

A transport (WebRTC peer, phone socket, test harness) only moves PCM:

    mic frames --push()--> QueueAudioInput --> AgentSession (VAD, STT, turn detection)
    AgentSession (TTS) --capture_frame()--> PacedAudioOutput --next_chunk()--> speaker/network

`PacedAudioOutput` is the playout clock: the transport pulls one chunk per `frame_ms` and the
output reports what was actually handed out, so LiveKit's history keeps only the heard part of an
interrupted reply. It pauses (silence, position frozen) for false-interruption resume and drops
its buffer on `clear_buffer()`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import numpy as np
from livekit import rtc
from livekit.agents.voice import io

logger = logging.getLogger(__name__)

# Frames buffered before the session reads them; beyond this the oldest are dropped so a stalled
# consumer cannot grow memory (500 x 20 ms = 10 s of audio).
MAX_QUEUED_INPUT_FRAMES = 500


class QueueAudioInput(io.AudioInput):
    """An `AudioInput` fed by `push(frame)`; `close()` ends the stream.

    >>> inp = QueueAudioInput(); inp.push(frame)   # from the transport
    >>> async for frame in inp: ...                # inside AgentSession
    """

    def __init__(self, *, label: str = "queue-audio-in") -> None:
        super().__init__(label=label)
        self._queue: asyncio.Queue[rtc.AudioFrame | None] = asyncio.Queue()
        self._closed = False
        self.dropped_frames = 0

    def push(self, frame: rtc.AudioFrame) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= MAX_QUEUED_INPUT_FRAMES:
            self._queue.get_nowait()
            self.dropped_frames += 1
        self._queue.put_nowait(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await self._queue.get()
        if frame is None:
            self._queue.put_nowait(None)  # stay ended for every later reader
            raise StopAsyncIteration
        return frame


class _SegmentEnd:
    """Marks where one reply (capture...flush) ends inside the playout queue."""


class PacedAudioOutput(io.AudioOutput):
    """An `AudioOutput` played out by a clock the transport drives.

    The session pushes TTS audio (already resampled to `sample_rate` by LiveKit) with
    `capture_frame` and ends a reply with `flush`; the transport calls `next_chunk()` (paced,
    async) or `pull()` (unpaced, for transports with their own clock) to get exactly
    `samples_per_chunk` int16 mono samples, silence when nothing is queued or while paused.

    Playback events follow LiveKit's contract: `on_playback_started` when a reply's first sample
    is pulled, `on_playback_finished(playback_position=seconds pulled, interrupted=...)` once per
    reply, when its last sample is pulled or when `clear_buffer()` drops the rest.
    `last_reply_stopped_at` is the Unix time the last finished reply first went silent before its
    end (paused for a possible interruption, or cleared), None when it played to its end unpaused.

    A reply whose audio runs out before its end (speech synthesised slower than it plays, or the
    next sentence not yet written) is played with silence in the gap: `last_reply_dry_s` is the
    last finished reply's total, and each reply that had one logs how long it was.
    """

    def __init__(
        self, *, sample_rate: int, frame_ms: int = 20, label: str = "paced-audio-out"
    ) -> None:
        super().__init__(
            label=label,
            capabilities=io.AudioOutputCapabilities(pause=True),
            sample_rate=sample_rate,
        )
        self.rate = sample_rate  # the sink's rate, never None (the base class allows None)
        self.samples_per_chunk = sample_rate * frame_ms // 1000
        self.frame_s = frame_ms / 1000
        self._queue: collections.deque[np.ndarray | _SegmentEnd] = collections.deque()
        self._capturing = False  # a reply is being captured (not yet flushed)
        self._cleared = False  # the reply being captured was cleared before its flush
        self._started = False  # the reply at the head of the queue has started playing
        self._played = 0  # samples of that reply pulled so far
        self._paused = False
        self._next_deadline: float | None = None
        self.chunks_out = 0  # chunks with reply audio (not silence) handed to the transport
        self._silent = 0  # samples of silence played since the current reply's last audio
        self._dry = 0  # samples of silence played between audio of the current reply
        self.last_reply_dry_s = 0.0  # seconds of silence played inside the last finished reply
        self._stopped_at: float | None = None  # when the playing reply was first paused or cleared
        self.last_reply_stopped_at: float | None = None

    # -- session side -------------------------------------------------------------------
    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        self._capturing = True
        if self._cleared:
            return  # the rest of an interrupted reply: never played
        if frame.sample_rate != self.rate or frame.num_channels != 1:
            raise ValueError(
                f"expected mono {self.rate} Hz, got {frame.num_channels} ch "
                f"{frame.sample_rate} Hz"
            )
        self._queue.append(np.frombuffer(frame.data, dtype=np.int16).copy())

    def flush(self) -> None:
        super().flush()
        if not self._capturing:
            return  # nothing captured: LiveKit counted no segment
        self._capturing = False
        if self._cleared:
            self._cleared = False
            self._finish(interrupted=True)
        else:
            self._queue.append(_SegmentEnd())

    def clear_buffer(self) -> None:
        self._note_stop()
        ends = sum(isinstance(item, _SegmentEnd) for item in self._queue)
        self._queue.clear()
        if self._capturing:
            self._cleared = True  # finished at its flush
        for _ in range(ends):
            self._finish(interrupted=True)

    def pause(self) -> None:
        super().pause()
        self._note_stop()
        self._paused = True

    def resume(self) -> None:
        super().resume()
        self._paused = False

    def _note_stop(self) -> None:
        if self._started and not self._paused and self._stopped_at is None:
            self._stopped_at = time.time()

    # -- transport side -----------------------------------------------------------------
    @property
    def playback_position_s(self) -> float:
        """Seconds of the current reply handed to the transport so far."""
        return self._played / self.rate

    def pull(self) -> np.ndarray:
        """The next `samples_per_chunk` samples (int16, mono); silence if none are queued."""
        out = np.zeros(self.samples_per_chunk, dtype=np.int16)
        if self._paused:
            return out
        filled = 0
        while filled < len(out) and self._queue:
            head = self._queue[0]
            if isinstance(head, _SegmentEnd):
                self._queue.popleft()
                self._finish(interrupted=False)
                continue
            filled += self._take(head, out[filled:])
        if filled:
            self.chunks_out += 1
        if self._started:  # silence inside a reply is a gap once more of its audio follows
            if filled and self._silent:
                self._dry, self._silent = self._dry + self._silent, 0
            self._silent += len(out) - filled
        return out

    async def next_chunk(self) -> np.ndarray:
        """`pull()` paced in real time: one chunk per `frame_ms` on the loop's clock."""
        now = time.monotonic()
        if self._next_deadline is None or now - self._next_deadline > self.frame_s * 5:
            self._next_deadline = now  # first call, or the consumer stalled: restart the clock
        elif self._next_deadline > now:
            await asyncio.sleep(self._next_deadline - now)
        self._next_deadline += self.frame_s
        return self.pull()

    def _take(self, head: np.ndarray, dest: np.ndarray) -> int:
        if not self._started:
            self._started = True
            self.on_playback_started(created_at=time.time())
        n = min(len(head), len(dest))
        dest[:n] = head[:n]
        if n == len(head):
            self._queue.popleft()
        else:
            self._queue[0] = head[n:]
        self._played += n
        return n

    def _finish(self, *, interrupted: bool) -> None:
        position = self.playback_position_s
        self.last_reply_dry_s = self._dry / self.rate
        self.last_reply_stopped_at, self._stopped_at = self._stopped_at, None
        if self._dry:
            logger.info("%s: a reply's audio ran dry for %.0f ms of its %.2f s", self.label,
                        1000 * self.last_reply_dry_s, position)
        self._played = self._dry = self._silent = 0  # silence at the end was no gap
        self._started = False
        self.on_playback_finished(playback_position=position, interrupted=interrupted)
