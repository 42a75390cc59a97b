"""`diffvoice serve`: talk to the agent in a browser over WebRTC, fully local.

Loads the engine and speech models once, then serves the page (`web/`) and WebSocket signalling
on `server.host:server.port`; every visitor gets an aiortc peer and its own `AgentSession`, and
all visitors' LLM requests share the engine's batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from agent.session import Models, load_models
from agent.settings import Settings
from agent.signalling import Notify, Signalling, check_bind, check_port_free
from agent.webrtc import Visitor
from llm.settings import usage_errors

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own: host, port and limits are `--set server.KEY=VALUE`."""


class BrowserServer:
    """Signalling + per-visitor peers over shared models; `start()` then `close()`."""

    def __init__(self, settings: Settings, models: Models) -> None:
        self.settings = settings
        self.models = models
        self.visitors: set[Visitor] = set()
        self.signalling = Signalling(settings.server, self._new_visitor)

    def _new_visitor(self, notify: Notify) -> Visitor:
        self.visitors = {v for v in self.visitors if not v.closed.is_set()}
        visitor = Visitor(self.settings, self.models, notify)
        self.visitors.add(visitor)
        return visitor

    async def start(self) -> str:
        await self.signalling.start()
        return self.url

    @property
    def url(self) -> str:
        host = self.settings.server.host
        shown = "localhost" if host in ("127.0.0.1", "::1") else host
        token = self.settings.server.access_token
        query = f"?token={token}" if token else ""
        return f"http://{shown}:{self.signalling.port}/{query}"

    async def close(self) -> None:
        await self.signalling.close()
        await asyncio.gather(*(v.close() for v in list(self.visitors)), return_exceptions=True)
        self.visitors.clear()


async def serve(settings: Settings, models: Models) -> None:
    """Serve until SIGINT/SIGTERM; the models are closed by the caller."""
    server = BrowserServer(settings, models)
    url = await server.start()
    print(f"diffvoice: open {url} and allow the microphone (Ctrl+C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def run(args: argparse.Namespace, settings: Settings) -> int:
    with usage_errors():  # a bind refused, a port taken, a model not found
        check_bind(settings.server)  # fail before the models load
        check_port_free(settings.server.host, settings.server.port, "server.port")
        logger.info("loading models (%s)", settings.llm.model)
        # on the main thread, before the loop: LiveKit registers plugins on import, main only
        models = load_models(settings)
    try:
        asyncio.run(serve(settings, models))
    finally:
        models.close()
    return 0
