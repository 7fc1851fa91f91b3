"""The compact subprotocol against a real gateway: a websockets client asking
for it, decoded with fastfeed.compact, holds the same rows as a v1 client;
fastfeed.client on it holds every row whole, across a dropped connection
(fastfeed.js on it: tests/test_fastfeed_js.py)."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import websockets
from support import Feed, start_gateway, until
from test_client import FAST

from fastfeed import protocol as P
from fastfeed.client import Client, Row
from fastfeed.compact import CompactState, decode_compact_bin
from fastfeed.feed.simulator import symbols
from fastfeed.publisher import Publisher


async def _read(ws, on_update, on_snapshot):
    async for raw in ws:
        if isinstance(raw, bytes):  # fastfeed.v1.compact.bin: an FFC1 frame
            t, rows = decode_compact_bin(raw)
            on_update({"type": "update", "t": t, "rows": rows})
            continue
        msg = json.loads(raw)
        if msg["type"] == "snapshot":
            on_snapshot(msg["rows"])
        elif msg["type"] == "update":
            on_update(msg)


@pytest.mark.parametrize("proto", [P.COMPACT_SUBPROTOCOL, P.COMPACT_BIN_SUBPROTOCOL])
async def test_compact_client_converges_to_v1_rows(proto):
    async with start_gateway("--simulate", "20", "--rate", "2000", "--seed", "7") as g:
        v1: dict[tuple[str, int], list] = {}
        compact: dict[tuple[str, int], list] = {}
        state = CompactState()
        sizes = {"v1": 0, "compact": 0}

        def v1_rows(rows):
            for r in rows:
                v1[(r[0], r[1])] = r

        def v1_update(msg):
            v1_rows(msg["rows"])

        def c_snapshot(rows):
            state.snapshot(rows)
            for r in rows:
                compact[(r[0], r[1])] = list(r)

        def c_update(msg):
            sizes["compact"] += len(msg["rows"])
            for r in state.update(msg):
                compact[(r[0], r[1])] = list(r)

        async with websockets.connect(g.ws_url, subprotocols=[P.JSON_SUBPROTOCOL]) as a, \
                websockets.connect(g.ws_url, subprotocols=[proto]) as b:
            assert b.subprotocol == proto
            syms = symbols(20)
            await a.send(json.dumps({"op": "subscribe", "symbols": syms}))
            await b.send(json.dumps({"op": "subscribe", "symbols": syms}))
            tasks = [asyncio.create_task(_read(a, v1_update, v1_rows)),
                     asyncio.create_task(_read(b, c_update, c_snapshot))]
            try:
                # both saw many of the same (symbol, seq): every one must agree
                await until(lambda: sizes["compact"] > 300
                            and len(v1.keys() & compact.keys()) > 200, timeout=60)
            finally:
                for t in tasks:
                    t.cancel()
        common = v1.keys() & compact.keys()
        assert all(v1[k] == compact[k] for k in common), [
            (v1[k], compact[k]) for k in common if v1[k] != compact[k]][:3]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "bin"])
async def test_the_python_client_on_compact_holds_every_row_across_a_drop(binary):
    """fastfeed.client with compact=True (and binary=True: compact binary
    frames): every row it applies is the whole row
    the source had at that seq, before and after a dropped connection (the
    resume's snapshot leaves out rows it holds: the compact rows after it build
    on them), and it ends on the source's state."""
    feed = Feed(5)
    syms = [f"C{k:02d}" for k in range(12)]
    rng = random.Random(5)
    async with start_gateway() as g, Publisher(g.ingest_url) as p:
        await p.publish(feed.ticks(syms))
        assert await p.sync(10)
        seen: list[Row] = []
        async with Client(g.ws_url, compact=True, binary=binary, backoff=FAST) as c:
            await c.subscribe(syms)
            c.on_update = seen.extend
            for k in range(40):
                await p.publish(feed.ticks(rng.sample(syms, 4)))
                if k == 15:
                    c.disconnect()
                await asyncio.sleep(0.02)
            assert await p.sync(10)
            await until(lambda: c.rows == feed.truth(), 20, what="the source's final rows")
            assert c.reconnects == 1 and c.frames > 10
            assert c.protocol == (P.COMPACT_BIN_SUBPROTOCOL if binary else P.COMPACT_SUBPROTOCOL)
        bad = [r for r in seen if r != feed.history[r.sym][r.seq]]
        assert not bad, bad[:3]


def test_a_bad_compact_binary_frame_is_a_clear_error():
    # FFC1, 1 row, t = 5: the row "AB", mask 0b11 (ts and bid), seq 7, t - ts
    # 3 (zigzag 6), bid 7.0 (the varint 7 * 32 = 224: two bytes)
    good = b"FFC1" + (1).to_bytes(4, "little") + (5).to_bytes(8, "little") + \
        b"\x02AB\x03\x07\x06\xe0\x01"
    assert decode_compact_bin(good) == (5, [["AB", 7, 3, 3, 7.0]])
    for bad in (b"", b"FFB1" + good[4:], good[:-1], good + b"\x00", good[:16] + b"\x40AB"):
        with pytest.raises(ValueError):
            decode_compact_bin(bad)
