"""Sinks: where every source writes its ticks (docs/sources.md).

A gateway has one sink for its sources, chosen once when it starts: the
local table (`LocalSink`, embedded mode), or the Redis bus (`BusSink`: the
ticks go through the row script and come back to every gateway, this one
included, through the bus's subscriber, which writes into the gateway's
`LocalSink`). `fastfeed publish` has a third, `fastfeed.feed.publish.PublisherSink`.
A source never asks which one it has.

The four ways in, all synchronous (none waits for the network):

``json(data, source, reply)``     one /ingest text message: a tick object or an array
``ticks(ticks, source, reply)``   tick objects (dicts) already decoded
``batch(data, source, reply)``    one binary tick batch (``FFT1``) or trade batch (``FTR1``,
                                  docs/protocol.md)
``arrays(numbering, ids, seqs, ts, vals, source)``  a simulator step, ids in the
                                  numbering `symbols(names)` returned

Book messages (``{"type":"book",...}``, contract v1.1) come in through
``json`` and ``ticks`` beside quote ticks: `split_kinds` takes them apart,
quotes keep their path (the fast parser never sees a ``type``), and the
books go to the sink's book writer; refusals of both come back in one
`refused` with their indices in the publisher's message.

``source`` is the table's source number (`SIMULATOR`, `INGEST`, `BUS`:
the ``source`` label of ``fastfeed_ticks``). A sink answers through the
`Reply` it was given: ``admit(n)`` before it takes n ticks (False: it takes
none, the source has said why), ``refused(errors)`` for the ticks it did not
take, as ``(index, symbol, why)``, and ``error(code, message)`` for a message
it did not take at all (bad JSON, a bad batch, the bus down). A local sink
answers before it returns; a bus sink once Redis has answered.

``await drain()`` waits until the sink has taken what it was given (flow
control for sources that can wait: the simulator, a replay); ``await
wait_ready()`` until it can take ticks at all (the bus: connected); ``kick()``
tells the frame clock that ticks were applied; ``observe(metrics)`` copies
the sink's counters once a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import orjson

from .. import _core
from .. import protocol as P
from .._tickjson import TickParser
from . import trades as T

__all__ = [
    "BUS",
    "INGEST",
    "SIMULATOR",
    "BusSink",
    "Errors",
    "LocalSink",
    "LogReply",
    "Reply",
    "Sink",
    "arrays_to_ticks",
    "batch_count",
]

log = logging.getLogger("fastfeed.feed")

# the table's source numbers (protocol.TICK_SOURCES, in the core's order)
INGEST, BUS, SIMULATOR = (P.TICK_SOURCES.index(s) for s in ("ingest", "bus", "simulator"))

Errors = list[tuple[int, Any, str]]

# messages a BusSink has at Redis at once; past BUS_BACKLOG_HIGH waiting, the
# publishers that sent them are paused (a Reply's optional pause()/resume())
MAX_INFLIGHT_MESSAGES = 16
BUS_BACKLOG_HIGH = 64

# One per process: parse() and apply() run back to back, never interleaved.
_PARSER = TickParser()
_loads = orjson.loads


class Reply(Protocol):
    """What a sink tells the source that wrote (a publisher connection, or the log)."""

    def admit(self, n: int) -> bool:
        """May `n` ticks be taken? False: none is, and the source has said why."""
        ...

    def refused(self, errors: Errors) -> None:
        """These ticks were not taken: ``(index in the message, symbol, why)``."""
        ...

    def error(self, code: str, message: str) -> None:
        """The message was not taken (or not wholly): `code` is a protocol error code."""
        ...

    # Optional: ``pause()`` stop reading from this source until ``resume()``
    # (a bus sink with a backlog for Redis asks it of publisher connections).


class Sink(Protocol):
    """Where sources write ticks (see the module)."""

    name: str  # "local table", "Redis bus", ...: for logs

    @property
    def ticks_in(self) -> int:
        """Ticks offered (admitted), every source together."""
        ...

    @property
    def ticks_refused(self) -> int:
        """Of those, refused by the sink (a bad tick, the table full)."""
        ...

    @property
    def failures(self) -> int:
        """Messages not taken at all (bad JSON or batch, the bus down)."""
        ...

    def json(self, data: bytes, source: int, reply: Reply) -> None: ...

    def ticks(self, ticks: list[Any], source: int, reply: Reply) -> None: ...

    def batch(self, data: bytes, source: int, reply: Reply) -> None: ...

    def symbols(self, names: Sequence[str]) -> Any: ...

    def arrays(self, numbering: Any, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
               vals: np.ndarray, source: int = SIMULATOR) -> None: ...

    async def drain(self) -> None: ...

    async def wait_ready(self) -> None: ...

    def kick(self) -> None: ...

    def observe(self, metrics: Any) -> None: ...


class LogReply:
    """The reply of a source with no one to answer (the simulator, a replay):
    it admits everything and logs what was not taken, the first ten times and
    then every thousandth."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.problems = 0

    def admit(self, n: int) -> bool:
        return True

    def refused(self, errors: Errors) -> None:
        if errors:
            idx, sym, why = errors[0]
            self._log(f"{len(errors)} ticks refused (the first: tick {idx}, {sym!r}: {why})")

    def error(self, code: str, message: str) -> None:
        self._log(f"{code}: {message}")

    def _log(self, what: str) -> None:
        self.problems += 1
        if self.problems <= 10 or self.problems % 1000 == 0:
            log.warning("%s: %s (%d such so far)", self.who, what, self.problems)


