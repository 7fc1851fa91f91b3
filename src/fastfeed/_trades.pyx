# cython: language_level=3
"""Trades: the running trade of every instrument, and the market-wide tape.

Per instrument a ring of the last `ring` trades, each encoded to JSON once,
when it is applied (`[tseq,ts,price,size,side]`), and the bytes reused by
every frame and snapshot that carries it. A trade whose `tseq` is not above
the instrument's last applied one is stale and dropped (as for quotes).

Every applied trade bumps `version`; the trade keeps that change stamp. An
update entry for a connection whose last frame was at stamp `since` holds
every trade with a stamp above `since`, oldest first, so the section is a
pure function of (ids, since): the hub shares it among connections. Trades
above `since` that the ring no longer holds are counted, exactly, from a
second, longer ring of stamps only (`backlog` per instrument, 16 bytes a
trade): `{"sym":..,"lost":N,"items":[...]}`. A connection more than
`backlog` trades of one instrument behind gets N counted from the oldest
stamp held: a lower bound (counted in `lost_inexact`; docs/protocol.md).

The tape (`Tape`, one item, id 0) holds the last `ring` trades of the whole
market in apply order, each encoded once as `["SYM",tseq,ts,price,size,side]`.
Its stamps are consecutive (one per trade), so its `lost` is always exact.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcmp, memcpy, memset

from fastfeed._bars cimport NBARIV, BarClock, Bars
from fastfeed._defs cimport (
    APPLIED, CLOCK_REALTIME, FF_DEBUG, NSOURCES, REJECTED, SRC_BUS, SRC_INGEST, SRC_SIMULATOR,
    STALE, SYM_MAX, _clock, _grow,
)
from fastfeed._table cimport Kind, Table
from fastfeed._wire cimport _put_f64, _put_i64, _rd_f64, _rd_i64, _rd_u32, symbol_ok

from fastfeed._wire import OUTCOMES, SOURCES

TRADE_BATCH_MAGIC = b"FTR1"
SIDES = ("", "b", "s")
cdef const char* SIDE_JSON[3]
SIDE_JSON[:] = [b'""', b'"b"', b'"s"']
cdef int SIDE_LEN[3]
SIDE_LEN[:] = [2, 3, 3]


cdef int _overrun(str what, Py_ssize_t n, Py_ssize_t bound) except -1:
    raise AssertionError(f"{what} of {n} bytes overran its bound of {bound}")


cdef char* _trade_json(char* p, int64_t tseq, int64_t ts, double price, double size,
                       int side) except NULL:
    p = _put_i64(p, tseq)
    p[0] = b","
    p = _put_i64(p + 1, ts)
    p[0] = b","
    p = _put_f64(p + 1, price)
    p[0] = b","
    p = _put_f64(p + 1, size)
    p[0] = b","
    memcpy(p + 1, SIDE_JSON[side], SIDE_LEN[side])
    p += 1 + SIDE_LEN[side]
    p[0] = b"]"
    return p + 1


cdef object _check_trade(object t, int64_t* tseq, int64_t* ts, double* price, double* size,
                         int* side):
    """Validate one decoded JSON trade into C values; an error message or None."""
    if type(t) is not dict:
        return "trade is not an object"
    d = <dict>t
    if type(d.get("sym")) is not str:
        return "sym missing or not a string"
    x = d.get("tseq")
    if type(x) is not int or not 0 <= x < 9223372036854775807:
        return "tseq missing or not a non-negative integer"
    tseq[0] = x
    x = d.get("ts")
    if type(x) is not int or not 0 <= x < 9223372036854775807:
        return "ts missing or not a non-negative integer (ns)"
    ts[0] = x
    x = d.get("price")
    if type(x) is not float and type(x) is not int:
        return "price missing or not a number"
    price[0] = x
    x = d.get("size")
    if type(x) is not float and type(x) is not int:
        return "size missing or not a number"
    size[0] = x
    if not isfinite(price[0]) or not isfinite(size[0]):
        return "price or size is NaN or infinite"
    if size[0] < 0:
        return "size is negative"
    x = d.get("side", "")
    if x == "b":
        side[0] = 1
    elif x == "s":
        side[0] = 2
    elif x == "":
        side[0] = 0
    else:
        return 'side is not "b", "s" or ""'
    return None


def check_trade(trade):
    """Why the gateway would refuse this trade object, or None if it accepts it."""
    cdef int64_t tseq, ts
    cdef double price, size
    cdef int side
    err = _check_trade(trade, &tseq, &ts, &price, &size, &side)
    if err is None:
        b = trade["sym"].encode("utf-8", "replace")
        if not symbol_ok(b, len(b)):
            err = "bad symbol: 1 to 32 characters of A-Z a-z 0-9 . _ - : /"
    return err


def encode_trade_batch(trades):
    """Encode trade objects as one binary batch; returns (bytes, errors).

    Layout (little-endian): b"FTR1", u32 count, then per trade: u8 symbol
    length, symbol bytes, i64 tseq, i64 ts, f64 price, f64 size, u8 side
    (0 "", 1 "b", 2 "s"). `errors` lists (index, symbol or None, message) of
    the trades left out as malformed.
    """
    cdef int64_t tseq, ts
    cdef double price, size
    cdef int side
    out = bytearray(TRADE_BATCH_MAGIC + b"\0\0\0\0")
    errors = []
    cdef uint32_t n = 0
    for i, t in enumerate(trades):
        err = check_trade(t)
        if err is None:
            _check_trade(t, &tseq, &ts, &price, &size, &side)
            b = t["sym"].encode()
            out += bytes((len(b),)) + b
            out += (<char*>&tseq)[:8] + (<char*>&ts)[:8]
            out += (<char*>&price)[:8] + (<char*>&size)[:8] + bytes((side,))
            n += 1
        else:
            errors.append((i, t.get("sym") if type(t) is dict else None, err))
    out[4:8] = (<char*>&n)[:4]
    return bytes(out), errors


cdef Py_ssize_t _record(const char* p, Py_ssize_t pos, Py_ssize_t n) noexcept:
    # end of the record at `pos`, or -1 if it runs past `n`
    if pos + 1 > n:
        return -1
    pos += 1 + <uint8_t>p[pos] + 33
    return pos if pos <= n else -1


def bar_starts(const unsigned char[::1] data, BarClock clock not None):
    """The bar starts of every trade of a binary batch, as the bus's trade
    script takes them: per trade, in batch order, six i64 (1s .. 1d, 48
    bytes), computed by `clock` as every gateway's `Bars` computes them."""
    cdef Py_ssize_t n = data.shape[0], pos = 8, end
    cdef const char* p = b""
    cdef uint32_t count, k
    cdef int j
    cdef int64_t ts, st
    if n:
        p = <const char*>&data[0]
    if n < 8 or memcmp(p, b"FTR1", 4) != 0:
        raise ValueError("not a fastfeed trade batch (magic FTR1 missing)")
    count = _rd_u32(p + 4)
    out = bytearray(<Py_ssize_t>count * NBARIV * 8)
    cdef char* o = out
    for k in range(count):
        end = _record(p, pos, n)
        if end < 0:
            raise ValueError(f"trade batch truncated after {k} of {count} trades")
        ts = _rd_i64(p + pos + 1 + <uint8_t>p[pos] + 8)
        for j in range(NBARIV):
            st = clock.start(ts, j)
            memcpy(o, &st, 8)
            o += 8
        pos = end
    return bytes(out)


