"""fastfeed.client with order books (contract version 1.1, "Order books"),
and `list` across pages.

Books are driven by a small scripted WebSocket server speaking the contract's
book messages, with checksums computed here from the contract's definition
(`zlib.crc32` over float64 little-endian price and volume, asks then bids):
it can send a wrong checksum, a stale status, a full book on demand, which is
behaviour a real gateway shows only when its source misbehaves. `list`'s pages
come from a real gateway process with a small page size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support import start_gateway, until
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed as WSClosed

from fastfeed.backoff import Backoff
from fastfeed.client import Client
from fastfeed.orderbook import OrderBook
from fastfeed.publisher import Publisher

FAST = Backoff(base=0.05, cap=0.2)
DEPTH = 10


def crc(bids: list[list[float]], asks: list[list[float]]) -> int:
    data = b"".join(struct.pack("<dd", p, v) for p, v, *_ in asks[:DEPTH] + bids[:DEPTH])
    return zlib.crc32(data)


class ServerBook:
    """The gateway's side: all levels, served best DEPTH, with seq."""

    def __init__(self, sym: str, seq: int = 100) -> None:
        self.sym = sym
        self.seq = seq
        self.side: dict[str, dict[float, list[Any]]] = {"bids": {}, "asks": {}}

    def view(self, key: str) -> list[list[Any]]:
        levels = sorted(self.side[key].values(), key=lambda lv: -lv[0] if key == "bids" else lv[0])
        return [list(lv) for lv in levels[:DEPTH]]

    def entry(self, changes: dict[str, list[list[Any]]] | None = None, *, full: bool = False,
              checksum: int | None = None) -> dict[str, Any]:
        """Apply `changes`, and the update entry that tells them (the levels
        that came into or left the view included)."""
        before = {k: self.view(k) for k in self.side}
        for key, levels in (changes or {}).items():
            for p, v, o in levels:
                if v == 0:
                    self.side[key].pop(p, None)
                else:
                    self.side[key][p] = [p, v, o]
        self.seq += 1
        out: dict[str, Any] = {"sym": self.sym, "seq": self.seq}
        for key in self.side:
            after = self.view(key)
            if full:
                out[key] = after
                continue
            now = {lv[0]: lv for lv in after}
            diff = [[p, 0.0, 0] for p in (lv[0] for lv in before[key]) if p not in now]
            old = {lv[0]: lv for lv in before[key]}
            diff += [lv for lv in after if old.get(lv[0]) != lv]
            out[key] = diff
        if full:
            out["full"] = True
        out["checksum"] = crc(self.view("bids"), self.view("asks")) if checksum is None \
            else checksum
        return out

    def snapshot_entry(self) -> dict[str, Any]:
        bids, asks = self.view("bids"), self.view("asks")
        return {"sym": self.sym, "seq": self.seq, "bids": bids, "asks": asks,
                "checksum": crc(bids, asks)}


def seeded_book(sym: str, rng: random.Random, n: int = 15) -> ServerBook:
    b = ServerBook(sym)
    for k in range(n):
        b.side["bids"][9100.0 - 25 * k] = [9100.0 - 25 * k, 100.0 * rng.randint(1, 500), 3]
        b.side["asks"][9125.0 + 25 * k] = [9125.0 + 25 * k, 100.0 * rng.randint(1, 500), 2]
    return b


Handler = Callable[[ServerConnection, list[dict]], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[str, list[dict]]]:
    """A server speaking just the contract's book messages; yields its URL
    and every request it received."""
    seen: list[dict] = []

    async def run(ws: ServerConnection) -> None:
        with contextlib.suppress(WSClosed):
            await handler(ws, seen)

    async with serve(run, "127.0.0.1", 0, select_subprotocol=lambda c, offered: offered[0]) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", seen


async def serve_requests(ws: ServerConnection, seen: list[dict], book: ServerBook) -> None:
    """Answer requests until the socket closes: subscribe with the book's
    snapshot, anything else with an ack."""
    async for raw in ws:
        req = json.loads(raw)
        seen.append(req)
        if req["op"] == "subscribe":
            snap: dict[str, Any] = {"type": "snapshot", "id": req["id"], "rows": [],
                                    "unknown": []}
            if "book" in (req.get("channels") or ()):
                snap["books"] = [book.snapshot_entry()]
            await ws.send(json.dumps(snap))
        else:
            await ws.send(json.dumps({"type": "ack", "id": req["id"], "op": req["op"],
                                      "symbols": req.get("symbols", [])}))


def same(client_book: OrderBook, server: ServerBook) -> bool:
    return (client_book.seq == server.seq and client_book.bids == server.view("bids")
            and client_book.asks == server.view("asks"))


