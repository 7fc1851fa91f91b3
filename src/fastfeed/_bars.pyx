# cython: language_level=3
"""Bars: OHLCV candles at 1s, 1m, 5m, 15m, 1h and 1d, built from applied trades.

Item id = instrument id * 6 + interval index (the order of `BAR_INTERVALS`).
`Trades.apply` calls `Bars.add` for every trade it applies, so bars are a
function of the applied trades in `tseq` order (a late trade with a lower
`tseq` is dropped as stale before it reaches the bars): `open` is the first
trade of the bar so applied, `close` the last. Intervals up to 1h start at
multiples of the interval since the epoch; 1d at midnight in the configured
zone, whose day bounds are computed in Python once per day (two days cached),
never per trade.

Per (instrument, interval) a ring of `history` bars, sorted by start. A late
trade whose bar is held updates it; one between held bars creates its bar
there; one older than every held bar changes no bar (the tape still has it).
The update entries of an item are its bars changed since the connection's
last frame: the forming bar, and at a boundary the closed bar's final values.

On the Redis bus the store keeps the same bars (fastfeed.bus.trades): its
script is given each trade's starts by `BarClock` (the code `add` uses) and
applies the rules above; `packed` and `load_packed` are that store's form.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from fastfeed._defs cimport CLOCK_REALTIME, FF_DEBUG, SYM_MAX, _clock, _grow
from fastfeed._table cimport Kind, Table
from fastfeed._wire cimport _put_f64, _put_i64, _rd_f64, _rd_i64

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

BAR_INTERVALS = ("1s", "1m", "5m", "15m", "1h", "1d")
cdef int64_t IV_NS[5]
IV_NS[:] = [1_000_000_000, 60_000_000_000, 300_000_000_000, 900_000_000_000,
            3_600_000_000_000]
# the JSON of each interval's name, quoted
cdef const char* IV_JSON[6]
IV_JSON[:] = [b'"1s"', b'"1m"', b'"5m"', b'"15m"', b'"1h"', b'"1d"']
cdef int IV_LEN[6]
IV_LEN[:] = [4, 4, 4, 5, 4, 4]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_SECOND = timedelta(seconds=1)


def day_bounds(zone, int64_t ts):
    """[start, end) in ns of the local day (in `zone`) holding `ts`."""
    d = datetime.fromtimestamp(ts // 1_000_000_000, zone).date()
    n = d + timedelta(days=1)
    lo = datetime(d.year, d.month, d.day, tzinfo=zone)
    hi = datetime(n.year, n.month, n.day, tzinfo=zone)
    return ((lo - _EPOCH) // _SECOND * 1_000_000_000,
            (hi - _EPOCH) // _SECOND * 1_000_000_000)


cdef int _overrun(str what, Py_ssize_t n, Py_ssize_t bound) except -1:
    raise AssertionError(f"{what} of {n} bytes overran its bound of {bound}")


cdef bytes _pack_bar(const Bar* b):
    # the bus's form of a bar (Bars.packed)
    cdef char out[BUS_BAR]
    cdef double x[6]
    x[0] = b.open
    x[1] = b.high
    x[2] = b.low
    x[3] = b.close
    x[4] = b.volume
    x[5] = <double>b.n
    memcpy(out, &b.start, 8)
    memcpy(out + 8, x, 48)
    return out[:BUS_BAR]


@cython.final
cdef class BarClock:
    """The start (ns) of the bar holding a trade's `ts`, per interval, in the
    zone `tz`: what `Bars` files a trade under, and what the bus's trade
    script is given with every trade (`bar_starts`), so that both agree."""

    def __cinit__(self, str tz="UTC"):
        self.tz = tz
        self.zone = ZoneInfo(tz)  # raises for an unknown zone: a config error at start
        self.day_lo[0] = self.day_lo[1] = 1
        self.day_hi[0] = self.day_hi[1] = 0

    def __init__(self, str tz="UTC"):
        pass

    cdef int64_t start(self, int64_t ts, int k) except? -1:
        if k < 5:
            return ts - ts % IV_NS[k]
        if self.day_lo[0] <= ts < self.day_hi[0]:
            return self.day_lo[0]
        if self.day_lo[1] <= ts < self.day_hi[1]:
            return self.day_lo[1]
        # a new day (or a late trade from another): Python, once per day
        lo, hi = day_bounds(self.zone, ts)
        self.day_lo[1] = self.day_lo[0]
        self.day_hi[1] = self.day_hi[0]
        self.day_lo[0] = lo
        self.day_hi[0] = hi
        return lo

    def starts(self, int64_t ts):
        """The six starts of `ts` (1s .. 1d)."""
        return [self.start(ts, k) for k in range(NBARIV)]


@cython.final
cdef class Bars(Kind):
    """OHLCV bars of every instrument of `table` (see the module)."""

    def __cinit__(self, Table table, int32_t history=200, str tz="UTC"):
        if history < 1:
            raise ValueError("history must be at least 1 bar")
        self.table = table
        self.history = history
        self.tz = tz
        self.clock = BarClock(tz)
        self.key = "bars"
        self.has_binary = False
        self.held = 0
        self.size = 0
        self.version = 0
        self.nhot = 0
        memset(&self.stats, 0, sizeof(self.stats))
        self._reserve(table.capacity * NBARIV)

    def __init__(self, Table table, int32_t history=200, str tz="UTC"):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.rings != NULL:
            for i in range(self.size):
                free(self.rings[i].b)
        free(self.rings)
        free(self.enc)
        free(self.enclen)
        free(self.encstamp)
        free(self.encstart)

    cdef int _reserve(self, Py_ssize_t items) except -1:
        # doubling, zeroed, in whole 64-item words; only when a new item appears
        cdef Py_ssize_t old = self.size
        cdef Py_ssize_t cap = old if old else 64
        if items <= old:
            return 0
        while cap < items:
            cap *= 2
        self._grow_items(old, cap)
        self.rings = <BarRing*>_grow(self.rings, old * sizeof(BarRing), cap * sizeof(BarRing), 0)
        self.enc = <char*>_grow(self.enc, old * BAR_SLOT, cap * BAR_SLOT, 0)
        self.enclen = <int32_t*>_grow(self.enclen, old * 4, cap * 4, 0)
        self.encstamp = <uint64_t*>_grow(self.encstamp, old * 8, cap * 8, 0)
        self.encstart = <int64_t*>_grow(self.encstart, old * 8, cap * 8, 0)
        self.size = cap
        return 0

    cdef int copy_state(self, Bars other) except -1:
        """Become a copy of `other`'s bars (same history; this one new): a
        delayed copy made from another (docs/delay.md)."""
        cdef Py_ssize_t i, n = other.size
        if self.history != other.history or self.version:
            raise ValueError("copy_state needs a new Bars of the same history")
        self._reserve(n)
        memcpy(self.rings, other.rings, n * sizeof(BarRing))
        for i in range(n):
            if other.rings[i].b != NULL:
                self.rings[i].b = <Bar*>_grow(NULL, 0, self.history * sizeof(Bar), 0)
                memcpy(self.rings[i].b, other.rings[i].b, self.history * sizeof(Bar))
        memcpy(self.enc, other.enc, n * BAR_SLOT)
        memcpy(self.enclen, other.enclen, n * 4)
        memcpy(self.encstamp, other.encstamp, n * 8)
        memcpy(self.encstart, other.encstart, n * 8)
        memcpy(self.chg, other.chg, n * 8)
        memcpy(self.arrived, other.arrived, n * 8)
        self.version = other.version
        self.held = other.held
        return 0

    def reserve(self, Py_ssize_t items):
        """Cover item ids 0 .. items-1 (the hub reads `chg`/`watched` of every id it is given)."""
        self._reserve(items)

    @cython.cdivision(True)  # ring positions are >= 0 and the history >= 1
    cdef int add(self, int32_t iid, int64_t ts, double price, double size,
                 int64_t now) except -1:
        """Put one applied trade into the bars of its instrument."""
        cdef int k
        cdef int32_t item, H = self.history, lo, hi, mid, j
        cdef int64_t start
        cdef BarRing* r
        cdef Bar* b
        cdef bint changed = False, grow
        cdef uint64_t ver = self.version + 1
        if (iid + 1) * NBARIV > self.size:
            self._reserve((iid + 1) * NBARIV)
        for k in range(NBARIV):
            item = iid * NBARIV + k
            start = self.clock.start(ts, k)
            r = &self.rings[item]
            if r.b == NULL:
                r.b = <Bar*>_grow(NULL, 0, H * sizeof(Bar), 0)
            b = NULL
            grow = False
            if r.cnt == 0 or start > r.b[(r.head + r.cnt - 1) % H].start:
                # a new newest bar
                if r.cnt == H:
                    r.head = (r.head + 1) % H
                    r.cnt -= 1
                    self.held -= 1
                b = &r.b[(r.head + r.cnt) % H]
                r.cnt += 1
                grow = True
            elif start == r.b[(r.head + r.cnt - 1) % H].start:
                b = &r.b[(r.head + r.cnt - 1) % H]
            elif start < r.b[r.head].start:
                continue  # older than every held bar: the tape has it, no bar does
            else:
                # late: binary search for the first held bar starting at or after `start`
                lo = 0
                hi = r.cnt - 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if r.b[(r.head + mid) % H].start < start:
                        lo = mid + 1
                    else:
                        hi = mid
                r.late = ver
                if r.b[(r.head + lo) % H].start == start:
                    b = &r.b[(r.head + lo) % H]
                else:
                    # a bar between held ones: make room at `lo` (the oldest goes if full)
                    if r.cnt == H:
                        r.head = (r.head + 1) % H
                        r.cnt -= 1
                        lo -= 1
                        self.held -= 1
                    j = r.cnt
                    while j > lo:
                        r.b[(r.head + j) % H] = r.b[(r.head + j - 1) % H]
                        j -= 1
                    r.cnt += 1
                    b = &r.b[(r.head + lo) % H]
                    grow = True
            if grow:
                self.held += 1
                b.start = start
                b.open = b.high = b.low = b.close = price
                b.volume = size
                b.n = 1
            else:
                if price > b.high:
                    b.high = price
                if price < b.low:
                    b.low = price
                b.close = price
                b.volume += size
                b.n += 1
            b.stamp = ver
            changed = True
            self._touch(item, ver, now)
        if changed:
            self.version = ver
        return 0

    cdef void _touch(self, int32_t item, uint64_t ver, int64_t now) noexcept:
        self.chg[item] = ver
        self.arrived[item] = now
        self.dirty[item >> 6] |= 1ULL << (item & 63)
        if self.watched[item] and not (self.hot_bits[item >> 6] & (1ULL << (item & 63))):
            self.hot_bits[item >> 6] |= 1ULL << (item & 63)
            self.hot[self.nhot] = item
            self.nhot += 1

    cdef char* _bar(self, char* p, int32_t item, const Bar* b) except NULL:
        # the newest bar of an item is cached by its stamp: many groups, one encoding
        cdef char* c = self.enc + <Py_ssize_t>item * BAR_SLOT
        cdef char* q
        cdef double x[5]
        cdef int k
        if self.encstamp[item] == b.stamp and self.encstart[item] == b.start:
            memcpy(p, c, self.enclen[item])
            return p + self.enclen[item]
        q = p
        q[0] = b"["
        q = _put_i64(q + 1, b.start)
        x[0] = b.open
        x[1] = b.high
        x[2] = b.low
        x[3] = b.close
        x[4] = b.volume
        for k in range(5):
            q[0] = b","
            q = _put_f64(q + 1, x[k])
        q[0] = b","
        q = _put_i64(q + 1, b.n)
        q[0] = b"]"
        q += 1
        if FF_DEBUG and q - p > BAR_SLOT:
            _overrun("bar", q - p, BAR_SLOT)
        memcpy(c, p, q - p)
        self.enclen[item] = <int32_t>(q - p)
        self.encstamp[item] = b.stamp
        self.encstart[item] = b.start
        return q

    @cython.cdivision(True)  # item >= 0, NBARIV a constant
    cdef char* _head(self, char* p, int32_t item) noexcept:
        cdef int32_t iid = item // NBARIV
        cdef int k = item % NBARIV
        cdef int n = self.table.symlen[iid]
        memcpy(p, b'{"sym":"', 8)
        memcpy(p + 8, self.table.syms + <Py_ssize_t>iid * SYM_MAX, n)
        p += 8 + n
        memcpy(p, b'","interval":', 13)
        p += 13
        memcpy(p, IV_JSON[k], IV_LEN[k])
        p += IV_LEN[k]
        memcpy(p, b',"bars":[', 9)
        return p + 9

    # ---- the kind: what the hub calls ----------------------------------

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        # an entry per item, and no more bars than the rings hold
        cdef Py_ssize_t b = <Py_ssize_t>n * self.history
        if self.held < b:
            b = self.held
        return <Py_ssize_t>n * (64 + SYM_MAX + 24) + b * (BAR_SLOT + 1)

    @cython.cdivision(True)  # the history holds at least one bar
    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        cdef Py_ssize_t i
        cdef int32_t item, j, H = self.history
        cdef uint32_t cnt = 0
        cdef int64_t old = 0
        cdef BarRing* r
        cdef bint first
        for i in range(n):
            item = ids[i]
            if item >= self.size or self.chg[item] <= since:
                continue
            r = &self.rings[item]
            if cnt:
                p[0] = b","
                p += 1
            if cnt == 0 or self.arrived[item] < old:
                old = self.arrived[item]
            cnt += 1
            p = self._head(p, item)
            if r.late > since:
                j = 0  # a late trade changed an older bar: look at every held bar
            else:
                # changed bars are the newest ones (their stamps rise with the ring)
                j = r.cnt
                while j > 0 and r.b[(r.head + j - 1) % H].stamp > since:
                    j -= 1
            first = True
            while j < r.cnt:
                if r.b[(r.head + j) % H].stamp > since:
                    if not first:
                        p[0] = b","
                        p += 1
                    first = False
                    p = self._bar(p, item, &r.b[(r.head + j) % H])
                j += 1
            p[0] = b"]"
            p[1] = b"}"
            p += 2
        count[0] = cnt
        oldest[0] = old
        return p

    cdef int check(self) except -1:
        cdef Py_ssize_t i
        cdef int32_t j, H = self.history
        cdef BarRing* r
        cdef Py_ssize_t held = 0
        for i in range(self.size):
            held += self.rings[i].cnt
        assert held == self.held, f"bars hold {held} bars but count {self.held}"
        for i in range(self.size):
            assert self.chg[i] <= self.version, f"bar item {i} stamped in the future"
            r = &self.rings[i]
            assert 0 <= r.cnt <= H, f"bar item {i} holds {r.cnt} of {H} bars"
            for j in range(1, r.cnt):
                assert r.b[(r.head + j - 1) % H].start < r.b[(r.head + j) % H].start, \
                    f"bars of item {i} out of order at {j}"
        for i in range(self.nhot):
            assert (self.hot_bits[self.hot[i] >> 6] >> (self.hot[i] & 63)) & 1, \
                "hot list and hot bitmap disagree"
        return 0

    # ---- Python face -------------------------------------------------

    def _check(self):
        """Assert the kind's invariants (tests; debug builds run it every pump)."""
        self.check()

    def add_trade(self, int32_t iid, int64_t ts, double price, double size):
        """Put one trade into the bars (tests; the gateway feeds bars through Trades)."""
        self.add(iid, ts, price, size, _clock(CLOCK_REALTIME))

    def bars_of(self, int32_t item):
        """The held bars of an item, oldest first, as [start, o, h, l, c, v, n] lists."""
        cdef BarRing* r
        cdef Bar* b
        cdef int32_t j
        if not 0 <= item < self.size:
            return []
        r = &self.rings[item]
        out = []
        for j in range(r.cnt):
            b = &r.b[(r.head + j) % self.history]
            out.append([b.start, b.open, b.high, b.low, b.close, b.volume, b.n])
        return out

    # ---- the bus's form (fastfeed.bus.trades): 56 bytes a bar --------

    def packed(self, int32_t iid):
        """The instrument's bars as the bus stores them: (the newest bar of
        each interval, 1s first, BUS_BAR bytes each; the older held bars of
        each interval, oldest first, one bytes per interval), or None before
        its first trade. A bar: i64 start, f64 open, high, low, close,
        volume and count (a double: Lua's only number)."""
        cdef int k
        cdef int32_t j, H = self.history
        cdef BarRing* r
        if iid < 0 or (iid + 1) * NBARIV > self.size:
            return None
        for k in range(NBARIV):
            if self.rings[iid * NBARIV + k].cnt == 0:
                return None
        newest = []
        older = []
        for k in range(NBARIV):
            r = &self.rings[iid * NBARIV + k]
            # (no negative indices: the core is built without wraparound)
            older.append(b"".join([_pack_bar(&r.b[(r.head + j) % H])
                                   for j in range(r.cnt - 1)]))
            newest.append(_pack_bar(&r.b[(r.head + r.cnt - 1) % H]))
        return b"".join(newest), older

    def load_packed(self, int32_t iid, bytes newest, list older):
        """Make the instrument's bars those of `packed`'s form (a late worker
        loading the bus's bars). An interval whose bars differ from the held
        ones gets them all, each stamped as changed; the same bars change
        nothing. Returns the intervals replaced."""
        cdef int k, replaced = 0
        cdef int32_t j, n, item, H = self.history
        cdef BarRing* r
        cdef Bar* b
        cdef const char* q
        cdef uint64_t ver = self.version + 1
        cdef int64_t now = _clock(CLOCK_REALTIME)
        if iid < 0:
            raise ValueError("bad instrument id")
        if len(newest) != NBARIV * BUS_BAR or len(older) != NBARIV:
            raise ValueError("not the bus's bars of an instrument")
        self._reserve((iid + 1) * NBARIV)
        for k in range(NBARIV):
            data = bytes(older[k]) + newest[k * BUS_BAR:(k + 1) * BUS_BAR]
            if len(data) % BUS_BAR:
                raise ValueError("not the bus's bars of an instrument")
            n = <int32_t>(len(data) // BUS_BAR)
            if n > H:  # the store keeps as many (the prefix's bars_history): never, but bound it
                data = data[(n - H) * BUS_BAR:]
                n = H
            item = iid * NBARIV + k
            r = &self.rings[item]
            if r.cnt == n and b"".join(
                    [_pack_bar(&r.b[(r.head + j) % H]) for j in range(r.cnt)]) == data:
                continue
            if r.b == NULL:
                r.b = <Bar*>_grow(NULL, 0, H * sizeof(Bar), 0)
            self.held += n - r.cnt
            r.head = 0
            r.cnt = n
            q = data
            for j in range(n):
                b = &r.b[j]
                b.start = _rd_i64(q)
                b.open = _rd_f64(q + 8)
                b.high = _rd_f64(q + 16)
                b.low = _rd_f64(q + 24)
                b.close = _rd_f64(q + 32)
                b.volume = _rd_f64(q + 40)
                b.n = <int64_t>_rd_f64(q + 48)
                b.stamp = ver
                q += BUS_BAR
            r.late = ver
            self._touch(item, ver, now)
            replaced += 1
        if replaced:
            self.version = ver
        return replaced

    def snapshot_json(self, ids):
        """Comma-joined snapshot entries of `ids`: every held bar of each, oldest
        first (an item never traded: an entry with no bars)."""
        import numpy as np
        return self._entries(np.asarray(list(ids), dtype=np.int32), 0, True)

    def _encode_section_py(self, ids, uint64_t since):
        """`encode_section` as bytes (tests: what the hub would put in the section)."""
        import numpy as np
        return self._entries(np.asarray(list(ids), dtype=np.int32), since, False)

    def _entries(self, a, uint64_t since, bint every):
        cdef int32_t[::1] arr
        cdef uint32_t count
        cdef int64_t oldest
        cdef char* p
        cdef char* end
        cdef int32_t item
        if len(a) == 0:
            return b""
        self._reserve(int(a.max()) + 1)
        if not every:
            arr = a
            buf = bytearray(self.section_bound(len(a)))
            p = buf
            end = self.encode_section(p, &arr[0], len(a), since, &count, &oldest)
            if FF_DEBUG and end - p > len(buf):
                _overrun("bars section", end - p, len(buf))
            return bytes(buf[:end - p]) if count else b""
        # a snapshot: one entry per item, empty `bars` for an item never traded
        parts = []
        one = bytearray(self.section_bound(1) + 64)
        for item in a:
            p = one
            if self.chg[item] > 0:
                arr = a[a == item][:1]
                end = self.encode_section(p, &arr[0], 1, 0, &count, &oldest)
            else:
                end = self._head(p, item)
                end[0] = b"]"
                end[1] = b"}"
                end += 2
            parts.append(bytes(one[:end - p]))
        return b",".join(parts)

    def take_stats(self):
        return {"bars_version": self.version}
