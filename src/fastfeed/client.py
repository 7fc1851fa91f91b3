"""An asyncio client for a fastfeed gateway.

    from fastfeed.client import Client

    async with Client("ws://localhost:8080/ws") as c:
        unknown = await c.subscribe(["BBCA", "TLKM"])   # returns once the snapshot is in
        print(c.rows["BBCA"].bid)
        async for rows in c.updates():                 # rows changed since the last item
            for row in rows:
                print(row.sym, row.bid, row.ask)

The client keeps a local copy of the latest row of every subscribed symbol in
`Client.rows` (and, for the version 1.1 channels, the book of every symbol
subscribed on ``book`` in `Client.books`, the tape of every symbol subscribed
on ``trades`` in `Client.trades` and its bars in `Client.bars`:
``await c.subscribe(["BBCA"], channels=["trades", "bars:1m"])``), and keeps it
current by itself: when the connection drops or the gateway closes it (a
deploy drains with 1012, a gateway with no market data yet says 1013, a killed
process leaves 1006), it reconnects after a jittered exponential backoff, to
the next URL when several replicas are given, and resumes by subscribing again
with ``"since": {sym: last seq}`` so the gateway sends only the rows it missed
(and ``"since_trades": {sym: last tseq}`` so it sends only the trades it
missed, or says how many it cannot: `Client.trades_lost`), then watches again
what was watched. The backoff starts afresh after a connection that was
served, and keeps growing after a 1013 (try again later). It does not
reconnect after it was closed by its user, nor after the gateway closed it for
a fault of the client's own (1002, 1003, 1007, 1008, 1009, 1010) or refused
the upgrade with an HTTP 4xx (a bad token, a wrong path), unless asked to with
``retry_client_errors=True``.

`connect()` (and ``async with``) returns once a gateway serves the client:
the WebSocket is open and a first round trip on it is answered (the resume's
requests, or a WebSocket ping when there is nothing to restore). A gateway
that has no market data yet accepts the upgrade and closes at once with 1013
"try again later"; connect() tries again with its backoff and raises
`TryAgainLater` (a `TimeoutError`) once ``try_again_attempts`` attempts were
answered so (6 by default: 4 to 8 s with the default backoff), or when
``connect_timeout`` runs out after one was. The client keeps trying in the
background until `close()` (``async with`` closes it); awaiting connect()
again waits again. ``docs/python-client.md`` has the table of what it raises.

Every request carries an ``id``; its coroutine returns when the reply with the
same ``id`` arrives, and an ``error`` reply raises `FastfeedError`. The wire
format is ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from picows.common import WSHandshakeError

from .backoff import Backoff
from .compact import CompactState
from .orderbook import OrderBook

# the client's protocol constants are the protocol module's (re-exported here)
from .protocol import (
    BIN_MAGIC,
    BIN_SUBPROTOCOL,
    BOOK_CHANNEL,
    BOOK_DEPTH,
    CLIENT_FAULT_CLOSE_CODES,
    CLOSE_TRY_AGAIN_LATER,
    COMPACT_BIN_SUBPROTOCOL,
    COMPACT_SUBPROTOCOL,
    FIELDS,
    FORBIDDEN,
    JSON_SUBPROTOCOL,
    QUOTE_CHANNEL,
    TRADES_CHANNEL,
)
from .tape import MARKET, Bar, BarStore, Tape, Trade

__all__ = [
    "BIN_SUBPROTOCOL",
    "COMPACT_BIN_SUBPROTOCOL",
    "COMPACT_SUBPROTOCOL",
    "FIELDS",
    "JSON_SUBPROTOCOL",
    "MARKET",
    "Backoff",
    "Bar",
    "Client",
    "ConnectionClosed",
    "FastfeedError",
    "OrderBook",
    "Row",
    "Trade",
    "TryAgainLater",
    "decode_binary_update",
]

log = logging.getLogger("fastfeed.client")

_BIN_HEADER = struct.Struct("<4sIq")  # magic, row count, server time ns: 16 bytes
_NO_STATUS = 1005  # the close frame had no code
_ABNORMAL = 1006  # the socket went away without a close frame
_TRY_AGAIN_LATER = CLOSE_TRY_AGAIN_LATER  # the gateway cannot serve yet (no market data)
_PING_PAYLOAD = b"fastfeed.client resume"
# Requests per message when resubscribing many symbols, so a resume stays
# well under the gateway's message size limit.
_CHUNK = 500
_QUOTE_ONLY = frozenset({QUOTE_CHANNEL})


class Row(NamedTuple):
    """One instrument's latest state, fields in protocol order."""

    sym: str
    seq: int
    ts: int
    bid: float
    ask: float
    last: float
    bid_size: float
    ask_size: float
    last_size: float
    volume: float


_make_row = Row._make


