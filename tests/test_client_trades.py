"""fastfeed.client and fastfeed.publisher on the trades and bars channels.

The tape and bar store as data structures; the client's requests and resume
against a small scripted server (what it sends: `channels`, `since_trades`;
what it does with a `lost` count it is told); and the whole path through a
real gateway: trades published with `Publisher`, every one of them seen by
the client exactly once and in order across a dropped connection, and its
bars equal to bars computed here from the published trades.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any

import pytest
from support import start_gateway, until
from test_client import scripted
from websockets.asyncio.server import ServerConnection

from fastfeed.client import MARKET, Backoff, Client
from fastfeed.publisher import Publisher, validate_trade
from fastfeed.tape import Bar, BarStore, Tape, Trade, bars_channel

FAST = Backoff(base=0.05, cap=0.2)
T0 = 1_700_000_000_000_000_000


def trade_item(tseq: int, price: float = 100.0, size: float = 100.0, side: str = "b") -> list:
    return [tseq, T0 + tseq, price, size, side]


# ------------------------------------------------------------------ the data structures


def test_the_tape_takes_each_trade_once_in_order_and_counts_lost() -> None:
    lost: list[tuple[str, int]] = []
    got: list[Trade] = []
    tape = Tape(3, on_trades=got.extend, on_lost=lambda s, n: lost.append((s, n)))
    mine = {"BBCA"}.__contains__
    tape.apply([{"sym": "BBCA", "recent": [trade_item(1), trade_item(2)]}], "recent", mine)
    # an update overlapping what is held (a resume): only the new ones
    tape.apply([{"sym": "BBCA", "items": [trade_item(2), trade_item(3)]}], "items", mine)
    tape.apply([{"sym": "BBCA", "lost": 4, "items": [trade_item(8)]},
                {"sym": "TLKM", "items": [trade_item(1)]}], "items", mine)
    assert [t.tseq for t in got] == [1, 2, 3, 8]
    assert [t.tseq for t in tape.trades["BBCA"]] == [2, 3, 8]  # bounded: the last 3
    assert "TLKM" not in tape.trades  # not subscribed
    assert tape.lost == {"BBCA": 4} and lost == [("BBCA", 4)]
    assert tape.since(["BBCA", "TLKM"]) == {"BBCA": 8}
    assert got[-1] == Trade("BBCA", 8, T0 + 8, 100.0, 100.0, "b")


def test_the_market_tape_keeps_every_symbol_in_arrival_order() -> None:
    tape = Tape(10)
    own = {"BBCA", MARKET}.__contains__
    tape.apply([{"sym": MARKET, "items": [["BBCA", *trade_item(1)], ["TLKM", *trade_item(7)]]},
                {"sym": "BBCA", "items": [trade_item(1)]}], "items", own)
    tape.apply([{"sym": MARKET, "lost": 5, "items": [["ASII", *trade_item(3)]]}], "items", own)
    assert [(t.sym, t.tseq) for t in tape.trades[MARKET]] == [
        ("BBCA", 1), ("TLKM", 7), ("ASII", 3)]
    assert [t.tseq for t in tape.trades["BBCA"]] == [1]  # its own tape as well
    assert "TLKM" not in tape.trades  # on the market tape only
    assert tape.lost == {MARKET: 5}
    # a resubscribe gets the gateway's ring again: what is held is skipped,
    # and a symbol whose trades jump (TLKM 7 -> 10) lost the ones between
    tape.apply([{"sym": MARKET, "recent": [["TLKM", *trade_item(7)], ["ASII", *trade_item(3)],
                                           ["TLKM", *trade_item(10)]]}], "recent", own)
    assert [(t.sym, t.tseq) for t in tape.trades[MARKET]][-1:] == [("TLKM", 10)]
    assert tape.lost == {MARKET: 7}


def test_bars_replace_the_forming_bar_insert_late_ones_and_stay_bounded() -> None:
    store = BarStore(3)
    ok = lambda sym, iv: True  # noqa: E731
    bar = lambda start, close: [start, 1.0, 3.0, 0.5, close, 100.0, 1]  # noqa: E731
    store.apply([{"sym": "BBCA", "interval": "1m", "bars": [bar(60, 1.0), bar(120, 2.0)]}], ok)
    store.apply([{"sym": "BBCA", "interval": "1m", "bars": [bar(120, 2.5)]}], ok)  # forming
    store.apply([{"sym": "BBCA", "interval": "1m", "bars": [bar(0, 9.0)]}], ok)  # late
    assert [(b.start, b.close) for b in store.bars[("BBCA", "1m")]] == [
        (0, 9.0), (60, 1.0), (120, 2.5)]
    store.apply([{"sym": "BBCA", "interval": "1m", "bars": [bar(180, 4.0)]}], ok)
    assert [b.start for b in store.bars[("BBCA", "1m")]] == [60, 120, 180]
    assert store.bars[("BBCA", "1m")][-1] == Bar(180, 1.0, 3.0, 0.5, 4.0, 100.0, 1)
    with pytest.raises(ValueError, match="unknown bar interval"):
        bars_channel("2m")


@pytest.mark.parametrize(("trade", "why"), [
    ({"sym": "BBCA", "tseq": 0, "ts": 1, "price": 1.0, "size": 1.0}, "tseq"),
    ({"sym": "BBCA", "tseq": 1, "ts": 1, "price": float("nan"), "size": 1.0}, "price"),
    ({"sym": "BBCA", "tseq": 1, "ts": 1, "price": 1.0, "size": -1.0}, "size"),
    ({"sym": "BBCA", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0, "side": "x"}, "side"),
    ({"sym": "no way", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0}, "symbol"),
    ({"sym": "BBCA", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0, "px": 2}, "unknown"),
    ({"type": "book", "sym": "BBCA", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0}, "type"),
])
def test_the_publisher_refuses_a_bad_trade_by_name(trade: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validate_trade(trade)


# the scripted server is test_client's: `scripted(handler)` yields its URL and
# what each connection asked


async def test_resumes_the_tape_with_since_trades_and_reports_what_was_lost() -> None:
    """First connection: trades 1..3 then a drop. The resume asks for what
    came after 3 and is told 2 were lost before 6: the tape holds 1, 2, 3, 6
    and `trades_lost` says 2."""
    lost: list[tuple[str, int]] = []

    async def gateway(ws: ServerConnection, n: int) -> None:
        req = json.loads(await ws.recv())
        seen[n].append(req)
        if n == 0:
            await ws.send(json.dumps({"type": "snapshot", "id": req["id"], "rows": [],
                                      "trades": [{"sym": "BBCA", "recent": [trade_item(1)]}],
                                      "bars": [{"sym": "BBCA", "interval": "1m",
                                                "bars": [[0, 1, 1, 1, 1, 100, 1]]}],
                                      "unknown": []}))
            await ws.send(json.dumps({"type": "update", "t": T0, "rows": [],
                                      "trades": [{"sym": "BBCA",
                                                  "items": [trade_item(2), trade_item(3)]}]}))
            await ws.recv()  # the client's next request (a ping) never gets an answer
            ws.transport.abort()
            return
        while True:  # the resume: the symbol with its channels
            if req["op"] != "subscribe":
                await ws.send(json.dumps({"type": "pong", "id": req["id"], "ts": T0}))
            elif "trades" in req["channels"]:
                await ws.send(json.dumps({"type": "snapshot", "id": req["id"], "rows": [],
                                          "trades": [{"sym": "BBCA", "lost": 2,
                                                      "recent": [trade_item(6)]}],
                                          "unknown": []}))
            else:
                await ws.send(json.dumps({"type": "snapshot", "id": req["id"], "rows": [],
                                          "unknown": []}))
            req = json.loads(await ws.recv())
            seen[n].append(req)

    async with scripted(gateway) as (url, seen), Client(
            url, backoff=FAST, on_lost=lambda s, k: lost.append((s, k))) as c:
        assert await c.subscribe(["BBCA"], channels=["trades", "bars:1m"]) == []
        await until(lambda: len(c.trades.get("BBCA", ())) == 3, what="the first trades")
        assert c.bars[("BBCA", "1m")] == [Bar(0, 1, 1, 1, 1, 100, 1)]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.ping(), 1.0)
        await until(lambda: c.reconnects >= 1 and c.connected, what="resumed")
        await until(lambda: [t.tseq for t in c.trades["BBCA"]] == [1, 2, 3, 6],
                    what="the resume's trades")
        assert c.trades_lost == {"BBCA": 2} and lost == [("BBCA", 2)]
    first = seen[0][0]
    assert first == {"op": "subscribe", "symbols": ["BBCA"], "channels": ["bars:1m", "trades"],
                     "id": first["id"]}
    # the resume asks for the symbol's channels again, the trades only after what it holds
    resume = [{k: v for k, v in r.items() if k != "id"} for r in seen[1]]
    assert resume[:1] == [
        {"op": "subscribe", "symbols": ["BBCA"], "channels": ["bars:1m", "trades"],
         "since_trades": {"BBCA": 3}},
    ]


# ------------------------------------------------------------------ a real gateway


def bars_of(trades: list[dict[str, Any]], interval_ns: int) -> list[Bar]:
    """The contract's bars, computed from the published trades (tseq order)."""
    out: dict[int, list] = {}
    for t in sorted(trades, key=lambda t: t["tseq"]):
        start = t["ts"] // interval_ns * interval_ns
        b = out.get(start)
        if b is None:
            out[start] = [start, t["price"], t["price"], t["price"], t["price"], t["size"], 1]
        else:
            b[2] = max(b[2], t["price"])
            b[3] = min(b[3], t["price"])
            b[4] = t["price"]
            b[5] += t["size"]
            b[6] += 1
    return [Bar(*out[k]) for k in sorted(out)]


