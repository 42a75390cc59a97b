"""Twilio Media Streams: the wire protocol and the agent's audio output for one call.

From the provider (JSON text frames): `connected`, then `start` once (streamSid, callSid,
customParameters, mediaFormat = μ-law 8 kHz mono), `media` (base64 μ-law, ~20 ms each), `dtmf`,
`mark` (echoed once the audio sent before it has played, or was cleared) and `stop`.
To the provider: `media`, `mark` and `clear` (drop everything buffered: the barge-in primitive).

`parse_message` turns one frame into a typed event or raises `ProtocolError` with a reason fit
for a log line. `TwilioAudioOutput` is the shared paced output with the playout clock moved to
the far end: every 20 ms chunk sent is followed by a mark, and only echoed marks advance the
playback position, so LiveKit's history keeps what the caller actually heard and the latency
is measured at playout rather than at send.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.audio_io import PacedAudioOutput

logger = logging.getLogger(__name__)

SAMPLE_RATE = 8000  # the only rate Media Streams carries
ENCODING = "audio/x-mulaw"
FRAME_MS = 20  # the provider's frame; we send the same size
# μ-law is one byte per sample; frames are 160 bytes, anything past 1 s is not a phone frame
MAX_MEDIA_PAYLOAD_BYTES = SAMPLE_RATE
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class ProtocolError(ValueError):
    """A frame that breaks the protocol; `kind` groups them for counting and logging."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class Connected:
    protocol: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    custom_parameters: dict[str, str]
    encoding: str
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class Media:
    stream_sid: str
    payload: bytes  # μ-law samples
    timestamp_ms: int | None  # since the stream started, as the provider counts it
    chunk: int | None
    track: str = "inbound"  # "outbound" only if a one-way <Start><Stream> also sends ours


@dataclass(frozen=True)
class Dtmf:
    stream_sid: str
    digit: str


@dataclass(frozen=True)
class Mark:
    stream_sid: str
    name: str


@dataclass(frozen=True)
class Stop:
    stream_sid: str


TwilioEvent = Connected | Start | Media | Dtmf | Mark | Stop


def _field(obj: dict, key: str, kind: type, event: str) -> object:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise ProtocolError("bad-field", f"{event}.{key} missing or not {kind.__name__}")
    return value


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]  # the provider sends numeric strings
    except (TypeError, ValueError):
        return None