def decode_trade_batch(const unsigned char[::1] data):
    """Trade objects of a binary batch (the bus sink validates and publishes them)."""
    cdef Py_ssize_t n = data.shape[0], pos = 8, end
    cdef const char* p = b""
    cdef uint32_t count, k
    cdef uint8_t slen, sd
    cdef Py_ssize_t q
    if n:
        p = <const char*>&data[0]
    if n < 8 or memcmp(p, b"FTR1", 4) != 0:
        raise ValueError("not a fastfeed trade batch (magic FTR1 missing)")
    count = _rd_u32(p + 4)
    out = []
    for k in range(count):
        end = _record(p, pos, n)
        if end < 0:
            raise ValueError(f"trade batch truncated after {k} of {count} trades")
        slen = <uint8_t>p[pos]
        q = pos + 1 + slen
        sd = <uint8_t>p[q + 32]
        out.append({"type": "trade",
                    "sym": PyBytes_FromStringAndSize(p + pos + 1, slen).decode("utf-8",
                                                                               "replace"),
                    "tseq": _rd_i64(p + q), "ts": _rd_i64(p + q + 8),
                    "price": _rd_f64(p + q + 16), "size": _rd_f64(p + q + 24),
                    "side": SIDES[sd] if sd < 3 else "?"})
        pos = end
    return out


cdef inline void _stamp(Kind k, int32_t item, uint64_t ver, int64_t now) noexcept:
    k.chg[item] = ver
    k.arrived[item] = now
    k.dirty[item >> 6] |= 1ULL << (item & 63)
    if k.watched[item] and not (k.hot_bits[item >> 6] & (1ULL << (item & 63))):
        k.hot_bits[item >> 6] |= 1ULL << (item & 63)
        k.hot[k.nhot] = item
        k.nhot += 1


