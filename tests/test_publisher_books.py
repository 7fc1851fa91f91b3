"""fastfeed.publisher with order books: checked, sent in order with the
ticks, held whole and sent as one full book on every new connection.

The engine against the in-memory transport of test_publisher; the wire
against a WebSocket server standing in for /ingest (it records what a
gateway would read), and the Redis transport against a real redis-server.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import until
from test_publisher import FAST, MemoryTransport
from websockets.asyncio.server import ServerConnection, serve

from fastfeed.client import FastfeedError
from fastfeed.publisher import Publisher, book_message

BIDS = [[9100.0, 1200.0, 8], [9075.0, 500.0, 2]]
ASKS = [[9125.0, 300.0, 1], [9150.0, 4000.0, 11]]


def test_a_book_message_is_the_contracts_shape() -> None:
    m = book_message("BBCA", 77, BIDS, ASKS, full=True)
    assert m == {"type": "book", "sym": "BBCA", "seq": 77, "full": True, "bids": BIDS,
                 "asks": ASKS}
    # orders may be left out (0: the source does not say); ints become floats
    assert book_message("BBCA", 78, [[9100, 0]])["bids"] == [[9100.0, 0.0, 0]]


@pytest.mark.parametrize(("kw", "why"), [
    ({"sym": "BB CA"}, "symbol"),
    ({"seq": 1.5}, "seq"),
    ({"bids": [[float("nan"), 1.0, 1]]}, "finite"),
    ({"asks": [[9125.0, float("inf"), 1]]}, "finite"),
    ({"asks": [[9125.0, -100.0, 1]]}, "negative volume"),
    ({"asks": [[9125.0, 100.0, -1]]}, "orders"),
    ({"bids": [[9100.0]]}, "level"),
    ({"bids": [[9200.0, 100.0, 1]], "full": True}, "crossed"),
])
def test_a_bad_book_is_refused_by_name(kw: dict[str, Any], why: str) -> None:
    args = {"sym": "BBCA", "seq": 5, "bids": BIDS, "asks": ASKS, "full": False, **kw}
    with pytest.raises(ValueError, match=why):
        book_message(args["sym"], args["seq"], args["bids"], args["asks"], args["full"])


async def test_books_go_out_in_order_with_the_ticks() -> None:
    mem = MemoryTransport()
    async with Publisher(transport=mem, flush_ms=20) as p:
        await p.wait_connected(1)
        await p.publish({"sym": "BBCA", "seq": 1, "bid": 9100.0})
        await p.publish_book("BBCA", 10, BIDS, ASKS, full=True)
        await p.publish_book("BBCA", 11, [[9100.0, 0.0, 0]], [])
        await p.publish([{"sym": "BBCA", "seq": 2, "bid": 9075.0},
                         {"type": "book", "sym": "BBCA", "seq": 12, "bids": [[9090.0, 100.0, 1]]}])
        await p.flush(5)
        await until(lambda: len(mem.ticks) == 5)
        kinds = [(t.get("type", "quote"), t["seq"]) for t in mem.ticks]
        assert kinds == [("quote", 1), ("book", 10), ("book", 11), ("quote", 2), ("book", 12)]
        assert mem.ticks[2] == {"type": "book", "sym": "BBCA", "seq": 11, "full": False,
                                "bids": [[9100.0, 0.0, 0]], "asks": []}


async def test_a_stale_book_message_is_dropped_and_a_bad_one_raises() -> None:
    mem = MemoryTransport()
    async with Publisher(transport=mem, flush_ms=5) as p:
        await p.wait_connected(1)
        await p.publish_book("BBCA", 10, BIDS, ASKS, full=True)
        await p.publish_book("BBCA", 10, [[9100.0, 5.0, 1]], [])  # not newer
        with pytest.raises(ValueError, match="crossed"):
            await p.publish_book("BBCA", 11, [[9999.0, 1.0, 1]], ASKS, full=True)
        await p.flush(5)
        await until(lambda: len(mem.ticks) == 1)
        assert p.published == 1


async def test_without_validate_a_bad_book_is_reported_and_the_rest_sent() -> None:
    mem = MemoryTransport()
    errors: list[FastfeedError] = []
    async with Publisher(transport=mem, flush_ms=5, validate=False, on_error=errors.append) as p:
        await p.wait_connected(1)
        await p.publish_books([{"type": "book", "sym": "BBCA", "seq": 3, "bids": [[1.0, -5.0]]},
                               {"type": "book", "sym": "TLKM", "seq": 3, "full": True,
                                "bids": [[3000.0, 100.0, 1]], "asks": []}])
        await p.flush(5)
        await until(lambda: len(mem.ticks) == 1)
        assert mem.ticks[0]["sym"] == "TLKM"
        assert len(errors) == 1 and errors[0].symbols == ["BBCA"] and p.errors == 1


async def test_a_new_connection_gets_every_book_whole() -> None:
    """Changes queued while connected and published while away are both in
    the full book sent first on the next connection, at the latest seq."""
    mem = MemoryTransport()
    async with Publisher(transport=mem, flush_ms=5, backoff=FAST) as p:
        await p.wait_connected(1)
        await p.publish_book("BBCA", 10, BIDS, ASKS, full=True)
        await p.flush(5)
        mem.refuse = 10**6  # the gateway stays away until told otherwise
        mem.drop()
        await until(lambda: not p.connected)
        await p.publish_book("BBCA", 11, [[9100.0, 0.0, 0], [9110.0, 700.0, 3]], [])
        await p.publish_book("BBCA", 12, [], [[9125.0, 900.0, 2]])
        mem.refuse = 0
        await until(lambda: p.connected and len(mem.ticks) >= 2, timeout=10)
        resent = mem.ticks[1]
        assert resent == {"type": "book", "sym": "BBCA", "seq": 12, "full": True,
                          "bids": [[9110.0, 700.0, 3], [9075.0, 500.0, 2]],
                          "asks": [[9125.0, 900.0, 2], [9150.0, 4000.0, 11]]}


@contextlib.asynccontextmanager
async def ingest_stand_in() -> AsyncIterator[tuple[str, list[Any]]]:
    """What a gateway's /ingest reads: every message, decoded."""
    got: list[Any] = []

    async def run(ws: ServerConnection) -> None:
        async for raw in ws:
            got.append(json.loads(raw))

    async with serve(run, "127.0.0.1", 0) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ingest", got


