"""Bytes per instrument-update on the wire: compact subprotocol vs v1 JSON.

Runs a real gateway with its simulated feed, one v1 client and one compact
client subscribed to every instrument, and counts the update frames' bytes
and rows each receives over the same window. Usage:

    python -m bench.compact_bytes --instruments 50 --rate 100000 --secs 5 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import websockets

from fastfeed import protocol as P
from fastfeed.feed.simulator import symbols


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
            msg = json.loads(raw)
            if msg["type"] == "update" and stop[1] <= time.monotonic():
                out[0] += len(raw.encode() if isinstance(raw, str) else raw)
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
        v1, cp = [0, 0], [0, 0]
        await asyncio.gather(_count(url, P.JSON_SUBPROTOCOL, syms, stop, v1),
                             _count(url, P.COMPACT_SUBPROTOCOL, syms, stop, cp))
        return v1[0] / max(v1[1], 1), cp[0] / max(cp[1], 1)
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
    v1 = statistics.median(r[0] for r in runs)
    cp = statistics.median(r[1] for r in runs)
    print(f"bytes per instrument-update (median of {args.repeats}): v1 JSON {v1:.1f}, "
          f"compact {cp:.1f}, compact/v1 {100 * cp / v1:.1f} %")


if __name__ == "__main__":
    main()
