"""Order books end to end, against real processes: a third-party client
written only from the contract (`websockets`, `zlib`, `struct`; nothing of
fastfeed) keeps every book it subscribes to, and its checksum matches on
every entry, through slow reading, a reconnect with resubscribe, a worker
killed with SIGKILL and a Redis restart.

A real redis-server and a pod of two workers (``fastfeed serve --workers 2
--redis``); books come from two `fastfeed.publisher.Publisher`s, one onto
the bus (symbols E..), one into the pod's ``/ingest`` (symbols I..): full
books and price-keyed changes from a deterministic feed with no source
faults (no seq gap, no crossing), with more levels kept than the feed ever
has, so the gateway's book must be the source's book exactly, and a
``book: stale`` status means something was lost on the way. After each
phase every client's book of every symbol equals the source's (seq, levels,
checksum).

No book ever goes stale, with one exception: while the pod's Redis is away
its ``/ingest`` answers ``unavailable`` and the publisher reconnects to send
its books whole; a change it wrote right behind such a refused batch may
reach Redis first, if Redis comes back in that moment, and that book is
stale until the whole book follows (the client then gets ``ok``). That feed
sends full books only at first, so only the publisher's resending can heal
a book there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import struct
import time
import zlib
from typing import Any

import pytest
from books_feed import BookFeed
from contract_client import ContractConnection
from fixtures import children, http_get, owner_pid
from support import start_gateway, until

from fastfeed.backoff import Backoff
from fastfeed.publisher import Publisher

pytestmark = pytest.mark.timeout(180)

DEPTH = 5
LEVELS = 20  # the feed uses 17 prices a side: the gateway never drops a level
SYMS = [f"E{i:02d}" for i in range(10)]  # onto the bus
ISYMS = [f"I{i:02d}" for i in range(4)]  # into the pod's /ingest
FAST = {"backoff_base": 0.05, "backoff_cap": 0.3, "ping_interval": 0.2, "ping_timeout": 1.0}


# ---- the contract client: websockets + zlib + struct, from the contract alone ------


def checksum(bids: list, asks: list) -> int:
    """CRC-32 of price and volume (binary64 little-endian) of every ask, best
    first, then every bid, best first."""
    return zlib.crc32(b"".join(struct.pack("<dd", p, v) for p, v, _ in [*asks, *bids]))


class Book:
    def __init__(self) -> None:
        self.seq = 0
        self.bids: dict[float, tuple[float, int]] = {}
        self.asks: dict[float, tuple[float, int]] = {}
        self.checksum = 0  # the last one the server sent
        self.from_snapshot = False  # no change applied since the snapshot

    def apply(self, e: dict[str, Any]) -> None:
        """Price-keyed changes (volume 0 removes the price), then the best
        `DEPTH` levels a side are kept."""
        for side, name in ((self.bids, "bids"), (self.asks, "asks")):
            for p, v, o in e[name]:
                if v == 0:
                    side.pop(p, None)
                else:
                    side[p] = (v, o)
        self.bids = dict(sorted(self.bids.items(), reverse=True)[:DEPTH])
        self.asks = dict(sorted(self.asks.items())[:DEPTH])
        self.seq = e["seq"]
        self.checksum = e["checksum"]

    def levels(self) -> tuple[list, list]:
        return ([[p, v, o] for p, (v, o) in self.bids.items()],
                [[p, v, o] for p, (v, o) in self.asks.items()])


class ContractClient(ContractConnection):
    """Subscribes to the `book` channel of `syms`, keeps each book by the
    contract's rules and checks the checksum of every entry (a mismatch is
    counted and the book resubscribed, as the contract says). When its
    connection ends it reconnects and resubscribes everything. `pause()`
    stops reading the socket (a small receive buffer makes the server see
    it at once); `bounce()` closes the connection from this side."""

    def __init__(self, port: int, syms: list[str], rcvbuf: int = 0) -> None:
        super().__init__(port, syms, rcvbuf)
        self.books: dict[str, Book] = {}
        self.entries = 0
        self.mismatches: list[tuple[str, int]] = []
        self.backwards: list[tuple[str, int, int]] = []  # entries whose seq went back
        self.snapshots = 0  # answers to a subscribe of every symbol
        self.stale: list[dict] = []  # book status messages, and entries marked stale
        self.stale_before_redis = 0

    @property
    def ready(self) -> bool:
        """Subscribed on the current connection, every book held."""
        return self._ws is not None and all(s in self.books for s in self.syms)

    async def _opened(self, ws: Any) -> None:
        self.books = {}  # the new connection's snapshot brings every book whole
        await self._subscribe(ws, self.syms)

    async def _subscribe(self, ws: Any, syms: list[str]) -> None:
        await ws.send(json.dumps({"op": "subscribe", "symbols": syms, "channels": ["book"]}))

    async def _on(self, ws: Any, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t == "snapshot":
            if msg.get("unknown"):
                # that worker has not seen them yet (its snapshot from Redis is
                # on its way): ask again
                await asyncio.sleep(0.05)
                await self._subscribe(ws, msg["unknown"])
            if len(msg.get("books", [])) == len(self.syms):
                self.snapshots += 1
            for e in msg.get("books", []):
                await self._entry(ws, e, whole=True)
        elif t == "update":
            for e in msg.get("books", []):
                await self._entry(ws, e, whole=bool(e.get("full")))
        elif t == "status":
            if "feed" in msg:
                self.feed.append(msg["feed"])
            elif "book" in msg:
                self.stale.append(msg)
        elif t == "error":
            self.errors.append(msg)

    async def _entry(self, ws: Any, e: dict[str, Any], whole: bool) -> None:
        sym = e["sym"]
        if whole or sym not in self.books:
            self.books[sym] = Book()
        book = self.books[sym]
        # seq goes up with every entry; only the first change after a
        # snapshot may repeat its seq, with changes the snapshot already holds
        if not whole and (e["seq"] < book.seq
                          or (e["seq"] == book.seq and not book.from_snapshot)):
            self.backwards.append((sym, book.seq, e["seq"]))
        book.from_snapshot = whole and not e.get("full")
        book.apply(e)
        if e.get("stale"):
            self.stale.append(e)
        self.entries += 1
        if checksum(*book.levels()) != e["checksum"]:
            self.mismatches.append((sym, e["seq"]))
            # the contract's remedy: resubscribe that book for a full snapshot
            await ws.send(json.dumps({"op": "unsubscribe", "symbols": [sym],
                                      "channels": ["book"]}))
            await self._subscribe(ws, [sym])


# ---- the source's books, and the publisher that streams them ------------------------


class Source:
    """Every book as the feed made it (all levels): the truth."""

    def __init__(self) -> None:
        self.books: dict[str, tuple[int, dict, dict]] = {}

    def apply(self, msgs: list[dict]) -> None:
        for m in msgs:
            _, bids, asks = self.books.get(m["sym"], (0, {}, {}))
            if m.get("full"):
                bids, asks = {}, {}
            for side, name in ((bids, "bids"), (asks, "asks")):
                for p, v, o in m.get(name, ()):
                    if v == 0:
                        side.pop(p, None)
                    else:
                        side[p] = (v, o)
            self.books[m["sym"]] = (m["seq"], bids, asks)

    def top(self, sym: str) -> tuple[int, list, list]:
        seq, bids, asks = self.books[sym]
        return (seq, [[p, v, o] for p, (v, o) in sorted(bids.items(), reverse=True)[:DEPTH]],
                [[p, v, o] for p, (v, o) in sorted(asks.items())[:DEPTH]])


def holds(c: ContractClient, source: Source) -> bool:
    """The client's book of each of its symbols is the source's: seq,
    levels, and the server's last checksum for it."""
    for s in c.syms:
        b = c.books.get(s)
        if b is None:
            return False
        seq, bids, asks = source.top(s)
        if (b.seq, *b.levels()) != (seq, bids, asks) or b.checksum != checksum(bids, asks):
            return False
    return True


