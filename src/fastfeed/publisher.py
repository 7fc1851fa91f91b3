"""One publisher for feed handlers: ticks in, batches out, across reconnections.

    from fastfeed.publisher import Publisher

    async with Publisher("ws://localhost:8080/ingest", token=None) as p:      # a gateway
        await p.publish({"sym": "BBCA", "seq": 1, "bid": 9100, "ask": 9125})
        await p.publish([{"sym": "TLKM", "seq": 7, "last": 3010}, ...])

    async with Publisher("redis://redis:6379/0") as p:    # the Redis bus, every gateway
        ...                                               # (redis+cluster://, redis+sentinel://)

One engine, two transports: `WebSocketTransport` (JSON batches to a
gateway's ``/ingest``) and `RedisTransport` (the bus's row script, once per
partition: stored only-if-newer and published to every gateway, see
`fastfeed.bus`). The URL's scheme picks one; `Publisher(transport=...)` takes
any object with the `Transport` methods.

`publish` checks each tick against the gateway's rules (``sym`` and ``seq``
required, finite numbers; with `validate`, also no unknown field) and queues
it; a background task sends the queue as one batch every `flush_ms`
milliseconds, or as soon as `max_batch` ticks are waiting. With
``validate=True`` (the default) a bad tick raises `ValueError` and nothing of
that call is queued; with ``validate=False`` each bad tick is dropped and
reported like a refusal from the other side. Every refusal (a bad tick, or an
``error`` message from the gateway) is counted (`errors`, `last_error`) and
handed to ``on_error(FastfeedError)``; a refused tick names its symbol in
``symbols``.

Ticks are never lost across a reconnection: the publisher keeps the latest
state of every symbol it has published (each tick merged over the previous
ones, as the gateway and the store merge them) and sends that state first on
every new connection. The other side drops what it already has (a tick whose
``seq`` is not above the one it holds), so this is harmless to a gateway or
a Redis that stayed up and restores one that restarted empty. While
disconnected, `publish` never waits and memory is bounded by the number of
symbols, not ticks. The WebSocket transport reconnects after the
`fastfeed.backoff.Backoff` given as `backoff`, by the client's rule
(`fastfeed.backoff.Retries`: afresh after a served connection, still growing
after a 1013 or a close for the publisher's own fault); the Redis transport
follows the bus's circuit breaker (which waits with the same backoff). A
gateway whose Redis bus is down answers ``unavailable`` (what it was sent is
not published): the WebSocket transport then ends that connection as a 1013
would, so the publisher comes back after its backoff and sends the held
state first, until the gateway takes it.

Order books (contract version 1.1, "Ingest of books and trades") go the
same way: ``publish_book(sym, seq, bids, asks, full=...)`` (or a book
message, ``{"type": "book", ...}``, given to `publish`) checks the levels
(finite prices, volumes not negative, a full book not crossed) and queues
the message in order with the ticks; the publisher keeps each book whole
(every level, the latest ``seq``) and sends it as one full book on every new
connection, so a restarted gateway, or a Redis that restarted empty, gets
its books back and one that stayed up drops what it already has. Books go
to a gateway's ``/ingest``, or through the bus's book script
(`fastfeed.bus.books`; ``book_levels`` must be the gateways'
``--book-levels``).

Trades (contract version 1.1, ``{"type":"trade","sym":..,"tseq":..,"ts":..,
"price":..,"size":..,"side":"b"}``) go through `publish_trades`, or through
`publish` among the ticks (sent before the ticks of the same call), in the
same batches. They are events, not state: none is folded into another. The last
`trade_buffer` trades published are kept and sent again on every new
connection, after the state (the other side drops those whose `tseq` it
holds), so a reconnection loses none; trades published while disconnected
beyond that buffer are counted in `trades_dropped` and logged, never lost
silently. Trades go to a gateway's ``/ingest``, or through the bus's trade
script (`fastfeed.bus.trades`).

`sync()` waits until the other side has taken everything published so far
(Redis: answered every script call; a gateway: answered a ping sent after the
last batch), reconnecting if it must, and says whether it happened in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, Self

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from picows.common import WSHandshakeError

from fastfeed._core import check_tick, encode_batch, join_records, pack_ticks, valid_symbol
from fastfeed.backoff import Backoff, Retries
from fastfeed.bus import BusDown, RedisBus, RedisError
from fastfeed.client import ConnectionClosed, FastfeedError
from fastfeed.protocol import (
    CLIENT_FAULT_CLOSE_CODES,
    CLOSE_ABNORMAL,
    CLOSE_NO_STATUS,
    CLOSE_TRY_AGAIN_LATER,
    FIELDS,
    UNAVAILABLE,
)

__all__ = [
    "MAX_BATCH",
    "Publisher",
    "RedisPublisher",
    "RedisTransport",
    "Transport",
    "WebSocketTransport",
    "book_message",
    "transport_for",
    "validate_tick",
    "validate_trade",
]

log = logging.getLogger("fastfeed.publisher")

Tick = dict[str, Any]

_KNOWN = frozenset(FIELDS)

#: most ticks per batch, for either transport (`Publisher(max_batch=...)`)
MAX_BATCH = 1000

_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster",
                  "redis+sentinel", "rediss+sentinel")


def validate_tick(tick: Mapping[str, Any]) -> None:
    """Raise `ValueError` unless the gateway would accept `tick`.

    The gateway's own rules (from the core), plus one of the publisher's:
    field names outside the protocol are refused, because the gateway would
    silently ignore a misspelt one.
    """
    if not isinstance(tick, Mapping):
        raise ValueError(f"a tick is a mapping, not {type(tick).__name__}")
    why = check_tick(dict(tick))
    if why is not None:
        raise ValueError(f"{tick.get('sym')!r}: {why}")
    unknown = tick.keys() - _KNOWN
    if unknown:
        raise ValueError(f"{tick['sym']}: unknown field(s) {sorted(unknown)}")


Level = list[Any]  # [price, volume, orders]


def _levels(raw: Any, sym: Any, key: str) -> list[Level]:
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{sym!r}: {key} must be a list of [price, volume, orders]")
    out = []
    for lv in raw:
        if not isinstance(lv, (list, tuple)) or not 2 <= len(lv) <= 3:
            raise ValueError(f"{sym!r}: a level of {key} is [price, volume, orders], not {lv!r}")
        price, vol = lv[0], lv[1]
        orders = lv[2] if len(lv) == 3 else 0
        for name, v in (("price", price), ("volume", vol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{sym!r}: {key} level {lv!r}: {name} must be a finite number")
        if vol < 0:
            raise ValueError(f"{sym!r}: {key} level {lv!r}: negative volume")
        if isinstance(orders, bool) or not isinstance(orders, int) or orders < 0:
            raise ValueError(f"{sym!r}: {key} level {lv!r}: orders must be a whole number >= 0")
        out.append([float(price), float(vol), orders])
    return out


def book_message(sym: str, seq: int, bids: Iterable[Any] = (), asks: Iterable[Any] = (),
                 full: bool = False) -> Tick:
    """A checked ingest book message (raises `ValueError` for what the
    gateway would refuse: a bad symbol or seq, a level that is not
    ``[price, volume, orders]`` of finite numbers, a negative volume, a full
    book that is crossed)."""
    why = check_tick({"sym": sym, "seq": seq})
    if why is not None:
        raise ValueError(f"book {sym!r}: {why}")
    b = _levels(list(bids), sym, "bids")
    a = _levels(list(asks), sym, "asks")
    if full:
        b = [lv for lv in b if lv[1] > 0]
        a = [lv for lv in a if lv[1] > 0]
        if b and a and max(lv[0] for lv in b) >= min(lv[0] for lv in a):
            raise ValueError(f"book {sym!r} at seq {seq}: a crossed full book "
                             f"(best bid {max(lv[0] for lv in b)} >= best ask "
                             f"{min(lv[0] for lv in a)})")
    return {"type": "book", "sym": sym, "seq": int(seq), "full": bool(full), "bids": b, "asks": a}


class _HeldBook:
    """A book as published so far: every level, the latest seq."""

    __slots__ = ("asks", "bids", "seq")

    def __init__(self) -> None:
        self.seq = -1
        self.bids: dict[float, Level] = {}
        self.asks: dict[float, Level] = {}

    def apply(self, msg: Tick) -> bool:
        """False if `msg` is not newer (the gateway would drop it too)."""
        if msg["seq"] <= self.seq:
            return False
        self.seq = msg["seq"]
        if msg["full"]:
            self.bids, self.asks = {}, {}
        for side, levels in ((self.bids, msg["bids"]), (self.asks, msg["asks"])):
            for lv in levels:
                if lv[1] == 0:
                    side.pop(lv[0], None)
                else:
                    side[lv[0]] = lv
        return True

    def full(self, sym: str) -> Tick:
        return {"type": "book", "sym": sym, "seq": self.seq, "full": True,
                "bids": sorted(self.bids.values(), key=lambda lv: -lv[0]),
                "asks": sorted(self.asks.values(), key=lambda lv: lv[0])}


_TRADE_KEYS = frozenset(("type", "sym", "tseq", "ts", "price", "size", "side"))
_SIDES = ("b", "s", "")


def validate_trade(trade: Mapping[str, Any]) -> None:
    """Raise `ValueError` unless `trade` is a contract ingest trade
    (``type`` ``"trade"`` may be left out: it is added)."""
    if not isinstance(trade, Mapping):
        raise ValueError(f"a trade is a mapping, not {type(trade).__name__}")
    sym = trade.get("sym")
    if not isinstance(sym, str) or not valid_symbol(sym):
        raise ValueError(f"trade: bad symbol {sym!r}")
    if trade.get("type", "trade") != "trade":
        raise ValueError(f"{sym}: type {trade.get('type')!r} is not a trade")
    for name, least in (("tseq", 1), ("ts", 0)):
        n = trade.get(name)
        if type(n) is not int or n < least:
            raise ValueError(f"{sym}: {name} must be an integer of at least {least}, not {n!r}")
    for name in ("price", "size"):
        v = trade.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{sym}: {name} must be a finite number, not negative: {v!r}")
    if trade.get("side", "") not in _SIDES:
        raise ValueError(f"{sym}: side must be 'b', 's' or '', not {trade.get('side')!r}")
    unknown = trade.keys() - _TRADE_KEYS
    if unknown:
        raise ValueError(f"{sym}: unknown trade field(s) {sorted(unknown)}")


class Transport(Protocol):
    """Where batches go. Implementations: `WebSocketTransport` (the gateway's
    ``/ingest``) and `RedisTransport` (the bus).

    `connect` raises `OSError` (or a subclass) when it cannot connect, and
    `ConnectionClosed` when it must not retry (a refused token). `send`
    raises `ConnectionError` once the connection is gone. `closed` resolves
    with a close code when the connection ends. `on_error` is set by the
    publisher before `connect` and receives the other side's refusals.
    A transport may also have ``async sync()``: return once the other side
    has taken everything sent so far (raise `ConnectionError` if it cannot);
    without it, `Publisher.sync` stops at "written". A transport with
    ``packs_ticks = True`` is sent the records of `fastfeed._core.pack_ticks`
    (checked and encoded once, as the publisher queued them) instead of tick
    objects, and tick objects only for the state resent on connecting.
    """

    on_error: Callable[[FastfeedError], None] | None

    async def connect(self) -> None: ...

    async def send(self, ticks: list[Tick | bytes]) -> None: ...

    async def closed(self) -> int: ...

    async def close(self) -> None: ...


class _IngestListener(WSListener):  # type: ignore[misc]
    def __init__(self, transport: WebSocketTransport):
        super().__init__()
        self.owner = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.TEXT:
            self.owner._on_text(frame.get_payload_as_bytes())
        elif t is WSMsgType.PONG:
            self.owner._on_pong(frame.get_payload_as_bytes())
        elif t is WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NO_STATUS
            self.owner.close_code = code
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK if code == CLOSE_NO_STATUS
                                     else WSCloseCode(code))
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        done = self.owner._done
        if done is not None and not done.done():
            done.set_result(CLOSE_TRY_AGAIN_LATER if self.owner._unavailable
                            else self.owner.close_code)
        self.owner._writable.set()
        self.owner._lost_pings()

    def pause_writing(self) -> None:
        self.owner._writable.clear()

    def resume_writing(self) -> None:
        self.owner._writable.set()


class WebSocketTransport:
    """Batches as JSON arrays of tick objects over the gateway's ``/ingest``
    WebSocket. `token` is the publisher token, sent as a Bearer header."""

    takes_books = True  # book messages go in the same arrays
    takes_trades = True  # and trade messages

    def __init__(self, url: str, token: str | None = None, connect_timeout: float = 10.0):
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout
        self.on_error: Callable[[FastfeedError], None] | None = None
        self.close_code = CLOSE_ABNORMAL
        self._ws: WSTransport | None = None
        self._done: asyncio.Future[int] | None = None
        self._writable = asyncio.Event()
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self._unavailable = False  # the gateway could not publish: this connection ends

    async def connect(self) -> None:
        self.close_code = CLOSE_ABNORMAL
        self._unavailable = False
        self._done = asyncio.get_running_loop().create_future()
        self._writable.set()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws, _ = await ws_connect(
                lambda: _IngestListener(self),
                self.url,
                extra_headers=headers,
                websocket_handshake_timeout=self.connect_timeout,
            )
        except WSHandshakeError as e:
            status = int(e.response.status) if e.response is not None else 0
            if status in (401, 403, 404):
                raise ConnectionClosed(
                    status, f"{self.url} refused the upgrade: HTTP {status}"
                ) from e
            raise ConnectionError(f"{self.url}: {e}") from e

    async def send(self, ticks: list[Any]) -> None:  # tick objects: it does not pack
        ws = self._ws
        if ws is None or ws.is_disconnected:
            raise ConnectionError("not connected")
        if not self._writable.is_set():
            await self._writable.wait()  # the socket's buffer is full: wait for it
            if ws.is_disconnected:
                raise ConnectionError("connection lost")
        ws.send(WSMsgType.TEXT, json.dumps(ticks, separators=(",", ":")).encode())

    async def sync(self) -> None:
        """A ping after everything sent: the gateway answers it once it has
        read every batch before it."""
        ws = self._ws
        if ws is None or ws.is_disconnected:
            raise ConnectionError("not connected")
        self._ping_seq += 1
        token = b"fastfeed-sync-%d" % self._ping_seq
        fut = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        try:
            ws.send_ping(token)
            await fut
        finally:
            self._pings.pop(token, None)

    def _on_pong(self, payload: bytes) -> None:
        fut = self._pings.pop(payload, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _lost_pings(self) -> None:
        pings, self._pings = self._pings, {}
        for fut in pings.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost before the gateway answered"))

    async def closed(self) -> int:
        assert self._done is not None
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        ws = self._ws
        if ws is not None and not ws.is_disconnected:
            ws.send_close(WSCloseCode.OK)
            ws.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await ws.wait_disconnected()

    def _on_text(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            log.warning("fastfeed publisher: unreadable message %.200r", data)
            return
        if not isinstance(msg, dict) or msg.get("type") != "error":
            return
        if self.on_error is not None:
            self.on_error(
                FastfeedError(
                    str(msg.get("code", "error")), str(msg.get("message", "")), msg.get("symbols")
                )
            )
        if msg.get("code") == UNAVAILABLE:
            self._go_again()

    def _go_again(self) -> None:
        """The gateway did not publish a batch (its Redis bus is down): the
        publisher holds it in its state, which only a new connection sends,
        so this one ends, counted as a 1013 (the backoff keeps growing)."""
        ws = self._ws
        if self._unavailable or ws is None or ws.is_disconnected:
            return
        self._unavailable = True
        ws.send_close(WSCloseCode.OK)
        ws.disconnect()


class RedisTransport:
    """Batches onto the Redis bus: one row-script call per partition, which
    stores the ticks only-if-newer and publishes the newer ones to every
    gateway (`fastfeed.bus`). `url` is ``redis://``, ``rediss://``,
    ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``; `channels`
    and `prefix` must match the gateways' ``--redis-channels`` and
    ``--redis-prefix``. The bus reconnects by itself (its circuit breaker);
    `connect` waits until it is up. At most `max_inflight` script calls wait
    for Redis's answer before `send` waits too. The other keywords go to
    `fastfeed.bus.RedisBus` (``backoff_base``, ``ping_interval``, ...).
    """

    packs_ticks = True  # the publisher queues encoded records (see Transport)
    takes_books = True  # through the bus's book script (fastfeed.bus.books)
    takes_trades = True  # through the bus's trade script (fastfeed.bus.trades)

    def __init__(self, url: str, *, channels: int = 16, prefix: str = "fastfeed",
                 max_inflight: int = 64, name: str = "publisher", **bus_kw: Any):
        # a bus without a table: the link and the state store, no subscriber
        self.bus = RedisBus(url, channels=channels, prefix=prefix, on_feed=self._on_feed,
                            name=name, **bus_kw)
        self.max_inflight = max_inflight
        self.on_error: Callable[[FastfeedError], None] | None = None
        self._done: asyncio.Future[int] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return str(self.bus.url)

    @property
    def last_error(self) -> str:
        return str(self.bus.last_error)

    def _on_feed(self, up: bool) -> None:
        if not up and self._done is not None and not self._done.done():
            self._done.set_result(CLOSE_ABNORMAL)

    async def connect(self) -> None:
        if not self._started:
            self._started = True
            await self.bus.start()
        loop = asyncio.get_running_loop()
        while True:
            # made before waiting: an outage that begins as the bus comes up
            # must resolve the future of this connection
            self._done = loop.create_future()
            await self.bus.wait_ready()
            if self.bus.ready and not self._done.done():
                return

    async def send(self, ticks: list[Any]) -> None:
        # ticks, books and trades keep their order: runs of each, one after the other
        start = 0
        for k in range(1, len(ticks) + 1):
            if k == len(ticks) or _kind(ticks[k]) != _kind(ticks[start]):
                kind = _kind(ticks[start])
                if kind == "book":
                    await self._send_books(ticks[start:k], start)
                elif kind == "trade":
                    await self._send_trades(ticks[start:k], start)
                else:
                    await self._send_ticks(ticks[start:k])
                start = k

    async def _send_ticks(self, ticks: list[Any]) -> None:
        bus = self.bus
        if type(ticks[0]) is bytes:  # records the publisher packed: checked
            parts = join_records(ticks, bus.parts)
            errors: list[tuple[int, str | None, str]] = []
        else:
            parts, errors = encode_batch(ticks, bus.parts)
        if errors and self.on_error is not None:
            for idx, sym, why in errors:
                self.on_error(_refused(idx, sym, why))
        try:
            bus.publish_batches_nowait(parts)
            if bus.inflight() > self.max_inflight:
                await bus.flush()
            else:
                await bus.drain()
        except (TimeoutError, RedisError) as e:
            raise BusDown(f"redis {bus.url}: {e or type(e).__name__}") from e

    async def _send_books(self, books: list[Any], first: int) -> None:
        # the book script stores them by the book rules and publishes what it
        # took; waiting for its answer keeps them in order with what follows
        try:
            errors = await self.bus.publish_books(books, range(first, first + len(books)))
        except (TimeoutError, RedisError) as e:
            raise BusDown(f"redis {self.bus.url}: {e or type(e).__name__}") from e
        if errors and self.on_error is not None:
            for idx, sym, why in errors:
                self.on_error(_refused(idx, sym, why))

    async def _send_trades(self, trades: list[Any], first: int) -> None:
        # the trade script keeps each instrument's ring only-if-newer (a trade
        # sent again on a reconnection is dropped there); waiting for its
        # answer keeps the ticks that follow after them
        try:
            errors = await self.bus.publish_trades(trades)
        except (TimeoutError, RedisError, BusDown) as e:
            raise BusDown(f"redis {self.bus.url}: {e or type(e).__name__}") from e
        if errors and self.on_error is not None:
            for idx, sym, why in errors:
                self.on_error(_refused(first + idx, sym, why))

    async def sync(self) -> None:
        try:
            await self.bus.flush()
        except (TimeoutError, RedisError) as e:
            raise BusDown(f"redis {self.bus.url}: {e or type(e).__name__}") from e

    async def closed(self) -> int:
        assert self._done is not None
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        await self.bus.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(1000)


def transport_for(url: str, token: str | None = None, **kw: Any) -> Transport:
    """The transport a URL names: ``ws://``/``wss://`` a gateway's ``/ingest``,
    a Redis URL the bus (`kw` go to `RedisTransport`)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("ws", "wss"):
        if kw:
            raise ValueError(f"options {sorted(kw)} are for a Redis URL, not {url!r}")
        return WebSocketTransport(url, token)
    if scheme in _REDIS_SCHEMES:
        if token:
            raise ValueError("a publisher token is for a gateway's ws:// URL; a Redis URL "
                             "carries its password itself (redis://:PASSWORD@host)")
        return RedisTransport(url, **kw)
    raise ValueError(f"publish to ws://HOST:PORT/ingest (a gateway) or redis://HOST:PORT "
                     f"(the bus; also rediss://, unix://, redis+cluster://, "
                     f"redis+sentinel://), not {url!r}")


