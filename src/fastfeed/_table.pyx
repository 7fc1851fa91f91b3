# cython: language_level=3
"""State per kind, and the first kind: the instrument table (quotes).

The per-tick hot path lives here: `Table.apply` checks seq and finiteness,
writes the field arrays, stamps the change with the table version and sets a
bit in the dirty bitmap. The hub (_hub.pyx) reads those stamps and bits and
asks each kind to encode a client's pending items (`Kind.encode_section`).
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from fastfeed._defs cimport (
    APPLIED, BIN_ROW, CLOCK_REALTIME, FF_DEBUG, M_ALL, M_TS, NFCHG, NSOURCES, NVALS, REJECTED,
    ROW_SLOT, SRC_BUS, SRC_INGEST, SRC_SIMULATOR, STALE, SYM_MAX, Stats, __builtin_popcount,
    _clock, _grow,
)
from fastfeed._wire cimport (
    _check_tick, _finite, _hash, _put_f64, _put_i64, _put_value, _put_varint, _put_zigzag,
    _rd_f64, _rd_i64, _rd_u32, symbol_ok,
)

import numpy as np

from fastfeed._wire import FIELDS, OUTCOMES, SOURCES, VALUE_FIELDS


cdef enum:
    TOK_STEP = 10                # a value token's length byte and at most 9 bytes
    TOK_SLOT = 72                # NVALS tokens per instrument, 8-byte aligned


cdef int _overrun(str what, Py_ssize_t n, Py_ssize_t bound) except -1:
    # out of line, so the hot path it guards (in debug builds) stays free of Python
    raise AssertionError(f"{what} of {n} bytes overran its bound of {bound}")


cdef class Kind:
    """A kind of state the hub fans out (the C-level seam; see docs/core.md).

    Not used from Python: a kind is a subclass (quotes: `Table`) that fills the
    fields declared in _table.pxd and overrides the C methods. The hub writes
    the update frame's envelope and each key; a kind writes only its entries.
    """

    def __dealloc__(self):
        # after the subclass's own: the arrays every kind has
        free(self.chg)
        free(self.arrived)
        free(self.dirty)
        free(self.watched)
        free(self.hot_bits)
        free(self.hot)

    cdef int _grow_items(self, Py_ssize_t old, Py_ssize_t cap) except -1:
        """The per-item arrays every kind has, from `old` to `cap` items
        (multiples of 64, for the bitmaps' whole words), the new ones zeroed."""
        self.chg = <uint64_t*>_grow(self.chg, old * 8, cap * 8, 0)
        self.arrived = <int64_t*>_grow(self.arrived, old * 8, cap * 8, 0)
        self.dirty = <uint64_t*>_grow(self.dirty, (old // 64) * 8, (cap // 64) * 8, 0)
        self.hot_bits = <uint64_t*>_grow(self.hot_bits, (old // 64) * 8, (cap // 64) * 8, 0)
        self.hot = <int32_t*>_grow(self.hot, old * 4, cap * 4, 0)
        self.watched = <uint8_t*>_grow(self.watched, old, cap, 0)
        return 0

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        """Most bytes `encode_section` may write for `n` items."""
        return 0

    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        """Write at `p` the comma-separated JSON entries (no brackets, no key)
        of the items of `ids` whose change stamp is newer than `since`; return
        the end. `count` gets how many entries went in (0: nothing was pending
        and the bytes written mean nothing), `oldest` the earliest arrival
        time among them. A pure function of (ids, since, state): the hub
        shares the bytes among every connection in the same state."""
        raise NotImplementedError("a kind must override encode_section")

    cdef Py_ssize_t bin_bound(self, int32_t n, bint compact) noexcept:
        """Most bytes `encode_bin` may write for `n` items (kinds with has_binary)."""
        return 0

    cdef char* encode_bin(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                          bint compact, int64_t t, uint32_t* count,
                          int64_t* oldest) except NULL:
        """As encode_section, as binary records (no header): FFB1's, or with
        `compact` FFC1's (`t`: the frame's time). Only kinds with has_binary."""
        raise NotImplementedError("a kind without has_binary has no binary records")

    cdef Py_ssize_t compact_bound(self, int32_t n) noexcept:
        """Most bytes `encode_compact` may write for `n` items."""
        return self.section_bound(n)

    cdef char* encode_compact(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              int64_t t, uint32_t* count, int64_t* oldest) except NULL:
        """As encode_section, for connections on the compact subprotocol; `t`
        is the frame's time. A kind without a compact form sends its entries
        as they are."""
        return self.encode_section(p, ids, n, since, count, oldest)

    cdef int check(self) except -1:
        """Assert the kind's own invariants (debug builds call it every pump)."""
        return 0


@cython.final
cdef class Table(Kind):
    """Latest state of every instrument, one numpy array per protocol field."""

    def __cinit__(self, Py_ssize_t capacity=1024, Py_ssize_t max_instruments=1_000_000,
                  str key="rows"):
        self.key = key
        # FFB1 frames carry quote rows: a table under another key is not one
        self.has_binary = key == "rows"
        self.capacity = 0
        self.size = 0
        if not 1 <= max_instruments <= 2**31 - 1:
            raise ValueError("max_instruments must lie in 1..2**31-1 (ids are int32)")
        self.max_instruments = max_instruments
        self.refused_len = 0
        self.version = 0
        self.arrays = {}
        self.hcap = 0
        self.nhot = 0
        memset(&self.stats, 0, sizeof(Stats))
        # a power of two, so the symbol map can probe with a mask
        cap = 64
        while cap < capacity:
            cap *= 2
        self._resize(cap)

    def __init__(self, Py_ssize_t capacity=1024, Py_ssize_t max_instruments=1_000_000,
                 str key="rows"):
        # `key`: the frame key of its rows; a second quote table (a delayed
        # copy) keeps "rows", the tests use another key to stand in for a kind
        pass

    def __dealloc__(self):
        free(self.syms)
        free(self.symlen)
        free(self.rowbuf)
        free(self.rowlen)
        free(self.rowver)
        free(self.rowoff)
        free(self.fchg)
        free(self.tokbuf)
        free(self.tokver)
        free(self.hslots)

    def _resize(self, Py_ssize_t cap):
        # Doubling keeps the copy amortized O(1) per instrument; it happens
        # only when a new symbol arrives, never on the per-tick path.
        cdef Py_ssize_t old = self.capacity
        cdef Py_ssize_t k
        cdef int64_t[::1] iv
        cdef double[::1] dv
        new = {}
        for name in FIELDS[1:]:
            kind = np.int64 if name in ("seq", "ts") else np.float64
            arr = np.zeros(cap, dtype=kind)
            if name == "seq":
                arr[:] = -1
            if old:
                arr[:old] = self.arrays[name]
            new[name] = arr
        self.arrays = new
        iv = new["seq"]
        self.seq = &iv[0]
        iv = new["ts"]
        self.ts = &iv[0]
        for k in range(NVALS):
            dv = new[VALUE_FIELDS[k]]
            self.val[k] = &dv[0]
        self._grow_items(old, cap)
        self.syms = <char*>_grow(self.syms, old * SYM_MAX, cap * SYM_MAX, 0)
        self.symlen = <uint8_t*>_grow(self.symlen, old, cap, 0)
        self.rowbuf = <char*>_grow(self.rowbuf, old * ROW_SLOT, cap * ROW_SLOT, 0)
        self.rowlen = <int32_t*>_grow(self.rowlen, old * 4, cap * 4, 0)
        self.rowver = <uint64_t*>_grow(self.rowver, old * 8, cap * 8, 0xFF)
        self.rowoff = <uint16_t*>_grow(self.rowoff, old * 2 * (NVALS + 1),
                                       cap * 2 * (NVALS + 1), 0)
        self.fchg = <uint64_t*>_grow(self.fchg, old * 8 * NFCHG, cap * 8 * NFCHG, 0)
        self.tokbuf = <char*>_grow(self.tokbuf, old * TOK_SLOT, cap * TOK_SLOT, 0)
        self.tokver = <uint64_t*>_grow(self.tokver, old * 8, cap * 8, 0xFF)
        self.capacity = cap
        self._rehash(cap * 2)

    cdef void _rehash_c(self, Py_ssize_t hcap) noexcept:
        cdef Py_ssize_t i
        cdef uint64_t j
        free(self.hslots)
        self.hslots = <int32_t*>malloc(hcap * 4)
        memset(self.hslots, 0xFF, hcap * 4)
        self.hcap = hcap
        for i in range(self.size):
            j = _hash(self.syms + i * SYM_MAX, self.symlen[i]) & <uint64_t>(hcap - 1)
            while self.hslots[j] >= 0:
                j = (j + 1) & <uint64_t>(hcap - 1)
            self.hslots[j] = <int32_t>i

    def _rehash(self, Py_ssize_t hcap):
        self._rehash_c(hcap)

    cdef int32_t find(self, const char* s, Py_ssize_t n) noexcept:
        cdef uint64_t mask = <uint64_t>(self.hcap - 1)
        cdef uint64_t j = _hash(s, n) & mask
        cdef int32_t iid
        while True:
            iid = self.hslots[j]
            if iid < 0:
                return -1
            if self.symlen[iid] == n and memcmp(self.syms + iid * SYM_MAX, s, n) == 0:
                return iid
            j = (j + 1) & mask

    cdef int32_t intern(self, const char* s, Py_ssize_t n) except -2:
        """Id of a symbol, created if new; -1 for an invalid symbol or a full table."""
        cdef int32_t iid = self.find(s, n)
        cdef uint64_t j
        if iid >= 0:
            return iid
        if not symbol_ok(s, n):
            return -1
        if self.size >= self.max_instruments:
            # counted and named for the operator (take_stats), once per tick
            self.stats.refused += 1
            memcpy(self.refused_sym, s, n)
            self.refused_len = <uint8_t>n
            return -1
        if self.size >= self.capacity:
            # doubling, to at most the power of two at or above max_instruments
            self._resize(self.capacity * 2)
        iid = <int32_t>self.size
        memcpy(self.syms + iid * SYM_MAX, s, n)
        self.symlen[iid] = <uint8_t>n
        self.size += 1
        j = _hash(s, n) & <uint64_t>(self.hcap - 1)
        while self.hslots[j] >= 0:
            j = (j + 1) & <uint64_t>(self.hcap - 1)
        self.hslots[j] = iid
        return iid

    cdef int apply(self, int32_t iid, int64_t seq, int64_t ts, uint32_t mask,
                   const double* v, int64_t now) noexcept:
        cdef int k
        for k in range(NVALS):
            if mask & (2 << k) and not isfinite(v[k]):
                return REJECTED
        cdef uint64_t* f = self.fchg + <Py_ssize_t>iid * NFCHG
        cdef uint64_t ver = self.version + 1
        if seq <= self.seq[iid]:
            return STALE
        self.seq[iid] = seq
        # a field's own stamp moves only when its value does (bit for bit, so
        # -0.0 after 0.0 counts): the compact encoding sends just those
        if mask & M_TS and ts != self.ts[iid]:
            self.ts[iid] = ts
            f[0] = ver
        for k in range(NVALS):
            if mask & (2 << k) and memcmp(&self.val[k][iid], &v[k], 8) != 0:
                self.val[k][iid] = v[k]
                f[k + 1] = ver
        self.version = ver
        self.chg[iid] = self.version
        self.arrived[iid] = now
        self.dirty[iid >> 6] |= 1ULL << (iid & 63)
        if self.watched[iid] and not (self.hot_bits[iid >> 6] & (1ULL << (iid & 63))):
            self.hot_bits[iid >> 6] |= 1ULL << (iid & 63)
            self.hot[self.nhot] = iid
            self.nhot += 1
        return APPLIED

    cdef char* _row_head(self, char* p, int32_t iid) noexcept:
        # `["SYM",seq,`: how a whole row and a compact row both begin
        p[0] = b"["
        p[1] = b'"'
        memcpy(p + 2, self.syms + iid * SYM_MAX, self.symlen[iid])
        p += 2 + self.symlen[iid]
        p[0] = b'"'
        p[1] = b","
        p = _put_i64(p + 2, self.seq[iid])
        p[0] = b","
        return p + 1

    cdef const char* row_json(self, int32_t iid, int32_t* n) except NULL:
        """The instrument's JSON row, encoded at most once per change."""
        cdef char* base = self.rowbuf + iid * ROW_SLOT
        cdef char* p
        cdef uint16_t* off
        cdef int k
        if self.rowver[iid] != self.chg[iid]:
            p = self._row_head(base, iid)
            p = _put_i64(p, self.ts[iid])
            off = self.rowoff + iid * (NVALS + 1)
            for k in range(NVALS):
                p[0] = b","
                off[k] = <uint16_t>(p + 1 - base)  # compact rows copy the texts from here
                p = _put_f64(p + 1, self.val[k][iid])
            p[0] = b"]"
            off[NVALS] = <uint16_t>(p + 1 - base)
            if FF_DEBUG and p + 1 - base > ROW_SLOT:
                _overrun("row", p + 1 - base, ROW_SLOT)
            self.rowlen[iid] = <int32_t>(p + 1 - base)
            self.rowver[iid] = self.chg[iid]
            self.stats.rows_encoded += 1
        n[0] = self.rowlen[iid]
        return base

    cdef void row_bin(self, int32_t iid, char* out) noexcept:
        cdef int k
        memset(out, 0, SYM_MAX)
        memcpy(out, self.syms + iid * SYM_MAX, self.symlen[iid])
        memcpy(out + 32, &self.seq[iid], 8)
        memcpy(out + 40, &self.ts[iid], 8)
        for k in range(NVALS):
            memcpy(out + 48 + 8 * k, &self.val[k][iid], 8)

    # ---- the quote kind: what the hub calls ----------------------------

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        # every row of the group, each with its comma
        return <Py_ssize_t>n * (ROW_SLOT + 1)

    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        return self._rows(p, ids, n, since, False, 0, count, oldest)

    cdef Py_ssize_t compact_bound(self, int32_t n) noexcept:
        # a compact row is a full row at most, plus its mask (3 digits and a comma)
        return <Py_ssize_t>n * (ROW_SLOT + 5)

    cdef char* encode_compact(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              int64_t t, uint32_t* count, int64_t* oldest) except NULL:
        return self._rows(p, ids, n, since, True, t, count, oldest)

    cdef char* _rows(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                     bint compact, int64_t t, uint32_t* count, int64_t* oldest) except NULL:
        """The rows of `ids` changed after `since`, comma-separated: whole (the
        cached JSON row) or compact (only the fields changed after `since`)."""
        cdef Py_ssize_t k
        cdef int32_t iid, rn
        cdef uint32_t cnt = 0
        cdef const char* row
        cdef int64_t old = 0
        for k in range(n):
            iid = ids[k]
            # an id past the table never changed (the debug build flags it)
            if iid >= self.size or self.chg[iid] <= since:
                continue
            if cnt == 0 or self.arrived[iid] < old:
                old = self.arrived[iid]
            if cnt:
                p[0] = b","
                p += 1
            if compact:
                p = self._compact_row(p, iid, since, t)
            else:
                row = self.row_json(iid, &rn)
                memcpy(p, row, rn)
                p += rn
            cnt += 1
        count[0] = cnt
        oldest[0] = old
        return p

    cdef uint32_t _changed(self, int32_t iid, uint64_t since) noexcept:
        # bit 0: ts, bit k: the k-th value; set when changed after `since`
        cdef const uint64_t* f = self.fchg + <Py_ssize_t>iid * NFCHG
        cdef uint32_t m = 0
        cdef int j
        for j in range(NFCHG):
            if f[j] > since:
                m |= 1u << j
        return m

    cdef char* _compact_row(self, char* p, int32_t iid, uint64_t since, int64_t t) except NULL:
        # ["SYM",seq,mask,t-ts if bit 0,value per set bit 1-7] (docs/protocol.md);
        # the values' texts are those of the cached whole row (one encode per change)
        cdef uint32_t m = self._changed(iid, since)
        cdef int32_t rn
        cdef const char* row
        cdef const uint16_t* off
        cdef int j
        p = _put_i64(self._row_head(p, iid), m)
        if m & M_TS:
            # ts and t are both >= 0: the difference fits
            p[0] = b","
            p = _put_i64(p + 1, t - self.ts[iid])
        if m & ~M_TS:
            row = self.row_json(iid, &rn)
            off = self.rowoff + iid * (NVALS + 1)
            for j in range(NVALS):
                if m & (2u << j):
                    # the text runs up to the comma (or bracket) before the next
                    p[0] = b","
                    memcpy(p + 1, row + off[j], off[j + 1] - 1 - off[j])
                    p += off[j + 1] - off[j]
        p[0] = b"]"
        return p + 1

    cdef const char* _tokens(self, int32_t iid) noexcept:
        # the values' FFC1 tokens, encoded at most once per change (a
        # compact row is built per connection state, its values are not):
        # per value its length, then its bytes, TOK_STEP apart
        cdef char* base = self.tokbuf + iid * TOK_SLOT
        cdef char* q
        cdef int j
        if self.tokver[iid] != self.chg[iid]:
            for j in range(NVALS):
                q = base + j * TOK_STEP
                q[0] = <char>(_put_value(q + 1, self.val[j][iid]) - (q + 1))
            self.tokver[iid] = self.chg[iid]
        return base

    cdef char* _compact_bin_row(self, char* p, int32_t iid, uint64_t since, int64_t t) noexcept:
        # u8 symbol length, the symbol, u8 mask, varint seq, zigzag varint
        # t-ts if bit 0, a value token per set bit 1-7 (docs/protocol.md)
        cdef uint32_t m = self._changed(iid, since)
        cdef const char* tok
        cdef int j
        p[0] = <char>self.symlen[iid]
        memcpy(p + 1, self.syms + iid * SYM_MAX, self.symlen[iid])
        p += 1 + self.symlen[iid]
        p[0] = <char>m
        p = _put_varint(p + 1, <uint64_t>self.seq[iid])
        if m & M_TS:
            p = _put_zigzag(p, t - self.ts[iid])
        if m & ~M_TS:
            tok = self._tokens(iid)
            for j in range(NVALS):
                if m & (2u << j):
                    memcpy(p, tok + j * TOK_STEP + 1, <uint8_t>tok[j * TOK_STEP])
                    p += <uint8_t>tok[j * TOK_STEP]
        return p

    cdef Py_ssize_t bin_bound(self, int32_t n, bint compact) noexcept:
        # a compact record: length, symbol, mask, two 10-byte varints, 9 per value
        return <Py_ssize_t>n * (2 + SYM_MAX + 20 + 9 * NVALS if compact else BIN_ROW)

    cdef char* encode_bin(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                          bint compact, int64_t t, uint32_t* count,
                          int64_t* oldest) except NULL:
        cdef Py_ssize_t k
        cdef int32_t iid
        cdef uint32_t cnt = 0
        cdef int64_t old = 0
        for k in range(n):
            iid = ids[k]
            if iid >= self.size or self.chg[iid] <= since:
                continue
            if cnt == 0 or self.arrived[iid] < old:
                old = self.arrived[iid]
            if compact:
                p = self._compact_bin_row(p, iid, since, t)
            else:
                self.row_bin(iid, p)
                p += BIN_ROW
            cnt += 1
        count[0] = cnt
        oldest[0] = old
        return p

    cdef int check(self) except -1:
        cdef Py_ssize_t i, k, found = 0
        cdef bint bit
        assert 0 <= self.size <= self.capacity, "table size past its capacity"
        for i in range(self.size):
            bit = (self.dirty[i >> 6] >> (i & 63)) & 1
            assert bit == (self.chg[i] > self.swept), (
                f"dirty bit of instrument {i} is {bit} but its change stamp is "
                f"{self.chg[i]} against {self.swept} at the last sweep")
            assert self.chg[i] <= self.version, f"instrument {i} stamped in the future"
            for k in range(NFCHG):
                assert self.fchg[i * NFCHG + k] <= self.chg[i], \
                    f"field {k} of instrument {i} stamped after its row"
            if self.rowver[i] == self.chg[i]:
                assert 0 < self.rowlen[i] <= ROW_SLOT, f"cached row {i} overflows its slot"
        for i in range(self.size, (self.capacity // 64) * 64):
            assert not (self.dirty[i >> 6] >> (i & 63)) & 1, f"dirty bit past the table: {i}"
        for i in range(self.nhot):
            assert (self.hot_bits[self.hot[i] >> 6] >> (self.hot[i] & 63)) & 1, \
                "hot list and hot bitmap disagree"
        for i in range(self.hcap):
            if self.hslots[i] >= 0:
                found += 1
        assert found == self.size, f"symbol map holds {found} of {self.size} instruments"
        return 0

    # ---- Python face -------------------------------------------------

    def __len__(self):
        return self.size

    def lookup(self, str sym):
        """Id of a known symbol, or -1."""
        b = sym.encode("utf-8", "replace")
        if len(b) > SYM_MAX:
            return -1
        return self.find(b, len(b))

    def symbol(self, Py_ssize_t iid):
        if not 0 <= iid < self.size:
            raise IndexError(iid)
        return PyBytes_FromStringAndSize(self.syms + iid * SYM_MAX, self.symlen[iid]).decode()

    def symbols(self):
        """Every known symbol, in id order."""
        return [self.symbol(i) for i in range(self.size)]

    def seq_of(self, Py_ssize_t iid):
        return self.seq[iid]

    def row(self, Py_ssize_t iid):
        """The row as a Python list in protocol field order."""
        if not 0 <= iid < self.size:
            raise IndexError(iid)
        return [self.symbol(iid), self.seq[iid], self.ts[iid]] + [
            self.val[k][iid] for k in range(NVALS)
        ]

    def rows_json(self, ids, since=None):
        """Comma-joined JSON rows of `ids` (with `since`, only rows newer than it)."""
        cdef int32_t n
        cdef const char* p
        parts = []
        for iid in ids:
            if since is not None and self.seq[<int32_t>iid] <= since.get(iid, -1):
                continue
            p = self.row_json(iid, &n)
            parts.append(PyBytes_FromStringAndSize(p, n))
        return b",".join(parts)

    def apply_objects(self, list ticks, int source=SRC_INGEST):
        """Apply decoded JSON ticks. Returns (applied, stale, errors).

        `errors` lists (index, symbol or None, message) for every tick refused
        as malformed; the others are applied (or dropped as stale) regardless.
        """
        cdef int64_t now = _clock(CLOCK_REALTIME)
        cdef double v[7]
        cdef uint32_t mask
        cdef int64_t seq, ts
        cdef int32_t iid
        cdef Py_ssize_t idx = 0
        cdef int out
        cdef int applied = 0, stale = 0
        errors = []
        for t in ticks:
            err = _check_tick(t, v, &mask, &seq, &ts)
            if err is None:
                b = (<dict>t)["sym"].encode()
                iid = self.intern(b, len(b))
                if iid < 0:
                    err = "instrument table is full" if symbol_ok(b, len(b)) else "bad symbol"
            if err is not None:
                errors.append((idx, t.get("sym") if type(t) is dict else None, err))
                self.stats.ticks[source][REJECTED] += 1
            else:
                out = self.apply(iid, seq, ts, mask, v, now)
                self.stats.ticks[source][out] += 1
                if out == APPLIED:
                    applied += 1
                elif out == STALE:
                    stale += 1
                else:
                    errors.append((idx, t["sym"], "price or size is NaN or infinite"))
            idx += 1
        return applied, stale, errors

    def apply_batch(self, const unsigned char[::1] data, int source=SRC_BUS):
        """Apply a binary tick batch (see encode_batch). Returns (applied, stale, rejected).

        Raises ValueError if the batch is truncated or not a batch; records
        before the damage are applied.
        """
        cdef Py_ssize_t n = data.shape[0]
        cdef const char* p = b""
        if n:
            p = <const char*>&data[0]
        cdef Py_ssize_t pos = 8, k, end, start
        cdef uint32_t count, done = 0, mask
        cdef uint8_t slen
        cdef int j
        cdef double v[7]
        cdef int64_t seq, ts
        cdef int32_t iid
        cdef int out
        cdef int64_t now = _clock(CLOCK_REALTIME)
        cdef int res[3]
        res[0] = res[1] = res[2] = 0
        if n < 8 or memcmp(p, b"FFT1", 4) != 0:
            raise ValueError("not a fastfeed tick batch (magic FFT1 missing)")
        count = _rd_u32(p + 4)
        while done < count:
            if pos + 1 > n:
                break
            start = pos
            slen = <uint8_t>p[pos]
            k = pos + 1 + slen + 1 + 8
            if k > n:
                break
            mask = <uint8_t>p[pos + 1 + slen]
            end = k + 8 * __builtin_popcount(mask)
            if end > n:
                break
            seq = _rd_i64(p + pos + 2 + slen)
            ts = 0
            if mask & M_TS:
                ts = _rd_i64(p + k)
                k += 8
            for j in range(NVALS):
                if mask & (2 << j):
                    v[j] = _rd_f64(p + k)
                    k += 8
            pos = end
            # refuse before interning, so a bad tick never creates an instrument
            out = REJECTED
            if seq >= 0 and _finite(v, mask):
                iid = self.intern(p + start + 1, slen)
                if iid >= 0:
                    out = self.apply(iid, seq, ts, mask, v, now)
            self.stats.ticks[source][out] += 1
            res[out] += 1
            done += 1
        if done < count:
            raise ValueError(f"tick batch truncated after {done} of {count} ticks")
        return res[0], res[1], res[2]

    def apply_tick(self, str sym, int64_t seq, int64_t ts=0, bid=None, ask=None, last=None,
                   bid_size=None, ask_size=None, last_size=None, volume=None,
                   int source=SRC_SIMULATOR):
        """Apply one tick from Python (simulator, tests). Returns 0 applied, 1 stale, 2 rejected."""
        cdef double v[7]
        cdef uint32_t mask = M_TS if ts else 0
        cdef int32_t iid = -1
        cdef int out = REJECTED
        for k, x in enumerate((bid, ask, last, bid_size, ask_size, last_size, volume)):
            if x is not None:
                v[k] = x
                mask |= 2 << k
        if seq >= 0 and _finite(v, mask):
            b = sym.encode()
            iid = self.intern(b, len(b))
            if iid >= 0:
                out = self.apply(iid, seq, ts, mask, v, _clock(CLOCK_REALTIME))
        self.stats.ticks[source][out] += 1
        return out

    def apply_arrays(self, const int32_t[::1] ids, const int64_t[::1] seqs,
                     const int64_t[::1] tss, const double[:, ::1] vals,
                     int source=SRC_SIMULATOR):
        """Apply full ticks for known ids from arrays (the simulator's bulk path)."""
        cdef Py_ssize_t i
        cdef int64_t now = _clock(CLOCK_REALTIME)
        cdef int out
        cdef int applied = 0
        for i in range(ids.shape[0]):
            out = self.apply(ids[i], seqs[i], tss[i], M_ALL, &vals[i, 0], now)
            self.stats.ticks[source][out] += 1
            applied += out == APPLIED
        return applied

    def intern_symbol(self, str sym):
        """Id of `sym`, creating it if new; -1 if invalid or the table is full."""
        b = sym.encode("utf-8", "replace")
        return self.intern(b, len(b))

    def take_stats(self):
        """Counters since the last call, as a dict (the metrics flusher calls it)."""
        s = self.stats
        memset(&self.stats, 0, sizeof(Stats))
        ticks = {}
        for a in range(NSOURCES):
            for b in range(3):
                if s.ticks[a][b]:
                    ticks[(SOURCES[a], OUTCOMES[b])] = s.ticks[a][b]
        return {
            "ticks": ticks,
            "frames": s.frames,
            "frames_built": s.frames_built,
            "rows_encoded": s.rows_encoded,
            "bytes_sent": s.bytes_sent,
            "conflated": s.conflated,
            "watched_pushes": s.watched_pushes,
            "heartbeats": s.heartbeats,
            "pumps": s.pumps,
            "overruns": s.overruns,
            "build_seconds": s.build_ns / 1e9,
            "refused": s.refused,
            "refused_symbol": PyBytes_FromStringAndSize(self.refused_sym,
                                                        self.refused_len).decode(),
        }
