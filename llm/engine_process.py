"""The engine in a process of its own, behind the same `stream` interface.

A denoising step on a CPU is hundreds of small torch operations, and each one hands the GIL
back and asks for it again. In a voice agent's process the event loop (WebRTC, the VAD,
LiveKit's session) holds the GIL in bursts, and every such hand-back can cost the engine
thread a whole switch interval: on a 2-core Zen 3 a Python thread busy half the time made a
cached step 3.2x slower (11.7 -> 37.6 ms) with a core to spare, which is what the step took
inside the voice pipeline (docs/benchmarks.md). Here the engine runs in a spawned process
with its own interpreter; requests, cancellations and committed spans cross two queues.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from llm.engine import DiffusionEngine, EngineStream, Message
from llm.settings import LOG_FORMAT, DecodeSettings, LLMSettings

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # loading (and warming up) the model in the child
# how often the idle child looks whether its parent still runs: an orphan holding the model
# exits within about this long of its parent's death
PARENT_CHECK_S = 1.0


class EngineProcessError(RuntimeError):
    """The engine process failed to start or died."""


class _RemoteStream(EngineStream):
    def __init__(self, on_cancel: Any):
        super().__init__()
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        if not self.cancelled and self.stats is None:  # nothing to stop once it has ended
            self._on_cancel()
        super().cancel()


class ProcessEngine:
    """`DiffusionEngine.from_settings(llm)` run in a child process; `stream` returns at once
    and spans arrive through a reader thread, as with the in-process engine."""

    def __init__(self, llm: LLMSettings):
        ctx = mp.get_context("spawn")  # a fork would copy the parent's threads' locks
        self._requests, self._replies = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(llm, self._requests, self._replies),
                                 name="diffvoice-engine", daemon=True)
        self._proc.start()
        kind, info = self._wait_ready()
        if kind != "ready":
            self._proc.kill()
            raise EngineProcessError(f"the engine process failed to start: {info}")
        self.accepts_drafts: bool = info["accepts_drafts"]
        self._streams: dict[int, _RemoteStream] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="engine-replies", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> tuple[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return self._replies.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    return "error", f"it exited with code {self._proc.exitcode}"
        return "error", f"not ready after {START_TIMEOUT_S:.0f} s"

    def stream(self, messages: list[Message], *, session_id: str | None = None,
               decode: DecodeSettings | None = None,
               draft: Sequence[int] = ()) -> EngineStream:
        rid = next(self._ids)
        stream = _RemoteStream(lambda: self._requests.put(("cancel", rid)))
        with self._lock:
            if not self._proc.is_alive():
                raise EngineProcessError("the engine process has exited")
            self._streams[rid] = stream
        self._requests.put(("stream", rid, messages,
                            dict(session_id=session_id, decode=decode, draft=tuple(draft))))
        return stream

    def end_session(self, session_id: str) -> None:
        self._requests.put(("end_session", session_id))

    def generate(self, messages: list[Message], **kw: Any) -> tuple[str, Any]:
        stream = self.stream(messages, **kw)
        return "".join(span.text for span in stream), stream.stats

    def close(self) -> None:
        if self._proc.is_alive():
            self._requests.put(None)
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._replies.put(None)  # ends the reader
        self._reader.join(timeout=10)

    def _read(self) -> None:
        while True:
            try:
                msg = self._replies.get(timeout=1.0)
            except queue.Empty:
                if self._proc.is_alive():
                    continue
                msg = None
            if msg is None:
                self._fail_all(EngineProcessError("the engine process has exited"))
                return
            rid, kind, item = msg
            with self._lock:
                stream = self._streams.get(rid) if kind == "span" else self._streams.pop(rid, None)
            if stream is None:
                continue
            if kind == "span":
                stream._push(item)
            elif kind == "end":
                stream.end(item)
            else:  # "error": the row's stats and what its stream raised in the child
                stream.end(*item)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.end(None, error)


def start_engine(llm: LLMSettings) -> DiffusionEngine | ProcessEngine:
    """The engine `llm` asks for: in this process, or in its own (`llm.engine.process`)."""
    return ProcessEngine(llm) if llm.engine.process else DiffusionEngine.from_settings(llm)


def _serve(llm: LLMSettings, requests: Any, replies: Any) -> None:
    """The child: load the engine, then run requests until told to stop or orphaned."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        engine = DiffusionEngine.from_settings(llm)
    except Exception as e:  # the parent reports it
        replies.put(("error", f"{type(e).__name__}: {e}"))
        return
    replies.put(("ready", {"accepts_drafts": engine.accepts_drafts}))
    streams: dict[int, EngineStream] = {}
    try:
        while (msg := _next_request(requests, replies)) is not None:
            if msg[0] == "cancel":
                stream = streams.get(msg[1])
                if stream is not None:
                    stream.cancel()
            elif msg[0] == "end_session":
                engine.end_session(msg[1])
            else:
                _start(engine, msg, streams, replies)
    finally:
        engine.close()


def _next_request(requests: Any, replies: Any) -> Any:
    """The parent's next message, or None once it says stop or has died: a SIGKILLed parent
    says nothing, and the child holds both ends of the spawned queues' pipes, so a plain
    `get()` would wait forever with the model (and its GPU memory) held."""
    while True:
        try:
            return requests.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            parent = mp.parent_process()
            if parent is not None and not parent.is_alive():
                log.warning("the parent process has exited: the engine process stops")
                replies.cancel_join_thread()  # nobody reads them: exiting must not wait
                return None


def _start(engine: DiffusionEngine, msg: tuple, streams: dict[int, EngineStream],
           replies: Any) -> None:
    """Submit one request; one that fails (e.g. a chat role the template lacks) fails alone."""
    _, rid, messages, kw = msg
    try:
        stream = streams[rid] = engine.stream(messages, **kw)
    except Exception as e:
        replies.put((rid, "error", (None, _as_text(e))))
        return
    threading.Thread(target=_forward, args=(rid, stream, streams, replies), daemon=True).start()


def _forward(rid: int, stream: EngineStream, streams: dict[int, EngineStream],
             replies: Any) -> None:
    try:
        for span in stream:
            replies.put((rid, "span", span))
        replies.put((rid, "end", stream.stats))
    except Exception as e:  # the row failed: the caller's stream raises it
        replies.put((rid, "error", (stream.stats, _as_text(e))))
    finally:
        streams.pop(rid, None)


def _as_text(error: Exception) -> RuntimeError:
    """`error` as the parent's stream raises it: as text, since an exception that does not
    pickle would be lost in the queue's feeder thread."""
    return RuntimeError(f"{type(error).__name__}: {error}")
