"""Order books end to end: publishers on /ingest, clients on /ws written only
from the contract (`websockets`, `zlib`, `struct`), real gateways, a real
redis-server.

Every test ends the same way: each client's book (seq, levels) equals the
book the gateway holds, which is the compiled `Books` applying the same
messages in embedded mode (tests/test_books_bus.py holds the bus to it),
and every entry's checksum matched on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import zlib

import pytest
import websockets
from books_feed import SYMS, BookFeed
from fixtures import rss_kib
from support import start_gateway, until
from wsraw import RawWS

from fastfeed._core import Books, Table

pytestmark = pytest.mark.timeout(180)
DEPTH, LEVELS = 5, 8
BOOK_ARGS = ("--book-depth", str(DEPTH), "--book-levels", str(LEVELS))


def checksum(bids: list, asks: list) -> int:
    return zlib.crc32(b"".join(struct.pack("<dd", lv[0], lv[1]) for lv in [*asks, *bids]))


class BookState:
    """What a client holds, by the contract's rules alone."""

    def __init__(self) -> None:
        self.books: dict[str, tuple[int, dict, dict]] = {}
        self.stale: set[str] = set()
        self.entries = 0
        self.mismatches: list[str] = []

    def on(self, msg: dict) -> None:
        t = msg.get("type")
        if t in ("snapshot", "update"):
            for e in msg.get("books", []):
                self.apply(e, t == "snapshot")
        elif t == "status" and "book" in msg:
            (self.stale.add if msg["book"] == "stale" else self.stale.discard)(msg["sym"])

    def apply(self, e: dict, whole: bool) -> None:
        sym = e["sym"]
        if whole or e.get("full") or sym not in self.books:
            bids, asks = {}, {}
        else:
            _, bids, asks = self.books[sym]
        for side, name in ((bids, "bids"), (asks, "asks")):
            for p, v, o in e[name]:
                if v == 0:
                    side.pop(p, None)
                else:
                    side[p] = (v, o)
        bids = dict(sorted(bids.items(), reverse=True)[:DEPTH])
        asks = dict(sorted(asks.items())[:DEPTH])
        self.books[sym] = (e["seq"], bids, asks)
        self.entries += 1
        if e.get("stale"):  # a snapshot (or full book) of a book gone stale
            self.stale.add(sym)
        b, a = self.levels(sym)
        if checksum(b, a) != e["checksum"]:
            self.mismatches.append(sym)

    def levels(self, sym: str) -> tuple[list, list]:
        _, bids, asks = self.books[sym]
        return ([[p, v, o] for p, (v, o) in bids.items()],
                [[p, v, o] for p, (v, o) in asks.items()])

    def equals(self, truth: Books, syms: list[str]) -> bool:
        for s in syms:
            iid = truth.table.lookup(s)
            seq, bids, asks, _ = truth.book(iid)
            if s not in self.books:
                if seq:
                    return False
                continue
            if self.books[s][0] != seq or self.levels(s) != (bids, asks):
                return False
        return True


