"""Python `websockets` peer: what a Python team would write first.

Holds the latest row per instrument, takes ticks on /ingest (JSON array of
tick objects), serves /ws with subscribe -> snapshot, then one update frame per
tick, sent with `websockets.broadcast` to the instrument's subscribers.
Order books (the "book" channel): keeps every level of each book, takes
`{"type":"book",...}` on /ingest, answers a subscribe with channels
["book"] with the books, then broadcasts every applied book message as its
own update frame to the book's subscribers. Trades (the "trades" channel):
takes `{"type":"trade",...}` on /ingest (a `tseq` not above the last
dropped), keeps the last 100 per instrument for the snapshot's "recent", and
broadcasts every trade as its own update frame.

Best settings: uvloop when installed, permessage-deflate off (the other peers
do not compress either).

    python py_websockets.py PORT     (or PORT env)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import deque

from websockets import broadcast
from websockets.asyncio.server import ServerConnection, serve

FIELDS = ["sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume"]
SYM_RE = re.compile(r"^[A-Za-z0-9._\-:/]{1,32}$")
_dumps = json.JSONEncoder(separators=(",", ":")).encode

rows: dict[str, list] = {}
subs: dict[str, set[ServerConnection]] = {}
# sym -> [seq, {price: level} bids, {price: level} asks]
books: dict[str, list] = {}
book_subs: dict[str, set[ServerConnection]] = {}
# sym -> [last tseq, deque of [tseq, ts, price, size, side]]
trades: dict[str, list] = {}
trade_subs: dict[str, set[ServerConnection]] = {}
TRADE_RING = 100


def apply_tick(tick: dict, t: int) -> None:
    sym = tick.get("sym")
    seq = tick.get("seq")
    if not isinstance(sym, str) or not isinstance(seq, int) or not SYM_RE.match(sym):
        return
    row = rows.get(sym)
    if row is None:
        row = rows[sym] = [sym, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    elif seq <= row[1]:
        return  # stale
    for i in range(1, 10):
        v = tick.get(FIELDS[i])
        if v is not None:
            row[i] = v
    clients = subs.get(sym)
    if clients:
        broadcast(clients, f'{{"type":"update","t":{t},"rows":[{_dumps(row)}]}}')


def apply_book(msg: dict, t: int) -> None:
    sym = msg.get("sym")
    seq = msg.get("seq")
    if not isinstance(sym, str) or not isinstance(seq, int) or not SYM_RE.match(sym):
        return
    book = books.get(sym)
    if book is None:
        book = books[sym] = [0, {}, {}]
    elif seq <= book[0]:
        return  # stale
    full = msg.get("full") is True
    if full:
        book[1].clear()
        book[2].clear()
    for k, side in ((1, "bids"), (2, "asks")):
        held = book[k]
        for lv in msg.get(side) or ():
            if lv[1] == 0:
                held.pop(lv[0], None)
            else:
                held[lv[0]] = [lv[0], lv[1], lv[2] if len(lv) > 2 else 0]
    book[0] = seq
    clients = book_subs.get(sym)
    if clients:
        entry = {"sym": sym, "seq": seq, "bids": msg.get("bids") or [],
                 "asks": msg.get("asks") or []}
        if full:
            entry["full"] = True
        broadcast(clients, f'{{"type":"update","t":{t},"rows":[],"books":[{_dumps(entry)}]}}')


def book_view(sym: str, book: list) -> dict:
    return {"sym": sym, "seq": book[0], "bids": sorted(book[1].values(), key=lambda x: -x[0]),
            "asks": sorted(book[2].values(), key=lambda x: x[0])}


def apply_trade(msg: dict, t: int) -> None:
    sym = msg.get("sym")
    tseq = msg.get("tseq")
    if not isinstance(sym, str) or not isinstance(tseq, int) or not SYM_RE.match(sym):
        return
    held = trades.get(sym)
    if held is None:
        held = trades[sym] = [0, deque(maxlen=TRADE_RING)]
    elif tseq <= held[0]:
        return  # stale
    item = [tseq, msg.get("ts"), msg.get("price"), msg.get("size"), msg.get("side") or ""]
    held[0] = tseq
    held[1].append(item)
    clients = trade_subs.get(sym)
    if clients:
        broadcast(clients, f'{{"type":"update","t":{t},"rows":[],"trades":[{{"sym":'
                           f'{_dumps(sym)},"items":[{_dumps(item)}]}}]}}')


def apply(msg: dict, t: int) -> None:
    if msg.get("type") == "book":
        apply_book(msg, t)
    elif msg.get("type") == "trade":
        apply_trade(msg, t)
    else:
        apply_tick(msg, t)


def ingest(text: str | bytes) -> None:
    try:
        msg = json.loads(text)
    except ValueError:
        return
    t = time.time_ns()
    if isinstance(msg, list):
        for m in msg:
            if isinstance(m, dict):
                apply(m, t)
    elif isinstance(msg, dict):
        apply(msg, t)


async def client(ws: ServerConnection) -> None:
    mine: set[str] = set()
    mine_books: set[str] = set()
    mine_trades: set[str] = set()
    try:
        async for text in ws:
            try:
                req = json.loads(text)
            except ValueError:
                continue
            if not isinstance(req, dict):
                continue
            rid = req.get("id")
            op = req.get("op")
            syms = [s for s in req.get("symbols") or [] if isinstance(s, str)]
            chans = req.get("channels")
            if op == "subscribe" and isinstance(chans, list) and "trades" in chans:
                entries, unknown = [], []
                for s in syms:
                    held = trades.get(s)
                    if held is None and s not in rows:
                        unknown.append(s)
                    elif s not in mine_trades:
                        mine_trades.add(s)
                        trade_subs.setdefault(s, set()).add(ws)
                        entries.append({"sym": s, "recent": list(held[1]) if held else []})
                await ws.send(_dumps({"type": "snapshot", "id": rid, "rows": [],
                                      "trades": entries, "unknown": unknown}))
            elif op == "subscribe" and isinstance(chans, list) and "book" in chans:
                got, unknown = [], []
                for s in syms:
                    book = books.get(s)
                    if book is None:
                        unknown.append(s)
                    elif s not in mine_books:
                        mine_books.add(s)
                        book_subs.setdefault(s, set()).add(ws)
                        got.append(book_view(s, book))
                await ws.send(_dumps({"type": "snapshot", "id": rid, "rows": [], "books": got,
                                      "unknown": unknown}))
            elif op == "subscribe":
                out, unknown = [], []
                for s in syms:
                    row = rows.get(s)
                    if row is None:
                        unknown.append(s)
                    elif s not in mine:
                        mine.add(s)
                        subs.setdefault(s, set()).add(ws)
                        out.append(row)
                await ws.send(_dumps({"type": "snapshot", "id": rid, "fields": FIELDS,
                                      "rows": out, "unknown": unknown}))
            elif op == "unsubscribe":
                for s in syms:
                    mine.discard(s)
                    subs.get(s, set()).discard(ws)
                    mine_books.discard(s)
                    book_subs.get(s, set()).discard(ws)
                    mine_trades.discard(s)
                    trade_subs.get(s, set()).discard(ws)
                await ws.send(_dumps({"type": "ack", "id": rid, "op": op, "symbols": syms}))
            elif op in ("watch", "unwatch"):
                await ws.send(_dumps({"type": "ack", "id": rid, "op": op, "symbols": syms}))
            elif op == "ping":
                await ws.send(_dumps({"type": "pong", "id": rid, "ts": time.time_ns()}))
            else:
                await ws.send(_dumps({"type": "error", "id": rid, "code": "unknown_op",
                                      "message": str(op)}))
    finally:
        for s in mine:
            subs.get(s, set()).discard(ws)
        for s in mine_books:
            book_subs.get(s, set()).discard(ws)
        for s in mine_trades:
            trade_subs.get(s, set()).discard(ws)


async def publisher(ws: ServerConnection) -> None:
    async for text in ws:
        ingest(text)


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path.split("?")[0]
    if path == "/ingest":
        await publisher(ws)
    else:
        await client(ws)


def process_request(ws: ServerConnection, request):
    path = request.path.split("?")[0]
    if path == "/healthz":
        return ws.respond(200, "ok\n")
    if path not in ("/ws", "/ingest"):
        return ws.respond(404, "not found\n")
    return None


async def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8083"))
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=64 * 1024 * 1024,
                     process_request=process_request, max_queue=None, ping_interval=None):
        print(f"py_websockets listening on {port}", flush=True)
        await stop


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
