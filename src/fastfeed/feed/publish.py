"""`fastfeed publish`: ticks onto the Redis bus, or into one gateway's /ingest.

    fastfeed publish --redis redis://redis:6379/0 < ticks.ndjson
    fastfeed publish --redis redis://redis:6379/0 --file ticks.csv
    fastfeed publish --redis redis://redis:6379/0 --simulate 5000 --rate 50000
    fastfeed publish --redis redis+cluster://r1:6379,r2:6379 < ticks.ndjson   # Redis Cluster
    fastfeed publish --url ws://gateway:8080/ingest --token T < ticks.ndjson  # one gateway

Input is NDJSON (one tick object, or an array of them, per line) or CSV with a
header row naming protocol fields (``sym,seq,bid,ask,...``; an empty cell
leaves the field out). ``--format auto`` looks at the first character.

It is `fastfeed.publisher.Publisher` (the one publisher, also what feed
handlers written in Python use): ticks are checked, gathered into batches (up
to ``--batch`` ticks, or what arrived within 5 ms) and sent; the transport
being away never blocks or fails publishing: the latest state of every
symbol is held (memory bounded by symbols, not ticks) and sent first when
the connection comes back. A refused tick is counted and reported on
stderr; the exit status is 1 if any was, or if ``--wait`` seconds passed
before the other side took everything.

`RedisPublisher` is importable from here as before (`fastfeed.publisher`).
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
from collections.abc import Iterator
from typing import Any

from .._core import decode_batch
from ..client import FastfeedError
from ..protocol import BAD_REQUEST, FIELDS, INT_FIELDS
from ..publisher import MAX_BATCH, Publisher, RedisPublisher, RedisTransport, WebSocketTransport
from .sink import SIMULATOR, arrays_to_ticks

__all__ = ["PublisherSink", "RedisPublisher", "add_publish_parser", "publish_main", "read_ticks",
           "run_simulator", "simulate"]

log = logging.getLogger("fastfeed.publish")

# ---- input formats -------------------------------------------------------------


def _csv_value(name: str, raw: str) -> Any:
    if name == "sym":
        return raw
    if name in INT_FIELDS:
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


class PublisherSink:
    """A `fastfeed.feed.sink.Sink` in front of a `Publisher` (to a gateway's
    /ingest, or onto the bus): what a source writes is handed to
    `Publisher.publish` in `drain`, which waits while the publisher's queue is
    full. Refusals are the publisher's (its ``on_error``), so `reply` only
    admits; ``kick`` and ``observe`` have nothing to do here."""

    name = "publisher"

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.pending: list[dict[str, Any]] = []
        self.ticks_in = 0
        self.ticks_refused = 0  # the publisher counts refusals (Publisher.errors)
        self.failures = 0

    def json(self, data: bytes, source: int, reply: Any) -> None:
        try:
            msg = json.loads(data)
        except ValueError as e:
            self.failures += 1
            return reply.error(BAD_REQUEST, f"not JSON: {e}")
        self.ticks(msg if isinstance(msg, list) else [msg], source, reply)

    def ticks(self, ticks: list[Any], source: int, reply: Any) -> None:
        if reply.admit(len(ticks)):
            self.ticks_in += len(ticks)
            self.pending.extend(ticks)

    def batch(self, data: bytes, source: int, reply: Any) -> None:
        try:
            ticks = decode_batch(data)
        except (ValueError, IndexError) as e:
            self.failures += 1
            return reply.error(BAD_REQUEST, f"bad tick batch: {e}")
        self.ticks(ticks, source, reply)

    def symbols(self, names: Any) -> list[str]:
        return list(names)

    def arrays(self, numbering: list[str], ids: Any, seqs: Any, ts: Any, vals: Any,
               source: int = SIMULATOR) -> None:
        self.ticks_in += len(ids)
        self.pending.extend(arrays_to_ticks(numbering, ids, seqs, ts, vals))

    @property
    def takes_books(self) -> bool:
        """Book messages given to `ticks` go on (the transport carries them)."""
        return bool(getattr(self.pub.transport, "takes_books", False))

    @property
    def takes_trades(self) -> bool:
        """Trade messages given to `ticks` go on (the transport carries them)."""
        return bool(getattr(self.pub.transport, "takes_trades", False))

    async def drain(self) -> None:
        if self.pending:
            ticks, self.pending = self.pending, []
            await self.pub.publish(ticks)

    async def wait_ready(self) -> None:
        await self.pub.wait_connected()

    def kick(self) -> None:
        return None

    def observe(self, metrics: Any) -> None:
        return None


async def simulate(pub: Publisher, n: int, rate: float, seed: int = 0,
                   duration: float = 0.0, step: float = 0.005, trade_rate: float = 0.0) -> int:
    """Publish the built-in simulated market until `duration` (0: forever),
    with its order books when the publisher's transport takes books, and
    `trade_rate` trades per second (0: none)."""
    from .simulator import SimulatorSource

    return await SimulatorSource(PublisherSink(pub), n, rate, seed, duration=duration,
                                 step=step, trade_rate=trade_rate).run()


def run_simulator(url: str, n: int, rate: float, *, seed: int = 0, channels: int = 16,
                  prefix: str = "fastfeed", duration: float = 0.0, book_levels: int = 50,
                  trade_rate: float = 0.0) -> int:
    """The pod's simulated feed process (`fastfeed serve --simulate` with workers):
    its quotes, books and trades onto the bus (`book_levels` is the pod's
    ``--book-levels``; `trade_rate` trades per second, 0: none)."""
    import uvloop

    async def main() -> int:
        async with RedisPublisher(url, channels=channels, prefix=prefix,
                                  book_levels=book_levels) as pub:
            await simulate(pub, n, rate, seed, duration, trade_rate=trade_rate)
        return 0

    return uvloop.run(main())


# ---- the command ------------------------------------------------------------------


def add_publish_parser(subparsers: Any) -> argparse.ArgumentParser:
    env = os.environ
    p = subparsers.add_parser(
        "publish", help="publish ticks onto the Redis bus or to a gateway (NDJSON/CSV or "
                        "simulated)",
        description="Publish ticks to every gateway through Redis (--redis), or to one "
                    "gateway's /ingest (--url): NDJSON or CSV from stdin or --file, or a "
                    "simulated market with --simulate. --redis-channels and --redis-prefix "
                    "must match the gateways'.")
    p.add_argument("--redis", default=env.get("FASTFEED_REDIS", ""),
                   help="Redis URL, or redis+cluster://HOST:PORT,HOST:PORT for a Redis Cluster "
                        "(env FASTFEED_REDIS)")
    p.add_argument("--url", default="",
                   help="instead of --redis (wins over it): a gateway's ws://HOST:PORT/ingest")
    p.add_argument("--token", default=env.get("FASTFEED_PUBLISHER_TOKEN", ""),
                   help="the gateway's publisher token, with --url "
                        "(env FASTFEED_PUBLISHER_TOKEN)")
    p.add_argument("--redis-channels", type=int,
                   default=int(env.get("FASTFEED_REDIS_CHANNELS", "16")),
                   help="pub/sub partitions (env FASTFEED_REDIS_CHANNELS, default 16)")
    p.add_argument("--redis-prefix", default=env.get("FASTFEED_REDIS_PREFIX", "fastfeed"),
                   help="key and channel prefix (env FASTFEED_REDIS_PREFIX, default fastfeed)")
    p.add_argument("--book-levels", type=int,
                   default=int(env.get("FASTFEED_BOOK_LEVELS", "50")),
                   help="order book levels kept per side, with --redis: the gateways' "
                        "--book-levels (env FASTFEED_BOOK_LEVELS, default 50)")
    p.add_argument("--file", default="-", help="input file (default: stdin)")
    p.add_argument("--format", choices=("auto", "ndjson", "csv"), default="auto")
    p.add_argument("--batch", type=int, default=MAX_BATCH,
                   help=f"ticks per batch (default {MAX_BATCH})")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="publish a simulated market of N instruments instead of reading input")
    p.add_argument("--rate", type=float, default=2000.0, help="simulated ticks per second")
    p.add_argument("--seed", type=int, default=0, help="simulator seed (0: random)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop the simulation after this many seconds (0: run until killed)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for Redis (or the gateway) before giving up "
                        "(default 30)")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.set_defaults(func=publish_main)
    return p


def publish_main(args: argparse.Namespace) -> int:
    if not args.url and not args.redis:
        print("fastfeed publish: give one of --redis URL (or FASTFEED_REDIS), for the bus, "
              "or --url ws://HOST:PORT/ingest, for one gateway", file=sys.stderr)
        return 2
    if args.batch < 1:
        print(f"fastfeed publish: --batch must be at least 1, not {args.batch}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import uvloop

    return uvloop.run(_publish(args))


async def _publish(args: argparse.Namespace) -> int:
    import signal

    refused: list[str] = []

    def on_error(err: FastfeedError) -> None:
        if len(refused) < 20:
            refused.append(str(err))

    transport: RedisTransport | WebSocketTransport
    if args.url:
        transport = WebSocketTransport(args.url, args.token or None)
        where = f"gateway {args.url}"
    else:
        transport = RedisTransport(args.redis, channels=args.redis_channels,
                                   prefix=args.redis_prefix, book_levels=args.book_levels)
        where = f"Redis {transport.url}"
    pub = Publisher(transport=transport, max_batch=args.batch, validate=False,
                    on_error=on_error)
    try:
        await pub.wait_connected(args.wait)
    except TimeoutError:
        why = transport.last_error if isinstance(transport, RedisTransport) else (
            pub.error or "no connection")
        print(f"fastfeed publish: {where} unreachable for {args.wait:g}s: {why}",
              file=sys.stderr)
        await pub.close(0)
        return 1
    if pub.error is not None:
        print(f"fastfeed publish: {where}: {pub.error}", file=sys.stderr)
        await pub.close(0)
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
    for r in refused:
        print(f"fastfeed publish: refused: {r}", file=sys.stderr)
    if not args.quiet:
        print(f"published {pub.published} ticks in {dt:.2f}s ({pub.published / max(dt, 1e-9):,.0f}"
              f" ticks/s, {pub.batches} batches); refused {pub.errors + len(problems)}"
              + (f"; re-sent {pub.resent} rows on reconnecting" if pub.resent else ""),
              file=sys.stderr)
    if not ok:
        print(f"fastfeed publish: {where} did not take every tick before the deadline",
              file=sys.stderr)
        return 1
    return 1 if pub.errors or problems else 0