def _kind(t: Any) -> str:
    """What a queued entry is: ``"book"``, ``"trade"``, or a tick (a packed
    record or a tick object)."""
    return "tick" if type(t) is bytes else str(t.get("type") or "tick")


def _refused(idx: int, sym: Any, why: str) -> FastfeedError:
    return FastfeedError("bad_request", f"tick {idx} refused: {why}",
                         [sym] if isinstance(sym, str) else None)


class Publisher:
    """Publishes ticks in batches to a gateway or onto the Redis bus, across
    reconnections (see the module).

    Parameters:
      url: a gateway's ``ws://host:port/ingest``, or a Redis URL for the bus
        (`transport_for`; ignored with `transport`).
      token: the publisher token, if the gateway requires one.
      transport: a `Transport` to use instead of the one `url` names.
      flush_ms: longest time a tick waits in the queue.
      max_batch: most ticks per batch; a full batch is sent at once.
      max_queue: `publish` waits while this many ticks are queued and the
        connection is up (backpressure); while it is down the queue is
        folded into the per-symbol state, so nothing waits.
      backoff: the `fastfeed.backoff.Backoff` between reconnection attempts.
      validate: raise `ValueError` in `publish` for a bad tick
        (`validate_tick`; `publish_trades`: `validate_trade`); if false, a
        bad one is dropped and reported.
      trade_buffer: the last trades kept to send again on a new connection.
      on_error: ``callback(FastfeedError)`` for each refusal: a bad tick
        (with ``validate=False``) or an ``error`` the gateway sends back (a
        refused tick names its symbol in ``symbols``).
      **transport_kw: options of `RedisTransport` for a Redis URL
        (``channels``, ``prefix``, ``backoff_base``, ...).

    Counters: `published` (ticks accepted by `publish`), `sent` (ticks
    written to the wire, resends included), `resent` (of those, rows sent
    from the held state on a new connection), `batches`, `errors`
    (refusals), `reconnects`; `trades_published`, `trades_dropped` (trades
    published while disconnected that the buffer could not hold);
    `last_error`; `connected`; `error` (why the publisher stopped, once it has).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        transport: Transport | None = None,
        flush_ms: float = 5.0,
        max_batch: int = MAX_BATCH,
        max_queue: int = 100_000,
        backoff: Backoff | None = None,
        validate: bool = True,
        on_error: Callable[[FastfeedError], Any] | None = None,
        trade_buffer: int = 100_000,
        **transport_kw: Any,
    ):
        if transport is None:
            if url is None:
                raise ValueError("Publisher needs a url or a transport")
            transport = transport_for(url, token, **transport_kw)
        elif transport_kw:
            raise ValueError(f"options {sorted(transport_kw)} are for the transport a url "
                             "names, not for one given as transport=")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.transport = transport
        # the transport sends `pack_ticks` records (RedisTransport), not tick objects
        self._packs = bool(getattr(transport, "packs_ticks", False))
        self.flush_ms = flush_ms
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.backoff = backoff or Backoff()
        self.validate = validate
        self.on_error = on_error

        self.published = 0
        self.trades_published = 0
        self.trades_dropped = 0
        self.sent = 0
        self.resent = 0
        self.batches = 0
        self.errors = 0
        self.reconnects = 0
        self.last_error: FastfeedError | None = None
        #: why the publisher stopped, once it has
        self.error: BaseException | None = None

        self._queue: list[Tick | bytes] = []  # ticks, or a packing transport's records
        self._state: dict[str, Tick] = {}  # every symbol's ticks merged: resent on reconnect
        self._books: dict[str, _HeldBook] = {}  # every book whole: resent full on reconnect
        self._trades: deque[Tick] = deque(maxlen=max(1, trade_buffer))  # resent on reconnect
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()  # the flusher has work
        self._full = asyncio.Event()  # a whole batch is waiting
        self._space = asyncio.Event()  # the queue has room
        self._space.set()
        self._idle = asyncio.Event()  # the queue is empty and nothing is in flight
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connection = 0  # connections made so far

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def state(self) -> Mapping[str, Tick]:
        """The latest merged tick of every symbol published (read-only)."""
        return self._state

    async def start(self) -> None:
        """Start the background sender (``async with`` and `publish` do)."""
        if self._task is None:
            self.transport.on_error = self._on_error
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the transport is connected."""
        await self.start()
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def publish(self, ticks: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Queue one tick or a list of ticks. Raises `ValueError` for an
        invalid tick with `validate` (and queues none of the list),
        `ConnectionClosed` once the publisher has stopped."""
        if self._stopped.is_set():
            raise self.error or ConnectionClosed(1000, "publisher closed")
        batch = [ticks] if isinstance(ticks, Mapping) else list(ticks)
        trades = [t for t in batch if isinstance(t, Mapping) and t.get("type") == "trade"]
        if trades:
            # trades first (the ticks they moved follow them), none queued if
            # anything in the call is bad
            rest = [t for t in batch if not (isinstance(t, Mapping)
                                             and t.get("type") == "trade")]
            if self.validate:
                for t in rest:
                    if not (isinstance(t, Mapping) and t.get("type") == "book"):
                        validate_tick(t)
            await self.publish_trades(trades)
            if rest:
                await self.publish(rest)
            return
        if any(isinstance(t, Mapping) and t.get("type") == "book" for t in batch):
            books = [t for t in batch if isinstance(t, Mapping) and t.get("type") == "book"]
            batch = [t for t in batch if not (isinstance(t, Mapping) and t.get("type") == "book")]
            if batch:
                await self.publish(batch)
            await self.publish_books(books)
            return
        if self.validate:
            for t in batch:
                validate_tick(t)
        await self._room()
        state = self._state
        held_of = state.get
        queue = self._queue
        append = queue.append
        live = self._connected.is_set()
        accepted = 0
        if self._packs:
            # one pass in C checks and encodes every tick; the queue holds the
            # records the transport sends, so none is checked or encoded again
            ticks = [t if type(t) is dict else dict(t) if isinstance(t, Mapping) else t
                     for t in batch]
            records, errors = pack_ticks(ticks)
            for i, sym, why in errors:
                self._on_error(_refused(i, sym, why))
            for i, t in enumerate(ticks):
                rec = records[i]
                if rec is None:
                    continue
                accepted += 1
                sym = t["sym"]
                held = held_of(sym)
                if held is None:
                    state[sym] = dict(t)  # a copy: the caller may reuse its dicts
                elif t["seq"] > held["seq"]:
                    held.update(t)
                else:
                    continue  # the other side would drop it too
                if live:
                    append(rec)
        else:
            accepted = self._queue_ticks(batch, queue if live else None)
        self.published += accepted
        if queue or not live:
            self._idle.clear()
            self._wake.set()
        if len(queue) >= self.max_batch:
            self._full.set()

    def _queue_ticks(self, batch: list[Any], queue: list[Any] | None) -> int:
        """Check, copy, fold into the state and queue (when live) tick objects,
        for a transport that sends them as objects; how many were accepted."""
        state = self._state
        held_of = state.get
        # with validate, every tick was checked above; else each is checked here
        check = None if self.validate else check_tick
        accepted = 0
        for i, t in enumerate(batch):
            # a copy: the caller may reuse its dicts
            tick = dict(t) if type(t) is dict or isinstance(t, Mapping) else None
            if check is not None:
                why = check(tick) if tick is not None else "a tick is a mapping"
                if why is not None:
                    self._on_error(_refused(i, tick.get("sym") if tick is not None else None,
                                            why))
                    continue
            assert tick is not None
            accepted += 1
            sym = tick["sym"]
            held = held_of(sym)
            if held is None:
                state[sym] = dict(tick)  # a copy: the queued tick must not change
            elif tick["seq"] > held["seq"]:
                held.update(tick)
            else:
                continue  # the other side would drop it too
            if queue is not None:
                queue.append(tick)
        return accepted

    async def publish_book(self, sym: str, seq: int, bids: Iterable[Any] = (),
                           asks: Iterable[Any] = (), *, full: bool = False) -> None:
        """Queue one order book message: with `full`, the whole book (every
        level the source has, best first or not); otherwise price-keyed
        changes (volume 0 removes that price), each book's `seq` one above
        its last. Raises `ValueError` for a bad book (see `book_message`)
        with `validate`; otherwise it is dropped and reported."""
        await self.publish_books([{"type": "book", "sym": sym, "seq": seq, "full": full,
                                   "bids": bids, "asks": asks}])

    async def publish_books(self, books: Iterable[Mapping[str, Any]]) -> None:
        """Queue book messages (ingest's ``{"type": "book", ...}`` objects),
        in order (see `publish_book`)."""
        if self._stopped.is_set():
            raise self.error or ConnectionClosed(1000, "publisher closed")
        msgs = []
        for i, b in enumerate(books):
            try:
                # book_message refuses a missing sym or seq by name
                msgs.append(book_message(b.get("sym"), b.get("seq"),  # type: ignore[arg-type]
                                         b.get("bids") or (),
                                         b.get("asks") or (), bool(b.get("full"))))
            except (ValueError, TypeError, AttributeError) as e:
                if self.validate:
                    raise ValueError(str(e)) from e
                sym = b.get("sym") if isinstance(b, Mapping) else None
                self._on_error(_refused(i, sym, str(e)))
        await self._room()
        live = self._connected.is_set()
        for m in msgs:
            held = self._books.get(m["sym"])
            if held is None:
                held = self._books[m["sym"]] = _HeldBook()
            if not held.apply(m):
                continue  # not newer: the other side would drop it too
            self.published += 1
            if live:
                self._queue.append(m)
        if self._queue or not live:
            self._idle.clear()
            self._wake.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()

    async def publish_trades(self, trades: Mapping[str, Any] | Iterable[Mapping[str, Any]]
                             ) -> None:
        """Queue one trade or a list of them, in order (see the module).
        Raises `ValueError` for a bad trade with `validate` (and queues
        none of the list), `ConnectionClosed` once the publisher has stopped."""
        if self._stopped.is_set():
            raise self.error or ConnectionClosed(1000, "publisher closed")
        batch = [trades] if isinstance(trades, Mapping) else list(trades)
        if self.validate:
            for t in batch:
                validate_trade(t)
        await self._room()
        live = self._connected.is_set()
        held = self._trades
        dropped = 0
        for i, t in enumerate(batch):
            if not self.validate:
                try:
                    validate_trade(t)
                except ValueError as e:
                    self._on_error(_refused(i, t.get("sym") if isinstance(t, Mapping) else None,
                                            str(e)))
                    continue
            trade = {"type": "trade", **t}  # a copy: the caller may reuse its dicts
            if not live and len(held) == held.maxlen:
                dropped += 1  # the oldest held, never sent: say so below
            held.append(trade)
            if live:
                self._queue.append(trade)
            self.trades_published += 1
        if dropped:
            self.trades_dropped += dropped
            log.error("fastfeed publisher: %d trades dropped while disconnected (%d so far): "
                      "more than trade_buffer=%d were published before the connection came "
                      "back", dropped, self.trades_dropped, held.maxlen)
        if self._queue or not live:
            self._idle.clear()
            self._wake.set()
        if len(self._queue) >= self.max_batch:
            self._full.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued tick is written to the connection."""
        if self._task is None:
            return
        async with asyncio.timeout(timeout):
            while not self._idle.is_set():
                if self._stopped.is_set():
                    raise self.error or ConnectionClosed(1000, "publisher closed")
                waiter = asyncio.ensure_future(self._idle.wait())
                stopper = asyncio.ensure_future(self._stopped.wait())
                try:
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()

    async def sync(self, timeout: float | None = 30.0) -> bool:
        """Flush, and wait until the other side has taken everything published
        so far (waiting for it to come back, up to `timeout` seconds). False
        if it did not happen in time, or the publisher has stopped."""
        if self._task is None:
            return True
        confirm = getattr(self.transport, "sync", None)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._stopped.is_set():
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await self.flush(left)
                conn = self._connection
                if self._connected.is_set():
                    if confirm is not None:
                        async with asyncio.timeout(
                                None if deadline is None else max(0.0, deadline - loop.time())):
                            await confirm()
                    # taken on the connection that had everything: done
                    if (self._connection == conn and self._connected.is_set()
                            and self._idle.is_set()):
                        return True
            except TimeoutError:
                return False
            except ConnectionError:
                pass
            except Exception:
                if self._stopped.is_set():
                    return False
                raise
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return False

    async def close(self, timeout: float = 5.0) -> bool:
        """Deliver what is held (`sync`, for up to `timeout` seconds), then
        disconnect. Returns whether everything was delivered."""
        ok = True
        if self._task is not None and not self._stopped.is_set():
            ok = await self.sync(timeout)
        self._closing = True
        self._wake.set()  # out of the send loop even if the cancel below is swallowed
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.transport.close()
        self._stop(ConnectionClosed(1000, "publisher closed"))
        return ok

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- internals

    async def _room(self) -> None:
        """Start, then wait while the queue is full and the link is up: a
        caller outpacing the other side waits here (while disconnected,
        publishing never waits; see the module)."""
        await self.start()
        while len(self._queue) >= self.max_queue and self._connected.is_set():
            self._space.clear()
            await self._space.wait()
            if self._stopped.is_set():
                raise self.error or ConnectionClosed(1000, "publisher closed")

    def _on_error(self, err: FastfeedError) -> None:
        self.errors += 1
        self.last_error = err
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:
                log.exception("fastfeed publisher: on_error callback failed")
        elif self.errors <= 10 or self.errors % 1000 == 0:
            log.warning("fastfeed publisher: refused (%d so far): %s", self.errors, err)

    def _stop(self, error: BaseException) -> None:
        if not self._stopped.is_set():
            self.error = error
            self._stopped.set()
            self._connected.clear()
            self._space.set()
            self._idle.set()

    async def _run(self) -> None:
        retries = Retries(self.backoff)  # the client's rule: see fastfeed.backoff
        try:
            # `_closing` ends it too: a cancel can be swallowed (see bus.link's close)
            while not self._closing:
                try:
                    await self.transport.connect()
                except ConnectionClosed as e:
                    log.error("fastfeed publisher: %s", e)
                    self._stop(e)
                    return
                except (TimeoutError, OSError) as e:
                    log.info("fastfeed publisher: cannot connect: %s", e)
                else:
                    retries.served(await self._serve())
                    if self._closing:
                        return
                await retries.wait()
                self.reconnects += 1
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("fastfeed publisher stopped")
            self._stop(e)

    async def _serve(self) -> int:
        """Send the held state, then batches, until the connection ends;
        returns the code that closed it."""
        closed = asyncio.ensure_future(self.transport.closed())
        wake: asyncio.Future[Any] | None = None
        self._connection += 1
        try:
            # what was queued is folded into the state: send the state instead
            self._queue = []
            self._connected.set()
            state = list(self._state.values())
            # then every book whole: the changes queued before are in it
            state += [b.full(sym) for sym, b in self._books.items()]
            for i in range(0, len(state), self.max_batch):
                batch: list[Tick | bytes] = [dict(t) for t in state[i : i + self.max_batch]]
                await self._send(batch)
                self.resent += len(batch)
            if state:
                log.info("fastfeed publisher: sent the latest state of %d symbols (%d books) "
                         "on connecting", len(self._state), len(self._books))
            # whatever the last connection may not have delivered
            trades: list[Tick | bytes] = list(self._trades)
            for i in range(0, len(trades), self.max_batch):
                batch = trades[i : i + self.max_batch]
                await self._send(batch)
                self.resent += len(batch)
            while not closed.done() and not self._closing:
                if not self._queue:
                    self._idle.set()
                    self._wake.clear()
                    wake = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({closed, wake}, return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    if closed.done():
                        break
                if len(self._queue) < self.max_batch and self.flush_ms > 0:
                    # gather a batch: until flush_ms passes or max_batch ticks wait
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.flush_ms / 1000):
                            await self._full.wait()
                self._full.clear()
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                if len(self._queue) < self.max_queue:
                    self._space.set()
                if len(self._queue) >= self.max_batch:
                    self._full.set()
                if batch:
                    await self._send(batch)
        except ConnectionError:
            pass
        finally:
            if wake is not None:
                wake.cancel()
            self._connected.clear()
            self._queue = []
            self._space.set()
            if self._state or self._books or self._trades:
                self._idle.clear()  # the state goes again on the next connection
        code = closed.result() if closed.done() else CLOSE_ABNORMAL
        closed.cancel()
        if not self._closing:
            if code in CLIENT_FAULT_CLOSE_CODES:
                log.warning(
                    "fastfeed publisher: the gateway closed for a publisher fault (%s)", code
                )
            else:
                log.info("fastfeed publisher: connection closed (%s), reconnecting", code)
        return code

    async def _send(self, batch: list[Tick | bytes]) -> None:
        await self.transport.send(batch)
        self.sent += len(batch)
        self.batches += 1


class RedisPublisher(Publisher):
    """`Publisher` onto the Redis bus, with the keywords of the former
    ``fastfeed.feed.publish.RedisPublisher``: a bad tick is reported (not
    raised), `bus` is the transport's `fastfeed.bus.RedisBus`, `rejected`
    counts refusals (`errors`), `wait_ready` is `wait_connected`."""

    def __init__(self, url: str, *, channels: int = 16, prefix: str = "fastfeed",
                 max_batch: int = MAX_BATCH, flush_ms: float = 5.0, max_inflight: int = 64,
                 on_error: Callable[[FastfeedError], Any] | None = None,
                 backoff: Backoff | None = None, validate: bool = False, **bus_kw: Any):
        super().__init__(
            transport=RedisTransport(url, channels=channels, prefix=prefix,
                                     max_inflight=max_inflight, **bus_kw),
            max_batch=max_batch, flush_ms=flush_ms, backoff=backoff, validate=validate,
            on_error=on_error)

    @property
    def bus(self) -> RedisBus:
        assert isinstance(self.transport, RedisTransport)
        return self.transport.bus

    @property
    def rejected(self) -> int:
        return self.errors

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.wait_connected(timeout)
