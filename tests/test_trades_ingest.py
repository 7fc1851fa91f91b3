"""Trades into a running gateway through /ingest, as a publisher sends them.

A real `fastfeed serve` process and the `websockets` library: JSON messages
mixing quotes and trades, and binary FTR1 batches. Every bad trade gets an
error naming its index and why; the good ones and the quotes beside them
apply; a trade makes its symbol known.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct

import pytest
import websockets
from support import running_gateway

from fastfeed import _core


@pytest.fixture(scope="module")
def gw():
    with running_gateway() as g:
        yield g


def trade(sym: str, tseq: int, **kw) -> dict:
    return {"type": "trade", "sym": sym, "tseq": tseq, "ts": 1_772_384_400_000_000_000 + tseq,
            "price": 9125.0, "size": 500.0, "side": "b", **kw}


async def errors_until_quiet(pub, want: int) -> list[dict]:
    out = []
    while len(out) < want:
        out.append(json.loads(await asyncio.wait_for(pub.recv(), 10)))
    return out


async def known(gw, syms: list[str]) -> list[str]:
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == "snapshot":
                return sorted(set(syms) - set(msg.get("unknown", [])))


async def test_bad_trades_are_named_and_the_rest_of_the_message_applies(gw):
    msg = [trade("TRDA", 1),
           trade("TRDB", 1, size=-5.0),
           {"sym": "QTE", "seq": 1, "last": 10.0},
           trade("TRDC", 1, side="buy"),
           {"type": "candle", "sym": "CNDX", "seq": 1},
           trade("TRDD", 1, price="9125"),
           trade("TRDA", 1),                # stale: not above the held tseq, no error
           trade("TRDE", 2)]
    async with websockets.connect(gw.ingest_url) as pub:
        # NaN is not JSON: a publisher cannot send one in JSON, only in a batch
        await pub.send(json.dumps(msg))
        errs = await errors_until_quiet(pub, 4)
        assert [(e["code"], e["index"]) for e in errs] == [
            ("bad_request", 1), ("bad_request", 3), ("bad_request", 4), ("bad_request", 5)]
        assert "negative" in errs[0]["message"] and "side" in errs[1]["message"]
        assert "unknown type 'candle'" in errs[2]["message"]
        assert errs[0]["symbols"] == ["TRDB"]
    assert await known(gw, ["TRDA", "TRDB", "TRDC", "TRDE", "QTE", "CNDX"]) == \
        ["QTE", "TRDA", "TRDE"]


async def test_a_binary_trade_batch_applies_and_counts_the_refused(gw):
    good, errors = _core.encode_trade_batch([trade("BINA", 1), trade("BINB", 1)])
    assert errors == []
    # a batch whose first trade has a NaN price (JSON cannot carry one)
    two, _ = _core.encode_trade_batch([trade("BINC", 1), trade("BIND", 1)])
    price_at = 8 + 1 + len("BINC") + 16
    bad = two[:price_at] + struct.pack("<d", math.nan) + two[price_at + 8:]
    async with websockets.connect(gw.ingest_url) as pub:
        await pub.send(good)
        await pub.send(bad)
        err = json.loads(await asyncio.wait_for(pub.recv(), 10))
        assert err["code"] == "bad_request" and "1 ticks or trades" in err["message"]
        await pub.send(b"FTR1\x05\x00\x00\x00\x04")
        err = json.loads(await asyncio.wait_for(pub.recv(), 10))
        assert err["code"] == "bad_request" and "truncated" in err["message"]
    assert await known(gw, ["BINA", "BINB", "BINC", "BIND"]) == ["BINA", "BINB", "BIND"]