def differences(clients: list[ContractClient], source: Source) -> str:
    out = []
    for k, c in enumerate(clients):
        for s in c.syms:
            b = c.books.get(s)
            want = source.top(s)
            got = None if b is None else (b.seq, *b.levels())
            if got != want:
                out.append(f"client {k} {s}: holds {got}, the source {want}")
    return "; ".join(out[:5]) or "none"


class Stream:
    """Publishes the feed's books in batches until stopped."""

    def __init__(self, pub: Publisher, feed: BookFeed, source: Source) -> None:
        self.pub, self.feed, self.source = pub, feed, source
        self.published = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def batch(self, n: int) -> None:
        msgs = self.feed.msgs(n)
        self.source.apply(msgs)
        await self.pub.publish_books(msgs)
        self.published += len(msgs)

    async def _run(self, size: int, pause: float) -> None:
        while not self._stop.is_set():
            await self.batch(size)
            await asyncio.sleep(pause)

    def start(self, size: int = 20, pause: float = 0.01) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(size, pause))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def until(self, n: int) -> None:
        """Until `n` more messages went out."""
        goal = self.published + n
        await until(lambda: self.published >= goal, 30, what=f"{n} more book messages")


def metric(port: int, name: str) -> float:
    """A pod metric (every worker's, summed)."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    m = re.search(rb"^" + re.escape(name.encode()) + rb" ([0-9.e+-]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


# ---- the test --------------------------------------------------------------------


async def test_contract_clients_keep_every_book_through_every_fault(redis, tmp_path):
    t0 = time.monotonic()
    args = ["--workers", "2", "--redis", redis.url, "--redis-channels", "4",
            "--book-depth", str(DEPTH), "--book-levels", str(LEVELS),
            "--high-water-bytes", "65536", "--stall-s", "120", "--feed-grace-s", "0.5"]
    feed, source = BookFeed(17, SYMS, faults=False), Source()
    backoff = Backoff(base=0.05, factor=2.0, cap=0.3, jitter=0.5)
    async with start_gateway(*args, log=tmp_path / "pod.log") as pod, \
            Publisher(redis.url, channels=4, book_levels=LEVELS, flush_ms=5, backoff=backoff,
                      **FAST) as pub, \
            Publisher(pod.ingest_url, flush_ms=5, backoff=backoff) as ipub:
        await pub.wait_connected(10)
        bus = Stream(pub, feed, source)
        # every book starts full (the feed's first message for a symbol is)
        while any(feed.seq[s] == 0 for s in SYMS):
            await bus.batch(20)
        assert await pub.sync(20)
        # changes only after the first full books: a book the /ingest path
        # let go stale heals only if the publisher sends it whole again
        ingest_feed = BookFeed(23, ISYMS, faults=False, full_rate=0.0)
        await ipub.wait_connected(10)
        ingest = Stream(ipub, ingest_feed, source)
        while any(ingest_feed.seq[s] == 0 for s in ISYMS):
            await ingest.batch(8)
        assert await ipub.sync(20)
        streams = (bus, ingest)

        sup = pod.proc.pid
        await until(lambda: len(children(sup)) == 2, what="two workers")
        # two slow readers (small receive buffers), two that keep reading
        clients = [ContractClient(pod.port, SYMS + ISYMS, rcvbuf=4096),
                   ContractClient(pod.port, SYMS),
                   ContractClient(pod.port, SYMS[:6] + ISYMS[:2], rcvbuf=4096),
                   ContractClient(pod.port, SYMS[4:] + ISYMS)]
        for c in clients:
            c.start()

        def start(size: int = 20, pause: float = 0.01) -> None:
            bus.start(size, pause)
            ingest.start(max(4, size // 3), pause)

        async def settle(what: str) -> None:
            for st in streams:
                await st.stop()
                assert await st.pub.sync(30), what
            try:
                await until(lambda: all(holds(c, source) for c in clients), 30, what=what)
            except AssertionError:
                raise AssertionError(f"{what}: {differences(clients, source)}") from None

        try:
            await until(lambda: all(c.ready for c in clients), 20, what="clients subscribed")

            # 1. normal reading
            start()
            await bus.until(1500)
            await settle("normal reading")

            # 2. slow reading: two clients stop reading while books stream;
            # the server holds their changes back (conflates) and, when they
            # read again, sends what brings them to the current books
            slow = [clients[0], clients[2]]
            conflated = metric(pod.port, "fastfeed_conflated_frames_total")
            for c in slow:
                c.pause()
            start(size=50, pause=0.005)
            await until(lambda: metric(pod.port, "fastfeed_stalled_clients") >= 2, 30,
                        step=0.1, what="both slow readers above the high-water mark")
            await bus.until(3000)  # ... while more changes go by
            assert metric(pod.port, "fastfeed_conflated_frames_total") > conflated
            for c in slow:
                c.resume()
            await settle("slow reading")
            assert all(c.reconnects == 0 for c in clients)

            # 3. every client closes its connection, reconnects, resubscribes
            start()
            for c in clients:
                before = c.snapshots
                await c.bounce()
                await until(lambda c=c, before=before: c.snapshots > before and c.ready,
                            20, what="resubscribed after a reconnect")
            await bus.until(500)
            await settle("reconnect with resubscribe")
            assert all(c.reconnects == 1 for c in clients)

            # 4. SIGKILL of the worker client 0 is on: its clients reconnect
            # (to either worker), the supervisor starts a new one
            workers = children(sup)
            victim = owner_pid(workers, pod.port, clients[0].local_port)
            assert victim is not None, "no worker holds client 0's connection"
            on_victim = [c for c in clients
                         if owner_pid(workers, pod.port, c.local_port) == victim]
            before = {id(c): c.connections for c in clients}
            start()
            os.kill(victim, signal.SIGKILL)
            await until(lambda: all(c.connections > before[id(c)] and c.ready
                                    for c in on_victim), 30,
                        what="the killed worker's clients back and resubscribed")
            await until(lambda: len(children(sup)) == 2 and victim not in children(sup),
                        30, what="the worker restarted")
            await bus.until(500)
            await settle("worker kill")
            assert all(c.connections == before[id(c)] for c in clients
                       if c not in on_victim)

            assert all(c.stale == [] for c in clients), [c.stale[:3] for c in clients]
            for c in clients:
                c.stale_before_redis = len(c.stale)

            # 5. Redis stops and starts again empty on the same port while
            # the publishers keep publishing
            start()
            await bus.until(200)
            await asyncio.to_thread(redis.stop)
            await until(lambda: all(c.feed[-1:] == ["down"] for c in clients), 20,
                        what="feed down on every client")
            await bus.until(200)  # published while Redis is away: held
            await asyncio.to_thread(redis.start)
            await until(lambda: all(c.feed[-1:] == ["up"] for c in clients), 30,
                        what="feed up on every client")
            await until(lambda: pub.connected and ipub.connected, 20,
                        what="the publishers back")
            await bus.until(1500)
            await settle("redis restart")

            entries = sum(c.entries for c in clients)
            mismatches = sum(len(c.mismatches) for c in clients)
            reconnects = sum(c.reconnects for c in clients)
            print(f"\nbooks e2e: {bus.published} book messages onto the bus, "
                  f"{ingest.published} into /ingest (the publisher reconnected "
                  f"{ipub.reconnects} times), "
                  f"{entries} entries checked, {mismatches} checksum mismatches, "
                  f"{reconnects} reconnects ({[c.reconnects for c in clients]}), "
                  f"{len(on_victim)} clients on the killed worker, "
                  f"{sum(m.get('book') == 'stale' for c in clients for m in c.stale)} "
                  f"stale books healed, "
                  f"{time.monotonic() - t0:.1f}s")
            assert mismatches == 0, [c.mismatches[:5] for c in clients]
            assert all(c.backwards == [] for c in clients), [c.backwards[:5] for c in clients]
            for c in clients:  # see the module's docstring
                for k, m in enumerate(c.stale):
                    assert m["sym"] in ISYMS and k >= c.stale_before_redis, m
                    assert m.get("book") != "stale" or any(
                        later.get("book") == "ok" and later["sym"] == m["sym"]
                        for later in c.stale[k + 1:]), m
            assert all(c.errors == [] for c in clients), [c.errors[:3] for c in clients]
            assert all(c.entries > 100 for c in clients)
        finally:
            for c in clients:
                await c.stop()
