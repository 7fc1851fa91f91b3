"""Python `websockets` peer: what a Python team would write first.

Holds the latest row per instrument, takes ticks on /ingest (JSON array of
tick objects), serves /ws with subscribe -> snapshot, then one update frame per
tick, sent with `websockets.broadcast` to the instrument's subscribers.

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

from websockets import broadcast
from websockets.asyncio.server import ServerConnection, serve

FIELDS = ["sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume"]
SYM_RE = re.compile(r"^[A-Za-z0-9._\-:/]{1,32}$")
_dumps = json.JSONEncoder(separators=(",", ":")).encode

rows: dict[str, list] = {}
subs: dict[str, set[ServerConnection]] = {}


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


def ingest(text: str | bytes) -> None:
    try:
        msg = json.loads(text)
    except ValueError:
        return
    t = time.time_ns()
    if isinstance(msg, list):
        for tick in msg:
            if isinstance(tick, dict):
                apply_tick(tick, t)
    elif isinstance(msg, dict):
        apply_tick(msg, t)


async def client(ws: ServerConnection) -> None:
    mine: set[str] = set()
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
            if op == "subscribe":
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
