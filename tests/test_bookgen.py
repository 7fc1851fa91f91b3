"""The simulator's order books (`fastfeed.feed.bookgen`): contract ingest book
messages consistent with the simulator's quotes, applied the way a client
applies them (`fastfeed.orderbook.OrderBook`)."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest

from fastfeed.feed.bookgen import BookGen, ladder, tick_size
from fastfeed.feed.simulator import Simulator
from fastfeed.orderbook import OrderBook, book_checksum

FRACTIONS = [(199, 1), (200, 2), (499, 2), (500, 5), (1995, 5), (2000, 10), (4990, 10),
             (5000, 25), (26000, 25), (1, 1)]


def idx_fraction(price: float) -> float:
    return 1 if price < 200 else 2 if price < 500 else 5 if price < 2000 else (
        10 if price < 5000 else 25)


@pytest.mark.parametrize(("price", "fraction"), FRACTIONS)
def test_idx_price_fractions(price: float, fraction: float) -> None:
    assert tick_size(np.array([float(price)]))[0] == fraction


def test_ladders_step_by_the_fraction_of_each_band() -> None:
    bids = ladder(np.array([505.0]), 4, 0)[0].tolist()
    asks = ladder(np.array([1990.0]), 4, 1)[0].tolist()
    assert bids == [505.0, 500.0, 498.0, 496.0]
    assert asks == [1990.0, 1995.0, 2000.0, 2010.0]
    assert ladder(np.array([2.0]), 4, 0)[0].tolist() == [2.0, 1.0, 0.0, 0.0]


def run(n: int, rate: float, steps: int, seed: int, levels: int = 15):
    sim = Simulator(n, rate, seed)
    gen = BookGen(sim.symbols, levels, seed, seq0=1000)
    for _ in range(steps):
        ids, seqs, ts, vals = sim.step(0.005)
        yield sim, ids, vals, gen.step(ids, seqs, ts, vals)


def test_books_follow_the_quotes_on_idx_fractions_in_lots() -> None:
    books: dict[str, OrderBook] = {}
    fulls = changes = swept = 0
    for sim, ids, vals, msgs in run(300, 20000, 300, seed=7):
        for m in msgs:
            assert m["type"] == "book" and set(m) == {"type", "sym", "seq", "full", "bids", "asks"}
            b = books.get(m["sym"])
            if b is None:  # the first message of a book is a full book
                assert m["full"] is True
                b = books[m["sym"]] = OrderBook(m["sym"], depth=15)
                fulls += 1
            else:  # then changes, each with the book's next seq
                assert m["full"] is False and m["seq"] == b.seq + 1
                changes += 1
                swept += sum(1 for lv in m["bids"] + m["asks"] if lv[1] == 0) >= 3
            for lv in m["bids"] + m["asks"]:
                assert isinstance(lv[0], float) and isinstance(lv[1], float)
                assert isinstance(lv[2], int) and math.isfinite(lv[0])
            b.apply(m)
        quote = {int(i): vals[k] for k, i in enumerate(ids)}  # the last tick of each wins
        for i, v in quote.items():
            b = books.get(sim.symbols[i])
            if b is None:
                continue  # not opened yet: a few hundred books open per step
            # the top of the book is the quote: best bid and ask, and their sizes
            assert (b.bids[0][0], b.asks[0][0]) == (v[0], v[1])
            assert (b.bids[0][1], b.asks[0][1]) == (v[3], v[4])
            assert b.bids[0][0] < b.asks[0][0]
            assert [lv[0] for lv in b.bids] == sorted((lv[0] for lv in b.bids), reverse=True)
            assert [lv[0] for lv in b.asks] == sorted(lv[0] for lv in b.asks)
            for price, vol, orders in b.bids + b.asks:
                assert price % idx_fraction(price) == 0, price
                assert vol > 0 and vol % 100 == 0, vol
                assert 1 <= orders <= vol // 100
    assert fulls == 300
    assert changes > 10 * fulls
    assert swept > 0  # sweeps: one message takes several levels off a side


def test_books_open_a_few_per_step_each_at_its_latest_quote() -> None:
    """The opening quotes every instrument at once; the books follow a few
    per step, each with the top at the instrument's quote of that moment."""
    sim = Simulator(1000, 2000, 3)
    gen = BookGen(sim.symbols, 10, 3, open_per_step=100)
    latest: dict[int, np.ndarray] = {}
    opened: set[str] = set()
    steps = 0
    while len(opened) < 1000:
        ids, seqs, ts, vals = sim.step(0.005)
        for k, i in enumerate(ids.tolist()):
            latest[i] = vals[k]
        msgs = gen.step(ids, seqs, ts, vals)
        fulls = [m for m in msgs if m["full"]]
        assert len(fulls) <= 100  # the cap: never all of them in one step
        for m in fulls:
            assert m["sym"] not in opened
            opened.add(m["sym"])
            v = latest[sim.symbols.index(m["sym"])]
            assert (m["bids"][0][0], m["asks"][0][0]) == (v[0], v[1])
            assert (m["bids"][0][1], m["asks"][0][1]) == (v[3], v[4])
        steps += 1
        assert steps <= 10
    assert steps == 10


def test_churn_is_mostly_near_the_top() -> None:
    """Where a held price's volume changes: the top levels far more often
    than the deep ones."""
    held: dict[str, dict[tuple[int, float], float]] = {}
    at = np.zeros(15)
    for _, _, _, msgs in run(100, 5000, 400, seed=11):
        for m in msgs:
            book = held.setdefault(m["sym"], {})
            if m["full"]:
                book.clear()
            for side, key in ((0, "bids"), (1, "asks")):
                for p, v, _ in m[key]:
                    if not m["full"] and v and (side, p) in book and book[(side, p)] != v:
                        prices = sorted((q for s, q in book if s == side), reverse=side == 0)
                        at[prices.index(p)] += 1
                    if v:
                        book[(side, p)] = v
                    else:
                        book.pop((side, p), None)
    assert at[:3].sum() > 3 * at[-6:].sum()


def test_the_contract_checksum_of_a_generated_book() -> None:
    """`OrderBook.checksum` is the contract's: CRC-32 of asks then bids, best
    first, price and volume as float64 little-endian, best `depth` only."""
    (_, _, _, msgs), = list(run(5, 100, 1, seed=3))
    m = msgs[0]
    b = OrderBook(m["sym"])  # depth 10: the gateway's default
    b.apply(m)
    data = b"".join(struct.pack("<dd", p, v) for p, v, _ in
                    sorted(m["asks"])[:10] + sorted(m["bids"], reverse=True)[:10])
    assert b.checksum() == zlib.crc32(data) == book_checksum(m["bids"][:10], m["asks"][:10])
    assert len(b.bids) == len(b.asks) == 10


def test_the_simulator_sends_books_only_to_a_sink_that_takes_them() -> None:
    from fastfeed._core import Table
    from fastfeed.feed.simulator import SimulatorSource
    from fastfeed.feed.sink import LocalSink

    sink = LocalSink(Table(), lambda: None)
    assert SimulatorSource(sink, 5, 100.0).bookgen is None or sink.takes_books
    assert SimulatorSource(sink, 5, 100.0, books=True).bookgen is not None
    assert SimulatorSource(sink, 5, 100.0, books=False).bookgen is None