class BookClient:
    """A websockets client subscribed to the book channel of `syms`."""

    def __init__(self, url: str, syms: list[str], watch: bool = False,
                 frame_ms: int | None = None) -> None:
        self.url, self.syms, self.watch, self.frame_ms = url, syms, watch, frame_ms
        self.state = BookState()
        self.task: asyncio.Task | None = None
        self.subscribed = asyncio.Event()

    async def __aenter__(self) -> BookClient:
        self.task = asyncio.get_running_loop().create_task(self.run())
        await asyncio.wait_for(self.subscribed.wait(), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def run(self) -> None:
        async with websockets.connect(self.url, max_size=None) as ws:
            if self.frame_ms:
                await ws.send(json.dumps({"op": "configure", "frame_ms": self.frame_ms}))
            await ws.send(json.dumps({"op": "subscribe", "symbols": self.syms,
                                      "channels": ["book"]}))
            if self.watch:
                await ws.send(json.dumps({"op": "watch", "symbols": self.syms,
                                          "channels": ["book"]}))
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "snapshot":
                    if msg.get("unknown"):
                        # not seen here yet (the bus is on its way): ask again
                        await asyncio.sleep(0.05)
                        await ws.send(json.dumps({"op": "subscribe", "symbols": msg["unknown"],
                                                  "channels": ["book"]}))
                    else:
                        self.subscribed.set()
                bad = len(self.state.mismatches)
                self.state.on(msg)
                if len(self.state.mismatches) > bad:  # the contract's remedy: resubscribe
                    sym = self.state.mismatches[-1]
                    await ws.send(json.dumps({"op": "unsubscribe", "symbols": [sym],
                                              "channels": ["book"]}))
                    await ws.send(json.dumps({"op": "subscribe", "symbols": [sym],
                                              "channels": ["book"]}))


class Publisher:
    """An /ingest connection that sends book messages and keeps the errors."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.errors: list[dict] = []

    async def __aenter__(self) -> Publisher:
        self.ws = await websockets.connect(self.url, max_size=None)
        self.reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.ws:
            self.errors.append(json.loads(raw))

    async def send(self, msgs: list[dict]) -> None:
        await self.ws.send(json.dumps(msgs))

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        await self.ws.close()


def embedded() -> Books:
    return Books(Table(), DEPTH, LEVELS)


async def feed_books(pub: Publisher, feed: BookFeed, truth: Books, batches: int,
                     size: int = 40, pause: float = 0.0) -> None:
    for _ in range(batches):
        msgs = feed.msgs(size)
        truth.apply_objects(msgs)
        await pub.send(msgs)
        if pause:
            await asyncio.sleep(pause)


def first_books(feed: BookFeed) -> list[dict]:
    """A full book for every symbol, so that every symbol is known."""
    out = []
    for s in feed.syms:
        feed.seq[s] += 1
        out.append({"type": "book", "sym": s, "seq": feed.seq[s], "full": True,
                    "bids": [feed.level(s, 0, k) for k in range(6)],
                    "asks": [feed.level(s, 1, k) for k in range(6)]})
    return out


async def test_books_from_ingest_reach_contract_clients_exactly():
    feed, truth = BookFeed(11), embedded()
    async with start_gateway(*BOOK_ARGS) as g, Publisher(g.ingest_url) as pub:
        start = first_books(feed)
        truth.apply_objects(start)
        await pub.send(start)
        async with BookClient(g.ws_url, SYMS) as a, BookClient(g.ws_url, SYMS[:4]) as b:
            await feed_books(pub, feed, truth, 40, pause=0.005)
            # bad books: refused by index, naming the symbol; nothing of them applied
            await pub.send([
                {"type": "book", "sym": "B00", "seq": 10**9, "full": True,
                 "bids": [[5000.0, 1.0, 0]], "asks": [[10.0, 1.0, 0]]},
                {"sym": "B01", "seq": 1, "bid": 1.0},
                {"type": "book", "sym": "B01", "seq": 10**9, "bids": [[1.0, -5.0, 0]]},
            ])
            await until(lambda: len(pub.errors) >= 2)
            assert [(e["index"], e["symbols"]) for e in pub.errors] == [(0, ["B00"]), (2, ["B01"])]
            assert "crossed full book" in pub.errors[0]["message"]
            assert "negative volume" in pub.errors[1]["message"]
            await until(lambda: a.state.equals(truth, SYMS) and b.state.equals(truth, SYMS[:4]))
            assert a.state.mismatches == [] == b.state.mismatches
            stale = {s for s in SYMS if truth.is_stale(truth.table.lookup(s))}
            assert a.state.stale == stale
            assert a.state.entries > len(SYMS)


async def test_a_client_that_stops_reading_is_conflated_and_converges():
    feed, truth = BookFeed(5), embedded()
    async with start_gateway(*BOOK_ARGS, "--high-water-bytes", "65536", "--stall-s", "60") as g, \
            Publisher(g.ingest_url) as pub:
        start = first_books(feed)
        truth.apply_objects(start)
        await pub.send(start)
        slow = await RawWS.connect(g.port, limit=2**16, rcvbuf=4096)
        slow.send_text(json.dumps({"op": "subscribe", "symbols": SYMS, "channels": ["book"]}))
        await feed_books(pub, feed, truth, 100, size=100)
        rss_mid = rss_kib(g.proc.pid)
        await feed_books(pub, feed, truth, 300, size=100)
        rss_end = rss_kib(g.proc.pid)
        # 30,000 book changes went by while it read nothing: the gateway held
        # its socket buffer and the books, not a queue of changes
        assert rss_end - rss_mid < 16 * 1024, (rss_mid, rss_end)
        state = BookState()
        deadline = time.monotonic() + 30
        while not state.equals(truth, SYMS) and time.monotonic() < deadline:
            _op, data = await slow.recv_frame(timeout=10)
            state.on(json.loads(data))
        assert state.equals(truth, SYMS)
        assert state.mismatches == []
        slow.close()


async def test_a_watched_book_goes_out_at_once():
    feed, truth = BookFeed(3), embedded()
    async with start_gateway(*BOOK_ARGS) as g, Publisher(g.ingest_url) as pub:
        start = first_books(feed)
        truth.apply_objects(start)
        await pub.send(start)
        # a frame a minute: only the watch can bring the change in this test's time
        async with BookClient(g.ws_url, ["B03"], watch=True, frame_ms=60000) as c:
            await until(lambda: c.state.equals(truth, ["B03"]))
            feed.seq["B03"] += 1
            change = {"type": "book", "sym": "B03", "seq": feed.seq["B03"],
                      "bids": [[feed.mid["B03"] - 1, 7.0, 1]]}
            truth.apply_objects([change])
            await pub.send([change])
            await until(lambda: c.state.books["B03"][0] == feed.seq["B03"], timeout=20)
            assert c.state.equals(truth, ["B03"])



async def test_two_workers_and_pods_hold_the_same_books(redis):
    """A pod of two workers, a second pod, and a third that starts late: every
    client's book and checksum equal the truth, through gaps, crossings and
    full books that heal them."""
    args = ("--redis", redis.url, "--redis-channels", "4", *BOOK_ARGS)
    feed, truth = BookFeed(21), embedded()
    async with start_gateway(*args, "--workers", "2") as pod_a, start_gateway(*args) as pod_b, \
            Publisher(pod_a.ingest_url) as pub:
        start = first_books(feed)
        truth.apply_objects(start)
        await pub.send(start)
        urls = [pod_a.ws_url] * 4 + [pod_b.ws_url] * 2
        clients = [BookClient(u, SYMS) for u in urls]
        for c in clients:
            await c.__aenter__()
        try:
            await feed_books(pub, feed, truth, 20, pause=0.005)
            async with start_gateway(*args) as late:
                await feed_books(pub, feed, truth, 20, pause=0.005)
                async with BookClient(late.ws_url, SYMS) as lc:
                    await feed_books(pub, feed, truth, 10, pause=0.005)
                    everyone = [*clients, lc]
                    await until(lambda: all(c.state.equals(truth, SYMS) for c in everyone),
                                timeout=30)
                    assert all(c.state.mismatches == [] for c in everyone)
                    stale = {s for s in SYMS if truth.is_stale(truth.table.lookup(s))}
                    assert stale, "the feed should leave some book stale"
                    assert all(c.state.stale == stale for c in everyone)
        finally:
            for c in clients:
                await c.__aexit__()
