"""`diffvoice phone`: the agent on the phone via Twilio Media Streams, no LiveKit server.

    provider --wss (TLS proxy)--> PhoneServer --one Call per socket--> AgentSession
      media (μ-law 8 kHz) -> decode, 8 -> 16 kHz -> QueueAudioInput -> VAD / STT / turns
      TTS -> TwilioAudioOutput (μ-law 8 kHz, paced) -> media + mark; barge-in -> clear
      dtmf -> digits collected until '#' or a pause -> one user message
      stop or socket close -> session closed, per-call record logged

Each call has its own session (shared models) and its own tasks; a broken call is logged and
ended without touching the others. Bad frames are counted per kind, logged once per kind at
WARNING, and end the call only past `max_bad_messages`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.transcription import TranscriptSynchronizer
from websockets.asyncio.server import Server, ServerConnection

from agent import twilio_io as tw
from agent.audio_io import QueueAudioInput
from agent.metrics import ClientTextOutput, TurnReporter
from agent.session import Models, build_session, start_session
from agent.settings import PhoneSettings, Settings
from audio.codecs import StreamResampler, mulaw_decode, mulaw_encode
from llm.settings import usage_errors

logger = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 / IANA)
CLOSE_POLICY = 1008  # refused: bad secret, wrong media format
CLOSE_TRY_AGAIN = 1013  # the server is at max_calls
SESSION_CLOSE_TIMEOUT_S = 5.0  # a session still busy after this is abandoned with a log line
MAX_FINISHED = 100  # ended calls kept for inspection
# burst allowance of the media flood guard, in seconds of the sustained rate: 3 s at 150
# frames/s = 9 s of audio, more than a provider replays after a stall
FLOOD_BURST_S = 3.0
MAX_KEYPAD_DIGITS = 32  # longer than any card or account number: submit rather than grow


@dataclass
class CallStats:
    """Per-call counters; logged and written as one JSON line when the call ends."""

    call_sid: str = ""
    stream_sid: str = ""
    t_start_s: float = field(default_factory=time.time)
    duration_s: float = 0.0
    end_reason: str = ""
    media_frames_in: int = 0
    flood_dropped: int = 0
    queue_dropped: int = 0
    bad: Counter = field(default_factory=Counter)
    dtmf_digits: int = 0
    user_stop_to_heard_s: list[float] = field(default_factory=list)


class _FloodGuard:
    """A token bucket: `max_per_s` frames a second sustained, bursts up to FLOOD_BURST_S of that.

    A provider catching up after a network stall sends a burst of frames that are all real
    speech; only a sustained excess (a replay, a broken or hostile peer) is dropped.
    """

    def __init__(self, max_per_s: int) -> None:
        self.max_per_s = max_per_s
        self.capacity = max_per_s * FLOOD_BURST_S
        self._tokens = self.capacity
        self._last = time.monotonic()

    def allow(self, now: float) -> bool:
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.max_per_s)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class KeypadEntry:
    """Keypad digits collected until '#' or `gap_s` of quiet, then handed on as one string.

    add("4"), add("2"), add("#") -> submit("42");  add("7") + gap_s of quiet -> submit("7")
    """

    def __init__(self, gap_s: float, submit: Callable[[str], None]) -> None:
        self.gap_s = gap_s
        self.submit = submit
        self._digits = ""
        self._timer: asyncio.TimerHandle | None = None

    def add(self, digit: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if digit != "#":
            self._digits += digit
        if digit == "#" or len(self._digits) >= MAX_KEYPAD_DIGITS:  # '#' ends it, as on a PBX
            self.flush()
        else:
            self._timer = asyncio.get_running_loop().call_later(self.gap_s, self.flush)

    def flush(self) -> None:
        digits, self._digits = self._digits, ""
        self.cancel()
        if digits:
            self.submit(digits)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def reply_to_keypad(session: AgentSession, text_template: str, digits: str) -> None:
    """Keypad digits as the caller's next turn; a reply being spoken is interrupted first."""
    if session.agent_state == "speaking":
        with contextlib.suppress(RuntimeError):  # a reply that may not be interrupted
            session.interrupt().add_done_callback(_retrieve)
    session.generate_reply(user_input=text_template.format(digits=" ".join(digits)))


class _TooManyBad(Exception):
    pass


