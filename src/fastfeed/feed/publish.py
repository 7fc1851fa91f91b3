"""Publish ticks straight onto the Redis bus: `fastfeed publish` and `RedisPublisher`.

    fastfeed publish --redis redis://redis:6379/0 < ticks.ndjson
    fastfeed publish --redis redis://redis:6379/0 --file ticks.csv
    fastfeed publish --redis redis://redis:6379/0 --simulate 5000 --rate 50000
    fastfeed publish --redis redis+cluster://r1:6379,r2:6379 < ticks.ndjson   # Redis Cluster

Input is NDJSON (one tick object, or an array of them, per line) or CSV with a
header row naming protocol fields (``sym,seq,bid,ask,...``; an empty cell
leaves the field out). ``--format auto`` looks at the first character.

For feed handlers written in Python:

    from fastfeed.feed.publish import RedisPublisher

    async with RedisPublisher("redis://redis:6379/0") as p:
        await p.publish([{"sym": "BBCA", "seq": 1, "bid": 9100.0, "ask": 9125.0}])

Ticks are validated, gathered into batches (up to `max_batch` ticks, or what
arrived within `flush_ms`) and sent as one script call per partition, which
stores them only-if-newer and publishes them (see `fastfeed.bus`). Redis
being away never blocks or fails `publish`: the publisher keeps the latest
state of every symbol it has published (memory bounded by symbols, not
ticks) and sends that state first whenever the connection comes back; the
store drops what it already had. A refused tick is counted (`rejected`) and
handed to `on_error(index_in_batch, sym, message)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._core import encode_batch
from ..bus import BusDown, RedisBus
from ..protocol import FIELDS

__all__ = ["RedisPublisher", "add_publish_parser", "publish_main", "read_ticks", "run_simulator"]

log = logging.getLogger("fastfeed.publish")

_INT_FIELDS = frozenset({"seq", "ts"})


class RedisPublisher:
    """Batching, reconnecting publisher onto the Redis bus."""

    def __init__(
        self,
        url: str,
        *,
        channels: int = 16,
        prefix: str = "fastfeed",
        max_batch: int = 2000,
        flush_ms: float = 5.0,
        max_inflight: int = 64,
        on_error: Callable[[int, Any, str], None] | None = None,
        **bus_kw: Any,
    ):
        self.bus = RedisBus(url, None, channels=channels, prefix=prefix, subscribe=False,
                            on_feed=self._on_feed, name="publisher", **bus_kw)
        self.max_batch = max_batch
        self.flush_ms = flush_ms
        self.max_inflight = max_inflight
        self.on_error = on_error
        self.state: dict[str, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []
        self.published = 0  # ticks accepted (validated) so far
        self.rejected = 0
        self.resent = 0  # rows re-sent from the state after a reconnection
        self.batches = 0
        self._dirty_while_down = False
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._resend: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        await self.bus.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.bus.wait_ready(timeout)

    async def __aenter__(self) -> RedisPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.bus.ready

    async def publish(self, ticks: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        """Queue ticks; a full batch is sent at once, the rest within `flush_ms`."""
        if isinstance(ticks, dict):
            self.pending.append(ticks)
        else:
            self.pending.extend(ticks)
        if len(self.pending) >= self.max_batch:
            await self.flush()
        elif self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Send what is queued (validated, merged into the resend state)."""
        assert self._lock is not None, "start() first"
        async with self._lock:
            while self.pending:
                chunk = self.pending[:self.max_batch]
                del self.pending[:self.max_batch]
                await self._send(chunk)

    async def _send(self, ticks: list[dict[str, Any]]) -> None:
        parts, errors = encode_batch(ticks, self.bus.parts)
        bad = set()
        for idx, sym, why in errors:
            bad.add(idx)
            self.rejected += 1
            if self.on_error is not None:
                self.on_error(idx, sym, why)
            elif self.rejected <= 10:
                log.warning("tick refused: %s (%s)", why, sym)
        state = self.state
        for i, t in enumerate(ticks):
            if bad and i in bad:
                continue
            st = state.get(t["sym"])
            if st is None:
                state[t["sym"]] = dict(t)
            elif t["seq"] > st["seq"]:
                st.update(t)
        self.published += len(ticks) - len(errors)
        if not self.bus.ready:
            self._dirty_while_down = True
            return
        try:
            self.bus.publish_batches_nowait(parts)
            self.batches += 1
            if self.bus.inflight() > self.max_inflight:
                await self.bus.flush()
            else:
                await self.bus.drain()
        except BusDown:
            # the state holds these; they go out when the bus is back
            self._dirty_while_down = True

    def _on_feed(self, up: bool) -> None:
        resending = self._resend is not None and not self._resend.done()
        if up and (self.state or self._dirty_while_down) and not resending:
            self._resend = asyncio.get_running_loop().create_task(self._resend_state())

    async def _resend_state(self) -> None:
        assert self._lock is not None
        async with self._lock:
            rows = list(self.state.values())
            self._dirty_while_down = False
            try:
                for i in range(0, len(rows), self.max_batch):
                    parts, _ = encode_batch(rows[i:i + self.max_batch], self.bus.parts)
                    self.bus.publish_batches_nowait(parts)
                    await self.bus.flush()
                self.resent += len(rows)
                if rows:
                    log.info("re-sent the latest state of %d symbols after reconnecting",
                             len(rows))
            except BusDown:
                self._dirty_while_down = True

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_ms / 1000)
            with contextlib.suppress(BusDown):
                await self.flush()

    async def sync(self, timeout: float | None = 30.0) -> bool:
        """Flush, and wait until Redis has taken everything published so far
        (waiting for it to come back, up to `timeout`). False if it did not."""
        await self.flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await self.bus.wait_ready(left)
                if self._resend is not None:
                    await self._resend
                if self._dirty_while_down:
                    await self._resend_state()
                await self.bus.flush()
                if not self._dirty_while_down:
                    return True
            except (TimeoutError, BusDown):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(0.05)

    async def close(self, timeout: float | None = 10.0) -> bool:
        """Deliver what is queued (waiting up to `timeout` for Redis) and stop."""
        ok = True
        if self._flusher is not None:
            ok = await self.sync(timeout)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.bus.close()
        return ok


