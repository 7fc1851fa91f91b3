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
    sent: list[int]  # per slot: that kind's version at the last frame
    subs_by: list[set[int]] = field(default_factory=list)  # per slot
    watched_by: list[set[int]] = field(default_factory=list)
    scheduled: bool = False
    due: int = 0
    paused: bool = False

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

    def add(self, interval_ns: int, binary: bool, mono: int) -> int:
        cid = self._next
        self._next += 1
        n = len(self.kinds)
        self.conns[cid] = RefConn(interval_ns, binary, mono, [k.version for k in self.kinds],
                                  [set() for _ in range(n)], [set() for _ in range(n)])
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
            c.sent = [t.version for t in self.kinds]
            frames = []
            if c.binary:
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

    def frame(self, pending: list[list[int]], wall: int) -> bytes:
        """A JSON update frame: `rows` always, every other key in order of its
        first slot, only when it holds something."""
        keys: dict[str, list[bytes]] = {"rows": []}
        for t, ids in zip(self.kinds, pending, strict=True):
            keys.setdefault(t.key, []).extend(t.row_json(i) for i in ids)
        body = b"".join(b',"%s":[%s]' % (k.encode(), b",".join(v))
                        for k, v in keys.items() if v or k == "rows")
        return b'{"type":"update","t":%d%s}' % (wall, body)


# ---- trades and bars (the models of _trades.pyx and _bars.pyx)

SIDES = ("", "b", "s")
BAR_NS = (1_000_000_000, 60_000_000_000, 300_000_000_000, 900_000_000_000, 3_600_000_000_000)


def ref_check_trade(t: object) -> str | None:
    """The trade rules of the contract: what a trade must be to apply."""
    if not isinstance(t, dict):
        return "not an object"
    sym = t.get("sym")
    if not isinstance(sym, str) or not valid_symbol(sym):
        return "bad symbol"
    for k in ("tseq", "ts"):
        v = t.get(k)
        if type(v) is not int or not 0 <= v < 2**63 - 1:
            return f"bad {k}"
    for k in ("price", "size"):
        x = t.get(k)
        if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
            return f"bad {k}"
    if t["size"] < 0:
        return "negative size"
    if t.get("side", "") not in SIDES:
        return "bad side"
    return None


class RefTrades:
    """Every applied trade, kept forever; the ring and backlog are views of it."""

    def __init__(self, ids: dict[str, int], ring: int = 100, backlog: int = 1000,
                 tape_ring: int = 1000, bars: RefBars | None = None) -> None:
        self.ids = ids  # shared with the other kinds: one instrument numbering
        self.ring, self.backlog, self.tape_ring = ring, backlog, tape_ring
        self.bars = bars
        self.version = 0
        self.log: dict[int, list[tuple[int, int, bytes]]] = {}  # iid -> (stamp, tseq, json)
        self.tape: list[bytes] = []  # market-wide, stamp = position + 1

    def sym(self, iid: int) -> str:
        return next(s for s, i in self.ids.items() if i == iid)

    def apply(self, t: dict) -> int:
        if ref_check_trade(t) is not None:
            return REJECTED
        iid = self.ids.setdefault(t["sym"], len(self.ids))
        log = self.log.setdefault(iid, [])
        if log and t["tseq"] <= log[-1][1]:
            return STALE
        trade = [t["tseq"], t["ts"], float(t["price"]), float(t["size"]), t.get("side", "")]
        self.version += 1
        log.append((self.version, t["tseq"], _dumps(trade).encode()))
        self.tape.append(_dumps([t["sym"], *trade]).encode())
        if self.bars is not None:
            self.bars.add(iid, t["ts"], float(t["price"]), float(t["size"]))
        return APPLIED

    def section(self, ids, since: int) -> bytes:
        out = []
        for iid in ids:
            log = self.log.get(iid, [])
            pending = [e for e in log if e[0] > since]
            if not pending:
                continue
            held = log[-self.ring:]
            items = [e for e in pending if e in held]
            # counted exactly up to the backlog; beyond, from the oldest stamp held
            lost = min(len(pending), self.backlog) - len(items)
            head = f'{{"sym":"{self.sym(iid)}",'
            if lost:
                head += f'"lost":{lost},'
            out.append(head.encode() + b'"items":[' + b",".join(e[2] for e in items) + b"]}")
        return b",".join(out)

    def snapshot(self, ids, since_trades: dict[int, int] | None = None) -> bytes:
        out = []
        for iid in ids:
            log = self.log.get(iid, [])
            held = log[-self.ring:]
            head = f'{{"sym":"{self.sym(iid)}",'
            since = (since_trades or {}).get(iid, -1)
            later = [e for e in held if e[1] > since]
            if since >= 0 and later and later[0][1] > since + 1 and len(log) > self.ring:
                head += f'"lost":{later[0][1] - since - 1},'
            out.append(head.encode() + b'"recent":[' + b",".join(e[2] for e in later) + b"]}")
        return b",".join(out)

    def tape_section(self, since: int) -> bytes:
        if len(self.tape) <= since:
            return b""
        first = max(since, len(self.tape) - self.tape_ring)
        head = b'{"sym":"*",'
        if first > since:
            head += b'"lost":%d,' % (first - since)
        return head + b'"items":[' + b",".join(self.tape[first:]) + b"]}"