async def test_books_on_the_wire_to_ingest() -> None:
    async with ingest_stand_in() as (url, got), Publisher(url, flush_ms=5, backoff=FAST) as p:
        await p.wait_connected(10)
        await p.publish_book("BBCA", 1, BIDS, ASKS, full=True)
        await p.publish_book("BBCA", 2, [[9100.0, 1300.0, 9]], [])
        assert await p.sync(10)
        books = [m for batch in got for m in batch]
        assert books == [
            {"type": "book", "sym": "BBCA", "seq": 1, "full": True, "bids": BIDS, "asks": ASKS},
            {"type": "book", "sym": "BBCA", "seq": 2, "full": False,
             "bids": [[9100.0, 1300.0, 9]], "asks": []},
        ]


async def test_unavailable_from_a_gateway_brings_the_held_state_again() -> None:
    """A gateway whose Redis bus is down answers `unavailable` (nothing of that
    batch published): the publisher ends the connection and, on the next,
    sends its state first: the tick and the whole book, changes folded in."""
    got: list[tuple[int, Any]] = []
    connections = 0

    async def run(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        n = connections
        async for raw in ws:
            if n == 1:  # the bus is down while this connection lasts
                await ws.send(json.dumps({"type": "error", "code": "unavailable",
                                          "message": "2 ticks NOT published: redis down"}))
            else:
                got.extend((n, m) for m in json.loads(raw))

    errors: list[FastfeedError] = []
    async with serve(run, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ingest"
        async with Publisher(url, flush_ms=5, backoff=FAST, on_error=errors.append) as p:
            await p.wait_connected(10)
            await p.publish([{"sym": "BBCA", "seq": 1, "bid": 9100.0},
                             {"type": "book", "sym": "BBCA", "seq": 1, "full": True,
                              "bids": BIDS, "asks": ASKS}])
            await until(lambda: connections == 2 and len(got) >= 2, timeout=10)
            await p.publish_book("BBCA", 2, [[9100.0, 0.0, 0]], [])
            assert await p.sync(10)
    assert errors and {e.code for e in errors} == {"unavailable"}
    assert got == [
        (2, {"sym": "BBCA", "seq": 1, "bid": 9100.0}),
        (2, {"type": "book", "sym": "BBCA", "seq": 1, "full": True, "bids": BIDS,
             "asks": ASKS}),
        (2, {"type": "book", "sym": "BBCA", "seq": 2, "full": False,
             "bids": [[9100.0, 0.0, 0]], "asks": []}),
    ]


async def test_the_redis_transport_carries_books_through_a_redis_restart(redis: Any) -> None:
    """Books onto the bus in order with the ticks, and the ticks beside them.
    Redis restarts empty: the change published meanwhile is in the whole
    book the publisher's next connection sends first (the worker's write-back
    is older), so the change after it applies and nothing goes stale."""
    from fastfeed._core import Books, Table
    from fastfeed.bus import RedisBus
    from fastfeed.feed.sink import LocalSink

    errors: list[FastfeedError] = []
    table = Table()
    books = Books(table, depth=5, levels=8)
    truth = Books(Table(), depth=5, levels=8)
    fast = {"backoff_base": 0.05, "backoff_cap": 0.2, "ping_interval": 0.2,
            "ping_timeout": 1.0}
    sink = LocalSink(table, lambda: None, books)
    worker = RedisBus(redis.url, channels=4, prefix="bk", sink=sink, **fast)
    async with worker:
        await worker.wait_ready(5)
        async with Publisher(redis.url, channels=4, prefix="bk", book_levels=8, flush_ms=5,
                             backoff=FAST, on_error=errors.append, **fast) as p:
            await p.wait_connected(5)
            sent = [{"type": "book", "sym": "BBCA", "seq": 1, "full": True,
                     "bids": BIDS, "asks": ASKS},
                    {"type": "book", "sym": "BBCA", "seq": 2, "bids": [[9090.0, 100.0, 1]]}]
            await p.publish([{"sym": "BBCA", "seq": 1, "bid": 9100.0}, *sent])
            assert await p.sync(10)
            truth.apply_objects(sent)

            def same() -> bool:
                return (books.snapshot_json([table.lookup("BBCA")])
                        == truth.snapshot_json([truth.table.lookup("BBCA")]))

            await until(same)
            assert table.row(table.lookup("BBCA"))[3] == 9100.0
            redis.stop()
            await until(lambda: not p.connected)
            change = {"type": "book", "sym": "BBCA", "seq": 3, "asks": [[9130.0, 50.0, 2]]}
            await p.publish(change)
            redis.start()
            await until(lambda: p.connected, timeout=20)
            later = {"type": "book", "sym": "BBCA", "seq": 4, "bids": [[9080.0, 70.0, 1]]}
            await p.publish(later)
            assert await p.sync(10)
            truth.apply_objects([change, later])
            await until(same, timeout=20)
            assert not books.is_stale(table.lookup("BBCA"))
            assert p.resent >= 1 and errors == []


async def test_publish_simulate_sends_books_to_ingest() -> None:
    """`fastfeed publish --simulate` into a gateway's /ingest: the
    simulator's books go with its quotes, full first, then changes."""
    from fastfeed.feed.publish import simulate

    async with ingest_stand_in() as (url, got), Publisher(url, flush_ms=5, backoff=FAST) as p:
        await p.wait_connected(10)
        sent = await simulate(p, 20, 2000.0, seed=4, duration=0.5)
        assert await p.sync(10)
        msgs = [m for batch in got for m in batch]
        books = [m for m in msgs if m.get("type") == "book"]
        assert sent > 0 and len(books) >= 20
        first: dict[str, dict[str, Any]] = {}
        for m in books:
            if m["sym"] not in first:
                first[m["sym"]] = m
                assert m["full"] is True
            else:
                assert m["full"] is False
        assert len(first) == 20
