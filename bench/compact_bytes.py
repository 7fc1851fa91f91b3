"""Bytes per instrument-update on the wire: the compact subprotocols vs v1 JSON.

Runs a real gateway with its simulated feed and one client per subprotocol
(v1 JSON, v1 binary, compact JSON, compact binary) subscribed to every
instrument, and counts the update frames' bytes (WebSocket payloads) and rows
each receives over the same window. Usage:

    python -m bench.compact_bytes --instruments 50 --rate 100000 --secs 5 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request

import websockets

from fastfeed import protocol as P
from fastfeed.feed.simulator import symbols

SUBS = (P.JSON_SUBPROTOCOL, P.BIN_SUBPROTOCOL, P.COMPACT_SUBPROTOCOL, P.COMPACT_BIN_SUBPROTOCOL)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _count(url, sub, syms, stop, out):
    async with websockets.connect(url, subprotocols=[sub], max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
        while time.monotonic() < stop[0]:
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if stop[1] > time.monotonic():
                continue
            if isinstance(raw, bytes):  # FFB1 / FFC1: the row count is in the header
                out[0] += len(raw)
                out[1] += struct.unpack_from("<I", raw, 4)[0]
                continue
            msg = json.loads(raw)
            if msg["type"] == "update":
                out[0] += len(raw.encode())
                out[1] += len(msg["rows"])


async def one(args) -> tuple[float, float]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "fastfeed", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--simulate", str(args.instruments),
                             "--rate", str(args.rate), "--seed", "1"],
                            env={**os.environ, "FASTFEED_LOG_LEVEL": "warning"})
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                await asyncio.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/ws"
        syms = symbols(args.instruments)
        now = time.monotonic()
        stop = [now + 1 + args.secs, now + 1]  # one second of warm-up
        counts = {sub: [0, 0] for sub in SUBS}
        await asyncio.gather(*(_count(url, sub, syms, stop, counts[sub]) for sub in SUBS))
        return {sub: b / max(n, 1) for sub, (b, n) in counts.items()}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instruments", type=int, default=50)
    ap.add_argument("--rate", type=float, default=100_000)
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = [asyncio.run(one(args)) for _ in range(args.repeats)]
    per = {sub: statistics.median(r[sub] for r in runs) for sub in SUBS}
    v1 = per[P.JSON_SUBPROTOCOL]
    print(f"bytes per instrument-update, medians of {args.repeats} "
          f"({args.instruments} instruments, {args.rate:g} ticks/s):")
    for sub, b in per.items():
        print(f"  {sub:26s} {b:6.1f}  {100 * b / v1:5.1f} % of v1 JSON")


if __name__ == "__main__":
    main()