class FastfeedError(Exception):
    """An ``error`` reply from the gateway, or a request the client refused.

    `code` is one of the protocol's error codes (``bad_request``,
    ``forbidden``, ``not_subscribed``, ...); `symbols` lists the symbols it
    names, if any.
    """

    def __init__(self, code: str, message: str = "", symbols: Sequence[str] | None = None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.symbols: list[str] = list(symbols or [])
        #: for a partly refused subscribe: the snapshot of the rest
        self.reply: dict[str, Any] | None = None


class ConnectionClosed(FastfeedError):
    """The client stopped for good: closed by its user, or by a close or HTTP
    status it must not retry. `close_code` is the WebSocket close code, or the
    HTTP status of a refused upgrade."""

    def __init__(self, close_code: int, message: str = ""):
        super().__init__("closed", message or f"connection closed ({close_code})")
        self.close_code = close_code


class TryAgainLater(TimeoutError):
    """`Client.connect` gave up: the gateway is up but cannot serve yet.

    No gateway served it, and `attempts` attempts were accepted and closed at
    once with 1013 "try again later" (a gateway that has not loaded its
    market data, e.g. started while Redis was unreachable); `url` and
    `reason` are those of the last one. The client is not stopped: it keeps
    trying with its backoff until `Client.close`, and `Client.connect` may be
    awaited again. A `TimeoutError`, so code written for `connect_timeout`
    handles it too.
    """

    close_code = _TRY_AGAIN_LATER

    def __init__(self, url: str, reason: str, attempts: int):
        super().__init__(
            f"{url} cannot serve yet: {attempts} attempt(s) closed with {_TRY_AGAIN_LATER} "
            f"({reason or 'no reason given'})"
        )
        self.url = url
        self.reason = reason
        self.attempts = attempts


class _Disconnected(Exception):
    """The connection a request was sent on went away before its reply."""


def decode_binary_update(
    buf: bytes | bytearray | memoryview, dtype: Any = None
) -> tuple[int, list[Row]]:
    """Decode one binary update frame of ``fastfeed.v1.bin``.

    The layout: a 16-byte header (``<4s`` magic ``b"FFB1"``, ``<u4`` row
    count, ``<i8`` server send time in ns), then that many rows laid out as
    the NumPy dtype ``fastfeed._core.ROW_DTYPE`` (`dtype` overrides it).
    Returns ``(server time ns, rows)``.
    """
    import numpy as np

    if dtype is None:
        from fastfeed._core import ROW_DTYPE as dtype
    magic, count, t = _BIN_HEADER.unpack_from(buf, 0)
    if magic != BIN_MAGIC:
        raise ValueError(f"not a fastfeed binary frame (magic {magic!r})")
    arr = np.frombuffer(buf, dtype, count, offset=_BIN_HEADER.size)
    # a multi-field view puts the fields in protocol order whatever the layout
    recs = arr[list(FIELDS)].tolist()
    rows = []
    for rec in recs:
        sym = rec[0]
        if isinstance(sym, bytes):
            sym = sym.rstrip(b"\0").decode("ascii")
        rows.append(_make_row((sym, *rec[1:])))
    return t, rows


class _Listener(WSListener):  # type: ignore[misc]
    """picows callbacks of one connection, handed on to its `_Session`."""

    def __init__(self, session: _Session):
        super().__init__()
        self.session = session
        self.parts: list[bytes] | None = None  # a fragmented message being reassembled
        self.part_type = WSMsgType.TEXT

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.TEXT or t is WSMsgType.BINARY:
            if frame.fin:
                self.session.on_message(t is WSMsgType.BINARY, frame.get_payload_as_bytes())
            else:
                self.parts = [frame.get_payload_as_bytes()]
                self.part_type = t
        elif t is WSMsgType.CONTINUATION:
            if self.parts is None:
                transport.send_close(WSCloseCode.PROTOCOL_ERROR)
                transport.disconnect()
                return
            self.parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                data = b"".join(self.parts)
                self.parts = None
                self.session.on_message(self.part_type is WSMsgType.BINARY, data)
        elif t is WSMsgType.PONG:
            self.session.on_pong(frame.get_payload_as_bytes())
        elif t is WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else _NO_STATUS
            reason = payload[2:].decode("utf-8", "replace")
            self.session.close_code = code
            self.session.close_reason = reason
            self.session.on_close_frame()
            # answer the closing handshake, then let the server drop the socket
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(1000 if code == _NO_STATUS else code))
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.session.on_disconnected()

    def pause_writing(self) -> None:
        self.session.writable.clear()

    def resume_writing(self) -> None:
        self.session.writable.set()


class _Session:
    """One WebSocket connection: its transport, replies it awaits, how it ended."""

    def __init__(self, client: Client, url: str):
        self.client = client
        self.url = url
        self.transport: WSTransport | None = None
        self.pending: dict[Any, _Pending] = {}
        self.close_code: int = _ABNORMAL
        self.close_reason = ""
        self.done = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.closing = False  # the gateway's close frame is in: nothing after it counts
        self.pong: asyncio.Future[None] | None = None  # the resume's round trip
        # fastfeed.v1.compact: the full rows this connection was sent
        self.compact = CompactState(lambda sym: client.rows.get(sym)) if client.compact else None

    def on_message(self, binary: bool, data: bytes) -> None:
        if not self.closing:
            self.client._on_message(self, binary, data)

    def on_pong(self, payload: bytes) -> None:
        pong = self.pong
        if not self.closing and pong is not None and not pong.done() and payload == _PING_PAYLOAD:
            pong.set_result(None)

    def on_close_frame(self) -> None:
        self.closing = True
        if self.pong is not None and not self.pong.done():
            self.pong.set_exception(_Disconnected())

    async def roundtrip(self, timeout: float) -> None:
        """A WebSocket ping answered: the gateway serves this connection."""
        if self.transport is None or self.transport.is_disconnected or self.closing:
            raise _Disconnected()
        self.pong = asyncio.get_running_loop().create_future()
        self.transport.send_ping(_PING_PAYLOAD)
        async with asyncio.timeout(timeout):
            await self.pong

    def on_disconnected(self) -> None:
        if self.client._session is self:
            # before the waiters below run: they must not see a stale "ready"
            self.client._ready.clear()
        for p in self.pending.values():
            if not p.future.done():
                p.future.set_exception(_Disconnected())
        self.pending.clear()
        if self.pong is not None and not self.pong.done():
            self.pong.set_exception(_Disconnected())
        if not self.done.done():
            self.done.set_result(self.close_code)

    def send(self, msg: dict[str, Any]) -> None:
        if self.transport is None or self.transport.is_disconnected:
            raise _Disconnected()
        self.transport.send(WSMsgType.TEXT, json.dumps(msg, separators=(",", ":")).encode())

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            if not self.transport.is_close_frame_sent:
                self.transport.send_close(WSCloseCode(code))
            self.transport.disconnect()


class _Pending:
    """A request waiting for its reply; `forbidden` collects a partial refusal."""

    __slots__ = ("forbidden", "future", "op", "symbols")

    def __init__(self, msg: dict[str, Any]):
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.op: str = msg["op"]
        self.symbols: list[str] = msg.get("symbols") or []
        self.forbidden: FastfeedError | None = None