# ---- input formats -------------------------------------------------------------


def _csv_value(name: str, raw: str) -> Any:
    if name == "sym":
        return raw
    if name in _INT_FIELDS:
        return int(raw)
    return float(raw)


def read_ticks(stream: io.TextIOBase | Any, fmt: str = "auto",
               errors: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Ticks from NDJSON or CSV text. Lines that do not parse are reported
    in `errors` (when given) and skipped."""
    first = ""
    if fmt == "auto":
        first = stream.readline()
        fmt = "ndjson" if first.lstrip()[:1] in ("{", "[") else "csv"
    lines = _chain(first, stream)
    if fmt == "ndjson":
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                if errors is not None:
                    errors.append(f"line {n}: not JSON: {e}")
                continue
            if isinstance(obj, list):
                yield from obj
            else:
                yield obj
        return
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in FIELDS]
    if unknown or "sym" not in header or "seq" not in header:
        raise ValueError(f"CSV header must name protocol fields including sym and seq; "
                         f"got {header} (unknown: {unknown})")
    for n, row in enumerate(reader, 2):
        if not row:
            continue
        try:
            yield {k: _csv_value(k, v.strip()) for k, v in zip(header, row, strict=False)
                   if v.strip() != ""}
        except ValueError as e:
            if errors is not None:
                errors.append(f"line {n}: {e}")


def _chain(first: str, stream: Any) -> Iterator[str]:
    if first:
        yield first
    yield from stream


# ---- the simulator ---------------------------------------------------------------


async def simulate(pub: RedisPublisher, n: int, rate: float, seed: int = 0,
                   duration: float = 0.0, step: float = 0.005) -> int:
    """Publish the built-in simulated market until `duration` (0: forever)."""
    from .simulator import Simulator

    sim = Simulator(n, rate, seed)
    sent = 0
    start = last = time.monotonic()
    while not duration or last - start < duration:
        await asyncio.sleep(step)
        now = time.monotonic()
        ticks = sim.ticks(min(now - last, 0.1))
        last = now
        await pub.publish(ticks)
        sent += len(ticks)
    return sent


def run_simulator(url: str, n: int, rate: float, *, seed: int = 0, channels: int = 16,
                  prefix: str = "fastfeed", duration: float = 0.0) -> int:
    """The pod's simulated feed process (`fastfeed serve --simulate` with workers)."""
    import uvloop

    async def main() -> int:
        async with RedisPublisher(url, channels=channels, prefix=prefix) as pub:
            await simulate(pub, n, rate, seed, duration)
        return 0

    return uvloop.run(main())


# ---- the command ------------------------------------------------------------------


def add_publish_parser(subparsers: Any) -> argparse.ArgumentParser:
    env = os.environ
    p = subparsers.add_parser(
        "publish", help="publish ticks onto the Redis bus (NDJSON/CSV or simulated)",
        description="Publish ticks to every gateway through Redis: NDJSON or CSV from stdin "
                    "or --file, or a simulated market with --simulate. --redis-channels and "
                    "--redis-prefix must match the gateways'.")
    p.add_argument("--redis", default=env.get("FASTFEED_REDIS", ""),
                   help="Redis URL, or redis+cluster://HOST:PORT,HOST:PORT for a Redis Cluster "
                        "(env FASTFEED_REDIS)")
    p.add_argument("--redis-channels", type=int,
                   default=int(env.get("FASTFEED_REDIS_CHANNELS", "16")),
                   help="pub/sub partitions (env FASTFEED_REDIS_CHANNELS, default 16)")
    p.add_argument("--redis-prefix", default=env.get("FASTFEED_REDIS_PREFIX", "fastfeed"),
                   help="key and channel prefix (env FASTFEED_REDIS_PREFIX, default fastfeed)")
    p.add_argument("--file", default="-", help="input file (default: stdin)")
    p.add_argument("--format", choices=("auto", "ndjson", "csv"), default="auto")
    p.add_argument("--batch", type=int, default=2000, help="ticks per batch (default 2000)")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="publish a simulated market of N instruments instead of reading input")
    p.add_argument("--rate", type=float, default=2000.0, help="simulated ticks per second")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (0: random)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop the simulation after this many seconds (0: run until killed)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for Redis before giving up (default 30)")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.set_defaults(func=publish_main)
    return p


