"""A simulated Twilio Media Streams caller, written from the protocol description.

It plays the provider's side of a bidirectional `<Connect><Stream>`: sends `connected` and
`start`, streams the caller's voice as base64 μ-law 8 kHz mono `media` frames of 20 ms in real
time, sends `dtmf` and `stop`; and it receives the agent's `media`, `mark` and `clear`.

Agent audio is "played" on a simulated phone line: each received chunk is queued behind the
audio already buffered, so `heard` holds what the caller heard and when (the same times a person
would). A `mark` is echoed when the audio sent before it has played out; `clear` drops the
buffered audio and echoes the pending marks at once, as Twilio does. All times are
`time.monotonic()` seconds.

    caller = TwilioCaller("ws://127.0.0.1:8765")
    await caller.connect()
    await caller.start(custom_parameters={"token": "s3cret"})
    caller.start_line()                                   # silence every 20 ms, like a phone
    t_end = await caller.send_pcm(question_pcm, 22050)    # spoken on the line; last-sample time
    t_heard = await caller.wait_for_reply(t_end)          # reply's first audible playout time
    clear_after_s = await caller.barge_in(interruption_pcm, 22050)  # speech start -> `clear`
    await caller.stop()
    await caller.close()
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import soxr
import websockets

from audio.speech_eval import MicNoise

SAMPLE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz: the frame size Twilio streams
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE

# G.711 μ-law (ITU-T G.711): bias 0x84, clip at 32635, 8 segments; written here independently of
# the server's codec so the tests check one against the other.
_ULAW_BIAS = 0x84
_ULAW_CLIP = 32635


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> μ-law bytes."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), _ULAW_CLIP) + _ULAW_BIAS
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7  # 0..7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> int16 samples."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mag = (((u & 0x0F) << 3) + _ULAW_BIAS) << exponent
    return np.where(u & 0x80, _ULAW_BIAS - mag, mag - _ULAW_BIAS).astype(np.int16)


def to_8k_int16(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """float in [-1, 1] or int16 samples at any rate -> int16 at 8 kHz."""
    x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
    if sample_rate != SAMPLE_RATE:
        x = soxr.resample(x, sample_rate, SAMPLE_RATE)
    return (np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)


def line_audio(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """What `send_pcm` puts on the line: 8 kHz int16, padded to whole 20 ms frames."""
    x = to_8k_int16(pcm, sample_rate)
    return np.pad(x, (0, -len(x) % FRAME_SAMPLES))


@dataclass
class HeardChunk:
    t_start_s: float  # when this chunk started playing on the simulated line
    pcm: np.ndarray  # int16 at 8 kHz; truncated if a clear cut it short


@dataclass
class CallerLog:
    """Everything the caller received, with arrival times."""

    media_arrivals: list[tuple[float, int]] = field(default_factory=list)  # (t, samples)
    marks_received: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)  # unexpected messages, for assertions


class TwilioCaller:
    """The provider's end of one call. Not thread-safe; use from one event loop."""

    def __init__(self, url: str, *, echo_marks: bool = True, noise: MicNoise | None = None) -> None:
        self.url = url
        self.echo_marks = echo_marks
        self.noise = noise or MicNoise(None)  # the line's noise floor, speech and silence
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.call_sid = "CA" + uuid.uuid4().hex
        self.log = CallerLog()
        self.heard: list[HeardChunk] = []
        self.closed = asyncio.Event()
        self._ws: websockets.ClientConnection | None = None
        self._receiver: asyncio.Task | None = None
        self._playout_end_s = 0.0  # when the line's buffered agent audio finishes playing
        self._pending_marks: dict[str, asyncio.TimerHandle] = {}
        self._echo_tasks: set[asyncio.Task] = set()
        self._chunk = 0
        self._t0 = 0.0
        self._line: asyncio.Task | None = None
        self._speech = np.zeros(0, np.int16)  # queued for the line, 8 kHz
        self._speech_done = asyncio.Event()
        self._audio_event = asyncio.Event()
        self._clear_event = asyncio.Event()

    # -- connection ------------------------------------------------------------------------
    async def connect(self, **connect_kwargs) -> None:
        self._ws = await websockets.connect(self.url, **connect_kwargs)
        self._receiver = asyncio.create_task(self._receive_loop())
        self._t0 = time.monotonic()

    async def close(self) -> None:
        """Close the socket (a hang-up without `stop` if `stop()` was not called)."""
        await self.stop_line()
        for handle in self._pending_marks.values():
            handle.cancel()
        self._pending_marks.clear()
        if self._ws is not None:
            await self._ws.close()
        if self._receiver is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._receiver

    async def send_json(self, message: dict) -> None:
        await self.send_raw(json.dumps(message))

    async def send_raw(self, data: str | bytes) -> None:
        assert self._ws is not None, "connect() first"
        await self._ws.send(data)

    # -- events to the agent ---------------------------------------------------------------
    async def start(self, *, custom_parameters: dict[str, str] | None = None,
                    media_format: dict | None = None, send_connected: bool = True) -> None:
        if send_connected:
            await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        fmt = media_format or {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE,
                               "channels": 1}
        await self.send_json({
            "event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid,
            "start": {
                "streamSid": self.stream_sid, "callSid": self.call_sid,
                "accountSid": "AC" + uuid.uuid4().hex, "tracks": ["inbound"],
                "customParameters": custom_parameters or {}, "mediaFormat": fmt,
            },
        })

    def start_line(self) -> None:
        """Stream like a real phone line: a frame every 20 ms, silence unless `send_pcm` speaks."""
        assert self._line is None
        self._line = asyncio.create_task(self._line_loop())

    async def stop_line(self) -> None:
        if self._line is not None:
            self._line.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await self._line
            self._line = None

    async def _line_loop(self) -> None:
        silence = np.zeros(FRAME_SAMPLES, np.int16)
        t_next = time.monotonic()
        while True:
            frame, self._speech = self._speech[:FRAME_SAMPLES], self._speech[FRAME_SAMPLES:]
            await self.send_media(ulaw_encode(self.noise.add(frame if len(frame) else silence)))
            if len(frame) and not len(self._speech):
                self._speech_done.set()
            t_next += FRAME_S
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def send_media(self, ulaw: bytes) -> None:
        """One `media` frame carrying `ulaw` as is (any length: tests send bad sizes too)."""
        self._chunk += 1
        await self.send_json({
            "event": "media", "sequenceNumber": str(self._chunk + 1), "streamSid": self.stream_sid,
            "media": {"track": "inbound", "chunk": str(self._chunk),
                      "timestamp": str(int((time.monotonic() - self._t0) * 1000)),
                      "payload": base64.b64encode(ulaw).decode()},
        })

    async def send_pcm(self, pcm: np.ndarray, sample_rate: int, *, realtime: bool = True) -> float:
        """Stream audio as 20 ms μ-law frames, paced like a phone line when `realtime`.

        Returns the monotonic time at which the last frame was sent (the end of the speech).
        """
        x = line_audio(pcm, sample_rate)
        if self._line is not None and realtime:  # the line's clock sends it
            self._speech_done.clear()
            self._speech = np.concatenate([self._speech, x])
            await self._speech_done.wait()
            return time.monotonic()
        t_next = time.monotonic()
        for i in range(0, len(x), FRAME_SAMPLES):
            await self.send_media(ulaw_encode(x[i:i + FRAME_SAMPLES]))
            if realtime:
                t_next += FRAME_S
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))
        return time.monotonic()

    async def send_silence(self, duration_s: float, *, realtime: bool = True) -> float:
        return await self.send_pcm(np.zeros(int(duration_s * SAMPLE_RATE), np.int16),
                                   SAMPLE_RATE, realtime=realtime)

    async def barge_in(self, pcm: np.ndarray, sample_rate: int, *,
                       timeout_s: float = 5.0) -> float | None:
        """Speak over the agent. Returns seconds from the start of this speech to the agent's
        `clear`, or None if none came within `timeout_s` of it."""
        t_start = time.monotonic()
        n_clears = len(self.log.clears)
        await self.send_pcm(pcm, sample_rate)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, t_start + timeout_s - time.monotonic())):
                while len(self.log.clears) == n_clears:  # noqa: ASYNC110 - read off the log
                    await asyncio.sleep(0.01)
        return self.log.clears[n_clears] - t_start if len(self.log.clears) > n_clears else None

    async def send_dtmf(self, digit: str) -> None:
        await self.send_json({"event": "dtmf", "streamSid": self.stream_sid,
                              "dtmf": {"track": "inbound_track", "digit": digit}})

    async def stop(self) -> None:
        await self.stop_line()
        await self.send_json({"event": "stop", "streamSid": self.stream_sid,
                              "stop": {"accountSid": "AC", "callSid": self.call_sid}})

    # -- what the caller got ---------------------------------------------------------------
    def heard_audio(self) -> np.ndarray:
        """All agent audio the caller heard, int16 at 8 kHz, gaps removed."""
        if not self.heard:
            return np.zeros(0, np.int16)
        return np.concatenate([c.pcm for c in self.heard])

    def first_audible_s(self, after_s: float = 0.0, threshold: int = 500) -> float | None:
        """Playout time of the first agent sample above `threshold` starting after `after_s`.
        Chunks that ended before it are skipped unread: the bench asks every 50 ms, in the
        process of the server it measures, over a call's thousands of chunks."""
        first = bisect.bisect_left(self.heard, after_s,
                                   key=lambda c: c.t_start_s + len(c.pcm) / SAMPLE_RATE)
        for c in self.heard[first:]:
            loud = np.flatnonzero(np.abs(c.pcm.astype(np.int32)) > threshold)
            if len(loud) and c.t_start_s + loud[0] / SAMPLE_RATE >= after_s:
                return c.t_start_s + loud[0] / SAMPLE_RATE
        return None

    async def wait_for_audio(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._audio_event.wait(), timeout_s)

    async def wait_for_clear(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._clear_event.wait(), timeout_s)

    async def wait_for_reply(self, after_s: float, *, quiet_s: float = 1.0,
                             timeout_s: float = 30.0) -> float | None:
        """Wait for agent audio arriving after `after_s`, then for it to end (`quiet_s` without
        audio, line played out). Returns the reply's first audible playout time, or None."""
        deadline = time.monotonic() + timeout_s
        while not (self.log.media_arrivals and self.log.media_arrivals[-1][0] > after_s):
            if time.monotonic() > deadline:
                raise TimeoutError("no reply")
            await asyncio.sleep(0.02)
        await self.wait_until_quiet(quiet_s, max(0.0, deadline - time.monotonic()))
        return self.first_audible_s(after_s=after_s)

    async def wait_until_quiet(self, quiet_s: float, timeout_s: float) -> None:
        """Wait until no agent audio has arrived for `quiet_s` and the line has played out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            last = self.log.media_arrivals[-1][0] if self.log.media_arrivals else 0.0
            now = time.monotonic()
            if now - last >= quiet_s and now >= self._playout_end_s:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("agent audio kept coming")

    # -- receiving -------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                self._on_message(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def _on_message(self, msg: dict) -> None:
        event = msg.get("event")
        if msg.get("streamSid") != self.stream_sid:
            self.log.other.append(msg)
        elif event == "media":
            self._play(ulaw_decode(base64.b64decode(msg["media"]["payload"])))
        elif event == "mark":
            self._on_mark(msg["mark"]["name"])
        elif event == "clear":
            self._on_clear()
        else:
            self.log.other.append(msg)

    def _play(self, pcm: np.ndarray) -> None:
        now = time.monotonic()
        start = max(now, self._playout_end_s)
        self._playout_end_s = start + len(pcm) / SAMPLE_RATE
        self.log.media_arrivals.append((now, len(pcm)))
        self.heard.append(HeardChunk(start, pcm))
        self._audio_event.set()

    def _on_mark(self, name: str) -> None:
        now = time.monotonic()
        self.log.marks_received.append((now, name))
        if not self.echo_marks:
            return
        delay = max(0.0, self._playout_end_s - now)
        self._pending_marks[name] = asyncio.get_running_loop().call_later(
            delay, lambda: self._echo_mark(name))

    def _echo_mark(self, name: str) -> None:
        self._pending_marks.pop(name, None)
        self.log.marks_echoed.append((time.monotonic(), name))
        if self._ws is not None:
            task = asyncio.create_task(self.send_json(
                {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}))
            self._echo_tasks.add(task)
            task.add_done_callback(self._echo_done)

    def _echo_done(self, task: asyncio.Task) -> None:
        self._echo_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a socket closed under an echo is fine: mark it retrieved

    def _on_clear(self) -> None:
        now = time.monotonic()
        self.log.clears.append(now)
        self._truncate_heard(now)
        self._playout_end_s = now
        for name, handle in list(self._pending_marks.items()):
            handle.cancel()
            self._echo_mark(name)
        self._clear_event.set()

    def _truncate_heard(self, now: float) -> None:
        kept: list[HeardChunk] = []
        for c in self.heard:
            played = int((now - c.t_start_s) * SAMPLE_RATE)
            if played > 0:
                kept.append(HeardChunk(c.t_start_s, c.pcm[:played]))
        self.heard = kept
