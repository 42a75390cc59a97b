"""The bench's self-started WebRTC server, in a process of its own.

A caller and the agent it calls never share an interpreter. Run in the bench's process, the
simulated caller's Python work (its microphone track, Opus, RTP, level detection) holds the
GIL in bursts that the server's event loop and engine thread wait for: on a 2-core Zen 3 the
first LLM span took 6-14% longer and the warm p95 was 10-19% higher than with the server in a
process of its own, the median within noise (docs/benchmarks.md). Spawned here, the server
has its own interpreter and still shares the machine's clocks, so the hops of transport/playout
are still measured.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

from agent.settings import Settings
from llm.settings import LOG_FORMAT

START_TIMEOUT_S = 600.0  # loading (and warming up) the models in the child
STOP_TIMEOUT_S = 30.0


class ServerProcessError(RuntimeError):
    """The server process failed to start."""


class ServerProcess:
    """`diffvoice serve` with these settings in a spawned process; `start` returns its
    signalling URL once it listens, `close` stops it."""

    def __init__(self, settings: Settings):
        ctx = mp.get_context("spawn")  # a fork would copy the parent's threads' locks
        self._conn, child = ctx.Pipe()
        # not a daemon: the server may start an engine process of its own
        self._proc = ctx.Process(target=_serve, args=(settings, child), name="diffvoice-serve")
        self._proc.start()
        child.close()

    async def start(self) -> str:
        kind, info = await asyncio.to_thread(self._wait_ready)
        if kind != "ready":
            await self.close()
            raise ServerProcessError(f"the server process failed to start: {info}")
        return f"ws://127.0.0.1:{info}/ws"

    def _wait_ready(self) -> tuple[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._conn.poll(1.0):
                try:
                    return self._conn.recv()
                except EOFError:
                    break
            if not self._proc.is_alive():
                break
        if self._proc.is_alive():
            return "error", f"not listening after {START_TIMEOUT_S:.0f} s"
        return "error", f"it exited with code {self._proc.exitcode}"

    async def close(self) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        await asyncio.to_thread(self._proc.join, STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            await asyncio.to_thread(self._proc.join, STOP_TIMEOUT_S)
        self._conn.close()


def _serve(settings: Settings, conn: Connection) -> None:
    """The child: load the models (its main thread: LiveKit plugins insist), serve until told
    to stop or the parent is gone."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    from agent.session import load_models

    try:
        models = load_models(settings)
    except Exception as e:
        _failed(conn, "loading the models", e)
        return
    try:
        asyncio.run(_run(settings, models, conn))
    finally:
        models.close()


def _failed(conn: Connection, what: str, e: Exception) -> None:
    logging.getLogger(__name__).exception("%s failed", what)
    conn.send(("error", f"{what} failed: {type(e).__name__}: {e}"))


async def _run(settings: Settings, models: Any, conn: Connection) -> None:
    from agent.serve import BrowserServer

    web = BrowserServer(settings, models)
    try:
        await web.start()
    except OSError as e:  # e.g. the port is taken
        _failed(conn, "listening", e)
        return
    try:
        conn.send(("ready", web.signalling.port))
        await asyncio.to_thread(_until_stop, conn)
    finally:
        await web.close()


def _until_stop(conn: Connection) -> None:
    try:
        conn.recv()
    except EOFError:  # the parent has gone
        pass