def publish_main(args: argparse.Namespace) -> int:
    if not args.redis:
        print("fastfeed publish: --redis URL (or FASTFEED_REDIS) is required", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(_publish(args))


async def _publish(args: argparse.Namespace) -> int:
    import signal

    pub = RedisPublisher(args.redis, channels=args.redis_channels, prefix=args.redis_prefix,
                         max_batch=args.batch)
    await pub.start()
    try:
        await pub.wait_ready(args.wait)
    except TimeoutError:
        print(f"fastfeed publish: Redis {pub.bus.url} unreachable for {args.wait:g}s: "
              f"{pub.bus.last_error}", file=sys.stderr)
        await pub.bus.close()
        return 1
    t0 = time.perf_counter()
    problems: list[str] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.simulate:
            task = loop.create_task(simulate(pub, args.simulate, args.rate, args.seed,
                                             args.duration))
            stopper = loop.create_task(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            task.cancel()
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            fh = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
            try:
                batch: list[dict[str, Any]] = []
                for tick in read_ticks(fh, args.format, problems):
                    batch.append(tick)
                    if len(batch) >= args.batch:
                        await pub.publish(batch)
                        batch = []
                        if stop.is_set():
                            break
                if batch:
                    await pub.publish(batch)
            finally:
                if fh is not sys.stdin:
                    fh.close()
        ok = await pub.close(args.wait)
    except ValueError as e:
        print(f"fastfeed publish: {e}", file=sys.stderr)
        await pub.close(args.wait)
        return 2
    dt = time.perf_counter() - t0
    for p in problems[:20]:
        print(f"fastfeed publish: {p}", file=sys.stderr)
    if not args.quiet:
        print(f"published {pub.published} ticks in {dt:.2f}s ({pub.published / max(dt, 1e-9):,.0f}"
              f" ticks/s, {pub.batches} batches); refused {pub.rejected + len(problems)}"
              + (f"; re-sent {pub.resent} rows after reconnecting" if pub.resent else ""),
              file=sys.stderr)
    if not ok:
        print("fastfeed publish: Redis did not take every tick before the deadline",
              file=sys.stderr)
        return 1
    return 1 if pub.rejected or problems else 0
