"""The request line picows refuses, answered: HEAD, HTTP/1.0 and OPTIONS.

picows parses every request before the gateway sees it and answers 400 to
anything but ``GET ... HTTP/1.1``. Load balancers check with less: HAProxy's
``option httpchk`` sends HTTP/1.0 (and ``OPTIONS /`` without arguments),
others send ``HEAD``. `FrontDoor` sits in front of picows' protocol for the
first line of a connection only: a ``GET ... HTTP/1.1`` (every WebSocket
client, every browser) is handed to picows at once, bytes untouched, and
picows owns the connection from then on (the transport is switched to it,
so nothing of this module runs per frame). ``HEAD`` and ``GET`` over
HTTP/1.0 go through the same router (`Gateway.factory`), parsed by picows'
own request parser, and get its answer (``HEAD``: the headers alone, with
the body's ``Content-Length``); a WebSocket upgrade over them is refused
(RFC 6455 4.1 asks for GET over HTTP/1.1). ``OPTIONS`` gets the methods.
Every answer here closes the connection, as picows' own HTTP answers do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from picows import WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.api import _HAS_AIOFASTNET, _resolve_logger

# internals of the pinned picows (no stubs declare them): the tests fail loudly if they move
from picows.picows import (  # type: ignore[attr-defined]
    WSAutoPingStrategy,
    WSProtocol,
    _parse_http_request,
)

_HTTP_MAX = 16 * 1024  # picows' own limit on a request's head
_ALLOW = "GET, HEAD, OPTIONS"


class FrontDoor(asyncio.BufferedProtocol):
    """Reads the request line; hands the connection to picows or answers it.

    Buffered like picows' own protocol: the transport reads into `mem`
    (a plain `data_received` protocol would cost a 256 KiB allocation per
    read in aiofastnet)."""

    def __init__(self, ws: Any, route: Callable[[Any], Any]) -> None:
        self.ws = ws          # the picows protocol that gets the connection
        self.route = route
        self.transport: Any = None
        self.mem = bytearray(_HTTP_MAX)
        self.n = 0
        self.method = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # picows' handshake timeout runs from here, for requests of both kinds
        self.ws.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.mem)[self.n:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.method == b"-":
            return  # answered; the transport is closing
        self.n += nbytes
        full = self.n >= _HTTP_MAX
        if not self.method:
            eol = self.mem.find(b"\r\n", 0, self.n)
            if eol < 0:
                if full:
                    self._hand_over()  # picows refuses it as it always has
                return
            parts = bytes(self.mem[:eol]).split(b" ")
            if len(parts) != 3 or (parts[0], parts[2]) == (b"GET", b"HTTP/1.1") or (
                    parts[0] not in (b"GET", b"HEAD", b"OPTIONS")
                    or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0")):
                self._hand_over()
                return
            self.method = parts[0]
        end = self.mem.find(b"\r\n\r\n", 0, self.n)
        if end >= 0:
            self._answer(bytes(self.mem[:end]))
        elif full:
            self.transport.close()

    def _hand_over(self) -> None:
        tr, ws, data = self.transport, self.ws, bytes(self.mem[:self.n])
        tr.set_protocol(ws)
        off = 0
        while off < len(data) and not tr.is_closing():
            # the transport's protocol, not `ws`: once upgraded, the listener
            # may have put a wrapper of its own in front (framing.FrameGuard)
            proto = tr.get_protocol()
            room = proto.get_buffer(-1)
            n = min(len(room), len(data) - off)
            room[:n] = data[off:off + n]
            off += n
            proto.buffer_updated(n)

    def _answer(self, head: bytes) -> None:
        self.method = b"-"
        line, _, rest = head.partition(b"\r\n")
        method, target, _version = line.split(b" ")
        body_wanted = method == b"GET"
        if method == b"OPTIONS":
            resp = WSUpgradeResponse.create_ok_response(
                b"", extra_headers={"Allow": _ALLOW, "Content-Length": "0"})
        else:
            try:
                req = _parse_http_request(b"GET " + target + b" HTTP/1.1"
                                          + (b"\r\n" + rest if rest else b""))
            except RuntimeError as e:  # picows' own words: what is malformed
                resp = WSUpgradeResponse.create_error_response(
                    400, (str(e) + "\n").encode("utf-8", "backslashreplace"))
            else:
                out = self.route(req)
                resp = out.response if isinstance(out, WSUpgradeResponseWithListener) else None
                if resp is None or resp.status == 101:
                    resp = WSUpgradeResponse.create_error_response(
                        400, b"a WebSocket upgrade is a GET over HTTP/1.1\n",
                        extra_headers={"Content-Type": "text/plain; charset=utf-8"})
        resp.headers["Connection"] = "close"
        out_bytes = bytes(resp.to_bytes())
        if not body_wanted and resp.body:
            out_bytes = out_bytes[:len(out_bytes) - len(resp.body)]
        self.transport.write(out_bytes)
        self.transport.close()

    # until the hand-over, picows' protocol hears about the connection through us
    def connection_lost(self, exc: Exception | None) -> None:
        self.ws.connection_lost(exc)

    def eof_received(self) -> bool:
        return bool(self.ws.eof_received())

    def pause_writing(self) -> None:
        self.ws.pause_writing()

    def resume_writing(self) -> None:
        self.ws.resume_writing()


async def create_server(factory: Callable[[Any], Any], host: Any = None, port: Any = None, *,
                        disconnect_on_exception: bool = True,
                        websocket_handshake_timeout: float | None = 5,
                        logger_name: Any = None,
                        enable_auto_ping: bool = False,
                        auto_ping_idle_timeout: float = 20,
                        auto_ping_reply_timeout: float = 20,
                        auto_ping_strategy: Any = WSAutoPingStrategy.PING_WHEN_IDLE,
                        enable_auto_pong: bool = True,
                        max_frame_size: int = 10 * 1024 * 1024,
                        read_buffer_init_size: int = 16 * 1024,
                        **kwargs: Any) -> Any:
    """`picows.ws_create_server` (same arguments, same protocol), each
    connection behind a `FrontDoor`. It builds picows' `WSProtocol` as
    `ws_create_server` does, with the constructor of the pinned picows
    (tests/test_hardening_input.py drives every kind of request through it)."""
    loop = asyncio.get_running_loop()
    logger = _resolve_logger(logger_name, "server")
    if enable_auto_ping:
        assert auto_ping_reply_timeout <= auto_ping_idle_timeout

    def protocol() -> FrontDoor:
        ws = WSProtocol(None, None, False, factory, logger, disconnect_on_exception,
                        websocket_handshake_timeout, enable_auto_ping, auto_ping_idle_timeout,
                        auto_ping_reply_timeout, auto_ping_strategy, enable_auto_pong,
                        max_frame_size, None, read_buffer_init_size)
        return FrontDoor(ws, factory)

    if _HAS_AIOFASTNET:
        import aiofastnet
        return await aiofastnet.create_server(loop, protocol, host=host, port=port, **kwargs)
    return await loop.create_server(protocol, host=host, port=port, **kwargs)