def split_kinds(msgs: list[Any], kinds: Sequence[str]
                ) -> tuple[list[Any], list[int], dict[str, tuple[list[Any], list[int]]], Errors]:
    """Quote ticks (no ``type``, or ``"quote"``) apart from the messages of
    each kind in `kinds`: (quotes, their indices, {type: (messages,
    indices)}, errors for an unknown ``type``)."""
    quotes: list[Any] = []
    qidx: list[int] = []
    other: dict[str, tuple[list[Any], list[int]]] = {}
    errors: Errors = []
    for k, m in enumerate(msgs):
        t = m.get("type") if type(m) is dict else None
        if t is None or t == "quote":
            quotes.append(m)
            qidx.append(k)
        elif t in kinds:
            got = other.setdefault(t, ([], []))
            got[0].append(m)
            got[1].append(k)
        else:
            errors.append((k, m.get("sym"), f"unknown type {str(t)[:40]!r}"))
    return quotes, qidx, other, errors


_typed = _core.has_type
# one part of a message for the bus: (messages, their indices or None, the bus call)
_Part = tuple[list[Any], "list[int] | None", Callable[[list[Any]], Any]]


def batch_count(data: bytes) -> int:
    """The tick count in a binary batch's header (0 if it is not one; applying
    it then refuses it by name)."""
    if data[:4] in (P.BATCH_MAGIC, P.TRADE_BATCH_MAGIC):
        return int.from_bytes(data[4:8], "little")
    return 0


def arrays_to_ticks(names: Sequence[str], ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
                    vals: np.ndarray) -> list[dict[str, Any]]:
    """A simulator step as protocol tick objects (for sinks that send ticks on)."""
    fields = P.VALUE_FIELDS
    out = []
    for k in range(len(ids)):
        t: dict[str, Any] = {"sym": names[ids[k]], "seq": int(seqs[k]), "ts": int(ts[k])}
        row = vals[k]
        for j, name in enumerate(fields):
            t[name] = float(row[j])
        out.append(t)
    return out


