"""Order books for the simulated market, consistent with its quotes.

`BookGen` follows a `fastfeed.feed.simulator.Simulator`: after each step it
takes the step's ticks and brings the book of every instrument that ticked to
its latest quote, so the best bid and ask and their sizes are the top of the
book. Each side is a ladder of `levels` prices on IDX price fractions (tick 1
below 200, 2 below 500, 5 below 2,000, 10 below 5,000, 25 from 5,000), every
step of the ladder filled (a liquid name), volumes in lots of 100 shares, an
order count per level.

Churn looks like a real book's: a level's volume changes more often the
nearer it is to the top (a third of the steps at the top, a tenth as often
ten levels down), and when the quote jumps several ticks (the simulator's sweeps)
the levels it passed are taken off the book in one message. New prices that
come into the ladder at either end get fresh volumes, larger further out.

Output is the contract's ingest book messages (docs/protocol.md, "Ingest of
books and trades"), one per book per step: the first of a book is full
(``"full":true``; at most `open_per_step` books open in a step, see
`BookGen`), the rest price-keyed changes (volume 0 removes a price),
each with the book's next ``seq``. The work of a step is numpy over every book
that ticked; only the messages themselves are Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..protocol import VALUE_FIELDS

__all__ = ["BookGen", "ladder", "tick_size"]

_COL = {name: k for k, name in enumerate(VALUE_FIELDS)}
LOT = 100.0
BID, ASK = 0, 1


_BANDS = np.array([200.0, 500.0, 2000.0, 5000.0])
_TICKS = np.array([1.0, 2.0, 5.0, 10.0, 25.0])


def tick_size(price: np.ndarray) -> np.ndarray:
    """IDX price fractions: 1 below 200, 2 below 500, 5 below 2000, 10 below 5000, else 25."""
    return _TICKS[np.searchsorted(_BANDS, price, side="right")]


def ladder(best: np.ndarray, levels: int, side: int) -> np.ndarray:
    """`levels` prices from `best` outwards on IDX price fractions, one row per
    entry of `best`: downwards for bids (the tick below a price is that of the
    band just under it: 200 -> 199, 500 -> 498), upwards for asks. A bid ladder
    stops at the lowest price, 1 (a level at or below 0 gets price 0 and is
    left out of the book)."""
    out = np.empty((len(best), levels))
    p = best.astype(np.float64)
    for k in range(levels):
        out[:, k] = p
        p = np.maximum(p - tick_size(p - 0.5), 0.0) if side == BID else p + tick_size(p)
    return out


class BookGen:
    """Books following a simulator's quotes (see the module).

    `step(ids, seqs, ts, vals)` takes what `Simulator.step` returned and gives
    the book messages for it. `levels` is how many prices each side holds (more
    than the gateway serves, so a level leaving its view has one behind it).

    At most `open_per_step` books open (go out full) in one step; the others
    wait for a later step and then open at their latest quote. A full book is
    the costliest message (every level a Python list), and the simulator's
    opening quotes every instrument at once: 100,000 full books in one step
    held the event loop for tens of seconds before the gateway was ready.
    """

    def __init__(self, symbols: list[str], levels: int = 15, seed: int = 0,
                 seq0: int = 0, open_per_step: int = 64) -> None:
        self.symbols = symbols
        self.n = len(symbols)
        self.levels = levels
        self.rng = np.random.default_rng(seed or None)
        n, L = self.n, levels
        self.price = np.zeros((n, 2, L))
        self.vol = np.zeros((n, 2, L))
        self.orders = np.zeros((n, 2, L), np.int64)
        self.seq = np.full(n, seq0, np.int64)
        self.started = np.zeros(n, bool)  # a full book has gone out
        self.quote = np.zeros((n, 4))  # the latest bid, ask, bid_size, ask_size
        self.quoted = np.zeros(n, bool)
        self.waiting = 0  # quoted, not yet opened
        self.open_per_step = open_per_step
        # how likely a held level's volume changes in a step, by distance
        # from the top: most churn is near the top
        self.churn = 0.35 * 0.8 ** np.arange(L)
        self.sent = 0  # messages made
        self.level_changes = 0  # levels in them

    # -- the numpy part -----------------------------------------------------

    def _fresh(self, shape: tuple[int, ...], depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Volumes (lots of 100) and order counts for new levels, `depth` the
        level index: deeper levels hold more."""
        lots = self.rng.integers(1, 60, shape) * (1 + depth // 2)
        return lots * LOT, self._orders(lots)

    def _orders(self, lots: np.ndarray) -> np.ndarray:
        # orders of 1 to 40 lots each: at least one order, never more than lots
        per = self.rng.integers(1, 41, lots.shape)
        return np.clip(np.ceil(lots / per), 1, lots).astype(np.int64)

    def step(self, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
             vals: np.ndarray) -> list[dict[str, Any]]:
        """Book messages for one simulator step (`Simulator.step`'s result)."""
        if len(ids):
            # the last tick of each instrument in the step is its quote now
            rev = ids[::-1]
            ticked, first = np.unique(rev, return_index=True)
            q = vals[len(ids) - 1 - first]
            self.quote[ticked] = q[:, [_COL["bid"], _COL["ask"], _COL["bid_size"],
                                       _COL["ask_size"]]]
            self.waiting += int((~self.quoted[ticked]).sum())
            self.quoted[ticked] = True
            uniq = ticked[self.started[ticked]]
        else:
            uniq = np.empty(0, np.int64)
        if self.waiting:
            # open the books still closed, the first few by id
            opening = np.flatnonzero(self.quoted & ~self.started)[:self.open_per_step]
            self.waiting -= len(opening)
            uniq = np.union1d(uniq, opening)
        if not len(uniq):
            return []
        L = self.levels
        q = self.quote[uniq]
        best = q[:, 0:2]  # (m, 2): bid, ask
        top_vol = q[:, 2:4]

        old_p = self.price[uniq]
        old_v = self.vol[uniq]
        old_o = self.orders[uniq]
        new_p = np.stack([ladder(best[:, BID], L, BID), ladder(best[:, ASK], L, ASK)], axis=1)
        # which old level (if any) holds each new price
        eq = (new_p[..., :, None] == old_p[..., None, :]) & (old_v[..., None, :] > 0)
        carried = eq.any(-1)
        src = eq.argmax(-1)
        new_v = np.take_along_axis(old_v, src, -1)
        new_o = np.take_along_axis(old_o, src, -1)
        depth = np.broadcast_to(np.arange(L), new_p.shape)
        fresh_v, fresh_o = self._fresh(new_p.shape, depth)
        new_v = np.where(carried, new_v, fresh_v)
        new_o = np.where(carried, new_o, fresh_o)
        # churn on held levels, skewed to the top: a few lots added or taken
        hit = carried & (self.rng.random(new_p.shape) < self.churn)
        delta = self.rng.integers(-30, 31, new_p.shape) * LOT
        churned = np.maximum(new_v + delta, LOT)
        new_o = np.where(hit & (churned != new_v),
                         np.clip(new_o + np.sign(churned - new_v).astype(np.int64), 1,
                                 churned // LOT).astype(np.int64), new_o)
        new_v = np.where(hit, churned, new_v)
        # the top is the quote: its size, and orders that fit it
        tv = np.maximum(top_vol, LOT)
        new_v[:, :, 0] = tv
        changed_top = ~carried[:, :, 0] | (old_v[:, :, 0] != tv)
        new_o[:, :, 0] = np.where(changed_top, self._orders(tv // LOT), new_o[:, :, 0])
        new_v = np.where(new_p > 0, new_v, 0.0)  # below the lowest price: no level

        # what changed, per side: new or changed levels, and old prices gone
        set_mask = (new_v > 0) & (~carried | (new_v != np.take_along_axis(old_v, src, -1))
                                  | (new_o != np.take_along_axis(old_o, src, -1)))
        gone = (old_v > 0) & ~((old_p[..., :, None] == new_p[..., None, :])
                               & (new_v[..., None, :] > 0)).any(-1)

        self.price[uniq] = new_p
        self.vol[uniq] = new_v
        self.orders[uniq] = new_o
        self.seq[uniq] += 1
        return self._messages(uniq, new_p, new_v, new_o, set_mask, old_p, gone)

    def volume_at(self, ids: np.ndarray, side: np.ndarray, price: np.ndarray) -> np.ndarray:
        """The volume the book of each of `ids` holds at `price` on `side`
        (`BID` 0, `ASK` 1), 0 where it holds none (or has not opened): what
        the simulator's trades meet when a level above it was taken out."""
        p = self.price[ids, side]  # (m, levels)
        v = self.vol[ids, side]
        hit = (p == price[:, None]) & (v > 0)
        return np.where(hit.any(1), v[np.arange(len(ids)), hit.argmax(1)], 0.0)

    # -- the messages ---------------------------------------------------------

    def _messages(self, uniq: np.ndarray, new_p: np.ndarray, new_v: np.ndarray,
                  new_o: np.ndarray, set_mask: np.ndarray, old_p: np.ndarray,
                  gone: np.ndarray) -> list[dict[str, Any]]:
        names = self.symbols
        m = len(uniq)
        full = ~self.started[uniq]
        # every level that goes out, as (book, side) groups in order: for a
        # full book its live levels, else the prices gone (volume 0) and then
        # the levels set
        live = new_v > 0
        take_new = np.where(full[:, None, None], live, set_mask)
        take_old = gone & ~full[:, None, None]
        lv = np.concatenate([
            np.stack([old_p[take_old], np.zeros(int(take_old.sum())),
                      np.zeros(int(take_old.sum()))], axis=1),
            np.stack([new_p[take_new], new_v[take_new], new_o[take_new]], axis=1)])
        group = np.concatenate([np.nonzero(take_old)[0] * 2 + np.nonzero(take_old)[1],
                                np.nonzero(take_new)[0] * 2 + np.nonzero(take_new)[1]])
        order = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=2 * m)
        levels = [[p, v, int(o)] for p, v, o in lv[order].tolist()]
        seqs = self.seq[uniq].tolist()
        fulls = full.tolist()
        out: list[dict[str, Any]] = []
        pos = 0
        cl = counts.tolist()
        for j, i in enumerate(uniq.tolist()):
            nb, na = cl[2 * j], cl[2 * j + 1]
            out.append({"type": "book", "sym": names[i], "seq": seqs[j], "full": fulls[j],
                        "bids": levels[pos:pos + nb], "asks": levels[pos + nb:pos + nb + na]})
            pos += nb + na
        changes = len(levels)
        self.started[uniq] = True
        self.sent += len(out)
        self.level_changes += changes
        return out
