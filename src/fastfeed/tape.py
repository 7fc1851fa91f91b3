"""The client side of the `trades` and `bars:<interval>` channels.

`fastfeed.client.Client` keeps one `Tape` and one `BarStore`; they are plain
data structures fed with the entries of snapshots and update frames (the
contract's shapes, docs/protocol.md "Trades" and "Bars"), usable on their
own by anyone who decodes the messages themselves.

A `Tape` holds the last trades of every symbol (a bounded `deque` each),
oldest first, and the market-wide tape under `MARKET` (``"*"``: every
instrument's trades in the order the gateway applied them; its entries carry
the symbol in front of each trade). It takes each trade once: a trade whose
`tseq` is not above the last one held for its symbol (a resume's snapshot
overlapping what was already held) is skipped. Trades the gateway had to drop
for this client (a slow reader's backlog, or a resume past what the gateway's
ring holds) arrive as a count, ``"lost":N``; the tape adds them to `lost` per
symbol and calls ``on_lost(sym, n)``, so nothing is missed without saying so.

A `BarStore` holds the bars of every (symbol, interval), oldest first, each
bar replaced by the newer values of the same `start` (the forming bar
changes until its interval closes).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

__all__ = ["INTERVALS", "MARKET", "Bar", "BarStore", "Tape", "Trade", "bars_channel"]

#: the bar intervals of the contract, shortest first
INTERVALS = ("1s", "1m", "5m", "15m", "1h", "1d")
#: the symbol of the market-wide tape: every instrument's trades (docs/protocol.md)
MARKET = "*"


def bars_channel(interval: str) -> str:
    """The channel name of `interval`'s bars: ``bars:1m``."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown bar interval {interval!r}: one of {', '.join(INTERVALS)}")
    return f"bars:{interval}"


class Trade(NamedTuple):
    """One trade print; `side` is ``"b"`` (buyer aggressed), ``"s"`` or ``""``."""

    sym: str
    tseq: int
    ts: int
    price: float
    size: float
    side: str


class Bar(NamedTuple):
    """One OHLCV bar; `start` in ns since the epoch."""

    start: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int  # the contract's `count`: trades in the bar


