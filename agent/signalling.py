"""HTTP for the page and WebSocket signalling for its peer connection, on one port.

Protocol (JSON text frames on `/ws`):

    page -> server  {"type": "offer", "sdp": "..."}      once, ICE candidates included
    server -> page  {"type": "answer", "sdp": "..."}
    server -> page  {"type": "error", "message": "..."}  bad input, busy, ICE timeout
    page -> server  {"type": "bye"}                      or just close the socket

Closing the socket ends the visitor's conversation and frees its peer; a conversation that
ends on the server's side (ICE timeout, connection failed, session closed) closes the socket,
so the page hangs up and the visitor's place is free. Guards: an access token
(`/ws?token=...`) when configured, the Origin header, a cap on concurrent visitors and on the
size of each message (larger frames close the socket with code 1009).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import json
import logging
import mimetypes
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agent.settings import ServerSettings

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
WS_PATH = "/ws"
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_NORMAL = 1000


class SignallingError(ValueError):
    """A bad message from the page; the text is sent back to it."""


class Peer(Protocol):
    """What signalling needs of a visitor (see `agent.webrtc.Visitor`)."""

    closed: asyncio.Event  # set once the peer has freed everything it held

    async def accept_offer(self, sdp: str) -> str: ...
    async def close(self) -> None: ...


Notify = Callable[[dict[str, Any]], Awaitable[None]]
PeerFactory = Callable[[Notify], Peer]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: ServerSettings) -> None:
    """Binding beyond loopback exposes the microphone pipeline: demand a token."""
    if not is_loopback(settings.host) and not settings.access_token:
        raise ValueError(
            f"server.host={settings.host!r} is not loopback: set server.access_token "
            "(DIFFVOICE_SERVER__ACCESS_TOKEN) so only you can connect"
        )


def check_port_free(host: str, port: int, setting: str) -> None:
    """Fail before the models load when another process listens on the port (0: any port);
    the server's own bind allows the same address reuse."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): another server "
                             f"holds it? choose a port with --set {setting}=N") from e


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """One signalling frame -> a dict with a known "type"; SignallingError otherwise."""
    if isinstance(raw, bytes):
        raise SignallingError("signalling frames must be JSON text")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also: 4,300-digit integers, deep nesting
        raise SignallingError(f"malformed JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(msg, dict) or msg.get("type") not in ("offer", "bye"):
        raise SignallingError('expected {"type": "offer" | "bye", ...}')
    if msg["type"] == "offer" and not isinstance(msg.get("sdp"), str):
        raise SignallingError('an offer needs "sdp" as a string')
    return msg


class Signalling:
    """The HTTP + WebSocket front door; one `Peer` per connected socket."""

    def __init__(
        self, settings: ServerSettings, peer_factory: PeerFactory, web_dir: Path = WEB_DIR
    ) -> None:
        check_bind(settings)
        self.settings = settings
        self.peer_factory = peer_factory
        self.web_dir = web_dir.resolve()
        self.active: set[ServerConnection] = set()
        self.server: Server | None = None

    async def start(self) -> Server:
        self.server = await serve(
            self._handle, self.settings.host, self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.max_message_bytes,
        )
        return self.server

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # -- HTTP ---------------------------------------------------------------------------
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != WS_PATH:
            return self._static(conn, url.path)
        if reason := self._refusal(request, url.query):
            logger.warning("signalling refused: %s", reason)
            return conn.respond(http.HTTPStatus.FORBIDDEN, reason + "\n")
        return None

    def _refusal(self, request: Request, query: str) -> str | None:
        token = self.settings.access_token
        if token:
            given = parse_qs(query).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return "missing or wrong access token"
        # browsers always send Origin; a client without one is not a web page another site
        # could use against this server (and is held to the token like everyone)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self._allowed_origins(request.headers):
            return f"origin {origin} not allowed"
        return None

    def _allowed_origins(self, headers: Headers) -> set[str]:
        host = headers.get("Host", "")
        return {f"http://{host}", f"https://{host}", *self.settings.allowed_origins}

    def _static(self, conn: ServerConnection, path: str) -> Response:
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        file = (self.web_dir / name).resolve()
        if not file.is_relative_to(self.web_dir) or not file.is_file():
            return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        body = file.read_bytes()
        headers = Headers([
            ("Content-Type", mimetypes.guess_type(file.name)[0] or "application/octet-stream"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ])
        return Response(http.HTTPStatus.OK, "OK", headers, body)

    # -- WebSocket ----------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.active) >= self.settings.max_sessions:
            await _send(ws, {"type": "error", "message": "server busy: too many conversations"})
            await ws.close(CLOSE_TRY_AGAIN_LATER, "too many sessions")
            return
        self.active.add(ws)
        peers: list[Peer] = []  # filled as soon as a peer exists, so a drop mid-offer frees it
        hang_ups: list[asyncio.Task[None]] = []
        try:
            await self._serve_socket(ws, peers, hang_ups)
        except ConnectionClosed:
            pass
        finally:
            self.active.discard(ws)
            for task in hang_ups:
                task.cancel()
            for peer in peers:
                await peer.close()

    async def _serve_socket(self, ws: ServerConnection, peers: list[Peer],
                            hang_ups: list[asyncio.Task[None]]) -> None:
        async for raw in ws:
            try:
                msg = parse_message(raw)
            except SignallingError as e:
                await _send(ws, {"type": "error", "message": str(e)})
                continue
            if msg["type"] == "bye":
                return
            if peers:
                await _send(ws, {"type": "error", "message": "already connected"})
                continue
            peers.append(self.peer_factory(lambda event: _send(ws, event)))
            hang_ups.append(asyncio.create_task(_hang_up_when_closed(ws, peers[0])))
            await self._answer(ws, peers[0], msg["sdp"])

    async def _answer(self, ws: ServerConnection, peer: Peer, sdp: str) -> None:
        try:
            answer = await peer.accept_offer(sdp)
        except ValueError as e:  # OfferError and aiortc's SDP errors
            await self._reject(ws, peer, str(e))
            return
        except Exception:
            logger.exception("starting a conversation failed")
            await self._reject(ws, peer, "the server could not start a conversation")
            return
        await _send(ws, {"type": "answer", "sdp": answer})


    async def _reject(self, ws: ServerConnection, peer: Peer, message: str) -> None:
        await _send(ws, {"type": "error", "message": message})
        await peer.close()
        await ws.close()


async def _hang_up_when_closed(ws: ServerConnection, peer: Peer) -> None:
    """A conversation the server ended closes its socket: the page hangs up, the place frees."""
    await peer.closed.wait()
    await ws.close(CLOSE_NORMAL, "conversation ended")


async def _send(ws: ServerConnection, event: dict[str, Any]) -> None:
    try:
        await ws.send(json.dumps(event))
    except ConnectionClosed:
        pass