class LocalSink:
    """The table of this process: ticks apply at once, and the frame clock is
    kicked so watched instruments go out in this loop pass.

    `apply_batch(data, source)` is the table's own (it raises `ValueError`
    for a bad batch and returns ``(applied, stale, rejected)``): the bus's
    subscriber writes through it, counting what the table took.
    """

    name = "local table"

    def __init__(self, table: Any, kick: Callable[[], None], books: Any = None,
                 trades: Any = None) -> None:
        self.table = table
        self.books = books  # fastfeed._core.Books, or None: book messages are refused
        self.trades = trades  # the Trades kind (feeds the tape and the bars), or None
        kinds = ((P.TYPE_BOOK, books), (P.TYPE_TRADE, trades))
        self._kinds_taken = tuple(name for name, kind in kinds if kind is not None)
        self.kick = kick
        # what the bus's subscriber applies: tick batches, and trade batches if trades are kept
        self.apply_batch = table.apply_batch if trades is None else self._apply_any
        self.ticks_in = 0
        self.ticks_refused = 0
        self.failures = 0

    def _apply_any(self, data: bytes, source: int = BUS) -> tuple[int, int, int]:
        if data[:4] == P.TRADE_BATCH_MAGIC:
            return self.trades.apply_batch(data, source)
        return self.table.apply_batch(data, source)

    def json(self, data: bytes, source: int, reply: Reply) -> None:
        n = _PARSER.parse(data)
        if n < 0:  # not the common shape: decoded in full, or refused as not JSON
            try:
                msg = _loads(data)
            except orjson.JSONDecodeError as e:
                self.failures += 1
                return reply.error(P.BAD_REQUEST, f"not JSON: {e}")
            return self.ticks(msg if isinstance(msg, list) else [msg], source, reply)
        if not reply.admit(n):
            return
        self.ticks_in += n
        _, _, errors = _PARSER.apply(self.table, source)
        self.kick()
        if errors:
            self.ticks_refused += len(errors)
            reply.refused(errors)

    def ticks(self, ticks: list[Any], source: int, reply: Reply) -> None:
        if not reply.admit(len(ticks)):
            return
        self.ticks_in += len(ticks)
        if _typed(ticks):
            return self._kinds(ticks, source, reply)
        _, _, errors = self.table.apply_objects(ticks, source)
        self.kick()
        if errors:
            self.ticks_refused += len(errors)
            reply.refused(errors)

    def _kinds(self, msgs: list[Any], source: int, reply: Reply) -> None:
        quotes, qidx, other, errors = split_kinds(msgs, self._kinds_taken)
        if quotes:
            _, _, errs = self.table.apply_objects(quotes, source)
            errors += T.renumber(errs, qidx)
        if P.TYPE_BOOK in other:
            errors += self.books.apply_objects(*other[P.TYPE_BOOK])[2]
        if P.TYPE_TRADE in other:
            errors += T.apply_local(self.trades, *other[P.TYPE_TRADE], source)
        self.kick()
        if errors:
            errors.sort(key=lambda e: e[0])
            self.ticks_refused += len(errors)
            reply.refused(errors)

    def batch(self, data: bytes, source: int, reply: Reply) -> None:
        n = batch_count(data)
        if not reply.admit(n):
            return
        try:
            if data[:4] == P.TRADE_BATCH_MAGIC and self.trades is not None:
                _, _, rejected = self.trades.apply_batch(data, source)
            else:
                _, _, rejected = self.table.apply_batch(data, source)
        except ValueError as e:
            self.failures += 1
            return reply.error(P.BAD_REQUEST, str(e))
        self.ticks_in += n
        self.kick()
        if rejected:
            self.ticks_refused += rejected
            reply.error(P.BAD_REQUEST, f"{rejected} ticks or trades with a bad symbol, seq or "
                        "value (a negative size, NaN or infinity, a bad side)")

    @property
    def takes_books(self) -> bool:
        """Book messages given to `ticks` or `json` are applied (the gateway
        gave this sink its books); the simulator then sends its books."""
        return getattr(self, "books", None) is not None

    @property
    def takes_trades(self) -> bool:
        """Trade messages given to `ticks` or `json` are applied (the gateway
        keeps trades); the simulator then sends its trades."""
        return self.trades is not None

    def symbols(self, names: Sequence[str]) -> np.ndarray:
        """The numbering `arrays` takes: position in `names` -> this table's id."""
        return np.array([self.table.intern_symbol(s) for s in names], np.int32)

    def arrays(self, numbering: np.ndarray, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
               vals: np.ndarray, source: int = SIMULATOR) -> None:
        self.ticks_in += len(ids)
        self.table.apply_arrays(numbering[ids], seqs, ts, vals, source)
        self.kick()

    async def drain(self) -> None:
        return None  # everything was applied before the call returned

    async def wait_ready(self) -> None:
        return None

    def observe(self, metrics: Any) -> None:
        return None  # the table counts its own ticks (Table.take_stats)


