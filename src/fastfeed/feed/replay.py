"""Play a recording back as a source (`serve --replay FILE --speed 1|10|max`).

Records are applied in file order: into the local table, or, in Redis mode,
published onto the bus through the bus's publish path (every worker and pod
then applies them as they would live ticks). `--speed 1` keeps the recorded
gaps between arrivals, `10` divides them by ten, `max` applies as fast as
the loop allows, yielding to it between records so clients are served.
A file cut off mid-record (the recorder crashed) plays up to its last whole
record and says so in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _core
from .._tickjson import TickParser
from . import record
from .simulator import VALUE_COLS

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


class Replay:
    """One playback of `path`; `stats` says what it did."""

    def __init__(self, path: str, speed: str, table: Any, on_ticks: Callable[[], None],
                 bus: Any = None) -> None:
        self.path = path
        self.factor = parse_speed(speed)
        self.table = table
        self.on_ticks = on_ticks
        self.bus = bus
        self.parser = TickParser()
        self.sim_ids: np.ndarray | None = None  # ARRAYS numbering -> table ids
        self.sim_names: list[str] = []
        self.stats = {"records": 0, "ticks": 0, "errors": 0, "truncated_at": -1}

    async def run(self) -> dict[str, Any]:
        with open(self.path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            it = record.scan(fh)
            first_ns = 0
            if self.bus is not None and not self.bus.ready:
                log.warning("replay %s waits for the Redis bus to be ready", self.path)
                while not self.bus.ready:
                    await asyncio.sleep(0.1)
            t0 = time.monotonic()
            log.info("replaying %s (%d bytes) at %s into the %s", self.path, size,
                     f"{self.factor:g}x" if self.factor else "max speed",
                     "Redis bus" if self.bus is not None else "local table")
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
                    await self.apply(kind, payload)
                except Exception as e:  # a bad record costs itself, not the replay
                    self.stats["errors"] += 1
                    if self.stats["errors"] <= 10 or self.stats["errors"] % 1000 == 0:
                        log.warning("replay %s: record at byte %d (%s) not applied (%d so "
                                    "far): %s", self.path, at, record.KINDS[kind],
                                    self.stats["errors"], e)
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

    async def apply(self, kind: int, payload: bytes) -> None:
        if kind == record.SYMBOLS:
            self.sim_names = json.loads(payload)
            if self.bus is None:
                self.sim_ids = np.array([self.table.intern_symbol(s) for s in self.sim_names],
                                        np.int32)
            return
        if self.bus is not None:
            ticks = self._ticks(kind, payload)
            self.stats["ticks"] += len(ticks)
            await self.bus.publish(ticks)
            return
        table = self.table
        if kind == record.JSON:
            n = self.parser.parse(payload)
            if n >= 0:
                self.parser.apply(table, 0)
            else:
                msg = json.loads(payload)
                ticks = msg if isinstance(msg, list) else [msg]
                n = len(ticks)
                table.apply_objects(ticks, 0)
        elif kind == record.BATCH:
            n = int.from_bytes(payload[4:8], "little")
            table.apply_batch(payload, 0)
        else:
            ids, seqs, ts, vals = record.decode_arrays(payload)
            if self.sim_ids is None:
                raise ValueError("arrays record before any symbols record")
            n = len(ids)
            table.apply_arrays(self.sim_ids[ids], seqs.copy(), ts.copy(), vals.copy(), 2)
        self.stats["ticks"] += n
        self.on_ticks()

    def _ticks(self, kind: int, payload: bytes) -> list[dict[str, Any]]:
        """A record as protocol tick objects, for the bus's publish path."""
        if kind == record.JSON:
            msg = json.loads(payload)
            return msg if isinstance(msg, list) else [msg]
        if kind == record.BATCH:
            return _core.decode_batch(payload)
        ids, seqs, ts, vals = record.decode_arrays(payload)
        names = self.sim_names
        out = []
        for k in range(len(ids)):
            t: dict[str, Any] = {"sym": names[ids[k]], "seq": int(seqs[k]), "ts": int(ts[k])}
            for name, j in VALUE_COLS.items():
                t[name] = float(vals[k, j])
            out.append(t)
        return out


async def play(path: str, speed: str, table: Any, on_ticks: Callable[[], None],
               bus: Any = None) -> dict[str, Any]:
    """The gateway's replay task."""
    try:
        return await Replay(path, speed, table, on_ticks, bus).run()
    except (OSError, record.RecordFileError) as e:
        log.error("replay %s failed: %s; the gateway goes on serving without it", path, e)
        return {"error": str(e)}