class RefBars:
    """Bars of every (instrument, interval), item id iid * 6 + k."""

    def __init__(self, ids: dict[str, int], history: int = 200, tz: str = "UTC") -> None:
        from zoneinfo import ZoneInfo

        self.ids, self.history, self.zone = ids, history, ZoneInfo(tz)
        self.version = 0
        self.bars: dict[int, list[list]] = {}  # item -> [[start,o,h,l,c,v,n,stamp], ...] by start

    def start(self, ts: int, k: int) -> int:
        if k < 5:
            return ts - ts % BAR_NS[k]
        from datetime import datetime

        day = datetime.fromtimestamp(ts // 10**9, self.zone).date()
        midnight = datetime(day.year, day.month, day.day, tzinfo=self.zone)
        return int(midnight.timestamp()) * 10**9

    def add(self, iid: int, ts: int, price: float, size: float) -> None:
        changed = False
        for k in range(6):
            item, start = iid * 6 + k, self.start(ts, k)
            held = self.bars.setdefault(item, [])
            if held and start < held[0][0]:
                continue  # older than every held bar
            changed = True
            bar = next((b for b in held if b[0] == start), None)
            if bar is None:
                held.append([start, price, price, price, price, size, 1, 0])
                held.sort(key=lambda b: b[0])
                del held[:-self.history]
                bar = next(b for b in held if b[0] == start)
            else:
                bar[2], bar[3], bar[4] = max(bar[2], price), min(bar[3], price), price
                bar[5] += size
                bar[6] += 1
            bar[7] = self.version + 1
        if changed:
            self.version += 1

    def _entry(self, item: int, bars: list[list]) -> bytes:
        sym = next(s for s, i in self.ids.items() if i == item // 6)
        iv = ("1s", "1m", "5m", "15m", "1h", "1d")[item % 6]
        body = b",".join(_dumps([b[0], *map(float, b[1:6]), b[6]]).encode() for b in bars)
        return b'{"sym":"%s","interval":"%s","bars":[%s]}' % (sym.encode(), iv.encode(), body)

    def section(self, items, since: int) -> bytes:
        out = []
        for item in items:
            bars = [b for b in self.bars.get(item, []) if b[7] > since]
            if bars:
                out.append(self._entry(item, bars))
        return b",".join(out)

    def snapshot(self, items) -> bytes:
        return b",".join(self._entry(i, self.bars.get(i, [])) for i in items)
