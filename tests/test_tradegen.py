"""The simulated trades agree with the simulated quotes (fastfeed.feed.tradegen).

A pure-Python replay of every trade, one at a time, against the top of book
the quotes showed: each trade is at the best ask (buyer) or the best bid
(seller), for whole lots no larger than the level, consuming it; tseq is
consecutive and ts never goes back per instrument; the quotes sent after
the trades carry the last trade's price and size and the summed volume.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastfeed.feed.simulator import Simulator, SimulatorSource, tick_size
from fastfeed.feed.tradegen import LOT, SIDES, TradeBatch, TradeGen, idx_tick, trades_to_messages
from fastfeed.orderbook import OrderBook
from fastfeed.protocol import VALUE_FIELDS

COL = {name: k for k, name in enumerate(VALUE_FIELDS)}


def run(sim: Simulator, steps: int, dt: float = 0.01) -> list[tuple[str, object]]:
    """What the simulator source sends, in order: ("quotes", (ids, seqs, ts,
    vals)) and ("trades", TradeBatch), with the top of book each trade batch met."""
    out: list[tuple[str, object]] = []
    for _ in range(steps):
        q = sim.step(dt)
        out.append(("quotes", q))
        batch, after = sim.trade_step(dt)
        out.append(("trades", batch))
        out.append(("quotes", after))
    return out


def test_every_trade_meets_the_quoted_top_of_book_and_moves_last_and_volume():
    n = 40
    sim = Simulator(n, rate=4000, seed=5, trade_rate=3000)
    # the reference: the top of book and the row each instrument shows
    top: dict[int, list[float | None]] = {}  # id -> [bid, ask, bid_size, ask_size], None: unknown
    seq: dict[int, int] = {}
    tseq: dict[int, int] = {}
    last_ts: dict[int, int] = {}
    traded: dict[int, list[float]] = {}  # id -> [last price, last size, volume]
    trades = 0
    for kind, what in run(sim, 80):
        if kind == "quotes":
            ids, seqs, _ts, vals = what  # type: ignore[misc]
            for i, s, v in zip(ids.tolist(), seqs.tolist(), vals, strict=True):
                assert s > seq.get(i, 0), "seq strictly increasing per instrument"
                seq[i] = s
                assert v[COL["bid"]] < v[COL["ask"]], "a quote is never crossed"
                t = traded.get(i)
                if t is not None:  # a quote carries the trades' last, size, volume
                    assert (v[COL["last"]], v[COL["last_size"]], v[COL["volume"]]) == tuple(t)
                else:
                    assert v[COL["volume"]] == 0.0
                # the quote's levels are what the next trades meet
                top[i] = [v[COL["bid"]], v[COL["ask"]], v[COL["bid_size"]], v[COL["ask_size"]]]
            continue
        b = what
        assert isinstance(b, TradeBatch)
        for i, q, ts, price, size, side in zip(b.ids.tolist(), b.tseq.tolist(), b.ts.tolist(),
                                               b.price.tolist(), b.size.tolist(),
                                               b.side.tolist(), strict=True):
            trades += 1
            assert q == tseq.get(i, q - 1) + 1, "tseq consecutive per instrument"
            tseq[i] = q
            assert ts > last_ts.get(i, 0), "ts never goes back per instrument"
            last_ts[i] = ts
            assert size > 0 and size % LOT == 0, "whole IDX lots"
            level = top[i][3 if side == 1 else 2]
            if level is not None:
                assert size <= level, "no more than the level shows"
            # a level refilled within this step (unknown here) is checked
            # again from the next quote on
            p, lv = (1, 3) if side == 1 else (0, 2)
            assert side in (1, -1)
            if top[i][p] is not None:
                assert price == top[i][p], "a buyer takes the best ask, a seller the best bid"
            if top[i][lv] is not None and top[i][lv] - size > 0:  # type: ignore[operator]
                top[i][lv] -= size  # type: ignore[operator]
            elif top[i][lv] is not None:  # taken out: the next level, a tick further
                tick = float(tick_size(np.array([price]))[0])
                down = float(tick_size(np.array([price - 0.5]))[0])  # the band below
                top[i][p] = price + tick if side == 1 else max(price - down, 1.0)
                top[i][lv] = None
            else:
                top[i][p] = top[i][lv] = None
            t = traded.setdefault(i, [0.0, 0.0, 0.0])
            t[0], t[1], t[2] = price, size, t[2] + size
    assert trades > 500
    assert len(tseq) == n, "every instrument traded"


def test_the_quotes_after_trades_hold_the_consumed_levels():
    sim = Simulator(10, rate=500, seed=3, trade_rate=2000)
    for _ in range(50):
        sim.step(0.01)
        tape = sim.tape
        assert tape is not None
        before = (tape.bid.copy(), tape.ask.copy(), tape.bid_size.copy(), tape.ask_size.copy())
        batch, (ids, _, _, vals) = sim.trade_step(0.01)
        assert sorted(set(batch.ids.tolist())) == ids.tolist()
        bid, ask, bid_size, ask_size = (a.copy() for a in before)
        for i, price, size, side in zip(batch.ids.tolist(), batch.price.tolist(),
                                        batch.size.tolist(), batch.side.tolist(), strict=True):
            px, lv = (ask, ask_size) if side == 1 else (bid, bid_size)
            if math.isnan(px[i]):  # a level refilled in this step, taken again
                continue
            assert price == px[i]
            if lv[i] - size > 0:
                lv[i] -= size
            elif not math.isnan(lv[i]):  # taken out: the next level, a tick further
                tick = tick_size(np.array([price]))[0]
                down = tick_size(np.array([price - 0.5]))[0]  # the band below
                px[i] = price + tick if side == 1 else max(price - down, 1.0)
                lv[i] = math.nan  # refilled: any size
            else:
                px[i] = math.nan
        for k, i in enumerate(ids.tolist()):
            v = vals[k]
            for f, want in (("bid", bid[i]), ("ask", ask[i])):
                assert math.isnan(want) or v[COL[f]] == want
            for f, want in (("bid_size", bid_size[i]), ("ask_size", ask_size[i])):
                if math.isnan(want):
                    assert v[COL[f]] > 0 and v[COL[f]] % LOT == 0
                else:
                    assert v[COL[f]] == want


def test_the_open_is_a_burst_and_then_the_rate_holds():
    rng = np.random.default_rng(1)
    ref = np.full(20, 1000.0)
    tg = TradeGen(20, 1000, rng, weights=np.ones(20), reference=ref, start_tseq=0,
                  open_s=2.0, open_burst=8.0)
    now = 10**18

    def trades_in(seconds: float) -> int:
        nonlocal now
        total = 0
        for _ in range(round(seconds / 0.01)):
            now += 10**7
            total += len(tg.step(0.01, now)[0])
        return total

    first = trades_in(0.5)
    trades_in(2.0)
    later = trades_in(0.5)
    assert later == pytest.approx(500, abs=2)
    assert first > 3 * later


def test_the_tick_sizes_are_the_quotes_own():
    prices = np.array([1.0, 199.0, 200.0, 499.0, 500.0, 1999.0, 2000.0, 4999.0, 5000.0, 9e4])
    assert np.array_equal(idx_tick(prices), tick_size(prices))


def test_trades_are_contract_ingest_messages():
    sim = Simulator(5, rate=100, seed=9, trade_rate=500)
    sim.step(0.05)
    batch, _ = sim.trade_step(0.05)
    msgs = trades_to_messages(sim.symbols, batch)
    assert len(msgs) == len(batch) > 0
    for m in msgs:
        assert list(m) == ["type", "sym", "tseq", "ts", "price", "size", "side"]
        assert m["type"] == "trade" and m["sym"] in sim.symbols
        assert type(m["tseq"]) is int and type(m["ts"]) is int
        assert type(m["price"]) is float and type(m["size"]) is float
        assert m["side"] in SIDES.values() and m["side"] != ""


def test_a_restarted_simulator_numbers_trades_above_the_last_one():
    a = Simulator(3, rate=100, seed=2, trade_rate=1000)
    a.step(0.05)
    first, _ = a.trade_step(0.05)
    b = Simulator(3, rate=100, seed=2, trade_rate=1000)
    b.step(0.05)
    again, _ = b.trade_step(0.05)
    assert again.tseq.min() > first.tseq.max()


def test_without_a_trade_rate_the_quotes_are_unchanged():
    plain = Simulator(30, rate=1000, seed=4)
    with_trades = Simulator(30, rate=1000, seed=4, trade_rate=100)
    for _ in range(20):
        a = plain.step(0.01)
        b = with_trades.step(0.01)
        # same instruments, same seqs, same book; only last/last_size/volume differ
        assert np.array_equal(a[0], b[0])
        assert np.array_equal(a[1] - plain.seq.min(), b[1] - with_trades.seq.min())
        for f in ("bid", "ask", "bid_size", "ask_size"):
            assert np.array_equal(a[3][:, COL[f]], b[3][:, COL[f]])


async def test_the_simulator_source_writes_trades_before_the_quotes_they_moved():
    """SimulatorSource's trades go to the sink's `ticks` (contract ingest
    trade messages, the entry point /ingest uses too), each step's before
    the quotes that carry their last and volume."""

    class Collect:
        name = "collect"

        def __init__(self) -> None:
            self.calls: list[tuple[str, object]] = []

        def symbols(self, names):
            return list(names)

        def arrays(self, numbering, ids, seqs, ts, vals, source=0):
            self.calls.append(("quotes", [(numbering[i], v[COL["last"]], v[COL["volume"]])
                                          for i, v in zip(ids.tolist(), vals, strict=True)]))

        def ticks(self, ticks, source, reply):
            self.calls.append(("trades", ticks))

        async def drain(self):
            return None

    sink = Collect()
    src = SimulatorSource(sink, 20, 2000, seed=3, duration=0.5, step=0.005,  # type: ignore[arg-type]
                          trade_rate=2000)
    await src.run()
    assert src.trades_sent > 100
    volume: dict[str, float] = {}
    last: dict[str, float] = {}
    for kind, what in sink.calls:
        if kind == "trades":
            for t in what:  # type: ignore[attr-defined]
                assert t["type"] == "trade"
                volume[t["sym"]] = volume.get(t["sym"], 0.0) + t["size"]
                last[t["sym"]] = t["price"]
        else:
            for sym, px, vol in what:  # type: ignore[attr-defined]
                assert vol == volume.get(sym, 0.0), "a quote's volume is its trades' sum so far"
                if sym in last:
                    assert px == last[sym], "a quote's last is its last trade's price"


async def test_with_books_every_trade_prints_at_the_books_best_and_takes_from_it():
    """The gateway's simulator sends books and trades together: every trade
    prints at the best bid or ask of the book as a client holds it, for no
    more than that level shows; the books after the step show each traded
    level shrunk by what traded, or gone and the next one uncovered with the
    volume the book held there."""

    class Collect:
        name = "collect"
        takes_books = True

        def __init__(self) -> None:
            self.calls: list[tuple[str, list[dict]]] = []

        def symbols(self, names):
            return list(names)

        def arrays(self, numbering, ids, seqs, ts, vals, source=0):
            return None

        def ticks(self, msgs, source, reply):
            if msgs:
                self.calls.append((msgs[0]["type"], msgs))

        async def drain(self):
            return None

    sink = Collect()
    src = SimulatorSource(sink, 30, 3000, seed=6, duration=0.6, step=0.005,  # type: ignore[arg-type]
                          trade_rate=1500)
    await src.run()
    books: dict[str, OrderBook] = {}
    expect: dict[str, dict[str, list[list[float]] | None]] = {}
    checked = taken_out = 0
    for kind, msgs in sink.calls:
        if kind == "book":
            for m in msgs:
                b = books.get(m["sym"])
                if b is None:
                    b = books[m["sym"]] = OrderBook(m["sym"], depth=20)
                b.apply(m)
                want = expect.pop(m["sym"], None)
                if want is not None:  # the top the trades left
                    if want["b"] is not None:
                        assert [lv[:2] for lv in b.asks[:1]] == want["b"][:1]
                    if want["s"] is not None:
                        assert [lv[:2] for lv in b.bids[:1]] == want["s"][:1]
            assert not expect, "the books of the traded instruments follow their trades"
            continue
        assert kind == "trade"
        local: dict[str, dict[str, list[list[float]] | None]] = {}
        for t in msgs:
            b = books.get(t["sym"])
            if b is None:
                continue  # its book has not opened yet
            held = local.setdefault(t["sym"], {"b": [lv[:2] for lv in b.asks],
                                               "s": [lv[:2] for lv in b.bids]})
            side = held[t["side"]]
            if not side:  # a burst took every level the book showed: beyond it, unknown
                held[t["side"]] = None
                continue
            level = side[0]  # a buyer takes the best ask, a seller the best bid
            assert t["price"] == level[0]
            assert 0 < t["size"] <= level[1]
            level[1] -= t["size"]
            if level[1] == 0:
                side.pop(0)  # taken out: the next level comes into view
                taken_out += 1
                if not side:  # the last level it showed: what comes into view is unknown
                    held[t["side"]] = None
            checked += 1
        expect.update(local)
    assert checked > 300 and taken_out > 0
