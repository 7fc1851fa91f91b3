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
    """Quotes. `key` is the frame key of its rows (a delayed copy keeps "rows")."""

    def __init__(self, key: str = "rows") -> None:
        self.key = key
        self.has_binary = key == "rows"  # FFB1 frames carry quote rows
        self.ids: dict[str, int] = {}
        self.rows: list[list] = []
        self.chg: list[int] = []
        self.fchg: list[list[int]] = []  # per row: stamp of ts and of each value
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
            self.fchg.append([0] * 8)
        row = self.rows[iid]
        if seq <= row[1]:
            return STALE
        row[1] = seq
        ver = self.version + 1
        f = self.fchg[iid]
        if tick.get("ts") is not None and tick["ts"] != row[2]:
            row[2] = tick["ts"]
            f[0] = ver
        for k, name in enumerate(VALUE_FIELDS):
            # bit for bit: -0.0 after 0.0 is a change
            if name in vals and struct.pack("<d", vals[name]) != struct.pack("<d", row[3 + k]):
                row[3 + k] = float(vals[name])
                f[k + 1] = ver
        self.version += 1
        self.chg[iid] = self.version
        self.dirty.add(iid)
        if iid in self.watched:
            self.hot.add(iid)
        return APPLIED

    def row_json(self, iid: int) -> bytes:
        return _dumps(self.rows[iid]).encode()

    def row_compact(self, iid: int, since: int, t: int) -> bytes:
        r, f = self.rows[iid], self.fchg[iid]
        mask = sum(1 << k for k in range(8) if f[k] > since)
        out = [r[0], r[1], mask]
        if mask & 1:
            out.append(t - r[2])
        out += [r[3 + k] for k in range(7) if mask & (2 << k)]
        return _dumps(out).encode()

    def row_bin(self, iid: int) -> bytes:
        r = self.rows[iid]
        return struct.pack("<32sqq7d", r[0].encode(), r[1], r[2], *r[3:])


@dataclass
class RefConn:
    interval: int
    binary: bool
    last_send: int
    sent: list[int]  # per slot: that kind's version at the last frame
    subs_by: list[set[int]] = field(default_factory=list)  # per slot
    watched_by: list[set[int]] = field(default_factory=list)
    scheduled: bool = False
    due: int = 0
    paused: bool = False
    compact: bool = False

    @property
    def subs(self) -> set[int]:  # slot 0
        return self.subs_by[0]

    @property
    def watched(self) -> set[int]:
        return self.watched_by[0]


class RefHub:
    def __init__(self, table: RefTable, slack_ns: int = 1_000_000) -> None:
        self.table = table
        self.kinds: list[RefTable] = [table]
        self.conns: dict[int, RefConn] = {}
        self.slack = slack_ns
        self.capture: list[tuple[int, bytes]] = []
        self._next = 0

    def add_kind(self, kind: RefTable) -> int:
        self.kinds.append(kind)
        for c in self.conns.values():
            c.sent.append(kind.version)
            c.subs_by.append(set())
            c.watched_by.append(set())
        return len(self.kinds) - 1

    def add(self, interval_ns: int, binary: bool, mono: int, compact: bool = False) -> int:
        cid = self._next
        self._next += 1
        n = len(self.kinds)
        self.conns[cid] = RefConn(interval_ns, binary, mono, [k.version for k in self.kinds],
                                  [set() for _ in range(n)], [set() for _ in range(n)],
                                  compact=compact)
        return cid

    def subscribe_ids(self, cid: int, ids, slot: int = 0) -> None:
        self.conns[cid].subs_by[slot] = set(ids)

    def watch_ids(self, cid: int, ids, on: bool, slot: int = 0) -> None:
        c = self.conns[cid]
        w = c.watched_by[slot]
        (w.update if on else w.difference_update)(ids)
        self.kinds[slot].watched = set().union(
            *(x.watched_by[slot] for x in self.conns.values()))

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
        for s, t in enumerate(self.kinds):
            for c in self.conns.values():
                if not c.paused and c.subs_by[s] & t.dirty:
                    self._schedule(c, c.last_send + c.interval)
            for c in self.conns.values():
                if not c.paused and c.watched_by[s] & t.hot:
                    self._schedule(c, 0)
            t.dirty.clear()
            t.hot.clear()
        for cid, c in self.conns.items():
            if not c.scheduled or c.due > mono + self.slack:
                continue
            c.scheduled = False
            if c.paused:
                continue
            pending = [[i for i in sorted(c.subs_by[s]) if t.chg[i] > c.sent[s]]
                       for s, t in enumerate(self.kinds)]
            since = c.sent
            c.sent = [t.version for t in self.kinds]
            frames = []
            if c.compact:
                if any(pending):
                    frames.append(self.frame(pending, wall, since))
            elif c.binary:
                kinds = self.kinds
                binary = [p if t.has_binary else [] for p, t in zip(pending, kinds, strict=True)]
                other = [[] if t.has_binary else p for p, t in zip(pending, kinds, strict=True)]
                if any(binary):
                    frames.append(self.bin_frame(binary, wall))
                if any(other):
                    frames.append(self.frame(other, wall))
            elif any(pending):
                frames.append(self.frame(pending, wall))
            if frames:
                c.last_send = mono
                self.capture.extend((cid, f) for f in frames)

    def bin_frame(self, pending: list[list[int]], wall: int) -> bytes:
        assert ROW_DTYPE.itemsize == 104
        rows = [t.row_bin(i) for t, ids in zip(self.kinds, pending, strict=True) for i in ids]
        return BIN_MAGIC + struct.pack("<Iq", len(rows), wall) + b"".join(rows)

    def frame(self, pending: list[list[int]], wall: int, since: list[int] | None = None) -> bytes:
        """A JSON update frame: `rows` always, every other key in order of its
        first slot, only when it holds something. With `since` (per slot),
        quote rows in the compact form."""
        keys: dict[str, list[bytes]] = {"rows": []}
        for s, (t, ids) in enumerate(zip(self.kinds, pending, strict=True)):
            if since is not None and isinstance(t, RefTable):
                keys.setdefault(t.key, []).extend(t.row_compact(i, since[s], wall) for i in ids)
            else:
                keys.setdefault(t.key, []).extend(t.row_json(i) for i in ids)
        body = b"".join(b',"%s":[%s]' % (k.encode(), b",".join(v))
                        for k, v in keys.items() if v or k == "rows")
        return b'{"type":"update","t":%d%s}' % (wall, body)