class Trades:
    """Trades for /ingest with consecutive tseq per symbol, and the truth."""

    def __init__(self, syms: list[str]) -> None:
        self.rng = random.Random(5)
        self.tseq = dict.fromkeys(syms, 0)
        self.sent: dict[str, list[dict[str, Any]]] = {s: [] for s in syms}
        self.order: list[dict[str, Any]] = []  # every symbol's, in publish order

    def make(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            s = self.rng.choice(list(self.tseq))
            self.tseq[s] += 1
            t = {"type": "trade", "sym": s, "tseq": self.tseq[s], "ts": time.time_ns(),
                 "price": float(self.rng.randrange(900, 1100) * 5),
                 "size": 100.0 * self.rng.randrange(1, 50), "side": self.rng.choice("bs")}
            self.sent[s].append(t)
            self.order.append(t)
            out.append(t)
        return out


async def test_every_published_trade_reaches_the_client_once_across_a_drop() -> None:
    syms = ["BBCA", "BBRI", "TLKM"]
    feed = Trades(syms)
    async with (
        start_gateway() as gw,
        Publisher(gw.ingest_url, backoff=FAST) as pub,
    ):
        await pub.publish([{"sym": s, "seq": 1, "bid": 1.0, "ask": 2.0} for s in syms])
        await pub.publish_trades(feed.make(30))
        assert await pub.sync(10)
        async with Client(gw.ws_url, backoff=FAST, tape_size=10_000) as c:
            assert await c.subscribe(syms, channels=["trades", "bars:1s", "quote"]) == []
            await until(lambda: all(len(c.trades.get(s, ())) == feed.tseq[s] for s in syms),
                        what="the snapshot's trades")
            for _ in range(5):
                await pub.publish_trades(feed.make(40))
            c.disconnect()  # the network fails; trades keep coming meanwhile
            await pub.publish_trades(feed.make(40))
            assert await pub.sync(10)
            await until(lambda: all(len(c.trades.get(s, ())) == feed.tseq[s] for s in syms),
                        timeout=30, what="every trade, after the resume")
            assert c.reconnects >= 1
            for s in syms:
                got = [t.tseq for t in c.trades[s]]
                assert got == list(range(1, feed.tseq[s] + 1)), s  # once each, in order
                assert c.trades_lost.get(s, 0) == 0
                want = bars_of(feed.sent[s], 1_000_000_000)
                await until(lambda s=s, want=want: c.bars.get((s, "1s"), [])[-len(want):]
                            == want, what=f"{s}'s bars")
