"""Delayed data: the delay line's clock, its budget and its health (docs/delay.md).

The line (`fastfeed._core.DelayLine`) reads the real table's changes once a
slot and releases them to the delayed tables as they come of age; this is
the task that makes it turn, in the gateway's loop, and what it tells the
operator (the log when it coarsens, metrics, /readyz with
--delay-gates-ready) and the delayed clients (whether it holds their past).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .. import _core
from .source import TaskSource

log = logging.getLogger("fastfeed.delay")

NS = 1_000_000_000


class DelaySource(TaskSource):
    """The delay line as a source of the delayed tables (not of the real one)."""

    name = "delay line"

    def __init__(self, table: Any, max_delay_s: int, slot_ms: int, budget_mb: int,
                 gates_ready: bool, kick: Callable[[], None], books: Any = None,
                 trades: Any = None) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # it writes delayed copies, no sink
        self.line = _core.DelayLine(table, max_delay_s * NS, slot_ms * 1_000_000,
                                    budget_mb << 20, books, trades)
        self.max_delay_s = max_delay_s
        self.gates_ready = gates_ready
        self.kick = kick
        self.on_full: Callable[[int], None] = lambda delay_s: None
        self._asked: set[int] = set()
        self._filling: set[int] = set()  # delays (s) whose past the line does not hold yet
        self._slot_logged = self.line.slot_ns
        self._over_logged = False  # "over budget at its coarsest", said once
        self._dropped = 0  # line.future_trades already counted

    def view_for(self, delay_s: int) -> Any:
        """The delayed copy for `delay_s` (1 .. max_delay_s), made on first use: a
        `DelayedView` (its `table`, `books`, `trades` and their `bars`)."""
        known = delay_s * NS in self._asked
        view = self.line.view(delay_s * NS)
        if not known:
            self._asked.add(delay_s * NS)
            if self.filling(delay_s):
                self._filling.add(delay_s)
        return view

    def filling(self, delay_s: int) -> bool:
        """True while the line holds less than `delay_s` of past (this worker
        started less than `delay_s` ago): symbols whose last tick is newer
        than that have no delayed state yet."""
        return self.line.past_ns() < delay_s * NS

    def past_s(self) -> float:
        return self.line.past_ns() / NS

    def problem(self) -> str | None:
        if self.gates_ready and self.filling(self.max_delay_s):
            return (f"delay line filling: {self.past_s():.0f} of {self.max_delay_s} s of past "
                    "held (--delay-gates-ready)")
        return None

    def step(self, now: int) -> int:
        """One turn: close a slot if one is due, release what came of age."""
        line = self.line
        line.record(now)
        applied = line.advance(now)
        if applied:
            self.kick()
        if line.slot_ns != self._slot_logged:
            log.warning("delay line over its budget of %d MiB (--delay-budget-mb): slots "
                        "coarsened from %g to %g ms, %d entries in %d slots, %d bytes; "
                        "delayed clients now move in steps of %g ms. Raise the budget, or "
                        "lower --max-delay-s, to keep the finer slots",
                        line.budget_bytes >> 20, self._slot_logged / 1e6, line.slot_ns / 1e6,
                        line.entries, line.slots, line.nbytes, line.slot_ns / 1e6)
            self._slot_logged = line.slot_ns
        if line.coarsest and not self._over_logged and line.nbytes > line.budget_bytes:
            self._over_logged = True
            log.error("delay line over its budget of %d MiB (--delay-budget-mb) at its "
                      "coarsest slots (%g ms, half of --max-delay-s): it holds %d bytes (each "
                      "instrument's latest state in every slot, every trade) and merges no "
                      "further, so it grows with the instruments and the trade rate. Delayed "
                      "clients stay correct, in steps of one slot. Raise --delay-budget-mb or "
                      "lower --max-delay-s (docs/delay.md, Memory, has the formula)",
                      line.budget_bytes >> 20, line.slot_ns / 1e6, line.nbytes)
        if self._filling:
            for d in sorted(self._filling):
                if not self.filling(d):
                    self._filling.discard(d)
                    self.on_full(d)
        return applied

    async def start(self) -> None:
        # the first slot now: it holds the table as the sources before this one
        # left it (the bus's snapshot), before any client can ask
        self.step(_core.wall_ns())
        await super().start()

    async def run(self) -> None:
        line = self.line
        while True:
            # a release is due at most a slot after the record that made it
            await asyncio.sleep(line.slot_ns / NS)
            self.step(_core.wall_ns())

    def observe(self, metrics: Any) -> None:
        line = self.line
        dropped = line.future_trades - self._dropped
        if dropped:
            self._dropped = line.future_trades
            metrics.delay_dropped.inc(dropped)
            log.warning("left %d trades out of the delayed copies: their source ts lies more "
                        "than --max-delay-s (%d s) ahead of this gateway's clock, so no delay "
                        "could release them; delayed clients count them lost. Check the "
                        "publisher's clock (or this host's)", dropped, self.max_delay_s)
        metrics.delay_entries.labels("quote").set(line.entries)
        metrics.delay_entries.labels("book").set(line.book_entries)
        metrics.delay_entries.labels("trade").set(line.trade_entries)
        metrics.delay_line_bytes.set(line.nbytes)
        metrics.delay_slot.set(line.slot_ns / NS)
        metrics.delay_past.set(min(self.past_s(), self.max_delay_s))
