"""A small, obviously-correct model of the core, in plain Python.

It is the specification the compiled `Table` and `Hub` are tested against:
the differential test feeds both the same random ticks, subscriptions,
watches, pauses and frame clocks, and requires byte-identical frames.
Nothing in the gateway runs it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

from ._core import ROW_DTYPE, valid_symbol
from .protocol import BIN_MAGIC, VALUE_FIELDS

APPLIED, STALE, REJECTED = 0, 1, 2
_dumps = json.JSONEncoder(separators=(",", ":")).encode


class RefTable:
    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.rows: list[list] = []
        self.chg: list[int] = []
        self.version = 0
        self.watched: set[int] = set()
        self.dirty: set[int] = set()
        self.hot: set[int] = set()

    def lookup(self, sym: str) -> int:
        return self.ids.get(sym, -1)

    def apply(self, tick: dict) -> int:
        sym, seq = tick.get("sym"), tick.get("seq")
        if not isinstance(sym, str) or not valid_symbol(sym):
            return REJECTED
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return REJECTED
        vals = {k: tick[k] for k in VALUE_FIELDS if tick.get(k) is not None}
        if any(not math.isfinite(v) for v in vals.values()):
            return REJECTED
        iid = self.ids.get(sym)
        if iid is None:
            iid = self.ids[sym] = len(self.rows)
            self.rows.append([sym, -1, 0] + [0.0] * 7)
            self.chg.append(0)
        row = self.rows[iid]
        if seq <= row[1]:
            return STALE
        row[1] = seq
        if tick.get("ts") is not None:
            row[2] = tick["ts"]
        for k, name in enumerate(VALUE_FIELDS):
            if name in vals:
                row[3 + k] = float(vals[name])
        self.version += 1
        self.chg[iid] = self.version
        self.dirty.add(iid)
        if iid in self.watched:
            self.hot.add(iid)
        return APPLIED

    def row_json(self, iid: int) -> bytes:
        return _dumps(self.rows[iid]).encode()

    def row_bin(self, iid: int) -> bytes:
        r = self.rows[iid]
        return struct.pack("<32sqq7d", r[0].encode(), r[1], r[2], *r[3:])


@dataclass
class RefConn:
    interval: int
    binary: bool
    last_send: int
    sent_ver: int
    subs: set[int] = field(default_factory=set)
    watched: set[int] = field(default_factory=set)
    scheduled: bool = False
    due: int = 0
    paused: bool = False


class RefHub:
    def __init__(self, table: RefTable, slack_ns: int = 1_000_000) -> None:
        self.table = table
        self.conns: dict[int, RefConn] = {}
        self.slack = slack_ns
        self.capture: list[tuple[int, bytes]] = []
        self._next = 0

    def add(self, interval_ns: int, binary: bool, mono: int) -> int:
        cid = self._next
        self._next += 1
        self.conns[cid] = RefConn(interval_ns, binary, mono, self.table.version)
        return cid

    def subscribe_ids(self, cid: int, ids) -> None:
        self.conns[cid].subs = set(ids)

    def watch_ids(self, cid: int, ids, on: bool) -> None:
        c = self.conns[cid]
        (c.watched.update if on else c.watched.difference_update)(ids)
        self.table.watched = set().union(*(x.watched for x in self.conns.values()))

    def pause(self, cid: int) -> None:
        self.conns[cid].paused = True

    def resume(self, cid: int) -> None:
        c = self.conns[cid]
        if c.paused:
            c.paused = False
            self._schedule(c, 0)

    def _schedule(self, c: RefConn, due: int) -> None:
        if c.scheduled and c.due <= due:
            return
        c.scheduled, c.due = True, due

    def pump(self, wall: int, mono: int) -> None:
        t = self.table
        for c in self.conns.values():
            if not c.paused and c.subs & t.dirty:
                self._schedule(c, c.last_send + c.interval)
        for c in self.conns.values():
            if not c.paused and c.watched & t.hot:
                self._schedule(c, 0)
        t.dirty.clear()
        t.hot.clear()
        for cid, c in self.conns.items():
            if not c.scheduled or c.due > mono + self.slack:
                continue
            c.scheduled = False
            if c.paused:
                continue
            ids = [i for i in sorted(c.subs) if t.chg[i] > c.sent_ver]
            c.sent_ver = t.version
            if not ids:
                continue
            c.last_send = mono
            self.capture.append((cid, self.frame(ids, wall, c.binary)))

    def frame(self, ids: list[int], wall: int, binary: bool) -> bytes:
        t = self.table
        if binary:
            head = BIN_MAGIC + struct.pack("<Iq", len(ids), wall)
            assert ROW_DTYPE.itemsize == 104
            return head + b"".join(t.row_bin(i) for i in ids)
        rows = b",".join(t.row_json(i) for i in ids)
        return b'{"type":"update","t":%d,"rows":[%s]}' % (wall, rows)