class Call:
    """One phone call: the provider's socket bridged to its own `AgentSession`."""

    def __init__(self, ws: ServerConnection, settings: Settings, models: Models, *,
                 keep_events: bool = False, admit: Callable[[Call], bool] = lambda call: True,
                 ) -> None:
        self.ws = ws
        self.admit = admit  # asked once `start` checks out: is there a place for this call?
        self.started = False  # admitted: the call holds a session
        self.settings = settings
        self.cfg: PhoneSettings = settings.phone
        self.models = models
        self.stats = CallStats()
        self.session: AgentSession | None = None
        self.audio_in: QueueAudioInput | None = None
        self.audio_out: tw.TwilioAudioOutput | None = None
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._flood = _FloodGuard(self.cfg.max_media_frames_per_s)
        self._resampler = StreamResampler(tw.SAMPLE_RATE, self.cfg.input_sample_rate)
        self._digits = KeypadEntry(self.cfg.dtmf_gap_s, self._submit_digits)
        self._user_stopped_at: float | None = None
        self._sync: TranscriptSynchronizer | None = None
        # the events a page would receive (transcripts, reply text, turn metrics), kept only
        # for a caller in this process that reads them (`diffvoice bench`): a phone line has
        # no channel for them
        self.events: list[dict[str, Any]] | None = [] if keep_events else None

    @property
    def name(self) -> str:
        return self.stats.call_sid or f"socket {self.ws.id.hex[:8]}"

    async def run(self) -> None:
        """Serve the call until `stop`, a socket close, a timeout or too many bad frames."""
        try:
            start = await self._wait_for_start()
            if start is not None and await self._accept(start):
                await self._start_session(start)
                await self._read_loop()
        except _TooManyBad:
            self.stats.end_reason = "too many malformed messages"
        except Exception:
            logger.exception("%s: failed", self.name)
            self.stats.end_reason = "error"
        finally:
            await self._close()
            self._record()

    # -- before the session --------------------------------------------------------------
    async def _recv(self, timeout_s: float) -> str | bytes | None:
        """The next frame; None (with end_reason set) on timeout or a closed socket."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self.ws.recv()
        except TimeoutError:
            self.stats.end_reason = f"nothing received for {timeout_s:g} s"
        except websockets.ConnectionClosed as e:
            self.stats.end_reason = f"socket closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
        return None

    async def _wait_for_start(self) -> tw.Start | None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while (raw := await self._recv(max(0.0, deadline - time.monotonic()))) is not None:
            try:
                event = tw.parse_message(raw)
            except tw.ProtocolError as e:
                self._bad(e.kind, str(e))
                continue
            if isinstance(event, tw.Start):
                return event
            if isinstance(event, tw.Stop):
                self.stats.end_reason = "stop before start"
                return None
            if not isinstance(event, tw.Connected):
                self._bad("before-start", f"{type(event).__name__.lower()} before start")
        if self.stats.end_reason.startswith("nothing received"):
            self.stats.end_reason = "no start"
        return None

    async def _accept(self, start: tw.Start) -> bool:
        self.stats.call_sid, self.stats.stream_sid = start.call_sid, start.stream_sid
        fmt = (start.encoding, start.sample_rate, start.channels)
        if fmt != (tw.ENCODING, tw.SAMPLE_RATE, 1):
            return await self._refuse(f"unsupported media format {fmt}")
        secret = self.cfg.shared_secret
        given = start.custom_parameters.get(self.cfg.secret_parameter, "")
        if secret and not hmac.compare_digest(given.encode(), secret.encode()):
            return await self._refuse(f"wrong or missing custom parameter "
                                      f"{self.cfg.secret_parameter!r}")
        if not self.admit(self):
            logger.warning("%s: refused: %d calls in progress", self.name, self.cfg.max_calls)
            self.stats.end_reason = "refused: busy"
            await self.ws.close(CLOSE_TRY_AGAIN, "busy")
            return False
        return True

    async def _refuse(self, reason: str) -> bool:
        logger.warning("%s: refused: %s", self.name, reason)
        self.stats.end_reason = f"refused: {reason}"
        await self.ws.close(CLOSE_POLICY, reason[:100])
        return False

    async def _start_session(self, start: tw.Start) -> None:
        self.audio_in = QueueAudioInput(label="twilio-in")
        self.audio_out = tw.TwilioAudioOutput(
            stream_sid=start.stream_sid, encode=mulaw_encode,
            send_now=self._outbox.put_nowait, mark_timeout_s=self.cfg.mark_timeout_s)
        session, agent = build_session(self.settings, self.models, session_id=start.call_sid)
        self.session = session
        send = self.events.append if self.events is not None else _drop
        TurnReporter(start.call_sid, send, self.cfg.metrics_log or None).attach(session)
        session.on("user_state_changed", self._on_user_state)
        session.on("close", self._on_session_close)
        self.audio_out.on("playback_started", self._on_heard)
        self._spawn(self._writer())
        self._spawn(self._pacer())
        logger.info("%s: call started (stream %s)", self.name, start.stream_sid)
        # the synchroniser maps the heard position to the words heard, so an interrupted reply
        # enters the history cut where the caller stopped hearing it
        self._sync = TranscriptSynchronizer(next_in_chain_audio=self.audio_out,
                                            next_in_chain_text=None)
        session.output.transcription = ClientTextOutput(send,
                                                        next_in_chain=self._sync.text_output)
        await start_session(session, agent, audio_in=self.audio_in,
                            audio_out=self._sync.audio_output,
                            greeting=self.settings.session.greeting)

    # -- during the call -----------------------------------------------------------------
    async def _read_loop(self) -> None:
        while (raw := await self._recv(self.cfg.media_timeout_s)) is not None:
            try:
                event = tw.parse_message(raw)
                if not self._handle(event):
                    return
            except tw.ProtocolError as e:
                self._bad(e.kind, str(e))
        if self.stats.end_reason.startswith("nothing received"):
            self.stats.end_reason = "no media (caller vanished)"

    def _handle(self, event: tw.TwilioEvent) -> bool:
        """Act on one event; False ends the call."""
        if isinstance(event, tw.Stop):
            self.stats.end_reason = "stop"
            return False
        if isinstance(event, tw.Connected | tw.Start):
            self._bad("repeated-handshake", f"{type(event).__name__.lower()} after start")
        elif event.stream_sid != self.stats.stream_sid:
            self._bad("wrong-stream", f"streamSid {event.stream_sid[:40]!r}")
        elif isinstance(event, tw.Media):
            if event.track == "outbound":  # our own voice coming back: never the caller
                self._bad("outbound-track", "media of the outbound track")
            else:
                self._on_media(event)
        elif isinstance(event, tw.Mark):
            assert self.audio_out is not None
            self.audio_out.on_mark(event.name)
        elif isinstance(event, tw.Dtmf):
            self.stats.dtmf_digits += 1
            self._digits.add(event.digit)
        return True

    def _on_media(self, event: tw.Media) -> None:
        assert self.audio_in is not None
        self.stats.media_frames_in += 1
        if not self._flood.allow(time.monotonic()):
            self.stats.flood_dropped += 1
            if self.stats.flood_dropped == 1:
                logger.warning("%s: media faster than %d frames/s for too long: dropping the "
                               "excess", self.name, self.cfg.max_media_frames_per_s)
            return
        pcm = self._resampler.push(mulaw_decode(event.payload))  # (n,) int16
        if len(pcm):
            self.audio_in.push(rtc.AudioFrame(pcm.tobytes(), self.cfg.input_sample_rate, 1,
                                              len(pcm)))
        if self.audio_in.dropped_frames and not self.stats.queue_dropped:
            logger.warning("%s: the session is not keeping up: dropping old input audio",
                           self.name)
        self.stats.queue_dropped = self.audio_in.dropped_frames

    def _bad(self, kind: str, detail: str) -> None:
        self.stats.bad[kind] += 1
        if self.stats.bad[kind] == 1:
            logger.warning("%s: ignored a bad message (%s); further ones of this kind are "
                           "counted", self.name, detail[:120])
        if self.stats.bad.total() > self.cfg.max_bad_messages:
            logger.warning("%s: more than %d bad messages: ending the call", self.name,
                           self.cfg.max_bad_messages)
            raise _TooManyBad

    def _submit_digits(self, digits: str) -> None:
        session = self.session
        if session is None:
            return
        logger.info("%s: %d keypad digits", self.name, len(digits))
        reply_to_keypad(session, self.cfg.dtmf_text, digits)

    def _on_user_state(self, event: Any) -> None:
        """Remember the end of the caller's last stretch of speech before a reply."""
        if event.new_state == "speaking":
            self._user_stopped_at = None  # a pause inside the turn, not its end
        elif event.old_state == "speaking" and event.new_state == "listening":
            self._user_stopped_at = event.created_at

    def _on_heard(self, event: Any) -> None:
        if self._user_stopped_at is None:
            return
        latency = event.created_at - self._user_stopped_at
        self._user_stopped_at = None
        self.stats.user_stop_to_heard_s.append(round(latency, 4))
        logger.info("%s: user stop -> reply heard %.3f s", self.name, latency)

    def _on_session_close(self, event: Any) -> None:
        logger.info("%s: session closed (%s)", self.name, getattr(event, "reason", "?"))
        self._spawn(self.ws.close())

    async def _writer(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await self.ws.send(await self._outbox.get())

    async def _pacer(self) -> None:
        assert self.audio_out is not None
        while True:
            for message in await self.audio_out.next_message_batch():
                self._outbox.put_nowait(message)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: task failed", self.name, exc_info=task.exception())

    # -- the end ---------------------------------------------------------------------------
    async def _close(self) -> None:
        self._digits.cancel()
        if self.audio_in is not None:
            self.audio_in.close()
        if self.session is not None:
            try:
                async with asyncio.timeout(SESSION_CLOSE_TIMEOUT_S):
                    await self.session.aclose()
            except Exception:
                logger.exception("%s: session did not close cleanly", self.name)
        if self._sync is not None:
            await self._sync.aclose()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ws.close()

    def _record(self) -> None:
        s = self.stats
        s.duration_s = round(time.time() - s.t_start_s, 3)
        out = self.audio_out.stats if self.audio_out else tw.PlayoutStats()
        record = {"type": "call", **asdict(s), "bad": dict(s.bad),
                  **{k: v for k, v in asdict(out).items() if k != "playout_starts"}}
        logger.info("%s: call ended (%s) after %.1f s: %d frames in, %d chunks out, %d clears, "
                    "%d bad", self.name, s.end_reason or "?", s.duration_s, s.media_frames_in,
                    out.chunks_sent, out.clears_sent, s.bad.total())
        if self.cfg.metrics_log:
            _append_jsonl(Path(self.cfg.metrics_log), record)


def _drop(_event: dict[str, Any]) -> None:
    """A call's client events where nobody reads them."""


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        logger.warning("cannot write call log %s: %s", path, e)


class PhoneServer:
    """The Media Streams endpoint: one `Call` per WebSocket, at most `max_calls` at once."""

    def __init__(self, settings: Settings, models: Models, *, keep_events: bool = False) -> None:
        self.settings = settings
        self.models = models
        self.keep_events = keep_events  # each call's `events` (see `Call`)
        self.calls: set[Call] = set()
        self.finished: list[CallStats] = []  # recent ended calls, newest last
        self._server: Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        cfg = self.settings.phone
        self._server = await websockets.serve(
            self._handle, cfg.host, cfg.port, max_size=cfg.max_message_bytes,
            compression=None)  # μ-law does not deflate; compressing costs CPU per frame
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, ws: ServerConnection) -> None:
        unstarted = sum(not call.started for call in self.calls)
        if unstarted >= self.settings.phone.max_unstarted:
            logger.warning("refused a socket: %d sockets have not started a call", unstarted)
            await ws.close(CLOSE_TRY_AGAIN, "busy")
            return
        call = Call(ws, self.settings, self.models, keep_events=self.keep_events,
                    admit=self._admit)
        self.calls.add(call)
        try:
            await call.run()
        finally:
            self.calls.discard(call)
            self.finished = [*self.finished[-(MAX_FINISHED - 1):], call.stats]

    def _admit(self, call: Call) -> bool:
        """A call whose `start` checked out takes a place, if one is free."""
        if sum(c.started for c in self.calls) >= self.settings.phone.max_calls:
            return False
        call.started = True
        return True

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Host, port, secret and limits come from settings: `--set phone.port=8765`."""


async def _serve(settings: Settings, models: Models) -> None:
    server = PhoneServer(settings, models)
    port = await server.start()
    print(f"diffvoice phone: Media Streams endpoint ws://{settings.phone.host}:{port}/ "
          "(put a TLS proxy in front; TwiML: <Connect><Stream url=\"wss://YOUR-HOST/\"/>)",
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from agent.session import load_models
    from agent.signalling import check_port_free

    with usage_errors():  # a port taken, a model not found
        check_port_free(settings.phone.host, settings.phone.port, "phone.port")
        models = load_models(settings)  # before the loop: loading blocks for seconds
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, models))
    return 0
