"""Sources: what writes ticks into a sink (docs/sources.md).

A source has a `name`, a `sink` it writes to (`fastfeed.feed.sink`), and a
lifecycle: ``await start()`` once (before the gateway listens: a source that
must hold its initial state first waits in `start`), ``await stop()`` once.
The gateway also asks every source, each second or on each request:
``problem()`` (why the gateway is not ready because of it, or None),
``has_data`` (False while it has never delivered its initial state: clients
are then turned away) and ``observe(metrics)`` (copy its counters).

The sources: `fastfeed.feed.simulator.SimulatorSource`, the ``/ingest``
endpoint (`fastfeed.feed.ingest.IngestSource`, one `IngestSession` per
publisher connection), the Redis bus's subscriber (`BusSource`), and a
recording played back (`fastfeed.feed.replay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from .sink import Sink

__all__ = ["BusSource", "Source", "TaskSource"]

log = logging.getLogger("fastfeed.server")  # where the gateway's start-up lines are


class Source:
    """The base of every source: the defaults of the optional parts."""

    name = "source"

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def problem(self) -> str | None:
        return None

    @property
    def has_data(self) -> bool:
        return True

    def observe(self, metrics: Any) -> None:
        return None


class TaskSource(Source):
    """A source that is one task: `run()` writes to the sink until it returns
    (or forever); `start` starts it, `stop` cancels it."""

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self.task: asyncio.Task[Any] | None = None

    def run(self) -> Coroutine[Any, Any, Any]:
        raise NotImplementedError

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class BusSource(Source):
    """The Redis bus's subscriber (`fastfeed.bus.subscriber.Subscriber`):
    every tick any gateway or publisher put on the bus, and the snapshot on
    every (re)connection, into this gateway's local sink. The bus writes to
    the sink it was made with (``RedisBus(..., sink=)``); this is its
    lifecycle and its health."""

    name = "Redis bus"

    def __init__(self, bus: Any, sink: Sink, grace_s: float) -> None:
        super().__init__(sink)
        self.bus = bus
        self.grace_s = grace_s

    async def start(self) -> None:
        # Workers share one listening socket: a worker takes connections as
        # soon as it listens, whatever /readyz says. Hold the snapshot first
        # (or give up after the grace and serve with the feed down).
        await self.bus.start()
        try:
            await self.bus.wait_ready(self.grace_s)
        except TimeoutError:
            log.warning("no snapshot from Redis after %gs (%s): serving with the feed down",
                        self.grace_s, getattr(self.bus, "last_error", "") or "connecting")

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.bus.stop()

    def problem(self) -> str | None:
        return None if self.bus.ready else "snapshot from Redis not loaded yet"

    @property
    def has_data(self) -> bool:
        # False until the first snapshot: the table is empty or partial. After
        # it, the gateway keeps serving through Redis outages, with the last rows.
        return bool(self.bus.connects > 0)

    def observe(self, metrics: Any) -> None:
        metrics.observe_bus(self.bus)
