"""The frame clock and its pacing: when the hub builds and sends frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

# A frame cycle yields to the loop after this long: a watched tick that
# arrives meanwhile waits at most one slice before it goes out. While any
# connection watches, the slice is shorter (bench watched scenario: p99 of
# watched ticks about a third lower at 250 µs than at 1 ms, the same CPU).
PUMP_SLICE_NS = 1_000_000
WATCHED_SLICE_NS = 250_000
PACE_EVERY_S = 0.1
PACE_BUSY = 0.75  # share of a core the frame pacing aims at under load


class FrameClock:
    """Runs the hub's frame cycles: every few ms, and in the loop pass after
    ticks were applied (so watched instruments go out at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hub: Any, frame_ms: int,
                 max_frame_ms: int, min_frame_ms: int,
                 show_floor: Callable[[float], None]) -> None:
        self.loop = loop
        self.hub = hub
        self.frame_ms = frame_ms
        self.max_frame_ms = max_frame_ms
        self.show_floor = show_floor  # the frame floor in seconds (0: not stretched)
        self.every = min(0.004, min_frame_ms / 4000)
        self._kicked = False
        # run before every frame cycle (a kind's out-of-band messages, e.g. book status)
        self.before: list[Callable[[], None]] = []

    def after_ticks(self) -> None:
        """Ticks were applied: watched instruments that changed go out in this loop pass."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self.pump)

    def pump(self) -> None:
        self._kicked = False
        for before in self.before:
            before()
        if self.hub.pump(WATCHED_SLICE_NS if self.hub.watches else PUMP_SLICE_NS):
            # out of time slice: let ingest and reads run, then carry on with
            # the most overdue connections first (the heap is deadline-ordered)
            self.after_ticks()

    async def run(self) -> None:
        while True:
            self.pump()
            await asyncio.sleep(self.every)

    async def pace(self) -> None:
        """Spend the latency budget rather than saturate: past PACE_BUSY of a
        core, raise every client's shortest frame interval alike (up to
        --max-frame-ms), so frames get fuller and fewer; a saturated loop
        would leave reads, ingest and the tail latency to chance instead."""
        base, top = self.frame_ms, self.max_frame_ms
        floor = float(base)
        cpu, t = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(PACE_EVERY_S)
            cpu1, t1 = time.process_time(), time.monotonic()
            busy = (cpu1 - cpu) / max(t1 - t, 1e-3)
            cpu, t = cpu1, t1
            # frames cost about in proportion to 1/floor: aim at PACE_BUSY, halfway per step
            want = min(max(floor * busy / PACE_BUSY, base), top)
            new = 0.5 * floor + 0.5 * want
            if abs(new - floor) >= 0.5 or (new == base) != (floor == base):
                floor = new if new - base >= 0.5 else float(base)
                self.hub.set_floor(0 if floor == base else int(floor * 1e6))
                self.show_floor(0 if floor == base else floor / 1000)