@cython.final
cdef class Tape(Kind):
    """The market-wide tape: one item (id 0), the last `ring` trades of every
    instrument in apply order. `Trades` feeds it."""

    def __cinit__(self, int32_t ring=1000):
        if ring < 1:
            raise ValueError("the tape ring must hold at least 1 trade")
        self.ring = ring
        self.key = "trades"
        self.has_binary = False
        self.size = 64  # one item; whole bitmap words
        self.version = 0
        self.nhot = 0
        memset(&self.stats, 0, sizeof(self.stats))
        self._grow_items(0, 64)
        self.enc = <char*>_grow(NULL, 0, <Py_ssize_t>ring * TAPE_SLOT, 0)
        self.enclen = <int32_t*>_grow(NULL, 0, <Py_ssize_t>ring * 4, 0)

    def __init__(self, int32_t ring=1000):
        pass

    def __dealloc__(self):
        free(self.enc)
        free(self.enclen)

    def reserve(self, Py_ssize_t items):
        if items > self.size:
            raise ValueError("the tape has one item, id 0")

    cdef void push(self, const char* sym, Py_ssize_t symlen, const char* trade,
                   int32_t n, int64_t now) noexcept:
        # `trade` is the instrument's encoding without its "[": prefix the symbol
        cdef char* p = self.enc + <Py_ssize_t>(self.version % <uint64_t>self.ring) * TAPE_SLOT
        p[0] = b"["
        p[1] = b'"'
        memcpy(p + 2, sym, symlen)
        p[2 + symlen] = b'"'
        p[3 + symlen] = b","
        memcpy(p + 4 + symlen, trade + 1, n - 1)
        self.enclen[self.version % <uint64_t>self.ring] = <int32_t>(3 + symlen + n)
        self.version += 1
        _stamp(self, 0, self.version, now)

    cdef void copy_state(self, Tape other) noexcept:
        """Become a copy of `other` (same ring; this one new): the delayed tape
        of a delayed copy made from another."""
        memcpy(self.enc, other.enc, <Py_ssize_t>self.ring * TAPE_SLOT)
        memcpy(self.enclen, other.enclen, <Py_ssize_t>self.ring * 4)
        self.version = other.version
        self.chg[0] = other.chg[0]
        self.arrived[0] = other.arrived[0]

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        return 64 + <Py_ssize_t>self.ring * (TAPE_SLOT + 1)

    @cython.cdivision(True)  # the ring holds at least one trade
    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        # trade k (1-based) has stamp k: held are version-held+1 .. version
        cdef uint64_t held, first, s
        cdef int32_t i
        count[0] = 0
        oldest[0] = 0
        for i in range(n):
            if ids[i] != 0 or self.chg[0] <= since:
                continue
            held = self.version if self.version < <uint64_t>self.ring else <uint64_t>self.ring
            first = self.version - held + 1
            memcpy(p, b'{"sym":"*",', 11)
            p += 11
            if first > since + 1:
                memcpy(p, b'"lost":', 7)
                p = _put_i64(p + 7, <int64_t>(first - since - 1))
                p[0] = b","
                p += 1
                s = first
            else:
                s = since + 1
            memcpy(p, b'"items":[', 9)
            p += 9
            while s <= self.version:
                memcpy(p, self.enc + <Py_ssize_t>((s - 1) % self.ring) * TAPE_SLOT,
                       self.enclen[(s - 1) % self.ring])
                p += self.enclen[(s - 1) % self.ring]
                if s < self.version:
                    p[0] = b","
                    p += 1
                s += 1
            p[0] = b"]"
            p[1] = b"}"
            p += 2
            count[0] = 1
            oldest[0] = self.arrived[0]
            return p  # one item: a repeated id 0 gets nothing more
        return p

    cdef int check(self) except -1:
        assert self.chg[0] == self.version, "the tape's item is stamped off its version"
        return 0

    def snapshot_json(self, ids=(0,)):
        """The tape's snapshot entry: `{"sym":"*","recent":[...]}`, oldest first."""
        cdef uint64_t held, s
        held = self.version if self.version < <uint64_t>self.ring else <uint64_t>self.ring
        parts = []
        for s in range(self.version - held + 1, self.version + 1):
            parts.append(PyBytes_FromStringAndSize(
                self.enc + <Py_ssize_t>((s - 1) % self.ring) * TAPE_SLOT,
                self.enclen[(s - 1) % self.ring]))
        return b'{"sym":"*","recent":[' + b",".join(parts) + b"]}"

    def _encode_section_py(self, ids, uint64_t since):
        cdef uint32_t count
        cdef int64_t oldest
        cdef int32_t zero = 0
        buf = bytearray(self.section_bound(1))
        cdef char* p = buf
        cdef char* end = p
        if 0 in list(ids):
            end = self.encode_section(p, &zero, 1, since, &count, &oldest)
        return bytes(buf[:end - p])


