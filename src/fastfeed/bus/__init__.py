"""The Redis tick bus and state store shared by workers and pods.

Every worker of every pod holds the whole instrument table. Ticks reach all of
them through Redis pub/sub, and the latest row of every instrument is kept in
Redis so that a worker that starts late (or comes back after Redis was away)
can load a snapshot first.

Names (``P`` is ``--redis-prefix``, ``N`` the partition of a symbol,
``fastfeed._core.partition(sym, --redis-channels)``):

``P:ticks:N``   pub/sub channel of partition N; every message is one binary
                tick batch (``FFT1``, see `fastfeed._core.encode_batch`)
``P:row:N``     hash, symbol -> the instrument's latest row as one ``FFT1``
                record (u8 symbol length, symbol, u8 field mask, i64 seq,
                the fields in the mask), all fields it ever had merged in
``P:meta``      hash; ``channels`` is the partition count, which every
                gateway and publisher on this prefix must share (checked
                on connect)

With ``sharded=True`` the partition number is a hash tag, ``P:ticks:{N}``
and ``P:row:{N}``, so a partition's channel and hash live in the same slot,
and the bus uses ``SSUBSCRIBE``/``SPUBLISH`` (on one Redis 7 node). A
``redis+cluster://`` URL gives ``ClusterBus`` instead,
which routes every partition to the master owning its slot (its own tags,
spread evenly over the slots). A ``redis+sentinel://`` URL asks the
Sentinels for the master on every (re)connection and then works as on one
Redis.

Publishing: the ticks of a call are encoded into one batch per partition and
each batch goes to Redis in one ``EVALSHA`` of `ROW_SCRIPT`, which, for every
record, compares ``seq`` with the stored row, merges the newer ones into it,
stores them, and publishes the merged rows that were newer as one batch. State
and pub/sub therefore never disagree: a message carries exactly the rows the
store took, and they are full rows, so applying the same set of messages and
snapshot rows in any order gives the same table.

Order books travel beside the quotes on ``P:books:N`` and are stored in
``P:book:N`` by their own script (`fastfeed.bus.books`). Trades travel on
``P:ticks:N`` as ``FTR1`` batches; their script keeps each instrument's
last trades in ``P:trades:N`` and the bars made of them in ``P:bars:N``
(`fastfeed.bus.trades`).

Subscribing, on every (re)connection: SUBSCRIBE all channels first, then read
the store (``HSCAN`` in chunks) and apply it. A tick published in between
arrives on the channel and is also in the store; the table keeps the newer
``seq`` and drops the other, so no window loses a tick. Only then is the bus
ready (`on_feed(True)`).

The bus is three jobs, each a module: `fastfeed.bus.link` (connections,
routing and the circuit breaker: `Link`, `fastfeed.bus.cluster.ClusterLink`),
`fastfeed.bus.store` (the row script: `RowStore`) and
`fastfeed.bus.subscriber` (pub/sub and snapshot into a table: `Subscriber`).
`RedisBus` puts them together: a link, its store, and a subscriber when it
is given a table (a gateway's bus; a publisher's has none).

Failure handling: a circuit breaker. Losing either connection, or a ``PING``
unanswered for `ping_timeout` seconds, opens it (`on_feed(False)`,
`publish` raises `BusDown`); reconnection attempts follow after a jittered
exponential backoff (half-open while trying), and the breaker closes once
subscriptions, script and snapshot are back.

The hot path (pub/sub messages into the table) is a raw asyncio protocol with
`hiredis.Reader`; no redis-py anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .books import BOOK_SCRIPT, BookBus
from .cluster import ClusterLink
from .link import (
    BREAKER_NAMES,
    CLOSED,
    HALF_OPEN,
    OPEN,
    Addr,
    BusConfigError,
    BusDown,
    Link,
    RedisError,
    RedisURL,
    fmt_addr,
    is_cluster_url,
    parse_sentinel_url,
    parse_url,
    split_hosts,
)
from .store import ROW_SCRIPT, RowStore
from .subscriber import Subscriber
from .trades import TradeStore

__all__ = [
    "BOOK_SCRIPT",
    "BREAKER_NAMES",
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "ROW_SCRIPT",
    "BookBus",
    "BusConfigError",
    "BusDown",
    "ClusterBus",
    "Link",
    "RedisBus",
    "RedisError",
    "RedisURL",
    "RowStore",
    "Subscriber",
    "fmt_addr",
    "is_cluster_url",
    "parse_sentinel_url",
    "parse_url",
    "split_hosts",
]


class RedisBus:
    """A `Link` with its `RowStore` and, given a `table`, a `Subscriber`.

    ``table``: a `fastfeed._core.Table` that receives every tick (a gateway's
    bus); without one the bus only publishes. ``on_ticks()`` is called after
    ticks were applied (once per read from the socket, not per message);
    ``on_feed(up)`` when the bus comes up (snapshot loaded) or goes down.
    ``subscribe`` is accepted for older callers and must agree with `table`.
    ``sink``, instead of `table` and `on_ticks`: the local sink the subscriber
    writes through (a `fastfeed.feed.sink.LocalSink`, or a sink wrapping one:
    ``sink.table``, ``sink.apply_batch(data)``, ``sink.kick()``), so what it
    applies passes where every other source's does (a gateway's bus).
    ``bars_tz``/``bars_history``: the bars the trade store keeps, for a bus
    without a sink's bars (a publisher: None adopts the prefix's).
    A ``redis+cluster://`` URL gives a ``ClusterBus``.

    The parts are `link`, `store` and `subscriber` (None without a table);
    what metrics and callers read of them reads through the bus as well
    (``bus.breaker``, ``bus.publish_stale``, ``bus.snapshot_rows``, ...):
    the link's names and state, the store's and the subscriber's counters
    (0 on a bus without a table: it has applied nothing).
    """

    link_class: type[Link] = Link

    def __new__(cls, url: str, *args: Any, **kw: Any) -> RedisBus:
        # a redis+cluster:// URL gives the cluster-routing bus
        if cls is RedisBus and is_cluster_url(url):
            return super().__new__(ClusterBus)
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        table: Any = None,
        *,
        channels: int = 16,
        prefix: str = "fastfeed",
        on_ticks: Callable[[], None] | None = None,
        on_feed: Callable[[bool], None] | None = None,
        subscribe: bool | None = None,
        sharded: bool = False,
        reseed: bool = True,
        backoff_base: float = 0.1,
        backoff_cap: float | None = None,
        connect_timeout: float = 3.0,
        ping_interval: float = 1.0,
        ping_timeout: float = 3.0,
        snapshot_chunk: int = 2000,
        name: str = "bus",
        sink: Any = None,
        books: Any = None,
        book_levels: int = 50,
        trade_ring: int = 100,
        bars_tz: str | None = None,
        bars_history: int | None = None,
    ):
        if sink is not None:
            if table is not None or on_ticks is not None:
                raise ValueError("give a sink, or a table (and on_ticks): not both")
            table, on_ticks = sink.table, sink.kick
            books = getattr(sink, "books", None) if books is None else books
        if subscribe and table is None:
            raise ValueError("a subscribing bus needs a table")
        if subscribe is False and table is not None:
            raise ValueError("a bus given a table subscribes: leave out subscribe=False, "
                             "or the table")
        self.link: Link = self.link_class(
            url, channels=channels, prefix=prefix, on_feed=on_feed, sharded=sharded,
            backoff_base=backoff_base, backoff_cap=backoff_cap,
            connect_timeout=connect_timeout, ping_interval=ping_interval,
            ping_timeout=ping_timeout, name=name)
        self.store = RowStore(self.link)
        self.link.attach(self.store)
        trades = getattr(sink, "trades", None)
        self.trade_store = TradeStore(self.link, trades, trade_ring, on_ticks,
                                      bars_tz=bars_tz, bars_history=bars_history)
        self.subscriber: Subscriber | None = None
        if table is not None:
            apply = sink.apply_batch if sink is not None else None
            if apply is not None and trades is not None:
                # trade batches wait while the rings and bars load (bus/trades.py)
                apply = self.trade_store.gate(apply)
            self.subscriber = Subscriber(self.link, table, self.store, on_ticks=on_ticks,
                                         reseed=reseed, snapshot_chunk=snapshot_chunk,
                                         apply=apply)
            self.link.attach(self.subscriber)
        # order books (bus/books.py): published by every bus, received by a
        # gateway's, which gives its `fastfeed._core.Books`
        self.book_bus = BookBus(self.link, books, levels=book_levels, on_change=on_ticks)
        self.link.attach(self.book_bus)
        # after the subscriber: the rings load once the channels are subscribed
        self.link.attach(self.trade_store)

    @classmethod
    def from_config(cls, cfg: Any, table: Any = None, **kw: Any) -> RedisBus:
        kw.setdefault("book_levels", getattr(cfg, "book_levels", 50))
        kw.setdefault("trade_ring", getattr(cfg, "trade_ring", 100))
        return cls(cfg.redis, table, channels=cfg.redis_channels, prefix=cfg.redis_prefix, **kw)

    # ---- the link: names and state ----

    @property
    def url(self) -> Any:
        """The parsed URL (`RedisURL`, `fastfeed.bus.cluster.ClusterURL`): its str hides
        the password."""
        return self.link.url

    @property
    def parts(self) -> int:
        """The partition count (``--redis-channels``)."""
        return self.link.parts

    @property
    def prefix(self) -> str:
        return self.link.prefix

    @property
    def sharded(self) -> bool:
        return self.link.sharded

    @property
    def row_keys(self) -> list[bytes]:
        """The row hash of every partition, by partition."""
        return self.link.row_keys

    @property
    def channel_names(self) -> list[bytes]:
        """The pub/sub channel of every partition, by partition."""
        return self.link.channel_names

    @property
    def breaker(self) -> int:
        """`CLOSED`, `OPEN` or `HALF_OPEN`."""
        return self.link.breaker

    @property
    def last_error(self) -> str:
        return self.link.last_error

    @property
    def lost_node(self) -> str:
        return self.link.lost_node

    @property
    def connects(self) -> int:
        return self.link.connects

    @property
    def connect_failures(self) -> int:
        return self.link.connect_failures

    @property
    def disconnects(self) -> int:
        return self.link.disconnects

    @property
    def outages(self) -> int:
        return self.link.outages

    @property
    def outage_seconds(self) -> float:
        return self.link.outage_seconds

    @property
    def outage_seconds_total(self) -> float:
        return self.link.outage_seconds_total

    # ---- the store's counters ----

    @property
    def published_ticks(self) -> int:
        return self.store.published_ticks

    @property
    def published_batches(self) -> int:
        return self.store.published_batches

    @property
    def publish_stale(self) -> int:
        return self.store.publish_stale

    @property
    def publish_errors(self) -> int:
        return self.store.publish_errors

    @property
    def publish_refused(self) -> int:
        return self.store.publish_refused

    # ---- the subscriber's counters (0 without one) ----

    @property
    def messages(self) -> int:
        return self.subscriber.messages if self.subscriber is not None else 0

    @property
    def ticks_applied(self) -> int:
        return self.subscriber.ticks_applied if self.subscriber is not None else 0

    @property
    def ticks_stale(self) -> int:
        return self.subscriber.ticks_stale if self.subscriber is not None else 0

    @property
    def bad_batches(self) -> int:
        return self.subscriber.bad_batches if self.subscriber is not None else 0

    @property
    def snapshot_rows(self) -> int:
        return self.subscriber.snapshot_rows if self.subscriber is not None else 0

    @property
    def snapshot_seconds(self) -> float:
        return self.subscriber.snapshot_seconds if self.subscriber is not None else 0.0

    @property
    def reseeded_rows(self) -> int:
        return self.subscriber.reseeded_rows if self.subscriber is not None else 0

    @property
    def loaded_trades(self) -> int:
        """Trades loaded from the rings in Redis, every (re)connection together."""
        return self.trade_store.loaded_trades

    @property
    def loaded_bars(self) -> int:
        """Instruments whose bars were taken from Redis, every (re)connection together."""
        return self.trade_store.loaded_bars

    @property
    def reseeded_trades(self) -> int:
        """Trades written back to a Redis that had lost the rings."""
        return self.trade_store.reseeded_trades

    @property
    def subscribing(self) -> bool:
        return self.subscriber is not None

    @property
    def ready(self) -> bool:
        """Connected, subscribed and holding the snapshot (breaker closed)."""
        return self.link.ready

    def stats(self) -> dict[str, float]:
        out = {**self.link.stats(), **self.store.stats()}
        sub = self.subscriber.stats() if self.subscriber is not None else dict.fromkeys(
            _SUBSCRIBER_COUNTERS, 0)
        return {**out, **sub}

    # ---- lifecycle ----

    async def start(self) -> None:
        """Start connecting in the background; see `wait_ready`."""
        await self.link.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.link.wait_ready(timeout)

    async def close(self) -> None:
        await self.link.close()

    stop = close

    async def __aenter__(self) -> RedisBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def backoff(self, attempt: int) -> float:
        return self.link.backoff(attempt)

    # ---- publishing (the store) ----

    def publish_nowait(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        return self.store.publish_nowait(ticks)

    def publish_batches_nowait(self, parts: list[bytes]) -> None:
        self.store.publish_batches_nowait(parts)

    async def publish(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        return await self.store.publish(ticks)

    async def publish_trades(self, trades: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Store (the ring per instrument) and publish trades; see `fastfeed.bus.trades`."""
        return await self.trade_store.publish(trades)

    async def publish_batches(self, parts: list[bytes], count: int) -> None:
        await self.store.publish_batches(parts, count)

    def inflight(self) -> int:
        return self.link.inflight()

    async def drain(self) -> None:
        await self.link.drain()

    async def flush(self) -> None:
        await self.store.flush()

    async def read_state(self) -> dict[str, bytes]:
        return await self.store.read_state()

    async def publish_books(self, msgs: list[Any], index: Any = None
                            ) -> list[tuple[int, Any, str]]:
        """Book messages onto the bus (`BookBus.publish`)."""
        return await self.book_bus.publish(msgs, index)

    async def delete_state(self) -> None:
        await self.store.delete_state()


_SUBSCRIBER_COUNTERS = ("messages", "ticks_applied", "ticks_stale", "bad_batches",
                        "snapshot_rows", "snapshot_seconds", "reseeded_rows")


class ClusterBus(RedisBus):
    """`RedisBus` over a Redis Cluster: its link is a `ClusterLink`, whose
    routing and counters read through the bus too."""

    link_class = ClusterLink
    link: ClusterLink

    @property
    def redirects(self) -> int:
        """MOVED/ASK replies followed."""
        return self.link.redirects

    @property
    def slot_map_reads(self) -> int:
        return self.link.slot_map_reads

    @property
    def part_slots(self) -> list[int]:
        """The hash slot of every partition, by partition."""
        return self.link.part_slots

    @property
    def part_node(self) -> list[Addr | None]:
        """The master holding every partition, by partition (None: not known yet)."""
        return self.link.part_node

    @property
    def nodes(self) -> dict[Addr, Any]:
        """The masters connected now, by address."""
        return self.link.nodes

    @property
    def known(self) -> list[Addr]:
        """The masters last seen in the slot map."""
        return self.link.known
