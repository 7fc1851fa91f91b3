"""Play a recording back as a source (`serve --replay FILE --speed 1|10|max`).

Records are written in file order to the gateway's sink (docs/sources.md):
the local table, or, in Redis mode, the bus (every worker and pod then
applies them as they would live ticks). `--speed 1` keeps the recorded
gaps between arrivals, `10` divides them by ten, `max` writes as fast as
the sink takes them, yielding to the loop between records so clients are
served. A file cut off mid-record (the recorder crashed) plays up to its
last whole record and says so in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from . import record
from .sink import INGEST, SIMULATOR, Errors, Sink
from .source import TaskSource

log = logging.getLogger("fastfeed.replay")


def parse_speed(raw: str) -> float:
    """'max' -> 0.0 (no waiting), else a positive factor; ValueError otherwise."""
    word = raw.strip().lower()
    if word == "max":
        return 0.0
    v = float(word)
    if not v > 0:
        raise ValueError(raw)
    return v


class _RecordReply:
    """The sink's reply for one record: a record not taken (a bad batch, the
    bus down: the sink counted a failure) is counted and logged with its
    place in the file; ticks refused one by one were refused when recorded."""

    __slots__ = ("at", "failures", "kind", "replay")

    def __init__(self, replay: ReplaySource, at: int, kind: int) -> None:
        self.replay, self.at, self.kind = replay, at, kind
        self.failures = replay.sink.failures

    def admit(self, n: int) -> bool:
        self.replay.stats["ticks"] += n
        return True

    def refused(self, errors: Errors) -> None:
        return None  # refused ticks were refused when recorded too

    def error(self, code: str, message: str) -> None:
        if self.replay.sink.failures > self.failures:
            self.replay.refused_record(self.at, self.kind, f"{code}: {message}")


class ReplaySource(TaskSource):
    """One playback of `path` into `sink`; `stats` says what it did."""

    name = "replay"

    def __init__(self, sink: Sink, path: str, speed: str) -> None:
        super().__init__(sink)
        self.path = path
        self.factor = parse_speed(speed)
        self.numbering: Any = None  # the sink's numbering of the last SYMBOLS record
        self.stats = {"records": 0, "ticks": 0, "errors": 0, "truncated_at": -1}

    async def run(self) -> dict[str, Any]:
        try:
            return await self.play()
        except (OSError, record.RecordFileError) as e:
            log.error("replay %s failed: %s; the gateway goes on serving without it",
                      self.path, e)
            return {"error": str(e)}

    async def play(self) -> dict[str, Any]:
        sink = self.sink
        with open(self.path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            it = record.scan(fh)
            first_ns = 0
            await sink.wait_ready()
            t0 = time.monotonic()
            log.info("replaying %s (%d bytes) at %s into the %s", self.path, size,
                     f"{self.factor:g}x" if self.factor else "max speed", sink.name)
            while True:
                try:
                    at, kind, ns, payload = next(it)
                except StopIteration:
                    break
                if not first_ns:
                    first_ns = ns
                if self.factor:
                    wait = t0 + (ns - first_ns) / 1e9 / self.factor - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                else:
                    await asyncio.sleep(0)
                try:
                    self.write(at, kind, payload)
                except Exception as e:  # a bad record costs itself, not the replay
                    self.refused_record(at, kind, str(e))
                await sink.drain()
                self.stats["records"] += 1
            end = fh.tell()
        if end < size:
            self.stats["truncated_at"] = end
            log.warning("replay %s: the file ends in an incomplete or damaged record at byte %d "
                        "of %d (a recorder cut off mid-write); replayed the %d whole records "
                        "before it", self.path, end, size, self.stats["records"])
        log.info("replay %s done: %d records, %d ticks offered, %d records refused",
                 self.path, self.stats["records"], self.stats["ticks"], self.stats["errors"])
        return self.stats

    def write(self, at: int, kind: int, payload: bytes) -> None:
        sink = self.sink
        if kind == record.SYMBOLS:
            self.numbering = sink.symbols(json.loads(payload))
        elif kind == record.JSON:
            sink.json(payload, INGEST, _RecordReply(self, at, kind))
        elif kind == record.BATCH:
            sink.batch(payload, INGEST, _RecordReply(self, at, kind))
        else:
            ids, seqs, ts, vals = record.decode_arrays(payload)
            if self.numbering is None:
                raise ValueError("arrays record before any symbols record")
            self.stats["ticks"] += len(ids)
            sink.arrays(self.numbering, ids, seqs.copy(), ts.copy(), vals.copy(), SIMULATOR)

    def refused_record(self, at: int, kind: int, why: str) -> None:
        self.stats["errors"] += 1
        if self.stats["errors"] <= 10 or self.stats["errors"] % 1000 == 0:
            log.warning("replay %s: record at byte %d (%s) not applied (%d so far): %s",
                        self.path, at, record.KINDS[kind], self.stats["errors"], why)


async def play(path: str, speed: str, sink: Sink) -> dict[str, Any]:
    """Play `path` into `sink` to its end (tools and tests; the gateway runs a
    `ReplaySource`)."""
    return await ReplaySource(sink, path, speed).run()