@cython.final
cdef class Trades(Kind):
    """Recent trades of every instrument of `table` (see the module)."""

    def __cinit__(self, Table table, int32_t ring=100, int32_t backlog=1000,
                  int32_t tape_ring=1000, Bars bars=None):
        if ring < 1:
            raise ValueError("the trade ring must hold at least 1 trade")
        if backlog < ring:
            raise ValueError("the trade backlog must be at least the trade ring")
        self.table = table
        self.ring = ring
        self.backlog = backlog
        self.tape = Tape(tape_ring)
        self.bars = bars
        self._bars = bars
        self.key = "trades"
        self.has_binary = False
        self.size = 0
        self.version = 0
        self.nhot = 0
        self.lost_inexact = 0
        self.held = 0
        memset(&self.stats, 0, sizeof(self.stats))
        self._reserve(table.capacity)

    def __init__(self, Table table, int32_t ring=100, int32_t backlog=1000,
                 int32_t tape_ring=1000, Bars bars=None):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.logs != NULL:
            for i in range(self.size):
                free(self.logs[i].stamp)
                free(self.logs[i].tseq)
                free(self.logs[i].enc)
                free(self.logs[i].enclen)
        free(self.logs)
        free(self.last)
        free(self.ntr)
        free(self.seeded)
        free(self.heldfrom)
        free(self.journal)

    cdef int _reserve(self, Py_ssize_t items) except -1:
        cdef Py_ssize_t old = self.size
        cdef Py_ssize_t cap = old if old else 64
        if items <= old:
            return 0
        while cap < items:
            cap *= 2
        self._grow_items(old, cap)
        self.last = <int64_t*>_grow(self.last, old * 8, cap * 8, 0xFF)
        self.ntr = <uint64_t*>_grow(self.ntr, old * 8, cap * 8, 0)
        self.seeded = <uint8_t*>_grow(self.seeded, old, cap, 0)
        self.heldfrom = <uint64_t*>_grow(self.heldfrom, old * 8, cap * 8, 0)
        self.logs = <TradeLog*>_grow(self.logs, old * sizeof(TradeLog),
                                     cap * sizeof(TradeLog), 0)
        self.size = cap
        return 0

    cdef int _gap(self, int32_t iid, int64_t tseq) except -1:
        """Before the oldest trade of a loaded ring: if it is not the next after
        the held one, the store lost the trades between (published while this
        worker was not subscribed, and the store's ring moved past them). They take
        ordinals and stamps, with no place in the ring, so a connection that
        has not had them gets them in its `lost`, as trades the ring dropped."""
        cdef TradeLog* g
        cdef uint64_t o, k, L = self.backlog, R = self.ring
        cdef int64_t n, t
        if iid >= self.size:
            self._reserve(iid + 1)
        if self.last[iid] < 0 or tseq <= self.last[iid] + 1:
            return 0
        g = &self.logs[iid]
        n = tseq - self.last[iid] - 1
        o = self.ntr[iid]
        # only the last `backlog` of them fit the stamps (further behind: a lower bound)
        k = <uint64_t>n if <uint64_t>n < L else L
        self.held += <Py_ssize_t>(min(o + <uint64_t>n, R) - min(o, R))
        o += <uint64_t>n - k
        t = tseq - <int64_t>k
        while k:
            self.version += 1
            g.stamp[o % L] = self.version
            g.tseq[o % L] = t
            o += 1
            t += 1
            k -= 1
        self.ntr[iid] = o
        self.heldfrom[iid] = o
        return 0

    def reserve(self, Py_ssize_t items):
        """Cover item ids 0 .. items-1 (the hub reads `chg`/`watched` of every id it is given)."""
        self._reserve(items)

    cdef int apply(self, int32_t iid, int64_t tseq, int64_t ts, double price, double size,
                   int side, int64_t now) except -1:
        """Apply one validated trade; APPLIED or STALE."""
        cdef TradeLog* g
        cdef uint64_t o
        cdef char* e
        cdef char* end
        if iid >= self.size:
            self._reserve(iid + 1)
        if tseq <= self.last[iid]:
            return STALE
        g = &self.logs[iid]
        if g.stamp == NULL:
            g.stamp = <uint64_t*>_grow(NULL, 0, <Py_ssize_t>self.backlog * 8, 0)
            g.tseq = <int64_t*>_grow(NULL, 0, <Py_ssize_t>self.backlog * 8, 0)
            g.enc = <char*>_grow(NULL, 0, <Py_ssize_t>self.ring * TRADE_SLOT, 0)
            g.enclen = <int32_t*>_grow(NULL, 0, <Py_ssize_t>self.ring * 4, 0)
        o = self.ntr[iid]
        self.version += 1
        g.stamp[o % <uint64_t>self.backlog] = self.version
        g.tseq[o % <uint64_t>self.backlog] = tseq
        e = g.enc + <Py_ssize_t>(o % <uint64_t>self.ring) * TRADE_SLOT
        e[0] = b"["
        end = _trade_json(e + 1, tseq, ts, price, size, side)
        if FF_DEBUG and end - e > TRADE_SLOT:
            _overrun("trade", end - e, TRADE_SLOT)
        g.enclen[o % <uint64_t>self.ring] = <int32_t>(end - e)
        self.ntr[iid] = o + 1
        if o < <uint64_t>self.ring:
            self.held += 1
        self.last[iid] = tseq
        _stamp(self, iid, self.version, now)
        self.tape.push(self.table.syms + <Py_ssize_t>iid * SYM_MAX, self.table.symlen[iid],
                       e, <int32_t>(end - e), now)
        if self._bars is not None:
            self._bars.add(iid, ts, price, size, now)
        if self.journaling:
            if self.jn == self.jcap:
                self.journal = <TradeRec*>_grow(self.journal, self.jcap * sizeof(TradeRec),
                                                max(1024, self.jcap * 2) * sizeof(TradeRec), 0)
                self.jcap = max(1024, self.jcap * 2)
            self.journal[self.jn] = TradeRec(tseq, ts, price, size, iid, side)
            self.jn += 1
        return APPLIED

    cdef int copy_state(self, Trades other) except -1:
        """Become a copy of `other`'s trades (same ring and backlog; this one
        new): a delayed copy made from another (docs/delay.md)."""
        cdef Py_ssize_t i, n = other.size
        cdef TradeLog* g
        cdef TradeLog* h
        if self.ring != other.ring or self.backlog != other.backlog or self.version:
            raise ValueError("copy_state needs a new Trades of the same ring and backlog")
        self._reserve(n)
        memcpy(self.last, other.last, n * 8)
        memcpy(self.ntr, other.ntr, n * 8)
        memcpy(self.seeded, other.seeded, n)
        memcpy(self.heldfrom, other.heldfrom, n * 8)
        memcpy(self.chg, other.chg, n * 8)
        memcpy(self.arrived, other.arrived, n * 8)
        for i in range(n):
            h = &other.logs[i]
            if h.stamp == NULL:
                continue
            g = &self.logs[i]
            g.stamp = <uint64_t*>_grow(NULL, 0, <Py_ssize_t>self.backlog * 8, 0)
            g.tseq = <int64_t*>_grow(NULL, 0, <Py_ssize_t>self.backlog * 8, 0)
            g.enc = <char*>_grow(NULL, 0, <Py_ssize_t>self.ring * TRADE_SLOT, 0)
            g.enclen = <int32_t*>_grow(NULL, 0, <Py_ssize_t>self.ring * 4, 0)
            memcpy(g.stamp, h.stamp, <Py_ssize_t>self.backlog * 8)
            memcpy(g.tseq, h.tseq, <Py_ssize_t>self.backlog * 8)
            memcpy(g.enc, h.enc, <Py_ssize_t>self.ring * TRADE_SLOT)
            memcpy(g.enclen, h.enclen, <Py_ssize_t>self.ring * 4)
        self.version = other.version
        self.held = other.held
        if self.tape.ring == other.tape.ring:
            self.tape.copy_state(other.tape)
        return 0

    # ---- the kind: what the hub calls ----------------------------------

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        # an entry per item, and no more trades than the rings hold: a group of
        # thousands of instruments does not reserve a ring for each
        cdef Py_ssize_t t = <Py_ssize_t>n * self.ring
        if self.held < t:
            t = self.held
        return <Py_ssize_t>n * (64 + SYM_MAX + 24) + t * (TRADE_SLOT + 1)

    @cython.cdivision(True)  # ring and backlog are at least 1 (checked at construction)
    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        cdef Py_ssize_t i
        cdef int32_t iid
        cdef uint32_t cnt = 0
        cdef int64_t old = 0
        cdef uint64_t end, lo_held, lo_idx, lo, hi, mid, f, o, L = self.backlog
        cdef uint64_t R = self.ring
        cdef TradeLog* g
        for i in range(n):
            iid = ids[i]
            if iid >= self.size or self.chg[iid] <= since:
                continue
            g = &self.logs[iid]
            end = self.ntr[iid]
            lo_held = end - R if end > R else 0
            if lo_held < self.heldfrom[iid]:
                lo_held = self.heldfrom[iid]
            lo_idx = end - L if end > L else 0
            # f: the first trade stamped after `since` (the newest one is)
            if g.stamp[lo_idx % L] > since:
                f = lo_idx
                if lo_idx > 0:
                    self.lost_inexact += 1  # further behind than the backlog: a lower bound
            else:
                lo = lo_idx
                hi = end - 1
                while hi - lo > 1:
                    mid = lo + (hi - lo) // 2
                    if g.stamp[mid % L] > since:
                        hi = mid
                    else:
                        lo = mid
                f = hi
            if cnt:
                p[0] = b","
                p += 1
            if cnt == 0 or self.arrived[iid] < old:
                old = self.arrived[iid]
            cnt += 1
            memcpy(p, b'{"sym":"', 8)
            memcpy(p + 8, self.table.syms + <Py_ssize_t>iid * SYM_MAX, self.table.symlen[iid])
            p += 8 + self.table.symlen[iid]
            p[0] = b'"'
            p[1] = b","
            p += 2
            if f < lo_held:
                memcpy(p, b'"lost":', 7)
                p = _put_i64(p + 7, <int64_t>(lo_held - f))
                p[0] = b","
                p += 1
                f = lo_held
            memcpy(p, b'"items":[', 9)
            p += 9
            o = f
            while o < end:
                memcpy(p, g.enc + <Py_ssize_t>(o % R) * TRADE_SLOT, g.enclen[o % R])
                p += g.enclen[o % R]
                o += 1
                if o < end:
                    p[0] = b","
                    p += 1
            p[0] = b"]"
            p[1] = b"}"
            p += 2
        count[0] = cnt
        oldest[0] = old
        return p

    cdef int check(self) except -1:
        cdef Py_ssize_t i
        cdef uint64_t o, L = self.backlog
        cdef TradeLog* g
        cdef Py_ssize_t held = 0
        for i in range(self.size):
            held += min(self.ntr[i], <uint64_t>self.ring)
        assert held == self.held, f"the rings hold {held} trades but count {self.held}"
        for i in range(self.size):
            assert self.chg[i] <= self.version, f"trade item {i} stamped in the future"
            g = &self.logs[i]
            if self.ntr[i] == 0:
                continue
            assert g.stamp != NULL, f"instrument {i} has trades but no log"
            assert g.stamp[(self.ntr[i] - 1) % L] == self.chg[i], \
                f"instrument {i}: its newest trade is not its change stamp"
            o = self.ntr[i] - 1
            while o > 0 and o + L > self.ntr[i]:
                assert g.stamp[(o - 1) % L] < g.stamp[o % L], \
                    f"instrument {i}: trade stamps out of order at ordinal {o}"
                assert g.tseq[(o - 1) % L] < g.tseq[o % L], \
                    f"instrument {i}: tseq not increasing at ordinal {o}"
                o -= 1
        for i in range(self.nhot):
            assert (self.hot_bits[self.hot[i] >> 6] >> (self.hot[i] & 63)) & 1, \
                "hot list and hot bitmap disagree"
        return 0

    # ---- Python face -------------------------------------------------

    def _check(self):
        """Assert the kind's invariants (tests; debug builds run it every pump)."""
        self.check()

    def last_tseq(self, Py_ssize_t iid):
        """tseq of the instrument's last applied trade, -1 before any."""
        return self.last[iid] if 0 <= iid < self.size else -1

    def recent(self, Py_ssize_t iid):
        """The held trades of an instrument, oldest first, as JSON bytes each."""
        cdef TradeLog* g
        cdef uint64_t o, end, lo
        if not 0 <= iid < self.size or self.ntr[iid] == 0:
            return []
        g = &self.logs[iid]
        end = self.ntr[iid]
        lo = end - self.ring if end > <uint64_t>self.ring else 0
        if lo < self.heldfrom[iid]:
            lo = self.heldfrom[iid]
        return [PyBytes_FromStringAndSize(g.enc + <Py_ssize_t>(o % self.ring) * TRADE_SLOT,
                                          g.enclen[o % self.ring]) for o in range(lo, end)]

    def snapshot_json(self, ids, since_trades=None, upto=None):
        """Comma-joined snapshot entries `{"sym":..,"recent":[...]}` of `ids`.

        `since_trades` maps an id to the last tseq the client holds: `recent`
        then holds only later trades, with `"lost":N` (N = first held tseq -
        since - 1) when the gateway held trades after `since` that its ring
        no longer holds (or it started from a loaded ring after them).
        `upto` (a version of this kind) leaves out trades stamped after it: a
        connection whose next frame starts there gets those in that frame,
        so none comes twice.
        """
        cdef TradeLog* g
        cdef uint64_t o, end, lo, R = self.ring, L = self.backlog
        cdef uint64_t cut = self.version if upto is None else <uint64_t>upto
        cdef int64_t since, first
        out = []
        for iid in ids:
            if iid >= self.size:
                self._reserve(iid + 1)
            sym = PyBytes_FromStringAndSize(self.table.syms + <Py_ssize_t>iid * SYM_MAX,
                                            self.table.symlen[<Py_ssize_t>iid])
            head = b'{"sym":"' + sym + b'",'
            end = self.ntr[iid]
            lo = end - R if end > R else 0
            if lo < self.heldfrom[iid]:
                lo = self.heldfrom[iid]
            g = &self.logs[iid]
            while end > lo and g.stamp[(end - 1) % L] > cut:
                end -= 1
            since = -1
            if since_trades is not None and iid in since_trades:
                since = since_trades[iid]
            # skip held trades at or below `since`
            while lo < end and g.tseq[lo % L] <= since:
                lo += 1
            if since >= 0 and lo < end:
                first = g.tseq[lo % L]
                if first > since + 1 and (end > R or self.seeded[iid]):
                    head += b'"lost":' + str(first - since - 1).encode() + b","
            items = [PyBytes_FromStringAndSize(g.enc + <Py_ssize_t>(o % R) * TRADE_SLOT,
                                               g.enclen[o % R]) for o in range(lo, end)]
            out.append(head + b'"recent":[' + b",".join(items) + b"]}")
        return b",".join(out)

    def _encode_section_py(self, ids, uint64_t since):
        """`encode_section` as bytes (tests: what the hub would put in the section)."""
        import numpy as np
        cdef int32_t[::1] arr
        cdef uint32_t count
        cdef int64_t oldest
        a = np.asarray(list(ids), dtype=np.int32)
        if len(a) == 0:
            return b""
        self._reserve(int(a.max()) + 1)
        arr = a
        buf = bytearray(self.section_bound(len(a)))
        cdef char* p = buf
        cdef char* end = self.encode_section(p, &arr[0], len(a), since, &count, &oldest)
        if end - p > len(buf):
            _overrun("trades section", end - p, len(buf))
        return bytes(buf[:end - p]) if count else b""

    cdef int _one(self, object t, int source, int64_t now, list errors, Py_ssize_t idx) except -1:
        cdef int64_t tseq, ts
        cdef double price, size
        cdef int side, out
        cdef int32_t iid = -1
        err = _check_trade(t, &tseq, &ts, &price, &size, &side)
        if err is None:
            b = (<dict>t)["sym"].encode("utf-8", "replace")
            iid = self.table.intern(b, len(b))
            if iid < 0:
                err = "instrument table is full" if symbol_ok(b, len(b)) else "bad symbol"
        if err is not None:
            errors.append((idx, t.get("sym") if type(t) is dict else None, err))
            self.stats.ticks[source][REJECTED] += 1
            return REJECTED
        out = self.apply(iid, tseq, ts, price, size, side, now)
        self.stats.ticks[source][out] += 1
        return out

    def apply_objects(self, list trades, int source=SRC_INGEST):
        """Apply decoded JSON trades. Returns (applied, stale, errors).

        `errors` lists (index, symbol or None, message) of the trades refused as
        malformed; the others are applied or dropped as stale regardless. A
        trade for a new symbol interns it in the table.
        """
        cdef int64_t now = _clock(CLOCK_REALTIME)
        cdef int res[3]
        cdef Py_ssize_t idx = 0
        res[0] = res[1] = res[2] = 0
        errors = []
        for t in trades:
            res[self._one(t, source, now, errors, idx)] += 1
            idx += 1
        return res[0], res[1], errors

    def apply_trade(self, str sym, int64_t tseq, int64_t ts, double price, double size,
                    str side="", int source=SRC_SIMULATOR):
        """Apply one trade from Python (simulator, tests): 0 applied, 1 stale, 2 rejected."""
        errors = []
        return self._one({"sym": sym, "tseq": tseq, "ts": ts, "price": price, "size": size,
                          "side": side}, source, _clock(CLOCK_REALTIME), errors, 0)

    def apply_batch(self, const unsigned char[::1] data, int source=SRC_BUS, bint seed=False,
                    bint bars=True):
        """Apply a binary trade batch (FTR1). Returns (applied, stale, rejected).

        Raises ValueError if it is not a batch or is truncated; the trades
        before the damage are applied. With `seed`, the batch is a ring loaded
        from the store: its instruments are marked as starting from a loaded
        ring (a snapshot resuming from before it gets `lost`). Without `bars`
        the trades do not reach the bars (a ring loaded beside the bars the
        store keeps, which hold them already).
        """
        cdef Bars keep = self._bars
        if not bars:
            self._bars = None
        try:
            return self._apply_batch(data, source, seed)
        finally:
            self._bars = keep

    cdef tuple _apply_batch(self, const unsigned char[::1] data, int source, bint seed):
        cdef Py_ssize_t n = data.shape[0], pos = 8, end, q
        cdef const char* p = b""
        cdef uint32_t count, k
        cdef uint8_t slen, sd
        cdef int32_t iid
        cdef int out
        cdef int64_t tseq, ts, now = _clock(CLOCK_REALTIME)
        cdef double price, size
        cdef int res[3]
        res[0] = res[1] = res[2] = 0
        loaded = set()
        if n:
            p = <const char*>&data[0]
        if n < 8 or memcmp(p, b"FTR1", 4) != 0:
            raise ValueError("not a fastfeed trade batch (magic FTR1 missing)")
        count = _rd_u32(p + 4)
        for k in range(count):
            end = _record(p, pos, n)
            if end < 0:
                raise ValueError(f"trade batch truncated after {k} of {count} trades")
            slen = <uint8_t>p[pos]
            q = pos + 1 + slen
            tseq = _rd_i64(p + q)
            ts = _rd_i64(p + q + 8)
            price = _rd_f64(p + q + 16)
            size = _rd_f64(p + q + 24)
            sd = <uint8_t>p[q + 32]
            out = REJECTED
            # refuse before interning, so a bad trade never creates an instrument
            if (tseq >= 0 and ts >= 0 and isfinite(price) and isfinite(size) and size >= 0
                    and sd < 3):
                iid = self.table.intern(p + pos + 1, slen)
                if iid >= 0:
                    if seed and iid not in loaded:
                        # a ring's oldest trade against what was held: holes
                        # within the ring are the store's own
                        loaded.add(iid)
                        self._gap(iid, tseq)
                    out = self.apply(iid, tseq, ts, price, size, sd, now)
                    if seed:
                        self.seeded[iid] = 1
            self.stats.ticks[source][out] += 1
            res[out] += 1
            pos = end
        return res[0], res[1], res[2]

    def seed(self, str sym, list trades):
        """Load an instrument's ring from stored trades (a late worker: the bus
        store), oldest first, as [tseq, ts, price, size, side] lists. Trades at
        or below the held tseq are skipped; the loaded ones are the start of
        what this gateway holds (a snapshot resuming from before them gets
        `lost`: the trades before them may have existed). Bars are fed as by
        any applied trade. Returns how many were applied."""
        b = sym.encode()
        cdef int32_t iid = self.table.intern(b, len(b))
        cdef int applied = 0
        cdef int64_t now = _clock(CLOCK_REALTIME)
        if iid < 0:
            raise ValueError(f"bad symbol or full table: {sym!r}")
        self._reserve(iid + 1)
        if trades and type(trades[0][0]) is int:
            self._gap(iid, trades[0][0])
        for tr in trades:
            t = {"sym": sym, "tseq": tr[0], "ts": tr[1], "price": tr[2], "size": tr[3],
                 "side": tr[4]}
            applied += self._one(t, SRC_BUS, now, [], 0) == APPLIED
        self.seeded[iid] = 1
        return applied

    def take_stats(self):
        """Trade counters since the last call: {(source, outcome): n}, lost_inexact."""
        s = self.stats
        memset(&self.stats, 0, sizeof(self.stats))
        trades = {}
        for a in range(NSOURCES):
            for b in range(3):
                if s.ticks[a][b]:
                    trades[(SOURCES[a], OUTCOMES[b])] = s.ticks[a][b]
        return {"trades": trades, "lost_inexact": self.lost_inexact}
