"""Order books in front of a gateway that does not serve them yet.

A WebSocket proxy for the frame-budget bench (`--ladder --book-standin`):
the page talks to it as to the gateway; it passes everything through, and
serves the "book" channel itself. The book of each symbol subscribed with
"book" follows that symbol's quote rows from the gateway, through the
simulator's book generator (`fastfeed.feed.bookgen.BookGen`: IDX price
fractions, lots, churn near the top, sweeps), and its changes ride in the
same update frames as the rows, as contract entries (price-keyed changes,
levels coming into view, checksum). So the page does the work it will do
against a gateway serving books, at the simulator's rate.

    python -m bench.book_standin http://127.0.0.1:8080 --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection, serve

from fastfeed.feed.bookgen import BookGen
from fastfeed.orderbook import book_checksum
from fastfeed.protocol import BOOK_CHANNEL, BOOK_DEPTH

__all__ = ["BookStandIn", "running_standin"]


class _Book:
    """A gateway's copy of one book: every level, the best `depth` served."""

    def __init__(self, sym: str) -> None:
        self.sym = sym
        self.seq = 0
        self.side: dict[str, dict[float, list[Any]]] = {"bids": {}, "asks": {}}

    def view(self, key: str) -> list[list[Any]]:
        lv = sorted(self.side[key].values(), key=(lambda x: -x[0]) if key == "bids" else
                    (lambda x: x[0]))
        return lv[:BOOK_DEPTH]

    def apply(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Apply an ingest message; the update entry that brings a client along."""
        before = {k: self.view(k) for k in self.side}
        if msg["full"]:
            self.side = {"bids": {}, "asks": {}}
        for key in self.side:
            for p, v, o in msg[key]:
                if v == 0:
                    self.side[key].pop(p, None)
                else:
                    self.side[key][p] = [p, v, o]
        self.seq = msg["seq"]
        out: dict[str, Any] = {"sym": self.sym, "seq": self.seq}
        for key in self.side:
            after = self.view(key)
            now = {lv[0] for lv in after}
            old = {lv[0]: lv for lv in before[key]}
            out[key] = ([[p, 0.0, 0] for p in old if p not in now]
                        + [lv for lv in after if old.get(lv[0]) != lv])
        out["checksum"] = book_checksum(self.view("bids"), self.view("asks"))
        return out

    def snapshot(self) -> dict[str, Any]:
        bids, asks = self.view("bids"), self.view("asks")
        return {"sym": self.sym, "seq": self.seq, "bids": bids, "asks": asks,
                "checksum": book_checksum(bids, asks)}


class _Conn:
    def __init__(self) -> None:
        self.books: dict[str, tuple[BookGen, _Book]] = {}
        self.snap_ids: dict[Any, list[str]] = {}  # subscribe ids whose snapshot gets books

    def book(self, sym: str) -> None:
        if sym not in self.books:
            self.books[sym] = (BookGen([sym], seed=7, seq0=1), _Book(sym))

    def step(self, sym: str, row: list[Any]) -> dict[str, Any] | None:
        gen, book = self.books[sym]
        vals = np.array([row[3:10]], dtype=np.float64)
        msgs = gen.step(np.zeros(1, np.int32), np.array([row[1]]), np.array([row[2]]), vals)
        return book.apply(msgs[0]) if msgs else None


class BookStandIn:
    """The proxy (see the module): `upstream` is the gateway's ws:// URL of /ws."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    async def handle(self, ws: ServerConnection) -> None:
        conn = _Conn()
        proto = ws.subprotocol or "fastfeed.v1.json"
        async with websockets.connect(self.upstream, subprotocols=[proto],  # type: ignore[list-item]
                                      max_size=None) as up:
            down_task = asyncio.ensure_future(self._down(up, ws, conn))
            try:
                async for raw in ws:
                    out = self._up(raw, conn)
                    if out is None:
                        continue
                    if isinstance(out, dict):  # answered here
                        await ws.send(json.dumps(out))
                    else:
                        await up.send(out)
            except websockets.ConnectionClosed:
                pass
            finally:
                down_task.cancel()

    def _up(self, raw: Any, conn: _Conn) -> Any:
        """A client request: passed on (without the book channel), or answered."""
        try:
            msg = json.loads(raw)
        except ValueError:
            return raw
        chans = msg.get("channels") if isinstance(msg, dict) else None
        if not isinstance(chans, list):
            return raw
        op, syms = msg.get("op"), msg.get("symbols") or []
        rest = [c for c in chans if c != BOOK_CHANNEL]
        if BOOK_CHANNEL in chans:
            if op == "subscribe":
                for s in syms:
                    conn.book(s)  # empty until its first quote row
                conn.snap_ids[msg.get("id")] = list(syms)
            elif op == "unsubscribe":
                for s in syms:
                    conn.books.pop(s, None)
        if rest:
            msg = {k: v for k, v in msg.items() if k != "channels"}
            return json.dumps(msg)
        rid = msg.get("id")
        if op == "subscribe":
            conn.snap_ids.pop(rid, None)
            return {"type": "snapshot", "id": rid, "rows": [], "unknown": [],
                    "books": [conn.books[s][1].snapshot() for s in syms if s in conn.books]}
        return {"type": "ack", "id": rid, "op": op, "symbols": syms}

    async def _down(self, up: Any, ws: ServerConnection, conn: _Conn) -> None:
        """Frames from the gateway, passed on as they are; an update holding
        a row of a book's symbol gets that book's entry spliced in. Only that
        row is parsed, so the stand-in costs about the same with a book open
        as without (the bench compares the two)."""
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in up:
                if isinstance(raw, str) and conn.books and raw.startswith('{"type":"update"'):
                    entries = []
                    for sym in conn.books:
                        at = raw.find(f'["{sym}",')
                        if at >= 0:
                            e = conn.step(sym, json.loads(raw[at:raw.index("]", at) + 1]))
                            if e is not None:
                                entries.append(e)
                    if entries:
                        raw = f'{raw[:-1]},"books":{dumps(entries)}}}'
                elif (isinstance(raw, str) and conn.snap_ids
                      and raw.startswith('{"type":"snapshot"')):
                    msg = json.loads(raw)
                    syms = conn.snap_ids.pop(msg.get("id"), None)
                    if syms is not None:
                        msg["books"] = [conn.books[s][1].snapshot() for s in syms
                                        if s in conn.books]
                        raw = dumps(msg)
                await ws.send(raw)


@contextlib.contextmanager
def running_standin(base: str, port: int = 0) -> Iterator[str]:
    """The stand-in in a thread of its own, in front of the gateway at `base`
    (http://host:port); yields the ws:// URL to give the page as ``?ws=``."""
    standin = BookStandIn(base.replace("http", "ws", 1) + "/ws")
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    started = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with serve(standin.handle, "127.0.0.1", port, max_size=None,
                         select_subprotocol=lambda c, offered: offered[0] if offered else None
                         ) as srv:
            ready.append(f"ws://127.0.0.1:{next(iter(srv.sockets)).getsockname()[1]}/ws")
            started.set()
            await stop

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    if not started.wait(10):
        raise RuntimeError("the book stand-in did not start")
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(lambda: stop is not None and stop.set_result(None))
        t.join(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gateway", help="the gateway, http://host:port")
    ap.add_argument("--port", type=int, default=8090)
    args = ap.parse_args(argv)
    with running_standin(args.gateway, args.port) as url:
        print(f"books for {args.gateway} at {url}", flush=True)
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
