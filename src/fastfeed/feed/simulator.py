"""A realistic simulated market: IDX-style tickers, random-walk quotes, skewed activity.

A few instruments tick far more than the rest (Zipf-like weights), prices move
on exchange tick sizes with a spread of one to three ticks, sizes are lots of
100 shares, volume accumulates, and every few seconds a burst multiplies the
rate for a moment, as at an open or on news. With a trade rate, trades
(`fastfeed.feed.tradegen`) print against those quotes and set their last,
last_size and volume.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from .._core import wall_ns
from ..protocol import VALUE_FIELDS
from .bookgen import BookGen, tick_size
from .sink import SIMULATOR, LogReply, Sink, arrays_to_ticks
from .source import TaskSource
from .tradegen import TradeBatch, TradeGen, trades_to_messages

# Real IDX names with rough price levels (IDR), so the board looks familiar.
IDX = {
    "BBCA": 9800, "BBRI": 4500, "BMRI": 6200, "TLKM": 3100, "ASII": 5000, "BBNI": 4800,
    "UNVR": 2300, "ICBP": 11000, "INDF": 6700, "GOTO": 70, "ANTM": 1500, "ADRO": 2500,
    "PGAS": 1600, "PTBA": 2700, "SMGR": 3500, "KLBF": 1500, "CPIN": 4900, "UNTR": 26000,
    "EXCL": 2200, "ISAT": 2400, "MDKA": 2100, "INCO": 3800, "TOWR": 800, "AMRT": 2900,
    "BRPT": 1000, "BBTN": 1200, "MEDC": 1300, "ITMG": 26000, "AKRA": 1400, "HMSP": 800,
    "JPFA": 1600, "BRIS": 2700, "ARTO": 2500, "EMTK": 500, "BUKA": 130, "ACES": 800,
    "MAPI": 1500, "ESSA": 800, "INKP": 8000, "TKIM": 7000, "SIDO": 600, "MYOR": 2500,
}
VALUE_COLS = {name: k for k, name in enumerate(VALUE_FIELDS)}


def on_grid(price: np.ndarray) -> np.ndarray:
    """`price` rounded to its band's price fraction (never below 1)."""
    t = tick_size(price)
    return np.maximum(np.round(price / t) * t, 1.0)


def symbols(n: int) -> list[str]:
    names = list(IDX)[:n]
    k = 0
    while len(names) < n:
        # generated codes look like listed ones: four letters, then a board suffix
        a, b = divmod(k, 26 * 26)
        c, d = divmod(b, 26)
        names.append(f"X{chr(65 + a % 26)}{chr(65 + c)}{chr(65 + d)}.{a // 26}" if a >= 26
                     else f"X{chr(65 + a)}{chr(65 + c)}{chr(65 + d)}")
        k += 1
    return names


