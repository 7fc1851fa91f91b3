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
import zlib
from dataclasses import dataclass, field

from ._core import ROW_DTYPE, valid_symbol
from .protocol import BIN_MAGIC, COMPACT_BIN_MAGIC, VALUE_FIELDS

APPLIED, STALE, REJECTED = 0, 1, 2
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _varint(u: int) -> bytes:
    out = bytearray()
    while u >= 0x80:
        out.append(u & 0x7F | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _value_token(v: float) -> bytes:
    """m / 10**c (the smallest c <= 11) or, for a whole multiple of ten,
    m * 10**(c - 11) (the largest power, c 12..15), as m*32 + c*2 + sign with
    m < 2**48; or 31 and the double's 8 bytes."""
    a, sign = abs(v), int(math.copysign(1.0, v) < 0)
    if 10 <= a < 2.0**53 and a == int(a):
        for e in (4, 3, 2, 1):
            if int(a) % 10**e == 0 and int(a) // 10**e < 2**48:
                return _varint(int(a) // 10**e * 32 + (11 + e) * 2 + sign)
    for k in range(12):
        p = float(10**k)
        if not a * p < 2.0**48:
            break
        m = round(a * p)
        if m / p == a:
            return _varint(m * 32 + k * 2 + sign)
    return b"\x1f" + struct.pack("<d", v)


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
        r, mask = self.rows[iid], self._changed(iid, since)
        out = [r[0], r[1], mask]
        if mask & 1:
            out.append(t - r[2])
        out += [r[3 + k] for k in range(7) if mask & (2 << k)]
        return _dumps(out).encode()

    def _changed(self, iid: int, since: int) -> int:
        return sum(1 << k for k in range(8) if self.fchg[iid][k] > since)

    def row_compact_bin(self, iid: int, since: int, t: int) -> bytes:
        r, mask = self.rows[iid], self._changed(iid, since)
        out = bytes([len(r[0])]) + r[0].encode() + bytes([mask]) + _varint(r[1])
        if mask & 1:
            d = t - r[2]
            out += _varint(2 * d if d >= 0 else -2 * d - 1)  # zigzag
        return out + b"".join(_value_token(r[3 + k]) for k in range(7) if mask & (2 << k))

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
        c = self.conns[cid]
        if not c.subs_by[slot]:  # nothing of the slot was pending: it starts now
            c.sent[slot] = self.kinds[slot].version
        c.subs_by[slot] = set(ids)

    def sent_version(self, cid: int, slot: int) -> int:
        return self.conns[cid].sent[slot]

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
            if c.binary:
                kinds = self.kinds
                binary = [p if t.has_binary else [] for p, t in zip(pending, kinds, strict=True)]
                other = [[] if t.has_binary else p for p, t in zip(pending, kinds, strict=True)]
                if any(binary):
                    frames.append(self.bin_frame(binary, wall, since if c.compact else None))
                if any(other):
                    frames.append(self.frame(other, wall))
            elif c.compact:
                if any(pending):
                    frames.append(self.frame(pending, wall, since))
            elif any(pending):
                frames.append(self.frame(pending, wall))
            if frames:
                c.last_send = mono
                self.capture.extend((cid, f) for f in frames)

    def bin_frame(self, pending: list[list[int]], wall: int,
                  since: list[int] | None = None) -> bytes:
        """FFB1, or with `since` (per slot) FFC1: compact binary rows."""
        assert ROW_DTYPE.itemsize == 104
        kinds = list(zip(self.kinds, pending, strict=True))
        if since is not None:
            rows = [t.row_compact_bin(i, since[s], wall) for s, (t, ids) in enumerate(kinds)
                    for i in ids]
            return COMPACT_BIN_MAGIC + struct.pack("<Iq", len(rows), wall) + b"".join(rows)
        rows = [t.row_bin(i) for t, ids in kinds for i in ids]
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


# ---- order books ------------------------------------------------------------

BOOK_APPLIED, BOOK_STALE, BOOK_REFUSED, BOOK_GAP, BOOK_CROSSED, BOOK_DROPPED = range(6)


def _fmt(x: float) -> str:
    return _dumps(float(x))


def ref_book_canon(msg: object, levels: int) -> tuple[str, int, bool, list, list] | None:
    """A book message as (sym, seq, full, bids, asks) with levels (p, v, o), or
    None if the contract refuses it."""
    if not isinstance(msg, dict):
        return None
    sym, seq, full = msg.get("sym"), msg.get("seq"), msg.get("full", False)
    if not isinstance(sym, str) or not valid_symbol(sym):
        return None
    if type(seq) is not int or not 0 <= seq < 2**63 - 1 or type(full) is not bool:
        return None
    sides = []
    for name in ("bids", "asks"):
        side = msg.get(name) or []
        if not isinstance(side, list):
            return None
        out = []
        for lv in side:
            if not isinstance(lv, list | tuple) or len(lv) not in (2, 3):
                return None
            p, v = lv[0], lv[1]
            o = lv[2] if len(lv) == 3 else 0
            if any(type(x) not in (int, float) for x in (p, v)) or type(o) is not int:
                return None
            if not (math.isfinite(p) and math.isfinite(v)) or v < 0 or not 0 <= o < 2**32:
                return None
            out.append((float(p) + 0.0, float(v) + 0.0, o))
        sides.append(out)
    bids, asks = sides
    if full:
        bids = sorted((x for x in bids if x[1] > 0), key=lambda x: -x[0])
        asks = sorted((x for x in asks if x[1] > 0), key=lambda x: x[0])
        for side in (bids, asks):
            if len({x[0] for x in side}) != len(side):
                return None
        if bids and asks and bids[0][0] >= asks[0][0]:
            return None
        bids, asks = bids[:levels], asks[:levels]
    return sym, seq, full, bids, asks


@dataclass
class RefBook:
    seq: int = 0
    sides: list = field(default_factory=lambda: [[], []])  # [p, v, o] best first
    stamps: list = field(default_factory=lambda: [{}, {}])  # price -> stamp (served levels)
    tombs: list = field(default_factory=lambda: [[], []])  # (price, stamp), oldest first
    floor: int = 0
    stale: bool = False


class RefBooks:
    """Order books as the contract and docs/core.md describe them."""

    def __init__(self, table: RefTable, depth: int = 10, levels: int = 50) -> None:
        self.table, self.depth, self.levels = table, depth, levels
        self.ntombs = 2 * depth
        self.books: dict[int, RefBook] = {}
        self.chg: dict[int, int] = {}
        self.version = 0
        self.events: list[tuple[int, bytes]] = []

    def _iid(self, sym: str) -> int:
        t = self.table
        if sym not in t.ids:
            t.ids[sym] = len(t.rows)
            t.rows.append([sym, -1, 0] + [0.0] * 7)
            t.chg.append(0)
        return t.ids[sym]

    def view(self, b: RefBook, side: int) -> list:
        return b.sides[side][:self.depth]

    def _event(self, iid: int, what: str) -> None:
        sym = self.table.rows[iid][0]
        self.events.append((iid, b'{"type":"status","sym":"%s","book":"%s"}'
                            % (sym.encode(), what.encode())))

    def apply(self, msg: object) -> int:
        c = ref_book_canon(msg, self.levels)
        if c is None:
            return BOOK_REFUSED
        sym, seq, full, bids, asks = c
        b = self.books.setdefault(self._iid(sym), RefBook())
        iid = self.table.ids[sym]
        if seq <= b.seq:
            return BOOK_STALE
        v = self.version + 1
        if full:
            b.sides = [list(map(list, bids)), list(map(list, asks))]
            b.stamps = [{lv[0]: v for lv in s} for s in b.sides]
            b.tombs = [[], []]
            b.floor = v
            b.seq = seq
            if b.stale:
                b.stale = False
                self._event(iid, "ok")
        else:
            if b.stale:
                return BOOK_DROPPED
            if seq != b.seq + 1:
                b.stale = True
                self._event(iid, "stale")
                return BOOK_GAP
            new = []
            for side, changes in enumerate((bids, asks)):
                lst = [list(x) for x in b.sides[side]]
                for p, q, o in changes:
                    at = next((k for k, x in enumerate(lst) if x[0] == p), None)
                    if q == 0:
                        if at is not None:
                            del lst[at]
                    elif at is not None:
                        lst[at][1:] = [q, o]
                    else:
                        lst.append([p, q, o])
                        lst.sort(key=lambda x: -x[0] if side == 0 else x[0])
                        del lst[self.levels:]
                new.append(lst)
            if new[0] and new[1] and new[0][0][0] >= new[1][0][0]:
                b.stale = True
                self._event(iid, "stale")
                return BOOK_CROSSED
            for side in range(2):
                old = {x[0]: x for x in self.view(b, side)}
                b.sides[side] = new[side]
                now = {x[0]: x for x in self.view(b, side)}
                for p, x in now.items():
                    if p not in old or old[p] != x:
                        b.stamps[side][p] = v
                    if p not in old:
                        b.tombs[side] = [t for t in b.tombs[side] if t[0] != p]
                for p in old:
                    if p not in now:
                        b.tombs[side] = [t for t in b.tombs[side] if t[0] != p]
                        b.tombs[side].append((p, v))
                        if len(b.tombs[side]) > self.ntombs:
                            b.floor = max(b.floor, b.tombs[side].pop(0)[1])
            b.seq = seq
        self.version = v
        self.chg[iid] = v
        return BOOK_APPLIED

    def checksum(self, iid: int) -> int:
        b = self.books.get(iid, RefBook())
        data = b"".join(struct.pack("<dd", x[0], x[1])
                        for side in (1, 0) for x in self.view(b, side))
        return zlib.crc32(data)

    def _levels(self, levels: list) -> str:
        return ",".join(f"[{_fmt(p)},{_fmt(q)},{o}]" for p, q, o in levels)

    def snapshot(self, iid: int) -> bytes:
        b = self.books.get(iid, RefBook())
        sym = self.table.rows[iid][0]
        stale = ',"stale":true' if b.stale else ""
        return (f'{{"sym":"{sym}","seq":{b.seq},"bids":[{self._levels(self.view(b, 0))}],'
                f'"asks":[{self._levels(self.view(b, 1))}],"checksum":{self.checksum(iid)}'
                f'{stale}}}').encode()

    def entry(self, iid: int, since: int) -> bytes:
        b = self.books[iid]
        changes = []
        for side in range(2):
            lv = [x for x in self.view(b, side) if b.stamps[side][x[0]] > since]
            gone = [(p, 0, 0) for p, s in b.tombs[side] if s > since]
            changes.append((lv, gone))
        if since < b.floor or sum(len(a) + len(g) for a, g in changes) > 2 * self.depth:
            return self.snapshot(iid)[:-1] + b',"full":true}'
        sides = [",".join(filter(None, [self._levels(a),
                                        ",".join(f"[{_fmt(p)},0,0]" for p, _, _ in g)]))
                 for a, g in changes]
        sym = self.table.rows[iid][0]
        return (f'{{"sym":"{sym}","seq":{b.seq},"bids":[{sides[0]}],"asks":[{sides[1]}],'
                f'"checksum":{self.checksum(iid)}}}').encode()

    def section(self, ids: list[int], since: int) -> tuple[int, bytes]:
        out = [self.entry(i, since) for i in ids if self.chg.get(i, 0) > since]
        return len(out), b",".join(out)
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

    def snapshot(self, ids, since_trades: dict[int, int] | None = None,
                 upto: int | None = None) -> bytes:
        out = []
        for iid in ids:
            log = self.log.get(iid, [])
            held = [e for e in log[-self.ring:] if upto is None or e[0] <= upto]
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