class BusSink:
    """The Redis bus: ticks are stored only-if-newer and published to every
    gateway (`fastfeed.bus.RedisBus.publish`); they reach this gateway's table
    through its subscriber, like everyone else's. Ticks refused before Redis
    (a bad tick) are counted here, with their source; ticks Redis dropped as
    not newer, once a second in `observe` (as ``ingest`` ``stale``: they never
    come back on the bus, so the table cannot count them)."""

    name = "Redis bus"

    def __init__(self, bus: Any, count_ticks: Callable[[str, str, int], None]) -> None:
        self.bus = bus
        self.count_ticks = count_ticks  # metrics.Metrics.count_ticks(source, outcome, n)
        self.ticks_in = 0
        self.ticks_refused = 0
        self.failures = 0
        self._stale_seen = 0
        self._inflight: set[asyncio.Task[None]] = set()
        # messages at Redis at once: more wait here, and their publishers stop
        # being read until the backlog is down (else Redis's queue outgrows the
        # bus's PING timeout and the link is torn down as dead)
        self._slots = asyncio.Semaphore(MAX_INFLIGHT_MESSAGES)
        self._paused: set[Any] = set()

    def json(self, data: bytes, source: int, reply: Reply) -> None:
        n = _PARSER.parse(data)
        if n >= 0:  # the common shape: straight into the bus's batches, no dicts
            if reply.admit(n):
                self._publish_parts(_PARSER.encode_batch(self.bus.parts), n, source, reply)
            return
        try:
            msg = _loads(data)
        except orjson.JSONDecodeError as e:
            self.failures += 1
            return reply.error(P.BAD_REQUEST, f"not JSON: {e}")
        self.ticks(msg if isinstance(msg, list) else [msg], source, reply)

    def ticks(self, ticks: list[Any], source: int, reply: Reply) -> None:
        if not reply.admit(len(ticks)):
            return
        if not _typed(ticks):
            return self._publish([(ticks, None, self.bus.publish)], source, reply)
        quotes, qidx, other, errors = split_kinds(ticks, (P.TYPE_BOOK, P.TYPE_TRADE))
        parts: list[_Part] = []
        if quotes:
            parts.append((quotes, qidx, self.bus.publish))
        if P.TYPE_BOOK in other:
            books, bidx = other[P.TYPE_BOOK]  # publish_books numbers its errors itself
            parts.append((books, None, lambda m: self.bus.publish_books(m, bidx)))
        if P.TYPE_TRADE in other:
            trades, tidx = other[P.TYPE_TRADE]
            parts.append((trades, tidx, self.bus.publish_trades))
        self._publish(parts, source, reply, errors)

    def batch(self, data: bytes, source: int, reply: Reply) -> None:
        if not reply.admit(batch_count(data)):
            return
        if data[:4] == P.TRADE_BATCH_MAGIC:
            try:
                trades = _core.decode_trade_batch(data)
            except (ValueError, IndexError) as e:
                self.failures += 1
                return reply.error(P.BAD_REQUEST, f"bad trade batch: {e}")
            return self._publish([(trades, None, self.bus.publish_trades)], source, reply)
        try:
            ticks = _core.decode_batch(data)
        except (ValueError, IndexError) as e:
            self.failures += 1
            return reply.error(P.BAD_REQUEST, f"bad tick batch: {e}")
        self._publish([(ticks, None, self.bus.publish)], source, reply)

    @property
    def takes_books(self) -> bool:
        """Book messages go onto the bus (when the bus carries books)."""
        return callable(getattr(self.bus, "publish_books", None))

    @property
    def takes_trades(self) -> bool:
        """Trade messages go onto the bus (when the bus carries trades)."""
        return callable(getattr(self.bus, "publish_trades", None))

    def symbols(self, names: Sequence[str]) -> list[str]:
        return list(names)

    def arrays(self, numbering: list[str], ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
               vals: np.ndarray, source: int = SIMULATOR) -> None:
        self._publish([(arrays_to_ticks(numbering, ids, seqs, ts, vals), None,
                        self.bus.publish)], source,
                      LogReply(f"{P.TICK_SOURCES[source]} onto the Redis bus"))

    def _publish(self, parts: list[_Part], source: int, reply: Reply,
                 early: Errors | None = None) -> None:
        """Publish each part (messages, their indices in the message or None,
        the bus call that takes them) in turn, and answer once: every refusal,
        `early` ones included, in the order of the message."""
        n = sum(len(msgs) for msgs, _, _ in parts)
        self.ticks_in += n

        async def go() -> None:
            try:
                errors = list(early or ())
                async with self._slots:
                    for msgs, idx, send in parts:
                        errs = await send(msgs)
                        errors += T.renumber(errs, idx) if errs and idx is not None else errs
                errors.sort(key=lambda e: e[0])
                if errors:  # refused before Redis: the table never counts these
                    self.ticks_refused += len(errors)
                    self.count_ticks(P.TICK_SOURCES[source], "rejected", len(errors))
                    reply.refused(errors)
            except Exception as e:  # the bus is down: say so, never drop silently
                self.failures += 1
                reply.error(P.UNAVAILABLE, f"{n} ticks NOT published: {e}")

        self._track(go(), reply)

    def _publish_parts(self, parts: list[bytes], n: int, source: int, reply: Reply) -> None:
        # ticks the C parser took: all valid, so nothing is refused before Redis
        self.ticks_in += n

        async def go() -> None:
            try:
                async with self._slots:
                    await self.bus.publish_batches(parts, n)
            except Exception as e:  # the bus is down: say so, never drop silently
                self.failures += 1
                reply.error(P.UNAVAILABLE, f"{n} ticks NOT published: {e}")

        self._track(go(), reply)

    def _track(self, coro: Any, reply: Reply) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._done)
        if len(self._inflight) > BUS_BACKLOG_HIGH and reply not in self._paused:
            pause = getattr(reply, "pause", None)
            if pause is not None:
                self._paused.add(reply)
                pause()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._paused and len(self._inflight) <= BUS_BACKLOG_HIGH // 2:
            paused, self._paused = self._paused, set()
            for r in paused:
                r.resume()

    async def drain(self) -> None:
        """Wait until Redis answered every publish made so far."""
        while self._inflight:
            await asyncio.wait(list(self._inflight))

    async def wait_ready(self) -> None:
        """Until the bus is connected (breaker closed, snapshot loaded)."""
        if not self.bus.ready:
            log.warning("waiting for the Redis bus to be ready before writing to it")
            while not self.bus.ready:
                await asyncio.sleep(0.1)

    def kick(self) -> None:
        return None  # the ticks come back through the subscriber, which kicks the table's

    def observe(self, metrics: Any) -> None:
        stale = self.bus.publish_stale - self._stale_seen
        if stale:
            self._stale_seen += stale
            metrics.count_ticks("ingest", "stale", stale)