class Simulator:
    def __init__(self, n: int, rate: float, seed: int = 0, trade_rate: float = 0.0) -> None:
        self.rng = np.random.default_rng(seed or None)
        self.symbols = symbols(n)
        self.n = n
        self.rate = rate
        base = np.array([IDX.get(s, 0) for s in self.symbols], dtype=np.float64)
        gen = base == 0
        base[gen] = np.round(self.rng.lognormal(7.5, 1.0, gen.sum()))
        self.mid = on_grid(np.maximum(base, 50.0))
        weights = 1.0 / np.arange(1, n + 1) ** 1.1
        self.rng.shuffle(weights[len(IDX):])  # the real names stay the busiest
        self.p = weights / weights.sum()
        self.cdf = np.cumsum(self.p)
        # seq starts at the start time in microseconds, as a real source's
        # would: a restarted simulator is still newer than what it left behind
        # (in Redis, or in a client resuming with since)
        self.seq = np.full(n, wall_ns() // 1000, dtype=np.int64)
        self.volume = np.zeros(n, dtype=np.float64)
        self.burst_left = 0.0
        self.carry = 0.0
        self.opened = False
        self.mult = 1.0  # the rate multiplier of the last step (bursts)
        # trades draw from their own generator: the quotes of a seed stay the same
        self.tape: TradeGen | None = None
        if trade_rate > 0:
            self.tape = TradeGen(
                n, trade_rate, np.random.default_rng(seed + 1 if seed else None),
                weights=self.p, reference=self.mid.copy(),
                start_tseq=int(self.seq[0]) if n else 0)

    def step(self, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Ticks for the next `dt` seconds: (ids, seqs, ts, values[7]) with one row per tick."""
        if self.burst_left > 0:
            self.burst_left -= dt
            mult = 5.0
        else:
            mult = 1.0
            if self.rng.random() < dt / 8.0:  # a burst about every 8 s
                self.burst_left = self.rng.uniform(0.2, 1.0)
        want = self.rate * dt * mult + self.carry
        count = int(want)
        self.carry = want - count
        # instruments by weight: the cumulative weights searched, as
        # Generator.choice does, without recomputing them every step
        ids = (np.minimum(np.searchsorted(self.cdf, self.rng.random(count), side="right"),
                          self.n - 1) if self.n else np.empty(0)).astype(np.int32)
        if not self.opened:
            # the opening: one quote for every instrument, so no row is ever empty
            self.opened = True
            ids = np.concatenate([np.arange(self.n, dtype=np.int32), ids])
            count = len(ids)
        if count == 0:
            e = np.empty(0, np.int32)
            return e, np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 7))
        mid = self.mid[ids]
        step = tick_size(mid)
        moves = self.rng.integers(-2, 3, count)
        # now and then a sweep: the price runs through several levels at once
        sweep = self.rng.random(count) < 0.02
        moves[sweep] = self.rng.choice([-6, -5, -4, 4, 5, 6], int(sweep.sum()))
        mid = on_grid(np.maximum(mid + step * moves, step))
        # later ticks of the same instrument in this step win
        self.mid[ids] = mid
        # the bid at or one tick under mid, the ask one to three ticks above
        # the bid, each on its own band's price fraction (IDX)
        bid = np.where(self.rng.random(count) < 0.5, mid, np.maximum(mid - tick_size(mid - 0.5), 1))
        wide = self.rng.integers(1, 4, count)
        ask = bid + tick_size(bid)
        for k in (2, 3):
            ask = np.where(wide >= k, ask + tick_size(ask), ask)
        last = np.where(self.rng.random(count) < 0.5, bid, ask)
        last_size = 100.0 * self.rng.integers(1, 200, count)
        np.add.at(self.volume, ids, last_size)
        vals = np.empty((count, 7))
        vals[:, VALUE_COLS["bid"]] = bid
        vals[:, VALUE_COLS["ask"]] = ask
        vals[:, VALUE_COLS["last"]] = last
        vals[:, VALUE_COLS["bid_size"]] = 100.0 * self.rng.integers(1, 5000, count)
        vals[:, VALUE_COLS["ask_size"]] = 100.0 * self.rng.integers(1, 5000, count)
        vals[:, VALUE_COLS["last_size"]] = last_size
        # cumulative volume as of each tick, so replaying the ticks in order is exact
        # each tick's seq and volume count the ticks of its instrument before
        # it in this step: ranks within each instrument's run, in tick order
        order = np.argsort(ids, kind="stable")
        run = ids[order]
        starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, count]))
        rank = np.arange(count) - first
        seqs = np.empty(count, np.int64)
        seqs[order] = self.seq[run] + rank + 1
        sizes = last_size[order]
        cum = np.cumsum(sizes)
        vol_before = self.volume - np.bincount(ids, weights=last_size, minlength=self.n)
        vol = np.empty(count)
        # sizes are whole lots, so these sums of floats are exact
        vol[order] = vol_before[run] + cum - (cum[first] - sizes[first])
        self.seq += np.bincount(ids, minlength=self.n)
        vals[:, VALUE_COLS["volume"]] = vol
        self.mult = mult
        if self.tape is not None:
            self.tape.on_quotes(ids, vals)
        ts = np.full(count, wall_ns(), dtype=np.int64)
        return ids, seqs, ts, vals

    def trade_step(self, dt: float) -> tuple[TradeBatch, tuple[np.ndarray, np.ndarray,
                                                              np.ndarray, np.ndarray]]:
        """The trades of the next `dt` seconds against the current quotes, and
        the quote ticks they cause (ids, seqs, ts, values[7]: the traded
        instruments' new top of book, last, last_size and volume)."""
        assert self.tape is not None, "a Simulator made without a trade rate"
        now = wall_ns()
        batch, ids = self.tape.step(dt, now, self.mult)
        self.seq[ids] += 1
        self.mid[ids] = self.tape.last[ids]  # the quotes walk on from the last print
        ticks = (ids, self.seq[ids], np.full(len(ids), now, np.int64),
                 self.tape.quote_values(ids))
        return batch, ticks

    def ticks(self, dt: float) -> list[dict]:
        """The same as `step`, as protocol tick objects (for publishers)."""
        ids, seqs, ts, vals = self.step(dt)
        return arrays_to_ticks(self.symbols, ids, seqs, ts, vals)


class SimulatorSource(TaskSource):
    """The simulated market as a source: every `step` seconds, the ticks of
    the time that passed (at most 0.1 s of them) go to the sink as one
    `Sink.arrays` call. The one simulator loop: `fastfeed serve --simulate`
    writes into its gateway's sink, `fastfeed publish --simulate` (and the
    pod's feed process) into a `fastfeed.feed.publish.PublisherSink`.

    With `books` (default: when the sink says it `takes_books`), the books
    of the instruments that ticked follow each step's quotes
    (`fastfeed.feed.bookgen.BookGen`), as contract ingest book messages
    written with `Sink.ticks`, which takes book messages beside quotes.

    With a `trade_rate`, each step's trades (`fastfeed.feed.tradegen`) go
    to `Sink.ticks` as contract trade messages, then the quotes they moved
    with `Sink.arrays`, then those instruments' books: a trade prints at the
    best bid or ask the quote and the book showed, and the book's level
    shrinks by it (or leaves the book)."""

    name = "simulator"

    def __init__(self, sink: Sink, n: int, rate: float, seed: int = 0, *,
                 duration: float = 0.0, step: float = 0.005, books: bool | None = None,
                 book_levels: int = 20, trade_rate: float = 0.0) -> None:
        super().__init__(sink)
        self.sim = Simulator(n, rate, seed, trade_rate)
        self.duration = duration  # seconds; 0: until stopped
        self.step = step
        self.sent = 0  # ticks written to the sink
        if books is None:
            books = bool(getattr(sink, "takes_books", False))
        self.bookgen = (BookGen(self.sim.symbols, book_levels, seed,
                                seq0=wall_ns() // 1000) if books else None)
        self.books_sent = 0  # book messages written to the sink
        if self.bookgen is not None and self.sim.tape is not None:
            # a level a trade takes out uncovers the book's next one, as it is
            self.sim.tape.book_volume = self.bookgen.volume_at
        self.trades_sent = 0  # trades written to the sink
        self.reply = LogReply("the simulator's trades")
        self.book_reply = LogReply("the simulator's books")
        # trades go out every `trade_step` seconds (their ts spread over it):
        # a few trades a step cost mostly NumPy's per-call overhead
        self.trade_step = max(step, 0.02)
        self._trade_dt = 0.0

    async def run(self) -> int:
        """Write to the sink until `duration` has passed (0: forever); the ticks sent."""
        sim, sink = self.sim, self.sink
        numbering = sink.symbols(sim.symbols)
        start = last = time.monotonic()
        while not self.duration or last - start < self.duration:
            await asyncio.sleep(self.step)
            now = time.monotonic()
            dt = min(now - last, 0.1)
            ids, seqs, ts, vals = sim.step(dt)
            last = now
            if len(ids):
                sink.arrays(numbering, ids, seqs, ts, vals, SIMULATOR)
                self.sent += len(ids)
                self._books(ids, seqs, ts, vals)
            if sim.tape is not None:
                self._trade_dt += dt
                if self._trade_dt >= self.trade_step:
                    self._trades(numbering, min(self._trade_dt, 0.1))
                    self._trade_dt = 0.0
            await sink.drain()
        return self.sent

    def _trades(self, numbering: object, dt: float) -> None:
        """A step's trades to the sink's trade entry point, then the quotes
        they moved (the trades come first: a row never shows a last that its
        tape has not had)."""
        batch, (ids, seqs, ts, vals) = self.sim.trade_step(dt)
        if len(batch):  # contract ingest trade messages, among a sink's ticks
            self.sink.ticks(trades_to_messages(self.sim.symbols, batch), SIMULATOR, self.reply)
            self.trades_sent += len(batch)
        if len(ids):
            self.sink.arrays(numbering, ids, seqs, ts, vals, SIMULATOR)
            self.sent += len(ids)
            # the books of the traded instruments follow: the level a trade
            # took from shrinks by its size, or leaves the book
            self._books(ids, seqs, ts, vals)

    def _books(self, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
               vals: np.ndarray) -> None:
        """The books of the instruments in these quote ticks brought to them."""
        if self.bookgen is not None:
            books = self.bookgen.step(ids, seqs, ts, vals)
            self.sink.ticks(books, SIMULATOR, self.book_reply)
            self.books_sent += len(books)