def _parse_start(msg: dict) -> Start:
    body = _field(msg, "start", dict, "start")
    assert isinstance(body, dict)
    fmt = _field(body, "mediaFormat", dict, "start")
    assert isinstance(fmt, dict)
    params = body.get("customParameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("bad-field", "start.customParameters is not an object")
    return Start(
        stream_sid=str(_field(body, "streamSid", str, "start")),
        call_sid=str(_field(body, "callSid", str, "start")),
        custom_parameters={str(k): str(v) for k, v in params.items()},
        encoding=str(fmt.get("encoding")),
        sample_rate=_int_or_none(fmt.get("sampleRate")) or 0,
        channels=_int_or_none(fmt.get("channels")) or 0,
    )


def _parse_media(msg: dict, sid: str) -> Media:
    body = _field(msg, "media", dict, "media")
    assert isinstance(body, dict)
    try:
        payload = base64.b64decode(str(_field(body, "payload", str, "media")), validate=True)
    except binascii.Error as e:
        raise ProtocolError("bad-base64", str(e)) from None
    if not 0 < len(payload) <= MAX_MEDIA_PAYLOAD_BYTES:
        raise ProtocolError("bad-payload-size", f"{len(payload)} bytes")
    return Media(sid, payload, _int_or_none(body.get("timestamp")),
                 _int_or_none(body.get("chunk")), str(body.get("track") or "inbound"))


def _parse_dtmf(msg: dict, sid: str) -> Dtmf:
    body = _field(msg, "dtmf", dict, "dtmf")
    assert isinstance(body, dict)
    digit = body.get("digit")
    if not isinstance(digit, str) or digit not in DTMF_DIGITS:
        raise ProtocolError("bad-dtmf", f"digit {digit!r}")
    return Dtmf(sid, digit)


def _parse_mark(msg: dict, sid: str) -> Mark:
    body = _field(msg, "mark", dict, "mark")
    assert isinstance(body, dict)
    return Mark(sid, str(_field(body, "name", str, "mark")))


def parse_message(raw: str | bytes) -> TwilioEvent:
    """One WebSocket frame -> one event. Raises `ProtocolError` for anything else."""
    if isinstance(raw, bytes):
        raise ProtocolError("binary-frame", f"{len(raw)} bytes; the protocol is JSON text")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also: 4,300-digit integers, deep nesting
        raise ProtocolError("not-json", str(e)) from None
    if not isinstance(msg, dict):
        raise ProtocolError("not-json", f"a JSON {type(msg).__name__}, not an object")
    event = msg.get("event")
    sid = msg.get("streamSid")
    sid = sid if isinstance(sid, str) else ""
    if event == "media":
        return _parse_media(msg, sid)
    if event == "mark":
        return _parse_mark(msg, sid)
    if event == "dtmf":
        return _parse_dtmf(msg, sid)
    if event == "start":
        return _parse_start(msg)
    if event == "connected":
        return Connected(str(msg.get("protocol", "")))
    if event == "stop":
        return Stop(sid)
    raise ProtocolError("unknown-event", repr(event)[:40])


def media_message(stream_sid: str, ulaw: bytes) -> str:
    payload = base64.b64encode(ulaw).decode()
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def mark_message(stream_sid: str, name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    return json.dumps({"event": "clear", "streamSid": stream_sid})


@dataclass
class _Pending:
    """A reply fully sent whose end the caller has not heard yet."""

    segment: int
    samples: int
    deadline_s: float  # monotonic; past it without an echo, fall back to the send clock


@dataclass
class PlayoutStats:
    chunks_sent: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    clears_sent: int = 0
    mark_timeouts: int = 0
    playout_starts: list[float] = field(default_factory=list)  # wall time each reply was heard


# Audio sent ahead of the far end's playout: absorbs network jitter (Twilio plays silence on an
# underrun) and bounds what a `clear` has to drop and what is lost if the socket dies.
SEND_LEAD_S = 0.1


class TwilioAudioOutput(PacedAudioOutput):
    """The agent's voice on the phone line: μ-law 8 kHz, paced, positions from echoed marks.

    The call's sender task loops on `next_message_batch()`, which waits for the send clock and
    returns the frames to write (`media` then `mark`). Marks are named `epoch:segment:samples`
    (segment = reply index, samples = its audio sent so far); `on_mark(name)` takes the echoes:
    they start a reply's playback and move its position; `clear_buffer()` (an interruption)
    writes `clear` through `send_now` and starts a new epoch, since the provider then echoes
    the dropped marks as well. A reply whose final mark never returns is ended `mark_timeout_s`
    after its expected playout, at its sent length. `pause()` (a possibly false interruption)
    stops sending; the at most SEND_LEAD_S already on the line still plays.
    """

    def __init__(self, *, stream_sid: str, encode: Callable[[np.ndarray], bytes],
                 send_now: Callable[[str], None], mark_timeout_s: float) -> None:
        super().__init__(sample_rate=SAMPLE_RATE, frame_ms=FRAME_MS, label="twilio-out")
        self._sid = stream_sid
        self._encode = encode
        self._send_now = send_now
        self._mark_timeout_s = mark_timeout_s
        self._epoch = 0  # bumped by every clear: older echoes say nothing about playout
        self._segment = 0  # index of the reply at the head of the playout queue
        self._heard: dict[int, int] = {}  # segment -> samples the caller has heard
        self._pending: list[_Pending] = []  # sent, awaiting the echo of their end
        self._finished_in_pull = False
        self._sent_since_clear = 0
        self._line_end_s = 0.0  # monotonic time the far end's buffer runs dry, by our clock
        self.stats = PlayoutStats()

    # -- PacedAudioOutput hooks: the caller's ear, not the send clock, ends a reply ----------
    def on_playback_started(self, *, created_at: float) -> None:
        """Sending began; playback is reported when the reply's first mark is echoed."""

    def _finish(self, *, interrupted: bool) -> None:
        sent = self._played
        self._played = 0
        self._started = False
        segment = self._segment
        self._segment += 1
        self._finished_in_pull = True
        if interrupted:
            self._report(segment, interrupted=True, samples=self._heard.get(segment, 0))
            return
        deadline = max(time.monotonic(), self._line_end_s) + self._mark_timeout_s
        self._pending.append(_Pending(segment, sent, deadline))

    def clear_buffer(self) -> None:
        logger.debug("stream %s: clear_buffer", self._sid)
        pending, self._pending = self._pending, []
        for p in pending:
            self._report(p.segment, interrupted=True, samples=self._heard.get(p.segment, 0))
        super().clear_buffer()  # finishes queued replies through _finish(interrupted=True)
        if self._sent_since_clear:
            self._send_now(clear_message(self._sid))
            self.stats.clears_sent += 1
            self._sent_since_clear = 0
            self._epoch += 1
            self._line_end_s = time.monotonic()

    def pause(self) -> None:
        logger.debug("stream %s: pause", self._sid)
        super().pause()

    def resume(self) -> None:
        logger.debug("stream %s: resume", self._sid)
        super().resume()

    def _report(self, segment: int, *, interrupted: bool, samples: int) -> None:
        logger.debug("stream %s: reply %d ended at %.2f s%s", self._sid, segment,
                     samples / SAMPLE_RATE, " (interrupted)" if interrupted else "")
        self._heard.pop(segment, None)
        self.on_playback_finished(playback_position=samples / SAMPLE_RATE,
                                  interrupted=interrupted)

    # -- the sender's side ---------------------------------------------------------------
    async def next_message_batch(self) -> list[str]:
        """Wait for the send clock; the frames to write now (none while idle or paused)."""
        await asyncio.sleep(self._send_wait_s())
        before = self.chunks_out
        self._finished_in_pull = False
        pcm = self.pull()
        out: list[str] = []
        if self.chunks_out != before:
            out.append(media_message(self._sid, self._encode(pcm)))
            self.stats.chunks_sent += 1
            self._sent_since_clear += 1
            self._line_end_s = max(time.monotonic(), self._line_end_s) + self.frame_s
        if out or self._finished_in_pull:
            name = f"{self._epoch}:{self._segment}:{self._played}"
            out.append(mark_message(self._sid, name))
            self.stats.marks_sent += 1
        self.check_timeouts()
        return out

    def _send_wait_s(self) -> float:
        """Idle: one tick. Audio queued: at once until SEND_LEAD_S ahead, then real time."""
        if not self._queue or self._paused:
            return self.frame_s
        return max(0.0, self._line_end_s - time.monotonic() - SEND_LEAD_S)

    def on_mark(self, name: str) -> None:
        """The provider echoed `name`: the audio sent before it has been heard (or cleared)."""
        try:
            epoch, segment, samples = (int(x) for x in name.split(":"))
        except ValueError:
            raise ProtocolError("unknown-mark", repr(name)[:40]) from None
        self.stats.marks_echoed += 1
        if epoch != self._epoch:
            return  # sent before a clear: echoed because it was dropped, not played
        self._finish_pending_before(segment)
        live = segment == self._segment or any(p.segment == segment for p in self._pending)
        if samples > 0 and live:
            self._heard_progress(segment, samples)

    def _heard_progress(self, segment: int, samples: int) -> None:
        if segment not in self._heard:
            created = time.time() - min(samples / SAMPLE_RATE, self.frame_s)
            self.stats.playout_starts.append(created)
            super(PacedAudioOutput, self).on_playback_started(created_at=created)
        self._heard[segment] = max(self._heard.get(segment, 0), samples)

    def _finish_pending_before(self, segment: int) -> None:
        while self._pending and self._pending[0].segment < segment:
            p = self._pending.pop(0)
            if p.segment not in self._heard:
                self._heard_progress(p.segment, p.samples)
            self._report(p.segment, interrupted=False, samples=p.samples)

    def check_timeouts(self) -> None:
        """End replies whose final mark is overdue, at their sent length (a peer not echoing)."""
        now = time.monotonic()
        while self._pending and self._pending[0].deadline_s < now:
            p = self._pending.pop(0)
            self.stats.mark_timeouts += 1
            if self.stats.mark_timeouts == 1:
                logger.warning("stream %s: marks are not echoed; playout assumed from the send "
                               "clock", self._sid)
            self._report(p.segment, interrupted=False, samples=p.samples)
