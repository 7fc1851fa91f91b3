"""Simulated trades that agree with the simulated quotes (and books).

The quote simulator (`fastfeed.feed.simulator`) moves each instrument's best
bid and ask; this module makes the prints that happen against them. A trade
takes the best ask (buyer aggressed, side ``"b"``) or the best bid (seller,
``"s"``), for a whole number of IDX lots (100 shares) no larger than what
that level shows, and consumes it: the level's size shrinks, and a level
taken out moves the price one tick away (the next level comes into view, as
in the book's ladder: the tick below a bid is that of the band under it).
Each trade moves the instrument's ``last``, ``last_size`` and ``volume``, and
the quotes the simulator sends afterwards carry them, so a client's row, its
tape and its bars all tell the same story.

Everything is vectorised with NumPy: a step's trades are played in rounds,
each round at most one trade per instrument, so trades of one instrument
apply in order while a round touches all its instruments at once. `tseq`
is consecutive per instrument (a restarted simulator starts above what it
numbered before, like the quote `seq`: its start time in microseconds), and
a trade's `ts` never goes back for an instrument.

Rates: `rate` trades per second over the whole market, the instruments
weighted like the quotes; the market's opening (the first `open_s` seconds)
runs up to `open_burst` times faster, and the quote simulator's bursts carry
over (`step(dt, mult)`).

A books simulator shares the same top of book: the quotes it follows are
the ones the trades meet (`on_quotes`), and the quotes the trades leave are
the new top it follows, so a book level shrinks by exactly what traded at it.
With `book_volume` set (`fastfeed.feed.bookgen.BookGen.volume_at`), the level
that comes into view when one is taken out shows the volume the book holds
at that price, not a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from ..protocol import VALUE_FIELDS
from .bookgen import LOT, tick_size

__all__ = ["LOT", "SIDES", "TradeBatch", "TradeGen", "idx_tick", "trades_to_messages"]

#: side codes of `TradeBatch.side`, as the contract spells them
SIDES = {1: "b", -1: "s", 0: ""}

_COL = {name: k for k, name in enumerate(VALUE_FIELDS)}
_BID, _ASK, _LAST = _COL["bid"], _COL["ask"], _COL["last"]
_BID_SIZE, _ASK_SIZE = _COL["bid_size"], _COL["ask_size"]
_LAST_SIZE, _VOLUME = _COL["last_size"], _COL["volume"]


#: IDX price fractions: the quotes' and the books' own (`fastfeed.feed.bookgen`)
idx_tick = tick_size


class TradeBatch(NamedTuple):
    """One step's trades, oldest first (arrays of equal length)."""

    ids: np.ndarray  # int32: instrument, in the simulator's numbering
    tseq: np.ndarray  # int64
    ts: np.ndarray  # int64, ns
    price: np.ndarray  # float64
    size: np.ndarray  # float64, multiples of LOT
    side: np.ndarray  # int8: 1 buyer aggressed ("b"), -1 seller ("s")

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.ids)


def _empty() -> TradeBatch:
    return TradeBatch(np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int64),
                      np.empty(0), np.empty(0), np.empty(0, np.int8))


def trades_to_messages(names: Sequence[str], batch: TradeBatch) -> list[dict[str, Any]]:
    """A batch as contract ingest messages (``{"type":"trade",...}``), oldest first."""
    syms = [names[i] for i in batch.ids.tolist()]
    sides = [SIDES[s] for s in batch.side.tolist()]
    return [
        {"type": "trade", "sym": sym, "tseq": q, "ts": t, "price": p, "size": z, "side": d}
        for sym, q, t, p, z, d in zip(syms, batch.tseq.tolist(), batch.ts.tolist(),
                                      batch.price.tolist(), batch.size.tolist(), sides,
                                      strict=True)
    ]


