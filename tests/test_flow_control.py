"""A client that stops reading is conflated, never queued, and closed only past the stall limit."""

from __future__ import annotations

import asyncio
import json
import time

import websockets
from fixtures import rss_kib
from support import start_gateway
from wsraw import RawWS

SYMS = [f"FC{k}" for k in range(200)]


async def flood(g, seconds: float, start_seq: int) -> int:
    """Publish fat ticks for every symbol as fast as the gateway takes them; returns last seq."""
    seq = start_seq
    async with websockets.connect(g.ingest_url, max_size=None) as pub:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            seq += 1
            await pub.send(json.dumps([
                {"sym": s, "seq": seq, "ts": time.time_ns(), "bid": seq + 0.25, "ask": seq + 0.5,
                 "last": seq + 0.75, "volume": seq * 100.0} for s in SYMS]))
            await asyncio.sleep(0.002)
    return seq


async def stalled_reader(g) -> RawWS:
    """A client that subscribes to every symbol and then reads nothing.

    The instruments must exist first (a subscription to unknown symbols is
    empty); a small receive window makes "not reading" bite at once.
    """
    await flood(g, 0.1, 0)
    slow = await RawWS.connect(g.port, limit=2**16, rcvbuf=4096)
    slow.send_text(json.dumps({"op": "subscribe", "symbols": SYMS}))
    return slow


async def test_stalled_reader_costs_bounded_memory_and_converges_when_it_reads():
    async with start_gateway("--high-water-bytes", "65536", "--stall-s", "60") as g:
        slow = await stalled_reader(g)
        # the kernel buffers fill first; then the server must conflate
        await flood(g, 3.0, 1000)
        rss_mid = rss_kib(g.proc.pid)
        last = await flood(g, 4.0, 100_000)
        rss_end = rss_kib(g.proc.pid)
        # tens of MB of updates were produced for this client while it read nothing;
        # the server holds at most its socket buffer plus one frame
        assert rss_end - rss_mid < 16 * 1024, (rss_mid, rss_end)
        # an attentive client meanwhile kept getting fresh frames
        async with websockets.connect(g.ws_url) as fast:
            await fast.send(json.dumps({"op": "subscribe", "symbols": SYMS[:5]}))
            assert json.loads(await fast.recv())["type"] == "snapshot"
        # the stalled client now reads everything: its final view is the true latest state
        latest: dict[str, list] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _op, data = await slow.recv_frame(timeout=10)
            msg = json.loads(data)
            for row in msg.get("rows", []):
                latest[row[0]] = row
            if len(latest) == len(SYMS) and all(r[1] == last for r in latest.values()):
                break
        assert {s: r[1] for s, r in latest.items()} == {s: last for s in SYMS}
        assert latest["FC7"][3:6] == [last + 0.25, last + 0.5, last + 0.75]
        slow.close()


async def test_client_stuck_past_the_stall_limit_is_closed_1008():
    async with start_gateway("--high-water-bytes", "16384", "--stall-s", "1") as g:
        slow = await stalled_reader(g)
        await flood(g, 3.0, 10)
        code = await slow.recv_close(timeout=30)
        assert code == 1008
        slow.close()