class Tape:
    """Recent trades per symbol (see the module).

    `maxlen`: trades kept per symbol (and on the market-wide tape).
    `on_trades(trades)`: called with every batch of new trades, oldest first.
    `on_lost(sym, n)`: called when the gateway says `n` trades of `sym` were
    dropped for this client.
    """

    def __init__(self, maxlen: int = 1000, *,
                 on_trades: Callable[[list[Trade]], Any] | None = None,
                 on_lost: Callable[[str, int], Any] | None = None) -> None:
        if maxlen < 1:
            raise ValueError(f"a tape keeps at least one trade, not {maxlen}")
        self.maxlen = maxlen
        self.on_trades = on_trades
        self.on_lost = on_lost
        #: symbol -> its last trades, oldest first (MARKET: every symbol's, in arrival order)
        self.trades: dict[str, deque[Trade]] = {}
        #: symbol -> trades the gateway dropped for this client, in all
        self.lost: dict[str, int] = {}
        #: symbol -> the highest tseq taken
        self.last: dict[str, int] = {}
        self._market_last: dict[str, int] = {}  # the same, on the market-wide tape

    def since(self, symbols: Iterable[str]) -> dict[str, int]:
        """``since_trades`` for a resume: the last tseq held of each of `symbols`."""
        last = self.last
        return {s: last[s] for s in symbols if s in last and s != MARKET}

    def _market(self, items: Iterable[Any], resumed: bool, tape: deque[Trade],
                new: list[Trade]) -> int:
        """The market-wide tape's ``["SYM", tseq, ...]`` trades. It has no
        `since_trades`: a resubscribe (a reconnection) gets the gateway's
        tape ring again, so trades already held are skipped by symbol and
        tseq, and a symbol whose first trade there is past the one held + 1
        had trades that neither held: their count (consecutive numbering)."""
        last = self._market_last
        gap = 0
        firsts: set[str] = set()
        for it in items:
            sym, tseq = it[0], it[1]
            held = last.get(sym)
            if held is not None and tseq <= held:
                continue
            if resumed and held is not None and sym not in firsts and tseq > held + 1:
                gap += tseq - held - 1
            firsts.add(sym)
            last[sym] = tseq
            t = Trade(*it[:6])
            tape.append(t)
            new.append(t)
        return gap

    def forget(self, symbols: Iterable[str]) -> None:
        for s in symbols:
            if s == MARKET:
                self._market_last.clear()
            self.trades.pop(s, None)
            self.last.pop(s, None)

    def apply(self, entries: Iterable[Mapping[str, Any]], key: str,
              own: Callable[[str], bool]) -> list[Trade]:
        """Take the entries of a snapshot (`key` ``"recent"``) or an update
        (``"items"``) for the symbols `own` says yes to (`MARKET` included).
        Returns the new trades, oldest first."""
        new: list[Trade] = []
        lost_now: list[tuple[str, int]] = []
        for e in entries:
            sym = e["sym"]
            if not own(sym):
                continue
            n = e.get("lost")
            if n:
                self.lost[sym] = self.lost.get(sym, 0) + int(n)
                lost_now.append((sym, int(n)))
            items = e.get(key) or ()
            if not items:
                continue
            tape = self.trades.get(sym)
            if tape is None:
                tape = self.trades[sym] = deque(maxlen=self.maxlen)
            if sym == MARKET:
                gap = self._market(items, key == "recent", tape, new)
                if gap:
                    self.lost[sym] = self.lost.get(sym, 0) + gap
                    lost_now.append((sym, gap))
                continue
            held = self.last.get(sym, -1)
            for it in items:
                tseq = it[0]
                if tseq <= held:
                    continue  # already taken (a resume's snapshot overlaps)
                held = tseq
                t = Trade(sym, tseq, it[1], it[2], it[3], it[4])
                tape.append(t)
                new.append(t)
            self.last[sym] = held
        for sym, n in lost_now:
            if self.on_lost is not None:
                self.on_lost(sym, n)
        if new and self.on_trades is not None:
            self.on_trades(new)
        return new


class BarStore:
    """Bars per (symbol, interval), oldest first (see the module).

    `maxlen`: bars kept per series. `on_bars(changes)`: called with the
    ``(sym, interval, Bar)`` of every batch of changed bars.
    """

    def __init__(self, maxlen: int = 500, *,
                 on_bars: Callable[[list[tuple[str, str, Bar]]], Any] | None = None) -> None:
        if maxlen < 1:
            raise ValueError(f"a bar series keeps at least one bar, not {maxlen}")
        self.maxlen = maxlen
        self.on_bars = on_bars
        #: (symbol, interval) -> its bars, oldest first
        self.bars: dict[tuple[str, str], list[Bar]] = {}

    def forget(self, symbols: Iterable[str], interval: str | None = None) -> None:
        drop = set(symbols)
        for k in [k for k in self.bars if k[0] in drop and interval in (None, k[1])]:
            del self.bars[k]

    def apply(self, entries: Iterable[Mapping[str, Any]],
              wanted: Callable[[str, str], bool]) -> list[tuple[str, str, Bar]]:
        """Take the entries of a snapshot or an update (the same shape)."""
        changed: list[tuple[str, str, Bar]] = []
        for e in entries:
            sym, interval = e["sym"], e["interval"]
            if not wanted(sym, interval):
                continue
            series = self.bars.setdefault((sym, interval), [])
            for raw in e.get("bars") or ():
                bar = Bar(*raw)
                if not series or bar.start > series[-1].start:
                    series.append(bar)  # the common cases: a new bar, or ...
                elif bar.start == series[-1].start:
                    series[-1] = bar  # ... the forming one again
                else:  # a late trade's earlier bar
                    k = bisect.bisect_left(series, bar.start, key=lambda b: b.start)
                    if k < len(series) and series[k].start == bar.start:
                        series[k] = bar
                    else:
                        series.insert(k, bar)
                changed.append((sym, interval, bar))
            if len(series) > self.maxlen:
                del series[: len(series) - self.maxlen]
        if changed and self.on_bars is not None:
            self.on_bars(changed)
        return changed