class TradeGen:
    """Trades for `n` instruments (see the module).

    `weights`: each instrument's share of the trades (normalised here);
    `reference`: the price a `last` starts from before the first trade (the
    previous close); `start_tseq`: the first instrument trade number minus
    one, for all; `tick`: the exchange's tick size for an array of prices.
    """

    def __init__(self, n: int, rate: float, rng: np.random.Generator, *,
                 weights: np.ndarray, reference: np.ndarray,
                 start_tseq: int, tick: Callable[[np.ndarray], np.ndarray] = idx_tick,
                 open_s: float = 2.0, open_burst: float = 8.0, max_lots: int = 50) -> None:
        if rate < 0:
            raise ValueError(f"the trade rate must not be negative, not {rate}")
        self.n = n
        self.rate = rate
        self.rng = rng
        self.p = weights / weights.sum() if n else weights
        self.tick = tick
        self.open_s = open_s
        self.open_burst = open_burst
        self.max_lots = max_lots
        self.elapsed = 0.0  # simulated seconds since the open
        self.carry = 0.0
        # the top of book each trade meets, kept current by set_top
        self.bid = np.maximum(reference - tick(reference), 1.0)
        self.ask = reference + tick(reference)
        self.bid_size = np.full(n, 10 * LOT)
        self.ask_size = np.full(n, 10 * LOT)
        self.last = reference.astype(np.float64).copy()
        self.last_size = np.zeros(n)
        self.volume = np.zeros(n)
        self.tseq = np.full(n, start_tseq, dtype=np.int64)
        self.last_ts = np.zeros(n, dtype=np.int64)
        self.trades = 0  # made so far
        # book_volume(ids, side, price) -> the volume a book shows there (0:
        # none): the next level's size when one is taken out (side 0 bid, 1 ask)
        self.book_volume: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None

    def set_top(self, ids: np.ndarray, bid: np.ndarray, ask: np.ndarray,
                bid_size: np.ndarray, ask_size: np.ndarray) -> None:
        """The best levels quoted for `ids` (in order: a later entry of an id wins)."""
        self.bid[ids] = bid
        self.ask[ids] = ask
        self.bid_size[ids] = bid_size
        self.ask_size[ids] = ask_size

    def on_quotes(self, ids: np.ndarray, vals: np.ndarray) -> None:
        """Quotes the simulator is about to send (`vals`: one row of the 7
        value fields per tick): their best levels become the top of book the
        next trades meet, and their last, last_size and volume are set to
        the trades' (quotes do not trade)."""
        if not len(ids):
            return
        self.set_top(ids, vals[:, _BID], vals[:, _ASK], vals[:, _BID_SIZE], vals[:, _ASK_SIZE])
        vals[:, _LAST] = self.last[ids]
        vals[:, _LAST_SIZE] = self.last_size[ids]
        vals[:, _VOLUME] = self.volume[ids]

    def step(self, dt: float, now_ns: int, mult: float = 1.0) -> tuple[TradeBatch, np.ndarray]:
        """The trades of the next `dt` seconds, ending at `now_ns`, and the
        instruments they touched (unique, sorted), whose quotes changed: the
        caller sends their `quote_values`."""
        burst = 1.0
        if self.elapsed < self.open_s:
            burst = 1.0 + (self.open_burst - 1.0) * (1.0 - self.elapsed / self.open_s)
        self.elapsed += dt
        want = self.rate * dt * mult * burst + self.carry
        count = int(want)
        self.carry = want - count
        if count == 0 or self.n == 0:
            return _empty(), np.empty(0, np.int32)
        rng = self.rng
        ids = rng.choice(self.n, size=count, p=self.p).astype(np.int32)
        # a trade's round: how many trades of its instrument come before it
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
        run = np.repeat(starts, np.diff(np.r_[starts, count]))
        rounds = np.empty(count, np.int64)
        rounds[order] = np.arange(count) - run
        # oldest first: round by round, in drawing order within a round
        out = np.lexsort((np.arange(count), rounds))
        ids, rounds = ids[out], rounds[out]
        side = np.where(rng.random(count) < 0.5, 1, -1).astype(np.int8)
        want_size = LOT * rng.integers(1, self.max_lots + 1, count)
        price = np.empty(count)
        size = np.empty(count)
        bounds = np.flatnonzero(np.r_[True, rounds[1:] != rounds[:-1], True])
        for a, b in pairwise(bounds.tolist()):  # rounds: few per step
            self._round(ids[a:b], side[a:b], want_size[a:b], price[a:b], size[a:b])
        # ts spread over the step in trade order, never back for an instrument
        span = int(dt * 1e9)
        ts = now_ns - span + (np.arange(1, count + 1, dtype=np.int64) * span) // count
        tseq = np.empty(count, np.int64)
        for a, b in pairwise(bounds.tolist()):
            r = ids[a:b]
            ts[a:b] = np.maximum(ts[a:b], self.last_ts[r] + 1)
            self.last_ts[r] = ts[a:b]
            self.tseq[r] += 1
            tseq[a:b] = self.tseq[r]
        self.trades += count
        return TradeBatch(ids, tseq, ts, price, size, side), np.unique(ids)

    def _round(self, ids: np.ndarray, side: np.ndarray, want: np.ndarray,
               price: np.ndarray, size: np.ndarray) -> None:
        """One trade for each of `ids` (unique), against the current top."""
        buy = side > 0
        level = np.where(buy, self.ask_size[ids], self.bid_size[ids])
        price[:] = np.where(buy, self.ask[ids], self.bid[ids])
        # whole lots, at most what the level shows (a level always shows a lot)
        size[:] = np.minimum(want, np.maximum(np.floor(level / LOT) * LOT, LOT))
        left = np.maximum(level - size, 0.0)
        gone = left <= 0.0
        refill = LOT * self.rng.integers(1, 5000, len(ids)).astype(np.float64)
        b, s = ids[buy], ids[~buy]
        # a level taken out: the next one, one tick further, comes into view
        # (below a bid, the tick of the band under it: 200 -> 199, as the book's ladder)
        ask_b, bid_s = self.ask[b], self.bid[s]
        nxt = np.empty(len(ids))
        nxt[buy] = ask_b + self.tick(ask_b)
        nxt[~buy] = np.maximum(bid_s - self.tick(bid_s - 0.5), 1.0)
        if self.book_volume is not None and gone.any():
            # with what the book holds there, when it holds that price
            held = self.book_volume(ids, buy.astype(np.int64), nxt)
            refill = np.where(held > 0, held, refill)
        self.ask[b] = np.where(gone[buy], nxt[buy], ask_b)
        self.ask_size[b] = np.where(gone[buy], refill[buy], left[buy])
        self.bid[s] = np.where(gone[~buy], nxt[~buy], bid_s)
        self.bid_size[s] = np.where(gone[~buy], refill[~buy], left[~buy])
        self.last[ids] = price
        self.last_size[ids] = size
        self.volume[ids] += size

    def quote_values(self, ids: np.ndarray) -> np.ndarray:
        """The 7 value fields of `ids` after their trades: their new quotes."""
        vals = np.empty((len(ids), len(VALUE_FIELDS)))
        vals[:, _BID] = self.bid[ids]
        vals[:, _ASK] = self.ask[ids]
        vals[:, _BID_SIZE] = self.bid_size[ids]
        vals[:, _ASK_SIZE] = self.ask_size[ids]
        vals[:, _LAST] = self.last[ids]
        vals[:, _LAST_SIZE] = self.last_size[ids]
        vals[:, _VOLUME] = self.volume[ids]
        return vals