class Client:
    """A fastfeed client that keeps `rows` current across reconnections.

    Parameters:
      url: the gateway's ``ws://host:port/ws``, or a list of them (replicas of
        one gateway); the client uses the first that answers and fails over
        to the next when a connection is lost.
      token: a JWT, sent as ``Authorization: Bearer``.
      frame_ms: ask for this update frame interval (``configure``), again on
        every reconnection. ``None``: the gateway's default.
      binary: negotiate ``fastfeed.v1.bin`` (update frames arrive binary and
        are decoded with NumPy); otherwise ``fastfeed.v1.json``.
      compact: negotiate ``fastfeed.v1.compact`` instead: update frames carry
        only the fields changed since the connection's previous frame (fewer
        bytes); `rows` holds the same full rows either way. With `binary`
        too, ``fastfeed.v1.compact.bin``: those rows in binary (FFC1) frames.
      backoff: the `Backoff` between reconnection attempts.
      reconnect: ``False`` stops the client at the first disconnection.
      retry_client_errors: also reconnect after a close for a client fault
        (1008, 1009, ...) or an HTTP 4xx at the upgrade.
      stale_after: seconds without any message (the gateway sends a
        ``heartbeat`` when it has nothing else, every 5 s by default) after
        which the connection is taken for dead and replaced. ``None``: never.
      connect_timeout: how long `connect` (and ``async with``) keeps trying
        before raising `TimeoutError` (`TryAgainLater` if an attempt was
        answered 1013); ``None``: forever.
      try_again_attempts: `connect` raises `TryAgainLater` once this many
        attempts were answered 1013 (try again later: the gateway has no
        market data yet), before `connect_timeout`; ``None``: only
        `connect_timeout` bounds it. Reconnections after the client was
        served are not bounded: they go on until `close`.
      request_timeout: how long a request waits for its reply.
      on_update: ``callback(rows)``, called with the rows of every change
        applied to `rows` (update frames, and resume snapshots).
      on_status: ``callback(feed_up: bool)`` on every ``status`` message.
      on_error: ``callback(FastfeedError)`` for an ``error`` that answers no
        pending request.
      book_depth: the levels per side the gateway serves (its book depth,
        10 unless it runs with another): `books` keeps that many, and the
        checksum covers them.
      on_book: ``callback(OrderBook)`` after every book entry applied
        (snapshots and updates).
      on_book_status: ``callback(sym, ok: bool)`` on a book ``status``
        (``"stale"``: its source skipped a ``seq`` or sent a crossed change,
        no changes follow until a full book, announced by ``"ok"``).
      on_trades: ``callback(trades)`` with every batch of new `Trade` objects
        (snapshots and updates of the ``trades`` channel), oldest first.
      on_lost: ``callback(sym, n)`` when the gateway says it dropped `n`
        trades of `sym` for this client (it read too slowly, or resumed
        past what the gateway still holds); `trades_lost` sums them.
      on_bars: ``callback(changes)`` with the ``(sym, interval, Bar)`` of
        every batch of changed bars.
      tape_size: trades kept per symbol in `trades`; bars_size: bars kept per
        (symbol, interval) in `bars`.

    Books (``subscribe(..., channels=["book"])``) are kept in `books`
    (``books[sym].bids`` / ``.asks``: ``[price, volume, orders]``, best
    first; ``.seq``; ``.stale``). Every entry's checksum is verified; on a
    mismatch the client resubscribes that book (unsubscribe, then
    subscribe: a full snapshot) and counts it in `book_resyncs`. Trades
    (``channels=["trades"]``) and bars (``"bars:1m"`` etc.) are kept in
    `trades` and `bars` (`fastfeed.tape`).

    Counters: `reconnects`, `frames` (update frames), `messages`,
    `trades_lost` (symbol -> trades the gateway dropped for this client),
    `last_latency` (seconds from the gateway's send time to local receipt,
    meaningful when both clocks agree), `last_message_at` (`time.monotonic`
    of the last message of any kind: a heartbeat counts), `last_server_time`
    (ns, from the last update or heartbeat), `last_close_code`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        frame_ms: int | None = None,
        binary: bool = False,
        compact: bool = False,
        backoff: Backoff | None = None,
        reconnect: bool = True,
        retry_client_errors: bool = False,
        stale_after: float | None = 15.0,
        connect_timeout: float | None = 30.0,
        try_again_attempts: int | None = 6,
        request_timeout: float = 10.0,
        on_update: Callable[[list[Row]], Any] | None = None,
        on_status: Callable[[bool], Any] | None = None,
        on_error: Callable[[FastfeedError], Any] | None = None,
        book_depth: int = BOOK_DEPTH,
        on_book: Callable[[OrderBook], Any] | None = None,
        on_book_status: Callable[[str, bool], Any] | None = None,
        on_trades: Callable[[list[Trade]], Any] | None = None,
        on_lost: Callable[[str, int], Any] | None = None,
        on_bars: Callable[[list[tuple[str, str, Bar]]], Any] | None = None,
        tape_size: int = 1000,
        bars_size: int = 500,
    ):
        self.urls: list[str] = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("Client needs at least one URL")
        self.token = token
        self.frame_ms = frame_ms
        self.binary = binary
        self.compact = compact
        self.protocol: str | None = None  # the subprotocol the gateway chose, once connected
        self.backoff = backoff or Backoff()
        self.reconnect = reconnect
        self.retry_client_errors = retry_client_errors
        self.stale_after = stale_after
        self.connect_timeout = connect_timeout
        if try_again_attempts is not None and try_again_attempts < 1:
            raise ValueError("try_again_attempts must be at least 1, or None")
        self.try_again_attempts = try_again_attempts
        self.request_timeout = request_timeout
        self.on_update = on_update
        self.on_status = on_status
        self.on_error = on_error
        self.book_depth = book_depth
        self.on_book = on_book
        self.on_book_status = on_book_status

        #: latest row of every subscribed symbol
        self.rows: dict[str, Row] = {}
        #: the order book of every symbol subscribed with the "book" channel
        self.books: dict[str, OrderBook] = {}
        #: books resubscribed because their checksum did not match
        self.book_resyncs = 0
        self._tape = Tape(tape_size,
                          on_trades=_guarded(on_trades), on_lost=_guarded(on_lost))
        self._bars = BarStore(bars_size, on_bars=_guarded(on_bars))
        #: symbol -> its last trades (a bounded deque, oldest first); MARKET: the market's
        self.trades = self._tape.trades
        #: symbol -> trades the gateway dropped for this client (it said so with "lost")
        self.trades_lost = self._tape.lost
        #: (symbol, interval) -> its bars, oldest first (the last one may be forming)
        self.bars = self._bars.bars
        #: what the gateway last said about its upstream
        self.feed_up = True
        #: the URL of the current (or last) connection
        self.url: str | None = None
        self.reconnects = 0
        self.frames = 0
        self.messages = 0
        self.last_latency: float | None = None
        self.last_message_at: float | None = None
        self.last_server_time: int | None = None
        #: close code that ended the last connection (1006: no close frame)
        self.last_close_code: int | None = None
        #: why the client stopped, once it has
        self.error: BaseException | None = None

        self._subs: set[str] = set()  # what the user subscribed (and the gateway knows)
        self._watched: set[str] = set()
        self._lost: set[str] = set()  # subscribed, but unknown to the gateway after a resume
        # channels per subscribed (and per watched) symbol; absent: quote only
        self._chans: dict[str, frozenset[str]] = {}
        self._wchans: dict[str, frozenset[str]] = {}
        self._resyncing: set[str] = set()  # books being resubscribed after a bad checksum
        self._bg: set[asyncio.Task[Any]] = set()
        self._session: _Session | None = None
        self._ready = asyncio.Event()  # a session is up and resumed
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._url_index = 0
        self._iters: list[_UpdateIterator] = []
        self._user_closed = False
        # what connect() waits on: connections served, attempts answered 1013
        # (url, reason of the last), and an event replaced at each change
        self._served = 0
        self._told_later = 0
        self._told_later_by: tuple[str, str] = ("", "")
        self._progress = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        """True while a connection is up and resumed."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """True once the client has stopped for good."""
        return self._stopped.is_set()

    async def connect(self) -> None:
        """Start the client and wait until a gateway serves it.

        Returns once a connection is open and a first round trip on it was
        answered: the client's resume requests (frame interval, subscriptions,
        watches), or a WebSocket ping when it has none. The connection may be
        gone again by the time the caller looks (the client then reconnects
        by itself); returns at once if the client is connected already.

        Raises `ConnectionClosed` if the gateway refuses it for good (e.g.
        HTTP 401, or a close for a client fault); `TryAgainLater` once
        `try_again_attempts` attempts were closed with 1013 (the gateway has
        no market data yet); `TimeoutError` after `connect_timeout`
        (`TryAgainLater` if some attempt was answered 1013). After
        `TryAgainLater` or `TimeoutError` the client keeps trying in the
        background; await `connect` again, or `close` it.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        served, told = self._served, self._told_later
        timeout = self.connect_timeout
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            progress = self._progress  # before the checks: no change goes unseen
            if self._ready.is_set() or self._served > served:
                return
            if self._stopped.is_set():
                raise self.error or ConnectionClosed(1000)
            answered = self._told_later - told
            if self.try_again_attempts is not None and answered >= self.try_again_attempts:
                raise TryAgainLater(*self._told_later_by, answered)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                if answered:
                    raise TryAgainLater(*self._told_later_by, answered)
                raise TimeoutError(
                    f"not connected to {self.urls} within {timeout} s "
                    f"(last error: {self.error!r})"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await progress.wait()

    def _progressed(self) -> None:
        """Wake every connect() waiting: something it waits for changed."""
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._user_closed = True
        for task in builtins.list(self._bg):
            task.cancel()
        if self._session is not None:
            self._session.close(1000)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stop(ConnectionClosed(1000, "closed by the client"))

    async def __aenter__(self) -> Client:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def disconnect(self) -> None:
        """Drop the current connection as if the network failed (the client
        reconnects). For tests and for callers that detect a dead socket."""
        if self._session is not None and self._session.transport is not None:
            self._session.transport.disconnect(graceful=False)

    # ---------------------------------------------------------------- requests

    async def subscribe(self, symbols: Iterable[str],
                        channels: Iterable[str] | None = None) -> list[str]:
        """Subscribe to `symbols`; return once their snapshot is applied.

        `channels` (version 1.1): any of ``"quote"`` (the default: `rows`),
        ``"book"`` (`books`), ``"trades"`` (`trades`; the symbol `MARKET`,
        ``"*"``, is every instrument's trades: ``trades["*"]``) and
        ``"bars:1m"`` etc. (`bars`). Returns the symbols the gateway has never
        seen (they are not subscribed). Raises `FastfeedError` if the request
        is refused, with code ``forbidden`` and `symbols` naming those outside
        the token's entitlements (the rest are subscribed nonetheless).
        """
        syms = _symbols(symbols)
        chans = _channels(channels)
        new = [s for s in syms if s not in self._subs]
        before = {s: self._chans.get(s) for s in syms}
        self._subs.update(new)
        for s in syms:
            held = self._chans.get(s, _QUOTE_ONLY if s not in new else frozenset())
            self._chans[s] = held | chans
        msg: dict[str, Any] = {"op": "subscribe", "symbols": syms}
        if channels is not None:
            msg["channels"] = sorted(chans)
        self._since_trades(msg, syms, chans)
        try:
            reply = await self._request(msg, resend=True)
        except FastfeedError as e:
            if e.code == FORBIDDEN:
                self._subs.difference_update(e.symbols)
                self._forget_channels(e.symbols)
            else:
                self._subs.difference_update(new)
                self._restore_channels(before)
            raise
        except BaseException:
            self._subs.difference_update(new)
            self._restore_channels(before)
            raise
        if reply.get("type") == "resumed":
            # the connection dropped: the resume subscribed them instead
            unknown = [s for s in syms if s not in self._subs]
            self._lost.difference_update(s for s in unknown if s in new)
            return unknown
        unknown = list(reply.get("unknown") or [])
        self._subs.difference_update(unknown)
        self._forget_channels(unknown)
        return unknown

    def _restore_channels(self, before: dict[str, frozenset[str] | None]) -> None:
        for s, chans in before.items():
            if chans is None:
                self._chans.pop(s, None)
            else:
                self._chans[s] = chans

    def _forget_channels(self, symbols: Iterable[str]) -> None:
        symbols = builtins.list(symbols)
        for s in symbols:
            self._chans.pop(s, None)
            self._wchans.pop(s, None)
            self.books.pop(s, None)
        self._tape.forget(symbols)
        self._bars.forget(symbols)

    def _drop_data(self, symbols: Iterable[str], chans: frozenset[str]) -> None:
        """What `chans` held for these symbols leaves the local copies."""
        symbols = builtins.list(symbols)
        for ch in chans:
            if ch == QUOTE_CHANNEL:
                for s in symbols:
                    self.rows.pop(s, None)
            elif ch == BOOK_CHANNEL:
                for s in symbols:
                    self.books.pop(s, None)
            elif ch == TRADES_CHANNEL:
                self._tape.forget(symbols)
            elif ch.startswith("bars:"):
                self._bars.forget(symbols, ch[5:])

    def _since_trades(self, msg: dict[str, Any], syms: Iterable[str],
                      chans: frozenset[str]) -> None:
        """A subscribe of the trades channel asks only for the trades after
        those held (``since_trades``)."""
        if TRADES_CHANNEL in chans:
            since_trades = self._tape.since(syms)
            if since_trades:
                msg["since_trades"] = since_trades

    async def unsubscribe(self, symbols: Iterable[str],
                          channels: Iterable[str] | None = None) -> None:
        """Unsubscribe; their rows leave `rows` (and books `books`, trades
        `trades`, bars `bars`). With `channels`, only those channels (the
        contract: without, every one)."""
        syms = _symbols(symbols)
        msg: dict[str, Any] = {"op": "unsubscribe", "symbols": syms}
        if channels is None:
            gone = syms
        else:
            chans = _channels(channels)
            msg["channels"] = sorted(chans)
            gone = []
            for s in syms:
                left = self._chans.get(s, _QUOTE_ONLY) - chans
                if not left:
                    gone.append(s)
                    continue
                self._chans[s] = left
                self._drop_data([s], chans)
        self._subs.difference_update(gone)
        self._watched.difference_update(gone)
        self._lost.difference_update(gone)
        self._forget_channels(gone)
        for s in gone:
            self.rows.pop(s, None)
        await self._request(msg, resend=False)

    async def watch(self, symbols: Iterable[str], channels: Iterable[str] | None = None) -> None:
        """Have every change of these (subscribed) symbols pushed at once
        (of `channels`: by default the quote)."""
        syms = _symbols(symbols)
        missing = [s for s in syms if s not in self._subs]
        if missing:
            raise FastfeedError("not_subscribed", "watch needs a subscription", missing)
        chans = _channels(channels)
        new = [s for s in syms if s not in self._watched]
        before = {s: self._wchans.get(s) for s in syms}
        self._watched.update(new)
        for s in syms:
            self._wchans[s] = self._wchans.get(s, frozenset() if s in new else _QUOTE_ONLY) | chans
        msg: dict[str, Any] = {"op": "watch", "symbols": syms}
        if channels is not None:
            msg["channels"] = sorted(chans)
        try:
            await self._request(msg, resend=True)
        except BaseException:
            self._watched.difference_update(new)
            for s, held in before.items():
                if held is None:
                    self._wchans.pop(s, None)
                else:
                    self._wchans[s] = held
            raise

    async def unwatch(self, symbols: Iterable[str], channels: Iterable[str] | None = None) -> None:
        """Back to frame-paced updates for these symbols (of `channels`: all)."""
        syms = _symbols(symbols)
        msg: dict[str, Any] = {"op": "unwatch", "symbols": syms}
        if channels is None:
            self._watched.difference_update(syms)
            for s in syms:
                self._wchans.pop(s, None)
        else:
            chans = _channels(channels)
            msg["channels"] = sorted(chans)
            for s in syms:
                left = self._wchans.get(s, _QUOTE_ONLY) - chans
                if left:
                    self._wchans[s] = left
                else:
                    self._watched.discard(s)
                    self._wchans.pop(s, None)
        await self._request(msg, resend=False)

    async def configure(self, frame_ms: int) -> None:
        """Set this connection's update frame interval (kept across reconnections)."""
        old = self.frame_ms
        self.frame_ms = frame_ms
        try:
            await self._request({"op": "configure", "frame_ms": frame_ms}, resend=True)
        except BaseException:
            self.frame_ms = old
            raise

    async def list(self, match: str | None = None) -> builtins.list[str]:
        """Symbols the gateway knows and this client may see, optionally
        filtered by a glob pattern such as ``"BB*"``: every page of the
        gateway's answer (it pages long lists), in its (sorted) order."""
        msg: dict[str, Any] = {"op": "list"}
        if match is not None:
            msg["match"] = match
        out: builtins.list[str] = []
        while True:
            # the gateway answers in pages: "more" says ask again after "next"
            reply = await self._request(msg)
            out.extend(reply.get("symbols") or ())
            after = reply.get("next")
            if not reply.get("more") or not isinstance(after, str):
                return out
            msg = {**msg, "after": after}

    async def ping(self) -> int:
        """Round trip to the gateway; returns its clock (ns since the epoch)."""
        reply = await self._request({"op": "ping"})
        return int(reply["ts"])

    @property
    def subscribed(self) -> frozenset[str]:
        """The symbols this client holds subscriptions for."""
        return frozenset(self._subs)

    @property
    def watched(self) -> frozenset[str]:
        """The symbols this client watches."""
        return frozenset(self._watched)

    @property
    def lost(self) -> frozenset[str]:
        """Subscribed symbols the gateway did not know when the client last
        resumed (it asks again, with backoff); their rows are the last known."""
        return frozenset(self._lost)

    def updates(self) -> AsyncIterator[builtins.list[Row]]:
        """Iterate over changes to `rows`, each item after it is applied.

        Each item holds the rows changed since the previous item: one update
        frame's rows while the consumer keeps up; if it falls behind, the
        rows of the frames it missed are merged (latest per symbol), never
        queued. Resume snapshots count as changes. Ends when the client is
        closed; raises `ConnectionClosed` if the gateway closed it for good.
        """
        it = _UpdateIterator(self)
        self._iters.append(it)
        return it

    # ---------------------------------------------------------------- internals

    async def _request(self, msg: dict[str, Any], resend: bool = False) -> dict[str, Any]:
        """Send `msg` with a fresh id and return the reply that echoes it.

        If the connection is lost first: with `resend` (requests whose effect
        the resume restores from the client's own state) the reply is
        ``{"type": "resumed"}`` once the next connection is resumed;
        otherwise the request is sent again on the next connection.
        """
        deadline = time.monotonic() + self.request_timeout
        while True:
            remaining = deadline - time.monotonic()
            await self._wait_ready(remaining)
            session = self._session
            assert session is not None
            rid = next(self._ids)
            pending = _Pending(msg)
            session.pending[rid] = pending
            try:
                session.send({**msg, "id": rid})
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    reply = await pending.future
            except _Disconnected:
                if resend:
                    await self._wait_ready(deadline - time.monotonic())
                    return {"type": "resumed"}
                continue
            finally:
                session.pending.pop(rid, None)
            if reply.get("type") == "error":
                raise _error(reply)
            if pending.forbidden is not None:
                # the rest was subscribed; the caller learns of the refusal
                pending.forbidden.reply = reply
                self._subs.difference_update(reply.get("unknown") or ())
                raise pending.forbidden
            return reply

    async def _wait_ready(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if self._ready.is_set():
                return
            if self._stopped.is_set():
                raise self.error or ConnectionClosed(1000)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(
                    f"not connected to {self.urls} within {timeout} s "
                    f"(last error: {self.error!r})"
                )
            ready = asyncio.ensure_future(self._ready.wait())
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait(
                    {ready, stopped}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                ready.cancel()
                stopped.cancel()
            # ready may have come and gone before this task ran (a gateway that
            # closes right after the upgrade): wait for the next connection

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                url = self.urls[self._url_index % len(self.urls)]
                try:
                    resumed = await self._session_once(url)
                except ConnectionClosed as e:
                    self._stop(e)
                    return
                except (TimeoutError, OSError, WSHandshakeError, _Disconnected, FastfeedError) as e:
                    log.info("fastfeed: cannot connect to %s: %s", url, e)
                    self.error = e
                    resumed = False
                self._progressed()
                if resumed and self.last_close_code != _TRY_AGAIN_LATER:
                    # a session that got going starts the backoff afresh; a
                    # gateway saying "try again later" right away does not
                    attempt = 0
                if not self.reconnect or self._user_closed:
                    self._stop(self.error or ConnectionClosed(_ABNORMAL))
                    return
                # fail over: the next attempt goes to the next replica
                self._url_index += 1
                delay = self.backoff.delay(attempt)
                attempt += 1
                await asyncio.sleep(delay)
                self.reconnects += 1
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug: do not leave callers waiting forever
            log.exception("fastfeed client stopped")
            self._stop(e)

    async def _session_once(self, url: str) -> bool:
        """Connect to `url`, resume, serve until the connection ends.
        Returns whether it got as far as resuming (with nothing to restore:
        the upgrade), which restarts the backoff unless the close was 1013.
        A connection counts as served (for connect()) once a round trip on it
        was answered."""
        session = _Session(self, url)
        proto = ((COMPACT_BIN_SUBPROTOCOL if self.compact else BIN_SUBPROTOCOL) if self.binary
                 else COMPACT_SUBPROTOCOL if self.compact else JSON_SUBPROTOCOL)
        headers = {"Sec-WebSocket-Protocol": proto}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            transport, _ = await ws_connect(
                lambda: _Listener(session),
                url,
                extra_headers=headers,
                websocket_handshake_timeout=self.request_timeout,
            )
        except WSHandshakeError as e:
            status = int(e.response.status) if e.response is not None else 0
            if 400 <= status < 500 and status not in (408, 429) and not self.retry_client_errors:
                raise ConnectionClosed(status, f"{url} refused the upgrade: HTTP {status}") from e
            raise
        session.transport = transport
        # what the gateway chose: rows are compact only if it chose a compact
        # subprotocol (an older gateway may answer with plain JSON)
        self.protocol = transport.response.headers.get("Sec-WebSocket-Protocol")
        if self.protocol not in (COMPACT_SUBPROTOCOL, COMPACT_BIN_SUBPROTOCOL):
            session.compact = None
        self._session = session
        self.url = url
        self.last_message_at = time.monotonic()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._watchdog(session))]
        resumed = served = False
        try:
            if not await self._resume(session):
                resumed = True
                # nothing to restore: a ping answered shows the gateway serves
                # (one with no market data closes with 1013 before it answers)
                await session.roundtrip(self.request_timeout)
            resumed = served = True
            self.error = None
            self._ready.set()
            self._served += 1
            self._progressed()
            log.info("fastfeed: connected to %s", url)
            if self._lost:
                tasks.append(loop.create_task(self._find_lost(session)))
            code = await session.done
        except _Disconnected:
            code = session.close_code
        finally:
            self._ready.clear()
            for task in tasks:
                task.cancel()
            session.close(1000)
            self._session = None
        self.last_close_code = code
        if code == _TRY_AGAIN_LATER and not served:
            self._told_later += 1
            self._told_later_by = (url, session.close_reason)
        if self._user_closed:
            return resumed
        log.info("fastfeed: connection to %s closed (%s %s)", url, code, session.close_reason)
        if code in CLIENT_FAULT_CLOSE_CODES and not self.retry_client_errors:
            raise ConnectionClosed(code, f"closed by the gateway: {code} {session.close_reason}")
        self.error = ConnectionClosed(code, f"connection lost: {code} {session.close_reason}")
        return resumed

    async def _resume(self, session: _Session) -> bool:
        """Bring a new connection to the client's state: frame interval,
        subscriptions (with `since`, so only missed rows come back), watches.
        Returns whether there was anything to restore (a request was sent)."""
        timeout = self.request_timeout
        if self.frame_ms is not None:
            await self._raw(session, {"op": "configure", "frame_ms": self.frame_ms}, timeout)
        syms = sorted(self._subs | self._lost)
        for chunk, msg in self._subscribe_msgs(syms):
            reply = await self._raw(session, msg, timeout)
            unknown = set(reply.get("unknown") or ())
            # the gateway lost them (a fresh replica not yet fed): keep them
            # and their last rows, and ask again on the next resume
            self._lost.difference_update(chunk)
            self._lost.update(unknown)
            self._subs.update(s for s in chunk if s not in unknown)
            self._subs.difference_update(unknown)
        watch = sorted(self._watched & self._subs)
        for _, msg in self._grouped("watch", watch, self._wchans):
            await self._raw(session, msg, timeout)
        return self.frame_ms is not None or bool(syms)

    def _grouped(self, op: str, syms: builtins.list[str],
                 chans: dict[str, frozenset[str]]) -> Iterable[tuple[builtins.list[str],
                                                                     dict[str, Any]]]:
        """Requests for `syms`, one per set of channels and chunk: a symbol
        of the quote alone goes without "channels", as in version 1."""
        groups: dict[frozenset[str], builtins.list[str]] = {}
        for s in syms:
            groups.setdefault(chans.get(s, _QUOTE_ONLY), []).append(s)
        for key in sorted(groups, key=sorted):
            group = groups[key]
            for i in range(0, len(group), _CHUNK):
                chunk = group[i : i + _CHUNK]
                msg: dict[str, Any] = {"op": op, "symbols": chunk}
                if key != _QUOTE_ONLY:
                    msg["channels"] = sorted(key)
                yield chunk, msg

    def _subscribe_msgs(self, syms: builtins.list[str]) -> Iterable[tuple[builtins.list[str],
                                                                          dict[str, Any]]]:
        """Resubscriptions: quotes with "since" (only what was missed), trades
        with "since_trades" (only what was missed, or how many the gateway no
        longer holds), books without (a full snapshot)."""
        for chunk, msg in self._grouped("subscribe", syms, self._chans):
            chans = frozenset(msg.get("channels", (QUOTE_CHANNEL,)))
            if QUOTE_CHANNEL in chans:
                since = {s: self.rows[s].seq for s in chunk if s in self.rows}
                if since:
                    msg["since"] = since
            self._since_trades(msg, chunk, chans)
            yield chunk, msg

    async def _raw(self, session: _Session, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        rid = next(self._ids)
        pending = _Pending(msg)
        session.pending[rid] = pending
        try:
            session.send({**msg, "id": rid})
            async with asyncio.timeout(timeout):
                reply = await pending.future
        finally:
            session.pending.pop(rid, None)
        if reply.get("type") == "error":
            err = _error(reply)
            if err.code == FORBIDDEN:  # entitlements shrank: drop those, go on
                self._drop(err.symbols)
                self._report_error(err)
                return {}
            raise err
        if pending.forbidden is not None:
            self._drop(pending.forbidden.symbols)
            self._report_error(pending.forbidden)
        return reply

    async def _find_lost(self, session: _Session) -> None:
        """Ask again, with backoff, for subscribed symbols the gateway did not
        know at the resume (a restarted gateway not yet fed, a replica that
        lags), until it knows them all."""
        attempt = 0
        while self._lost:
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1
            for lost, msg in list(self._subscribe_msgs(sorted(self._lost)[:_CHUNK])):
                try:
                    reply = await self._raw(session, msg, self.request_timeout)
                except (TimeoutError, FastfeedError) as e:
                    log.info("fastfeed: resubscribing %d lost symbols: %s", len(lost), e)
                    continue
                unknown = set(reply.get("unknown") or ())
                found = [s for s in lost if s in self._lost and s not in unknown]
                self._lost.difference_update(found)
                self._subs.update(found)
                watch = [s for s in found if s in self._watched]
                for _, wmsg in self._grouped("watch", watch, self._wchans):
                    await self._raw(session, wmsg, self.request_timeout)
                if found:
                    attempt = 0

    def _drop(self, symbols: Iterable[str]) -> None:
        symbols = builtins.list(symbols)
        for s in symbols:
            self._subs.discard(s)
            self._watched.discard(s)
            self._lost.discard(s)
            self.rows.pop(s, None)
        self._forget_channels(symbols)

    async def _watchdog(self, session: _Session) -> None:
        if not self.stale_after:
            return
        while True:
            await asyncio.sleep(self.stale_after / 4)
            idle = time.monotonic() - (self.last_message_at or 0.0)
            if idle > self.stale_after:
                log.warning("fastfeed: nothing from %s for %.1f s, reconnecting", session.url, idle)
                if session.transport is not None:
                    session.transport.disconnect(graceful=False)
                return

    def _stop(self, error: BaseException) -> None:
        if self._stopped.is_set():
            return
        self.error = error
        self._ready.clear()
        self._stopped.set()
        self._progressed()
        for it in self._iters:
            it.wake()

    # ---------------------------------------------------------------- incoming

    def _on_message(self, session: _Session, binary: bool, data: bytes) -> None:
        self.messages += 1
        self.last_message_at = time.monotonic()
        if binary:
            if session.compact is not None:  # fastfeed.v1.compact.bin: FFC1 frames
                try:
                    t, full = session.compact.update_binary(data)
                except ValueError as e:
                    log.warning("fastfeed: unreadable frame from %s: %s", session.url, e)
                    return
                self._on_rows([_make_row(r) for r in full], t)
                return
            t, rows = decode_binary_update(data)
            self._on_rows(rows, t)
            return
        try:
            msg = json.loads(data)
            kind = msg["type"]
        except (ValueError, TypeError, KeyError):
            log.warning("fastfeed: unreadable message from %s: %.200r", session.url, data)
            return
        if kind == "update":
            full = msg["rows"] if session.compact is None else session.compact.update(msg)
            self._on_rows([_make_row(r) for r in full], msg.get("t"))
            books = msg.get("books")
            if books:
                self._on_books(books, False)
            if "trades" in msg or "bars" in msg:
                self._apply_channels(msg, "items")
            return
        rid = msg.get("id")
        pending = session.pending.get(rid) if rid is not None else None
        if kind == "snapshot":
            # applied here, before the caller resumes, so `rows` holds them
            raw: list[list[Any]] = msg.get("rows") or []
            if session.compact is not None:
                session.compact.snapshot(raw)
            self._apply_rows([_make_row(r) for r in raw])
            books = msg.get("books")
            if books:
                self._on_books(books, True)
            if "trades" in msg or "bars" in msg:
                self._apply_channels(msg, "recent")
            if pending is not None and not pending.future.done():
                pending.future.set_result(msg)
        elif kind == "heartbeat":
            self.last_server_time = msg.get("t")
        elif kind == "status":
            if "book" in msg:  # one book's state, not the feed's
                self._on_book_status(msg)
                return
            if "feed" in msg:  # other statuses (a delay line filling, a book) say other things
                self.feed_up = msg["feed"] == "up"
                if self.on_status is not None:
                    _call(self.on_status, self.feed_up)
        elif kind == "error":
            err = _error(msg)
            if pending is not None and not pending.future.done():
                if (
                    err.code == FORBIDDEN
                    and pending.op == "subscribe"
                    and pending.forbidden is None
                    and not set(pending.symbols) <= set(err.symbols)
                ):
                    # partial refusal: the snapshot of the rest follows
                    pending.forbidden = err
                    self._subs.difference_update(err.symbols)
                    return
                pending.future.set_result(msg)
            else:
                self._report_error(err)
        elif pending is not None and not pending.future.done():  # ack, pong, list
            pending.future.set_result(msg)

    def _on_rows(self, rows: builtins.list[Row], t: int | None) -> None:
        self.frames += 1
        if t:
            self.last_server_time = t
            self.last_latency = (time.time_ns() - t) / 1e9
        self._apply_rows(rows)

    def _apply_rows(self, rows: builtins.list[Row]) -> None:
        """Apply rows to `rows`: a row not newer (by seq) than the one held,
        or for a symbol no longer subscribed, is ignored."""
        table = self.rows
        subs = self._subs
        changed = []
        for row in rows:
            sym = row[0]
            held = table.get(sym)
            if held is not None and row[1] <= held[1]:
                continue
            if sym not in subs and sym not in self._lost:
                continue
            table[sym] = row
            changed.append(row)
        if not changed:
            return
        for it in self._iters:
            it.push(changed)
        if self.on_update is not None:
            _call(self.on_update, changed)

    def _apply_channels(self, msg: dict[str, Any], key: str) -> None:
        """The trades and bars of a snapshot (`key` "recent") or an update ("items")."""
        chans = self._chans
        trades = msg.get("trades")
        if trades:
            self._tape.apply(trades, key,
                             lambda sym: TRADES_CHANNEL in chans.get(sym, _QUOTE_ONLY))
        bars = msg.get("bars")
        if bars:
            self._bars.apply(bars, lambda sym, iv: "bars:" + iv in chans.get(sym, _QUOTE_ONLY))

    def _on_books(self, entries: builtins.list[dict[str, Any]], snapshot: bool) -> None:
        """Apply ``books`` entries: a snapshot's replace the book, an update's
        are changes unless ``full``. A book whose checksum then differs is
        resubscribed; until its snapshot is in, its updates are ignored."""
        books = self.books
        for entry in entries:
            sym = entry.get("sym")
            if not isinstance(sym, str) or BOOK_CHANNEL not in self._chans.get(sym, _QUOTE_ONLY):
                continue
            if sym in self._resyncing:
                if not snapshot:
                    continue  # changes to the copy being replaced
                self._resyncing.discard(sym)
            book = books.get(sym)
            if book is None:
                book = books[sym] = OrderBook(sym, self.book_depth)
            full = snapshot or bool(entry.get("full"))
            if not book.apply(entry, full):
                log.warning("fastfeed: book %s at seq %s: checksum %s, held %s; resubscribing",
                            sym, entry.get("seq"), entry.get("checksum"), book.checksum())
                self._resync_book(sym)
                continue
            if full:
                book.stale = False
            if self.on_book is not None:
                _call(self.on_book, book)

    def _on_book_status(self, msg: dict[str, Any]) -> None:
        sym = msg.get("sym")
        book = self.books.get(sym) if isinstance(sym, str) else None
        ok = msg.get("book") == "ok"
        if book is not None:
            book.stale = not ok
        if self.on_book_status is not None and isinstance(sym, str):
            _call(self.on_book_status, sym, ok)

    def _resync_book(self, sym: str) -> None:
        """Resubscribe one book (unsubscribe + subscribe: a full snapshot),
        as the contract says a client whose checksum differs does."""
        if sym in self._resyncing:
            return
        self._resyncing.add(sym)
        self.book_resyncs += 1

        async def go() -> None:
            try:
                await self._request({"op": "unsubscribe", "symbols": [sym],
                                     "channels": [BOOK_CHANNEL]}, resend=False)
                if BOOK_CHANNEL in self._chans.get(sym, _QUOTE_ONLY):
                    await self._request({"op": "subscribe", "symbols": [sym],
                                         "channels": [BOOK_CHANNEL]}, resend=True)
            except (FastfeedError, TimeoutError) as e:
                log.warning("fastfeed: resubscribing the book of %s: %s", sym, e)
            finally:
                # a resume (or the snapshot) has replaced the book by now
                self._resyncing.discard(sym)

        task = asyncio.get_running_loop().create_task(go())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _report_error(self, err: FastfeedError) -> None:
        if self.on_error is not None:
            _call(self.on_error, err)
        else:
            log.warning("fastfeed: %s", err)


class _UpdateIterator:
    """Rows changed since the consumer's last step, merged per symbol."""

    def __init__(self, client: Client):
        self.client = client
        self.pending: dict[str, Row] = {}
        self.event = asyncio.Event()

    def push(self, rows: list[Row]) -> None:
        pending = self.pending
        for row in rows:
            pending[row[0]] = row
        self.event.set()

    def wake(self) -> None:
        self.event.set()

    def __aiter__(self) -> _UpdateIterator:
        return self

    async def __anext__(self) -> list[Row]:
        while not self.pending:
            if self.client.closed:
                self._detach()
                err = self.client.error
                if isinstance(err, ConnectionClosed) and self.client._user_closed:
                    raise StopAsyncIteration
                if err is not None:
                    raise err
                raise StopAsyncIteration
            self.event.clear()
            await self.event.wait()
        rows = list(self.pending.values())
        self.pending.clear()
        return rows

    def _detach(self) -> None:
        with contextlib.suppress(ValueError):
            self.client._iters.remove(self)

    async def aclose(self) -> None:
        self._detach()


def _symbols(symbols: Iterable[str]) -> list[str]:
    if isinstance(symbols, str):
        symbols = [symbols]
    out = list(dict.fromkeys(symbols))
    if not out:
        raise ValueError("no symbols given")
    return out


def _channels(channels: Iterable[str] | None) -> frozenset[str]:
    if channels is None:
        return _QUOTE_ONLY
    if isinstance(channels, str):
        channels = [channels]
    out = frozenset(channels)
    if not out or not all(isinstance(c, str) and c for c in out):
        raise ValueError(f"channels must be a non-empty list of names, not {channels!r}")
    return out


def _error(msg: dict[str, Any]) -> FastfeedError:
    return FastfeedError(
        str(msg.get("code", "error")), str(msg.get("message", "")), msg.get("symbols")
    )


def _call(callback: Callable[..., Any], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("fastfeed: callback %r failed", callback)


def _guarded(callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """A user callback whose exceptions are logged, not raised into the client."""
    if callback is None:
        return None
    return lambda *args: _call(callback, *args)