def update(*entries: dict[str, Any]) -> str:
    return json.dumps({"type": "update", "t": 1, "rows": [], "books": list(entries)})


async def test_a_book_snapshot_then_changes_keep_the_servers_book() -> None:
    rng = random.Random(5)
    book = seeded_book("BBCA", rng)
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        for _ in range(300):
            key = rng.choice(["bids", "asks"])
            base = 9100.0 if key == "bids" else 9125.0
            step = -25 if key == "bids" else 25
            k = min(int(rng.expovariate(0.4)), 18)  # mostly near the top
            vol = 0.0 if rng.random() < 0.3 else 100.0 * rng.randint(1, 500)
            await ws.send(update(book.entry({key: [[base + step * k, vol, rng.randint(0, 9)]]})))
        await server

    seen_books: list[int] = []
    async with scripted(gateway) as (url, seen), \
            Client(url, backoff=FAST, on_book=lambda b: seen_books.append(b.seq)) as c:
        assert await c.subscribe(["BBCA"], channels=["book"]) == []
        assert seen[0]["channels"] == ["book"] and "since" not in seen[0]
        b = c.books["BBCA"]
        assert same(b, book) and len(b.bids) == len(b.asks) == DEPTH
        assert b.bids[0] == [9100.0, book.side["bids"][9100.0][1], 3]  # best first
        go.set()
        await until(lambda: c.books["BBCA"].seq == 400)  # 300 changes after seq 100
        assert same(c.books["BBCA"], book)
        assert c.book_resyncs == 0
        assert seen_books[-1] == book.seq and len(seen_books) == 301
        assert "BBCA" not in c.rows  # no quote channel: no row


async def test_a_full_entry_replaces_the_book() -> None:
    book = seeded_book("TLKM", random.Random(1))
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        book.side = {"bids": {3000.0: [3000.0, 500.0, 1]}, "asks": {3010.0: [3010.0, 700.0, 2]}}
        await ws.send(update(book.entry(full=True)))
        await server

    async with scripted(gateway) as (url, _), Client(url, backoff=FAST) as c:
        await c.subscribe(["TLKM"], channels=["book", "quote"])
        go.set()
        await until(lambda: c.books["TLKM"].seq == 101)
        assert c.books["TLKM"].bids == [[3000.0, 500.0, 1]]
        assert c.books["TLKM"].asks == [[3010.0, 700.0, 2]]


async def test_a_checksum_mismatch_resubscribes_the_book() -> None:
    """The contract: a client whose checksum differs unsubscribes and
    subscribes that book again, and gets a full snapshot."""
    book = seeded_book("BBRI", random.Random(2))
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        await ws.send(update(book.entry({"bids": [[9100.0, 4200.0, 7]]})))
        # a change the client cannot reconcile: a wrong checksum
        await ws.send(update(book.entry({"asks": [[9125.0, 300.0, 1]]}, checksum=12345)))
        # sent before the client's unsubscribe arrives: ignored until the snapshot
        await ws.send(update(book.entry({"asks": [[9150.0, 0.0, 0]]})))
        await server

    errors: list[Any] = []
    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST,
                                                        on_error=errors.append) as c:
        await c.subscribe(["BBRI"], channels=["book"])
        go.set()
        # the snapshot of the resubscription holds seq 103
        await until(lambda: c.book_resyncs == 1 and len(seen) >= 3 and c.books["BBRI"].seq
                    == 103)
        unsub, resub = seen[1], seen[2]
        assert unsub["op"] == "unsubscribe" and unsub["symbols"] == ["BBRI"]
        assert unsub["channels"] == ["book"]
        assert resub["op"] == "subscribe" and resub["channels"] == ["book"]
        assert same(c.books["BBRI"], book)
        assert c.books["BBRI"].checksum() == crc(book.view("bids"), book.view("asks"))
        assert c.subscribed == {"BBRI"} and errors == []


async def test_stale_and_ok_status_mark_the_book() -> None:
    book = seeded_book("ASII", random.Random(3))
    go = asyncio.Event()
    step = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        await ws.send(json.dumps({"type": "status", "sym": "ASII", "book": "stale"}))
        await step.wait()
        await ws.send(json.dumps({"type": "status", "sym": "ASII", "book": "ok"}))
        book.side["bids"].pop(9100.0)
        await ws.send(update(book.entry(full=True)))
        await server

    said: list[tuple[str, bool]] = []
    feed: list[bool] = []
    async with scripted(gateway) as (url, _), Client(
            url, backoff=FAST, on_book_status=lambda s, ok: said.append((s, ok)),
            on_status=feed.append) as c:
        await c.subscribe(["ASII"], channels=["book"])
        go.set()
        await until(lambda: c.books["ASII"].stale)
        assert said == [("ASII", False)]
        step.set()
        await until(lambda: c.books["ASII"].seq == 101)
        assert not c.books["ASII"].stale and said == [("ASII", False), ("ASII", True)]
        assert same(c.books["ASII"], book)
        assert c.feed_up and feed == []  # a book's status is not the feed's


