"""Order books on the Redis bus, against a real redis-server: the book script
holds the contract's rules exactly as the compiled `Books` does, every worker
ends with the same bytes, and a worker that starts late loads the stored
books and then applies only newer seqs."""

from __future__ import annotations

import asyncio

import pytest
from books_feed import BookFeed
from redis_server import RedisServer
from support import until

from fastfeed._core import Books, Table
from fastfeed.bus import BusConfigError, RedisBus
from fastfeed.feed.sink import LocalSink

pytestmark = pytest.mark.timeout(120)




def worker(redis: RedisServer, prefix: str, levels: int = 8) -> tuple[RedisBus, Books]:
    table = Table()
    books = Books(table, depth=5, levels=levels)
    sink = LocalSink(table, lambda: None, books)
    return RedisBus(redis.url, channels=4, prefix=prefix, sink=sink), books


def states(books: Books) -> dict[str, bytes]:
    return {books.table.symbol(i): books.snapshot_json([i]) for i in books.ids()
            if books.seq_of(i) or books.is_stale(i)}


async def test_workers_hold_the_same_books_as_embedded_mode(redis, prefix):
    feed = BookFeed(7)
    embedded_table = Table()
    embedded = Books(embedded_table, depth=5, levels=8)
    pub = RedisBus(redis.url, channels=4, prefix=prefix, book_levels=8)
    a_bus, a = worker(redis, prefix)
    late_bus, late = worker(redis, prefix)
    await pub.start()
    await a_bus.start()
    await pub.wait_ready(10)
    await a_bus.wait_ready(10)
    sent = 0
    errors = []
    for k in range(30):
        msgs = feed.msgs(40)
        embedded.apply_objects(msgs)
        errors += await pub.publish_books(msgs)
        sent += len(msgs)
        if k == 15:  # the second worker starts mid-stream: it loads the store first
            await late_bus.start()
            await late_bus.wait_ready(10)
    assert errors == []
    want = states(embedded)
    stale = [s for s in want if embedded.is_stale(embedded_table.lookup(s))]
    assert stale, "the feed should have left some book stale"
    await until(lambda: states(a) == want and states(late) == want, timeout=20)
    # what the store holds is that book too
    fresh = Books(Table(), depth=5, levels=8)
    store = await a_bus.book_bus.read_state()
    fresh.apply_records(b"FFK1" + len(store).to_bytes(4, "little") + b"".join(store.values()),
                        snapshot=True)
    assert states(fresh) == want
    for b in (a, late):
        for i in b.ids():
            assert b.checksum(i) == embedded.checksum(embedded_table.lookup(b.table.symbol(i)))
        b._check_invariants()
    for bus in (pub, a_bus, late_bus):
        await bus.close()


async def test_bad_books_are_refused_before_redis(redis, prefix):
    pub = RedisBus(redis.url, channels=4, prefix=prefix)
    await pub.start()
    await pub.wait_ready(10)
    errors = await pub.publish_books([
        {"type": "book", "sym": "X", "seq": 1, "full": True, "bids": [[2.0, 1.0, 0]],
         "asks": [[1.0, 1.0, 0]]},
        {"type": "book", "sym": "X", "seq": 1, "bids": [[2.0, -1.0, 0]]},
        {"type": "book", "sym": "Y", "seq": 1, "full": True, "bids": [[1.0, 1.0, 0]]},
    ], index=[3, 5, 8])
    assert [(i, s) for i, s, _ in errors] == [(3, "X"), (5, "X")]
    assert "crossed full book" in errors[0][2] and "negative volume" in errors[1][2]
    assert set(await pub.book_bus.read_state()) == {"Y"}
    await pub.close()


async def test_every_gateway_on_a_prefix_keeps_the_same_levels(redis, prefix):
    first = RedisBus(redis.url, channels=4, prefix=prefix, book_levels=20)
    await first.start()
    await first.wait_ready(10)
    other = RedisBus(redis.url, channels=4, prefix=prefix, book_levels=30,
                     backoff_base=0.05, backoff_cap=0.1)
    await other.start()
    await until(lambda: "book levels" in other.link.last_error, timeout=10)
    assert "--book-levels 30" in other.link.last_error
    with pytest.raises(asyncio.TimeoutError):
        await other.wait_ready(0.3)
    await first.close()
    await other.close()
    assert BusConfigError


class Answers:
    """A source's `Reply` that keeps what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple] = []

    def admit(self, n: int) -> bool:
        return True

    def refused(self, errors: list) -> None:
        self.told.extend((i, s, why) for i, s, why in errors)

    def error(self, code: str, message: str) -> None:
        self.told.append(("error", code, message))


MIXED = [
    {"sym": "Q1", "seq": 1, "bid": 5.0},
    {"type": "book", "sym": "B1", "seq": 1, "full": True, "bids": [[1.0, 1.0, 0]],
     "asks": [[2.0, 1.0, 0]]},
    {"type": "book", "sym": "B1", "seq": 2, "asks": [[2.0, float("nan"), 0]]},
    {"type": "candle", "sym": "B1"},
    {"type": "quote", "sym": "Q2", "seq": 1, "ask": 6.0},
    {"type": "book", "sym": "B2", "seq": 1, "full": True, "bids": [[3.0, 1.0, 0]],
     "asks": [[2.0, 1.0, 0]]},
    {"sym": "Q1", "seq": 2, "bid": "x"},
]


async def test_local_and_bus_sinks_take_books_beside_quotes_alike(redis, prefix):
    from fastfeed.feed.sink import INGEST, BusSink

    table = Table()
    books = Books(table)
    local = Answers()
    LocalSink(table, lambda: None, books).ticks(MIXED, INGEST, local)
    bus_worker, remote = worker(redis, prefix, levels=50)
    pub = RedisBus(redis.url, channels=4, prefix=prefix)
    for b in (bus_worker, pub):
        await b.start()
        await b.wait_ready(10)
    sink = BusSink(pub, lambda *a: None)
    answers = Answers()
    sink.ticks(MIXED, INGEST, answers)
    await sink.drain()
    want = [(2, "B1", "price or volume is NaN or infinite at asks[0]"),
            (3, "B1", "unknown type 'candle'"),
            (5, "B2", "crossed full book: best bid 3.0 >= best ask 2.0"),
            (6, "Q1", "bid is not a number")]
    assert local.told == want == answers.told
    assert [table.symbol(i) for i in books.ids()] == ["B1"]
    assert table.row(table.lookup("Q2"))[4] == 6.0
    await until(lambda: states(remote) == states(books))
    for b in (bus_worker, pub):
        await b.close()
