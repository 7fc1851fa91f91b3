# cython: language_level=3
"""Order books: the second kind of state (contract v1.1 "Order books").

A book message (full or price-keyed changes) is validated and put in its
canonical form once, as a binary record (FFK1, docs/protocol.md "Books on the
bus"): /ingest, the Redis bus and the store all carry that record, so every
worker applies the same bytes with the same rules and holds the same book.

Per instrument a book keeps up to `levels` levels per side and serves the
best `depth`. Each applied change bumps the kind's version; a level's stamp
is the version at which it last changed or came into view, a tombstone
remembers a price that left the view. An update entry for a client whose
previous frame was at version `since` holds the levels stamped after it and
`[price,0,0]` for the tombstones after it, or the whole book with
`"full":true` when the tombstones no longer reach back to `since`, the book
was replaced by a full book since, or the changes would be longer than the
book. Entries are pure functions of (book, since): cached per book by change
stamp and by the class of `since` that gives the same bytes.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memmove, memset

from fastfeed._defs cimport CLOCK_REALTIME, FF_DEBUG, SYM_MAX, Stats, _clock, _grow
from fastfeed._table cimport Kind, Table
from fastfeed._wire cimport _hash, _put_f64, _put_i64, _rd_f64, _rd_i64, _rd_u32, symbol_ok

cdef extern from *:
    """
    static uint32_t ff_crc_table[256];
    static int ff_crc_ready = 0;
    static void ff_crc_init(void) {
        uint32_t c; int n, k;
        for (n = 0; n < 256; n++) {
            c = (uint32_t)n;
            for (k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            ff_crc_table[n] = c;
        }
        ff_crc_ready = 1;
    }
    static inline uint32_t ff_crc_update(uint32_t crc, const unsigned char* p, size_t n) {
        crc = ~crc;
        while (n--) crc = ff_crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        return ~crc;
    }
    """
    void ff_crc_init() noexcept
    uint32_t ff_crc_update(uint32_t crc, const unsigned char* p, size_t n) noexcept

ff_crc_init()

import struct

BOOK_MAGIC = b"FFK1"
DEFAULT_DEPTH = 10
DEFAULT_LEVELS = 50
MAX_DEPTH = 50
MAX_LEVELS = 1000
F_FULL = 1
F_STALE = 2
#: outcomes of a book message, in the order of `Books.take_stats()["books"]`
BOOK_OUTCOMES = ("applied", "stale", "refused", "gap", "crossed", "dropped")

cdef enum:
    B_APPLIED = 0
    B_STALE = 1      # seq not above the held one
    B_REFUSED = 2    # bad input (counted where it is validated)
    B_GAP = 3        # an incremental whose seq is not held + 1: the book goes stale
    B_CROSSED = 4    # an incremental that would cross the book: the book goes stale
    B_DROPPED = 5    # an incremental for a stale book
    LEVEL_REC = 20   # f64 price, f64 volume, u32 orders
    LEVEL_TEXT = 74  # "[" + 24 + "," + 24 + "," + 10 + "]" and a comma, rounded up

cdef const char* STALE_TAIL = b'","book":"stale"}'
cdef const char* OK_TAIL = b'","book":"ok"}'


@cython.final
cdef class Books(Kind):
    """Order books of the instruments of `table` (the quote Table: one id space).

    Python face: `apply_objects` (decoded /ingest messages), `apply_records`
    (FFK1 from the bus or the store), `snapshot_json`, `book`, `checksum`,
    `take_events`, `take_stats`; `_encode_section_py` runs the hub's call.
    """

    def __cinit__(self, Table table not None, int depth=DEFAULT_DEPTH,
                  int levels=DEFAULT_LEVELS):
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"book depth must lie in 1..{MAX_DEPTH}, not {depth}")
        if not depth <= levels <= MAX_LEVELS:
            raise ValueError(f"kept book levels must lie in depth ({depth})..{MAX_LEVELS}, "
                             f"not {levels}")
        self.key = "books"
        self.has_binary = False
        self.table = table
        self.depth = depth
        self.levels = levels
        self.tombs = 2 * depth
        self.size = 0
        self.capacity = 0
        self.nbooks = 0
        self.books_cap = 0
        self.version = 0
        self.nhot = 0
        self.events = []
        memset(self.counts, 0, sizeof(self.counts))
        memset(&self.stats, 0, sizeof(Stats))
        # an entry: the envelope, a 32-char symbol, seq, checksum, and at most
        # 2 * depth levels (a longer change list goes out as the full book)
        self.entry_bound = 176 + 2 * depth * LEVEL_TEXT
        self.scratch = <Level*>malloc(2 * levels * sizeof(Level))
        self.oldvis = <Level*>malloc(2 * depth * sizeof(Level))
        if self.scratch == NULL or self.oldvis == NULL:
            raise MemoryError()
        self._grow_ids(64)

    def __init__(self, Table table not None, int depth=DEFAULT_DEPTH,
                 int levels=DEFAULT_LEVELS):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t b
        for b in range(self.nbooks):
            free(self.books[b].snap)
            free(self.books[b].diff)
        free(self.slot)
        free(self.owner)
        free(self.books)
        free(self.lv)
        free(self.tb)
        free(self.scratch)
        free(self.oldvis)

    # ---- storage ------------------------------------------------------

    def _grow_ids(self, Py_ssize_t need):
        # per item only the Kind arrays and a book index: a book's levels are
        # allocated when it first holds state, so ids of quote-only
        # instruments cost a few bytes
        cdef Py_ssize_t old = self.capacity
        cdef Py_ssize_t cap = max(old, 64)
        while cap < need:
            cap *= 2
        if cap == old:
            return
        self._grow_items(old, cap)
        self.slot = <int32_t*>_grow(self.slot, old * 4, cap * 4, 0xFF)
        self.capacity = cap

    def reserve(self, Py_ssize_t n):
        """Cover item ids 0 .. n-1 (the hub may ask about any instrument id)."""
        if n > self.capacity:
            self._grow_ids(n)
        if n > self.size:
            self.size = n

    cdef int32_t _book(self, int32_t iid) except -1:
        """The book index of `iid`, created (empty, seq 0) if it has none."""
        cdef int32_t b
        cdef Py_ssize_t n
        if iid >= self.capacity:
            self._grow_ids(iid + 1)
        if iid >= self.size:
            self.size = iid + 1
        b = self.slot[iid]
        if b >= 0:
            return b
        if self.nbooks == self.books_cap:
            n = max(16, self.books_cap * 2)
            self.books = <Book*>_grow(self.books, self.books_cap * sizeof(Book),
                                      n * sizeof(Book), 0)
            self.owner = <int32_t*>_grow(self.owner, self.books_cap * 4, n * 4, 0)
            self.lv = <Level*>_grow(self.lv, self.books_cap * 2 * self.levels * sizeof(Level),
                                    n * 2 * self.levels * sizeof(Level), 0)
            self.tb = <Tomb*>_grow(self.tb, self.books_cap * 2 * self.tombs * sizeof(Tomb),
                                   n * 2 * self.tombs * sizeof(Tomb), 0)
            self.books_cap = n
        b = <int32_t>self.nbooks
        self.nbooks += 1
        self.slot[iid] = b
        self.owner[b] = iid
        return b

    cdef Level* _side(self, int32_t b, int32_t side) noexcept:
        return self.lv + (b * 2 + side) * self.levels

    cdef Tomb* _tside(self, int32_t b, int32_t side) noexcept:
        return self.tb + (b * 2 + side) * self.tombs

    # ---- applying -----------------------------------------------------

    cdef void _mark(self, int32_t iid, int64_t now) noexcept:
        self.version += 1
        self.chg[iid] = self.version
        self.arrived[iid] = now
        self.dirty[iid >> 6] |= 1ULL << (iid & 63)
        if self.watched[iid] and not (self.hot_bits[iid >> 6] & (1ULL << (iid & 63))):
            self.hot_bits[iid >> 6] |= 1ULL << (iid & 63)
            self.hot[self.nhot] = iid
            self.nhot += 1

    cdef int _set_stale(self, int32_t b, int32_t iid, bint stale) except -1:
        """Mark the book stale or healed: its snapshot text changes (a stale
        book's carries "stale":true) and its subscribers are told."""
        self.books[b].stale = stale
        self.books[b].snap_ver = <uint64_t>-1
        self._event(iid, stale)
        return 0

    def _event(self, int32_t iid, bint stale):
        sym = PyBytes_FromStringAndSize(self.table.syms + iid * SYM_MAX, self.table.symlen[iid])
        self.events.append((iid, b'{"type":"status","sym":"' + sym
                            + (STALE_TAIL if stale else OK_TAIL)))

    cdef int apply_book(self, int32_t iid, int64_t seq, bint full, int32_t nb, int32_t na,
                        const double* px, const double* vol, const uint32_t* orders,
                        int64_t now) except -1:
        """Apply one canonical book message (see `_canon`); returns its outcome.

        `px`, `vol`, `orders` hold the bids then the asks. A full book is
        sorted, without zero volumes and at most `levels` a side; changes are
        applied in their order.
        """
        cdef int32_t b = self._book(iid)
        cdef Book* B = &self.books[b]
        cdef Level* s
        cdef Level* lv
        cdef int32_t side, k, j, n, cnt, first
        cdef int32_t nnew[2]
        cdef double p
        cdef bint present
        if seq <= B.seq:
            return B_STALE
        if full:
            for side in range(2):
                first = 0 if side == 0 else nb
                cnt = nb if side == 0 else na
                s = self._side(b, side)
                for k in range(cnt):
                    s[k].price = px[first + k]
                    s[k].vol = vol[first + k]
                    s[k].orders = orders[first + k]
                    s[k].stamp = self.version + 1
                B.n[side] = cnt
                B.nt[side] = 0
            B.seq = seq
            B.floor = self.version + 1
            if B.stale:
                self._set_stale(b, iid, False)
            self._mark(iid, now)
            return B_APPLIED
        if B.stale:
            return B_DROPPED
        if seq != B.seq + 1:
            self._set_stale(b, iid, True)
            return B_GAP
        # the result goes to scratch first: a crossed one is not kept
        for side in range(2):
            lv = self._side(b, side)
            s = self.scratch + side * self.levels
            n = B.n[side]
            memcpy(s, lv, n * sizeof(Level))
            first = 0 if side == 0 else nb
            cnt = nb if side == 0 else na
            for j in range(first, first + cnt):
                p = px[j]
                # position: the first kept level at or behind p (bids high to low)
                k = 0
                if side == 0:
                    while k < n and s[k].price > p:
                        k += 1
                else:
                    while k < n and s[k].price < p:
                        k += 1
                present = k < n and s[k].price == p
                if vol[j] == 0.0:
                    if present:
                        memmove(s + k, s + k + 1, (n - k - 1) * sizeof(Level))
                        n -= 1
                elif present:
                    s[k].vol = vol[j]
                    s[k].orders = orders[j]
                elif k < self.levels:
                    if n == self.levels:
                        n -= 1  # the worst kept level makes room
                    memmove(s + k + 1, s + k, (n - k) * sizeof(Level))
                    s[k].price = p
                    s[k].vol = vol[j]
                    s[k].orders = orders[j]
                    s[k].stamp = 0
                    n += 1
            nnew[side] = n
        if nnew[0] and nnew[1] and self.scratch[0].price >= self.scratch[self.levels].price:
            self._set_stale(b, iid, True)
            return B_CROSSED
        self._commit(b, iid, seq, nnew, now)
        return B_APPLIED

    cdef int replace(self, int32_t iid, int64_t seq, int32_t nb, int32_t na,
                     const Level* bids, const Level* asks, int64_t now) except -1:
        """Set the book to a whole view: a delayed copy's step (docs/delay.md).
        Unlike a full book it goes out as the levels that changed, as an
        incremental would; `bids` and `asks` are sorted, best first, uncrossed,
        at most `levels` each. APPLIED, or STALE for a seq not above the held one."""
        cdef int32_t b = self._book(iid)
        cdef Book* B = &self.books[b]
        cdef int32_t nnew[2]
        cdef int32_t k
        if seq <= B.seq:
            return B_STALE
        if B.seq <= 0:  # its first state: a client that had none gets the whole book
            B.floor = self.version + 1
        nnew[0] = min(nb, self.levels)
        nnew[1] = min(na, self.levels)
        memcpy(self.scratch, bids, nnew[0] * sizeof(Level))
        memcpy(self.scratch + self.levels, asks, nnew[1] * sizeof(Level))
        for k in range(nnew[0]):
            self.scratch[k].stamp = 0
        for k in range(nnew[1]):
            self.scratch[self.levels + k].stamp = 0
        self._commit(b, iid, seq, nnew, now)
        return B_APPLIED

    cdef void _commit(self, int32_t b, int32_t iid, int64_t seq, const int32_t* nnew,
                      int64_t now) noexcept:
        """Make the levels in `scratch` the book's, stamping what changed."""
        cdef Book* B = &self.books[b]
        cdef Level* lv
        cdef int32_t side
        cdef int32_t nvis[2]
        for side in range(2):
            lv = self._side(b, side)
            # the old view, for _stamp to compare with
            nvis[side] = min(B.n[side], self.depth)
            memcpy(self.oldvis + side * self.depth, lv, nvis[side] * sizeof(Level))
            memcpy(lv, self.scratch + side * self.levels, nnew[side] * sizeof(Level))
            B.n[side] = nnew[side]
        B.seq = seq
        for side in range(2):
            self._stamp(b, side, nvis[side])
        self._mark(iid, now)

    cdef void _stamp(self, int32_t b, int32_t side, int32_t nold) noexcept:
        """After a change: stamp the levels that changed or came into view and
        take their prices off the tombstones; then tombstone the prices that
        left the view, in the old view's order (the stamp is the next version)."""
        cdef Book* B = &self.books[b]
        cdef Level* new = self._side(b, side)
        cdef Level* old = self.oldvis + side * self.depth
        cdef int32_t nnew = min(B.n[side], self.depth)
        cdef int32_t i, j
        cdef uint64_t v = self.version + 1
        for j in range(nnew):
            i = 0
            while i < nold and old[i].price != new[j].price:
                i += 1
            if i == nold:
                new[j].stamp = v
                self._untomb(b, side, new[j].price)
            elif old[i].vol != new[j].vol or old[i].orders != new[j].orders:
                new[j].stamp = v
            else:
                # unchanged across the message, even if it was removed and set
                # again inside it (the re-set level came in with stamp 0)
                new[j].stamp = old[i].stamp
        for i in range(nold):
            j = 0
            while j < nnew and new[j].price != old[i].price:
                j += 1
            if j == nnew:
                self._tomb(b, side, old[i].price, v)

    cdef void _tomb(self, int32_t b, int32_t side, double price, uint64_t stamp) noexcept:
        cdef Book* B = &self.books[b]
        cdef Tomb* t = self._tside(b, side)
        self._untomb(b, side, price)
        if B.nt[side] == self.tombs:
            # the oldest is forgotten: whoever had not seen it gets the full book
            if t[0].stamp > B.floor:
                B.floor = t[0].stamp
            memmove(t, t + 1, (self.tombs - 1) * sizeof(Tomb))
            B.nt[side] -= 1
        t[B.nt[side]].price = price
        t[B.nt[side]].stamp = stamp
        B.nt[side] += 1

    cdef void _untomb(self, int32_t b, int32_t side, double price) noexcept:
        cdef Book* B = &self.books[b]
        cdef Tomb* t = self._tside(b, side)
        cdef int32_t k
        for k in range(B.nt[side]):
            if t[k].price == price:
                memmove(t + k, t + k + 1, (B.nt[side] - k - 1) * sizeof(Tomb))
                B.nt[side] -= 1
                return

    # ---- encoding -----------------------------------------------------

    cdef uint32_t _crc(self, int32_t b) noexcept:
        """The contract's checksum: CRC-32 of the best `depth` asks, then
        bids, best first, price and volume as little-endian float64."""
        cdef Book* B = &self.books[b]
        cdef uint64_t ver = self.chg[self.owner[b]]
        cdef uint32_t crc = 0
        cdef int32_t side, k
        cdef Level* s
        cdef unsigned char buf[16]
        if B.crc_ver == ver and ver:
            return B.crc
        for side in range(1, -1, -1):  # asks, then bids; a C loop, no tuple
            s = self._side(b, side)
            for k in range(min(B.n[side], self.depth)):
                # x86 and ARM are little-endian: the doubles' bytes as they lie
                memcpy(buf, &s[k].price, 8)
                memcpy(buf + 8, &s[k].vol, 8)
                crc = ff_crc_update(crc, buf, 16)
        B.crc = crc
        B.crc_ver = ver
        return crc

    cdef char* _levels(self, char* p, int32_t b, int32_t side) except NULL:
        cdef Level* s = self._side(b, side)
        cdef int32_t k
        for k in range(min(self.books[b].n[side], self.depth)):
            if k:
                p[0] = b","
                p += 1
            p = _level(p, s[k].price, s[k].vol, s[k].orders)
        return p

    cdef const char* _snap(self, int32_t iid, int32_t* n) except NULL:
        """The book's snapshot entry, encoded at most once per change."""
        cdef int32_t b = self.slot[iid]
        cdef Book* B = &self.books[b]
        cdef char* p
        if B.snap == NULL:
            B.snap = <char*>malloc(self.entry_bound)
            if B.snap == NULL:
                raise MemoryError()
            B.snap_ver = <uint64_t>-1
        if B.snap_ver != self.chg[iid]:
            p = self._head(B.snap, iid, B.seq)
            memcpy(p, b',"bids":[', 9)
            p = self._levels(p + 9, b, 0)
            memcpy(p, b'],"asks":[', 10)
            p = self._levels(p + 10, b, 1)
            p = self._tail(p, b)
            if B.stale:
                memcpy(p - 1, b',"stale":true}', 14)
                p += 13
            if FF_DEBUG and p - B.snap > self.entry_bound:
                raise AssertionError("book snapshot entry overran its bound")
            B.snap_len = <int32_t>(p - B.snap)
            B.snap_ver = self.chg[iid]
            self.stats.rows_encoded += 1
        n[0] = B.snap_len
        return B.snap

    cdef char* _head(self, char* p, int32_t iid, int64_t seq) noexcept:
        memcpy(p, b'{"sym":"', 8)
        memcpy(p + 8, self.table.syms + iid * SYM_MAX, self.table.symlen[iid])
        p += 8 + self.table.symlen[iid]
        memcpy(p, b'","seq":', 8)
        return _put_i64(p + 8, seq)

    cdef char* _tail(self, char* p, int32_t b) noexcept:
        memcpy(p, b'],"checksum":', 13)
        p = _put_i64(p + 13, self._crc(b))
        p[0] = b"}"
        return p + 1

    cdef char* _entry(self, char* p, int32_t iid, uint64_t since) except NULL:
        """Write the update entry of `iid` for a client at `since` (chg > since)."""
        cdef int32_t b = self.slot[iid]
        cdef Book* B = &self.books[b]
        cdef const char* src
        cdef int32_t n, side, k, m = 0
        cdef uint64_t cs = B.floor
        cdef Level* s
        cdef Tomb* t
        cdef char* q
        cdef bint full = since < B.floor
        if not full:
            # the class of `since`: the newest stamp at or below it; every
            # `since` of one class gets the same changes, so the same bytes
            for side in range(2):
                s = self._side(b, side)
                for k in range(min(B.n[side], self.depth)):
                    if s[k].stamp > since:
                        m += 1
                    elif s[k].stamp > cs:
                        cs = s[k].stamp
                t = self._tside(b, side)
                for k in range(B.nt[side]):
                    if t[k].stamp > since:
                        m += 1
                    elif t[k].stamp > cs:
                        cs = t[k].stamp
            full = m > 2 * self.depth
        if full:
            src = self._snap(iid, &n)
            memcpy(p, src, n - 1)
            memcpy(p + n - 1, b',"full":true}', 13)
            return p + n + 12
        if B.diff == NULL:
            B.diff = <char*>malloc(self.entry_bound)
            if B.diff == NULL:
                raise MemoryError()
            B.diff_ver = <uint64_t>-1
        if B.diff_ver != self.chg[iid] or B.diff_cs != cs:
            q = self._head(B.diff, iid, B.seq)
            for side in range(2):
                memcpy(q, b',"bids":[' if side == 0 else b'],"asks":[', 9 + side)
                q += 9 + side
                m = 0
                s = self._side(b, side)
                for k in range(min(B.n[side], self.depth)):
                    if s[k].stamp > since:
                        if m:
                            q[0] = b","
                            q += 1
                        q = _level(q, s[k].price, s[k].vol, s[k].orders)
                        m += 1
                t = self._tside(b, side)
                for k in range(B.nt[side]):
                    if t[k].stamp > since:
                        if m:
                            q[0] = b","
                            q += 1
                        q[0] = b"["
                        q = _put_f64(q + 1, t[k].price)
                        memcpy(q, b",0,0]", 5)
                        q += 5
                        m += 1
            q = self._tail(q, b)
            if FF_DEBUG and q - B.diff > self.entry_bound:
                raise AssertionError("book update entry overran its bound")
            B.diff_len = <int32_t>(q - B.diff)
            B.diff_ver = self.chg[iid]
            B.diff_cs = cs
            self.stats.rows_encoded += 1
        memcpy(p, B.diff, B.diff_len)
        return p + B.diff_len

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept:
        # every entry at its longest, and the commas between them
        return <Py_ssize_t>n * (self.entry_bound + 13 + 1)

    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL:
        cdef char* start = p
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
            if cnt:
                p[0] = b","
                p += 1
            p = self._entry(p, iid, since)
            cnt += 1
        if FF_DEBUG and p - start > self.section_bound(n):
            raise AssertionError("books section overran its bound")
        count[0] = cnt
        oldest[0] = old
        return p

    cdef int check(self) except -1:
        cdef Py_ssize_t i, b
        cdef int32_t side, k
        cdef Level* s
        cdef Book* B
        cdef bint bit
        assert 0 <= self.size <= self.capacity, "books size past their capacity"
        for i in range(self.size):
            bit = (self.dirty[i >> 6] >> (i & 63)) & 1
            assert bit == (self.chg[i] > self.swept), (
                f"dirty bit of book {i} is {bit} but its change stamp is "
                f"{self.chg[i]} against {self.swept} at the last sweep")
            assert self.chg[i] <= self.version, f"book {i} stamped in the future"
            assert self.chg[i] == 0 or self.slot[i] >= 0, f"book {i} changed but holds nothing"
        for i in range(self.size, (self.capacity // 64) * 64):
            assert not (self.dirty[i >> 6] >> (i & 63)) & 1, f"dirty bit past the books: {i}"
        for b in range(self.nbooks):
            B = &self.books[b]
            assert self.slot[self.owner[b]] == b, f"book {b} and its instrument disagree"
            for side in range(2):
                s = self._side(b, side)
                assert 0 <= B.n[side] <= self.levels, f"book {b} holds {B.n[side]} levels"
                assert 0 <= B.nt[side] <= self.tombs, f"book {b} holds {B.nt[side]} tombstones"
                for k in range(1, B.n[side]):
                    assert (s[k - 1].price > s[k].price if side == 0
                            else s[k - 1].price < s[k].price), f"book {b} side {side} unsorted"
                for k in range(B.n[side]):
                    assert s[k].vol > 0, f"book {b} keeps a level without volume"
            if B.n[0] and B.n[1]:
                assert self._side(b, 0)[0].price < self._side(b, 1)[0].price, (
                    f"book {b} is crossed")
        return 0

    # ---- Python face --------------------------------------------------

    def __len__(self):
        return self.nbooks

    def apply_records(self, const unsigned char[::1] data, bint snapshot=False):
        """Apply an FFK1 batch (the bus, the store). Returns the count of
        each outcome, in `BOOK_OUTCOMES` order.

        With `snapshot` (records read from the store): a record replaces the
        book if its seq is above the held one, and its stale flag is taken
        over (a book held at the same seq learns that it went stale).
        Raises ValueError for a batch that is not one or is truncated; the
        records before the damage are applied.
        """
        cdef Py_ssize_t n = data.shape[0], pos = 8, end
        cdef const char* p = b""
        cdef uint32_t count, done = 0
        cdef uint8_t slen
        cdef int32_t iid, nb, na
        cdef int64_t seq
        cdef int out
        cdef int64_t now = _clock(CLOCK_REALTIME)
        res = [0] * 6
        if n:
            p = <const char*>&data[0]
        if n < 8 or memcmp(p, b"FFK1", 4) != 0:
            raise ValueError("not a fastfeed book batch (magic FFK1 missing)")
        count = _rd_u32(p + 4)
        while done < count:
            if pos + 1 > n:
                break
            slen = <uint8_t>p[pos]
            if pos + 14 + slen > n:
                break
            seq = _rd_i64(p + pos + 2 + slen)
            nb = (<uint8_t>p[pos + 10 + slen]) | (<uint8_t>p[pos + 11 + slen]) << 8
            na = (<uint8_t>p[pos + 12 + slen]) | (<uint8_t>p[pos + 13 + slen]) << 8
            end = pos + 14 + slen + <Py_ssize_t>(nb + na) * LEVEL_REC
            if end > n:
                break
            out = B_REFUSED
            if symbol_ok(p + pos + 1, slen) and seq >= 0:
                iid = self.table.intern(p + pos + 1, slen)
                if iid >= 0:
                    out = _apply_record(self, iid, p + pos, snapshot, now)
            self.counts[out] += 1
            res[out] += 1
            pos = end
            done += 1
        if done < count:
            raise ValueError(f"book batch truncated after {done} of {count} books")
        return tuple(res)

    def apply_objects(self, list msgs, index=None):
        """Apply decoded book messages (/ingest in embedded mode). Returns
        (applied, stale, errors): `errors` lists (index, symbol or None, why)
        of the refused ones; `index` gives each message's position in the
        publisher's message (default: its position in `msgs`)."""
        cdef int64_t now = _clock(CLOCK_REALTIME)
        cdef int out
        cdef int32_t iid
        cdef int applied = 0, stale = 0
        cdef bytes rec
        cdef const char* r
        cdef uint8_t slen
        errors = []
        for k, m in enumerate(msgs):
            err, sym, rec = _canon(m, self.levels)
            idx = index[k] if index is not None else k
            if err is not None:
                errors.append((idx, sym, err))
                self.counts[B_REFUSED] += 1
                continue
            r = PyBytes_AS_STRING(rec)
            slen = <uint8_t>r[0]
            iid = self.table.intern(r + 1, slen)
            if iid < 0:
                errors.append((idx, sym, "instrument table is full"))
                self.counts[B_REFUSED] += 1
                continue
            out = _apply_record(self, iid, r, False, now)
            self.counts[out] += 1
            applied += out == B_APPLIED
            stale += out == B_STALE
        return applied, stale, errors

    def snapshot_json(self, ids):
        """Comma-joined snapshot entries of `ids`; a book that holds nothing
        yet (seq 0, not stale) is left out: its first book comes as an update."""
        cdef int32_t n, i
        cdef const char* p
        parts = []
        for iid in ids:
            if iid < 0 or iid >= self.size or self.slot[<int32_t>iid] < 0:
                continue
            i = iid
            if self.books[self.slot[i]].seq == 0 and not self.books[self.slot[i]].stale:
                continue
            p = self._snap(i, &n)
            parts.append(PyBytes_FromStringAndSize(p, n))
        return b",".join(parts)

    def item(self, Py_ssize_t iid):
        """The item id of instrument `iid` (itself), with room made for it:
        the hub may watch and subscribe any instrument's book."""
        if iid >= self.size:
            self.reserve(iid + 1)
        return iid

    def _encode_section_py(self, ids, uint64_t since):
        """What `encode_section` writes for `ids` at `since` (tests): (count, bytes)."""
        import numpy as np
        arr = np.ascontiguousarray(np.asarray(list(ids), dtype=np.int32))
        cdef const int32_t[::1] mv = arr
        cdef Py_ssize_t bound = self.section_bound(<int32_t>len(arr)) + 1
        cdef char* buf = <char*>malloc(bound)
        cdef uint32_t count = 0
        cdef int64_t oldest = 0
        cdef char* end
        if buf == NULL:
            raise MemoryError()
        try:
            end = self.encode_section(buf, &mv[0] if len(arr) else NULL, <int32_t>len(arr),
                                      since, &count, &oldest)
            return count, PyBytes_FromStringAndSize(buf, end - buf) if count else b""
        finally:
            free(buf)

    def book(self, Py_ssize_t iid):
        """(seq, bids, asks, stale) of the served view, levels as [price, volume, orders]."""
        if iid < 0 or iid >= self.size or self.slot[iid] < 0:
            return 0, [], [], False
        cdef int32_t b = self.slot[iid]
        cdef int32_t side
        cdef Level* s
        out = []
        for side in range(2):
            s = self._side(b, side)
            out.append([[s[k].price, s[k].vol, s[k].orders]
                        for k in range(min(self.books[b].n[side], self.depth))])
        return self.books[b].seq, out[0], out[1], bool(self.books[b].stale)

    def kept(self, Py_ssize_t iid):
        """(bids, asks) of every kept level (beyond the served depth too)."""
        if iid < 0 or iid >= self.size or self.slot[iid] < 0:
            return [], []
        cdef int32_t b = self.slot[iid]
        cdef int32_t side
        cdef Level* s
        out = []
        for side in range(2):
            s = self._side(b, side)
            out.append([[s[k].price, s[k].vol, s[k].orders] for k in range(self.books[b].n[side])])
        return out[0], out[1]

    def seq_of(self, Py_ssize_t iid):
        if iid < 0 or iid >= self.size or self.slot[iid] < 0:
            return 0
        return self.books[self.slot[iid]].seq

    def is_stale(self, Py_ssize_t iid):
        if iid < 0 or iid >= self.size or self.slot[iid] < 0:
            return False
        return bool(self.books[self.slot[iid]].stale)

    def checksum(self, Py_ssize_t iid):
        if iid < 0 or iid >= self.size or self.slot[iid] < 0:
            return 0
        return self._crc(self.slot[iid])

    def ids(self):
        """Instrument ids that hold a book, in the order they got one."""
        return [self.owner[b] for b in range(self.nbooks)]

    def state_records(self, ids=None):
        """The books as one FFK1 batch of full records (with the stale
        flag): what the store holds, for writing it back after Redis lost it."""
        cdef int32_t b, iid
        parts = []
        for iid in (self.ids() if ids is None else ids):
            if iid < 0 or iid >= self.size or self.slot[iid] < 0:
                continue
            b = self.slot[iid]
            if self.books[b].seq == 0:
                continue
            bids, asks = self.kept(iid)
            sym = PyBytes_FromStringAndSize(self.table.syms + iid * SYM_MAX,
                                            self.table.symlen[iid])
            parts.append(_pack(sym, F_FULL | (F_STALE if self.books[b].stale else 0),
                               self.books[b].seq, bids, asks))
        return BOOK_MAGIC + len(parts).to_bytes(4, "little") + b"".join(parts)

    def take_events(self):
        """Status messages to send since the last call: [(iid, bytes)]."""
        ev = self.events
        self.events = []
        return ev

    def take_stats(self):
        """Counters since the last call: book messages by outcome, entries encoded."""
        out = {"books": {BOOK_OUTCOMES[k]: self.counts[k] for k in range(6) if self.counts[k]},
               "entries_encoded": self.stats.rows_encoded}
        memset(self.counts, 0, sizeof(self.counts))
        self.stats.rows_encoded = 0
        return out

    def _check_invariants(self):
        self.check()


cdef inline char* _level(char* p, double price, double vol, uint32_t orders) except NULL:
    p[0] = b"["
    p = _put_f64(p + 1, price)
    p[0] = b","
    p = _put_f64(p + 1, vol)
    p[0] = b","
    p = _put_i64(p + 1, orders)
    p[0] = b"]"
    return p + 1


cdef int _apply_record(Books bk, int32_t iid, const char* r, bint snapshot,
                       int64_t now) except -1:
    """Apply one FFK1 record at `r` to the book of `iid`."""
    cdef uint8_t slen = <uint8_t>r[0]
    cdef uint8_t flags = <uint8_t>r[1 + slen]
    cdef int64_t seq = _rd_i64(r + 2 + slen)
    cdef int32_t nb = (<uint8_t>r[10 + slen]) | (<uint8_t>r[11 + slen]) << 8
    cdef int32_t na = (<uint8_t>r[12 + slen]) | (<uint8_t>r[13 + slen]) << 8
    cdef const char* lp = r + 14 + slen
    cdef int32_t k, n = nb + na, b
    cdef double* px = <double*>malloc((n + 1) * 8)
    cdef double* vol = <double*>malloc((n + 1) * 8)
    cdef uint32_t* orders = <uint32_t*>malloc((n + 1) * 4)
    cdef uint8_t was
    if px == NULL or vol == NULL or orders == NULL:
        free(px)
        free(vol)
        free(orders)
        raise MemoryError()
    try:
        for k in range(n):
            px[k] = _rd_f64(lp + k * LEVEL_REC)
            vol[k] = _rd_f64(lp + k * LEVEL_REC + 8)
            orders[k] = _rd_u32(lp + k * LEVEL_REC + 16)
            # the record came from elsewhere (the bus): hold it to the rules again
            if not (isfinite(px[k]) and isfinite(vol[k]) and vol[k] >= 0):
                return B_REFUSED
        if flags & F_FULL:
            if nb > bk.levels or na > bk.levels or not _canonical(px, vol, nb, na):
                return B_REFUSED
        if snapshot and flags & F_STALE:
            # the store's book went stale: take it (if newer) and stay stale
            b = bk._book(iid)
            if seq < bk.books[b].seq:
                return B_STALE
            was = bk.books[b].stale
            if seq > bk.books[b].seq:
                bk.books[b].stale = 0  # replaced without an "ok": it stays stale
                bk.apply_book(iid, seq, True, nb, na, px, vol, orders, now)
            if was:
                bk.books[b].stale = 1
                bk.books[b].snap_ver = <uint64_t>-1
            else:
                bk._set_stale(b, iid, True)
            return B_APPLIED
        return bk.apply_book(iid, seq, flags & F_FULL, nb, na, px, vol, orders, now)
    finally:
        free(px)
        free(vol)
        free(orders)


cdef bint _canonical(const double* px, const double* vol, int32_t nb, int32_t na) noexcept:
    """A full book's sides are sorted best first, without zero volume, and not crossed."""
    cdef int32_t k
    for k in range(nb + na):
        if vol[k] <= 0:
            return False
    for k in range(1, nb):
        if not px[k - 1] > px[k]:
            return False
    for k in range(nb + 1, nb + na):
        if not px[k - 1] < px[k]:
            return False
    return not (nb and na and px[0] >= px[nb])


# ---- validation and the canonical record --------------------------------

_LEVEL = struct.Struct("<ddI")
_REC_HEAD = struct.Struct("<BqHH")


def _pack(bytes sym, int flags, seq, bids, asks):
    """One FFK1 record: u8 symbol length, symbol, u8 flags, i64 seq, u16
    bids, u16 asks, then each level as f64 price, f64 volume, u32 orders."""
    pack = _LEVEL.pack
    parts = [bytes((len(sym),)), sym, _REC_HEAD.pack(flags, seq, len(bids), len(asks))]
    for lv in bids:
        parts.append(pack(lv[0], lv[1], lv[2]))
    for lv in asks:
        parts.append(pack(lv[0], lv[1], lv[2]))
    return b"".join(parts)


cdef object _side_levels(object v, str name):
    """Validated levels of one side: (error or None, [(price, volume, orders)])."""
    if v is None:
        return None, []
    if type(v) is not list:
        return f"{name} is not a list of levels", None
    out = []
    for k, lv in enumerate(v):
        if (type(lv) is not list and type(lv) is not tuple) or not 2 <= len(lv) <= 3:
            return f"bad level {name}[{k}]: want [price, volume, orders]", None
        p, q = lv[0], lv[1]
        o = lv[2] if len(lv) == 3 else 0
        if (type(p) is not float and type(p) is not int) or (
                type(q) is not float and type(q) is not int):
            return f"bad level {name}[{k}]: price and volume must be numbers", None
        if type(o) is not int or not 0 <= o <= 0xFFFFFFFF:
            return f"bad level {name}[{k}]: orders must be an integer in 0..4294967295", None
        p = float(p) + 0.0  # -0.0 is 0.0: one price, one byte pattern
        q = float(q) + 0.0
        if not (isfinite(p) and isfinite(q)):
            return f"price or volume is NaN or infinite at {name}[{k}]", None
        if q < 0:
            return f"negative volume at {name}[{k}]", None
        out.append((p, q, o))
    return None, out


def _canon(object m, int levels):
    """Validate one decoded book message: (error, symbol, canonical FFK1 record).

    A full book's sides are sorted best first, zero volumes left out, one
    level per price and at most `levels` a side (the best); changes keep
    their order. Refused: not an object, bad symbol or seq, `full` not a
    boolean, a bad level, NaN or infinity, a negative volume, a repeated
    price in a full book, a crossed full book.
    """
    if type(m) is not dict:
        return "book is not an object", None, None
    d = <dict>m
    sym = d.get("sym")
    if type(sym) is not str:
        return "sym missing or not a string", None, None
    bsym = (<str>sym).encode("utf-8", "replace")
    if not symbol_ok(bsym, len(bsym)):
        return "bad symbol", sym, None
    seq = d.get("seq")
    if type(seq) is not int:
        return "seq missing or not an integer", sym, None
    if not 0 <= seq < 9223372036854775807:
        return "seq out of range", sym, None
    full = d.get("full", False)
    if type(full) is not bool:
        return "full must be true or false", sym, None
    err, bids = _side_levels(d.get("bids"), "bids")
    if err is not None:
        return err, sym, None
    err, asks = _side_levels(d.get("asks"), "asks")
    if err is not None:
        return err, sym, None
    if len(bids) > 65535 or len(asks) > 65535:
        return "more than 65535 levels on a side", sym, None
    if full:
        bids = sorted([x for x in bids if x[1] > 0], key=lambda x: -x[0])
        asks = sorted([x for x in asks if x[1] > 0], key=lambda x: x[0])
        for name, side in (("bids", bids), ("asks", asks)):
            for k in range(1, len(side)):
                if side[k][0] == side[k - 1][0]:
                    return f"price {side[k][0]!r} twice in {name} of a full book", sym, None
        if bids and asks and bids[0][0] >= asks[0][0]:
            return (f"crossed full book: best bid {bids[0][0]!r} >= best ask "
                    f"{asks[0][0]!r}"), sym, None
        bids = bids[:levels]
        asks = asks[:levels]
    return None, sym, _pack(bsym, F_FULL if full else 0, seq, bids, asks)


def encode_books(msgs, int parts=1, int levels=DEFAULT_LEVELS, index=None):
    """Validate book messages into FFK1 batches, one per bus partition (b""
    for none). Returns (batches, errors as (index, symbol, why))."""
    recs = [[] for _ in range(parts)]
    errors = []
    for k, m in enumerate(msgs):
        err, sym, rec = _canon(m, levels)
        if err is not None:
            errors.append((index[k] if index is not None else k, sym, err))
            continue
        b = (<bytes>rec)[1:1 + (<bytes>rec)[0]]
        recs[_hash(b, len(b)) % <uint64_t>parts].append(rec)
    out = [BOOK_MAGIC + len(r).to_bytes(4, "little") + b"".join(r) if r else b"" for r in recs]
    return out, errors


def decode_books(data):
    """An FFK1 batch as book messages (dicts in the /ingest shape; tools, tests)."""
    mv = bytes(data)
    if len(mv) < 8 or mv[:4] != BOOK_MAGIC:
        raise ValueError("not a fastfeed book batch (magic FFK1 missing)")
    count = int.from_bytes(mv[4:8], "little")
    pos = 8
    out = []
    lvl = _LEVEL
    for _ in range(count):
        slen = mv[pos]
        sym = mv[pos + 1:pos + 1 + slen].decode()
        flags = mv[pos + 1 + slen]
        seq = int.from_bytes(mv[pos + 2 + slen:pos + 10 + slen], "little", signed=True)
        nb = int.from_bytes(mv[pos + 10 + slen:pos + 12 + slen], "little")
        na = int.from_bytes(mv[pos + 12 + slen:pos + 14 + slen], "little")
        pos += 14 + slen
        if pos + (nb + na) * LEVEL_REC > len(mv):
            raise ValueError("book batch truncated")
        levels = [list(lvl.unpack_from(mv, pos + k * LEVEL_REC)) for k in range(nb + na)]
        pos += (nb + na) * LEVEL_REC
        msg = {"type": "book", "sym": sym, "seq": seq, "full": bool(flags & F_FULL),
               "bids": levels[:nb], "asks": levels[nb:]}
        if flags & F_STALE:
            msg["stale"] = True
        out.append(msg)
    return out


def has_type(list msgs):
    """True if any message is an object with a "type" key (a book, a trade):
    the sinks take those apart from quote ticks; a C loop, so that quote
    ticks pay nearly nothing for the look."""
    cdef object m
    for m in msgs:
        if type(m) is dict and "type" in <dict>m:
            return True
    return False