async def test_a_resume_subscribes_books_again_without_since() -> None:
    book = seeded_book("BBCA", random.Random(4))
    conns = 0

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        nonlocal conns
        conns += 1
        if conns == 1:
            req = json.loads(await ws.recv())
            seen.append(req)
            row = ["BBCA", 7, 1, 1.0, 2.0, 1.5, 1.0, 1.0, 1.0, 10.0]
            await ws.send(json.dumps({"type": "snapshot", "id": req["id"], "rows": [row],
                                      "books": [book.snapshot_entry()], "unknown": []}))
            await ws.send(update(book.entry({"bids": [[9100.0, 0.0, 0]]})))
            await asyncio.sleep(0.2)
            await ws.close(1012)
            return
        book.side["asks"][9125.0][1] = 9900.0
        await serve_requests(ws, seen, book)

    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST) as c:
        await c.subscribe(["BBCA", "TLKM"], channels=["quote", "book"])
        await until(lambda: c.reconnects == 1 and c.connected and len(seen) >= 2
                    and c.books["BBCA"].asks[0][1] == 9900.0)
        again = seen[1]
        assert again["channels"] == ["book", "quote"] and again["since"] == {"BBCA": 7}
        assert same(c.books["BBCA"], book)


async def test_unsubscribing_the_book_channel_keeps_the_quote() -> None:
    book = seeded_book("BBCA", random.Random(6))

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        await serve_requests(ws, seen, book)

    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST) as c:
        await c.subscribe(["BBCA"], channels=["quote", "book"])
        assert "BBCA" in c.books
        await c.unsubscribe(["BBCA"], channels=["book"])
        assert "BBCA" not in c.books and c.subscribed == {"BBCA"}
        assert seen[-1] == {"op": "unsubscribe", "symbols": ["BBCA"], "channels": ["book"],
                            "id": seen[-1]["id"]}
        await c.unsubscribe(["BBCA"])
        assert c.subscribed == frozenset() and "channels" not in seen[-1]


async def test_list_follows_every_page() -> None:
    """A real gateway answering `list` 4 symbols at a time: the client asks
    again with `after` until `more` is false and returns every symbol."""
    syms = [f"PG{k:02d}" for k in range(11)] + ["BBCA", "BBRI"]
    async with start_gateway("--max-list-symbols", "4") as gw:
        async with Publisher(gw.ingest_url, backoff=FAST) as p:
            await p.publish([{"sym": s, "seq": 1, "bid": 1.0} for s in syms])
            assert await p.sync(10)
        async with Client(gw.ws_url, backoff=FAST) as c:
            assert await c.list() == sorted(syms)
            assert await c.list("PG*") == sorted(s for s in syms if s.startswith("PG"))
            assert await c.list("BB*") == ["BBCA", "BBRI"]


@pytest.mark.parametrize("bad", [[], [""], [3]])
async def test_bad_channels_are_refused_before_sending(bad: list[Any]) -> None:
    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        await serve_requests(ws, seen, ServerBook("X"))

    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST) as c:
        with pytest.raises(ValueError, match="channels"):
            await c.subscribe(["BBCA"], channels=bad)
        assert seen == [] and c.subscribed == frozenset()


async def test_a_channel_the_gateway_refuses_changes_nothing() -> None:
    """A real gateway that does not serve a channel refuses the request
    whole (bad_request); the client keeps what it had and resumes without it."""
    from fastfeed.client import FastfeedError

    async with start_gateway() as gw:
        async with Publisher(gw.ingest_url, backoff=FAST) as p:
            await p.publish([{"sym": "BBCA", "seq": 1, "bid": 9100.0}])
            assert await p.sync(10)
        async with Client(gw.ws_url, backoff=FAST) as c:
            await c.subscribe(["BBCA"])
            with pytest.raises(FastfeedError) as info:
                await c.subscribe(["BBCA"], channels=["nonesuch"])
            assert info.value.code == "bad_request"
            assert c.subscribed == {"BBCA"} and "BBCA" in c.rows and not c.books
            c.disconnect()
            await until(lambda: c.reconnects == 1 and c.connected)
            assert c.subscribed == {"BBCA"} and c.lost == frozenset()
