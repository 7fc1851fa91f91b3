# cython: language_level=3
"""The delay line: quotes, books, trades and bars as of `delay` seconds ago (docs/delay.md).

`record` closes a time slot: every instrument the real table or books changed
since the last slot is copied once (its latest state: the slot conflates),
read from the kinds' change stamps, and every trade applied since is copied
whole (the trades kind journals them while a line is attached), so whatever
applied the tick (the local sink, the bus's subscriber, a replay) is seen.
`advance` applies, to each delayed copy (a plain `Table`, `Books`, `Trades`
with its `Bars`, which the hub serves like the real ones), the slots whose
every entry is old enough: a slot goes out when `now - delay` has passed both
its start and the newest `ts` in it (a book's is its arrival: books carry no
source time), so nothing newer than `now - delay` reaches a delayed copy. A
row whose `ts` lies ahead of the time it was recorded waits outside the line
(the pending set) until its `ts` has come, then joins the slot then open.

Memory is entries (80 bytes: one instrument's quote in one slot; a book's
head and its served levels; 40 bytes a trade), slot headers and a few bytes
per instrument; over the budget the slots are merged two by two (the slot
length doubles: quotes and books keep their later state, trades are kept
whole), never dropped, down to slots of half the maximum delay (`coarsest`).
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, qsort
from libc.string cimport memcpy, memmove

from fastfeed._bars cimport Bars
from fastfeed._books cimport Book, Books, Level
from fastfeed._defs cimport CLOCK_REALTIME, M_ALL, NVALS, SYM_MAX, _clock, _grow
from fastfeed._table cimport Table
from fastfeed._trades cimport TradeRec, Trades


cdef struct Entry:          # one instrument's quote in one slot: 80 bytes
    int64_t seq
    int64_t ts
    double val[7]
    int32_t iid
    int32_t pad


cdef struct BookHead:       # one instrument's book in one slot; its levels follow
    int64_t seq
    int64_t ts              # its arrival (wall ns): books carry no source time
    int32_t iid
    int32_t nb              # bids, then asks, best first (at most the served depth)
    int32_t na
    int32_t pad


cdef struct Buf:            # one kind's records, oldest first: live p[lo .. n)
    char* p
    int64_t rec             # bytes per record
    int64_t lo, n, cap
    int64_t open            # the records of the slot being recorded: p[open .. n)


cdef enum:
    QUOTES = 0
    BOOKS = 1
    TRADES = 2
    NBUF = 3


cdef struct Slot:           # a time slot: its records of buffer k are off[k] .. off[k] + n[k]
    int64_t start           # wall ns: everything in it arrived after this
    int64_t maxts           # newest ts among its records
    int64_t off[3]
    int64_t n[3]


cdef enum:
    ENTRY_BYTES = 80
    SLOT_BYTES = 64
    TRADE_BYTES = 40
    PER_INSTRUMENT = 21     # mgen, mpos (8 each), pend (4), pbits (1 bit, rounded up)


cdef int _by_ts(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const Entry*>a).ts, y = (<const Entry*>b).ts
    return (x > y) - (x < y)


cdef inline int32_t _iid(const Buf* B, int k, int64_t j) noexcept:
    if k == QUOTES:
        return (<Entry*>(B.p + j * B.rec)).iid
    return (<BookHead*>(B.p + j * B.rec)).iid


@cython.final
cdef class DelayedView:
    """One delayed copy: everything as of `delay_ns` ago."""

    cdef readonly Table table
    cdef readonly Books books       # None when the line keeps no books
    cdef readonly Trades trades     # None when the line keeps no trades; its bars: `bars`
    cdef readonly Bars bars
    cdef readonly int64_t delay_ns
    cdef int64_t cursor     # absolute number of the next slot to apply

    def __cinit__(self, Table table, Books books, Trades trades, int64_t delay_ns,
                  int64_t cursor):
        self.table = table
        self.books = books
        self.trades = trades
        self.bars = trades.bars if trades is not None else None
        self.delay_ns = delay_ns
        self.cursor = cursor


@cython.final
cdef class DelayLine:
    """Slots of the real kinds' changes, released to delayed copies as they come of age.

    `DelayLine(table, max_delay_ns, slot_ns, budget_bytes, books=None,
    trades=None)`; `record(now)` once per slot, `advance(now)` as often as the
    delayed frames should move (the gateway: every slot). `view(delay_ns)` is
    the delayed `DelayedView` for that delay (at most `max_delay_ns`), made on
    first use from the oldest one. With `books` (the real `Books`) and `trades`
    (the real `Trades`, its `bars` too) the views hold delayed copies of them.
    """

    cdef readonly Table real
    cdef readonly Books real_books
    cdef readonly Trades real_trades
    cdef readonly int64_t max_delay_ns
    cdef readonly int64_t slot_ns       # doubles each time the line is coarsened
    cdef readonly int64_t budget_bytes
    cdef readonly int64_t started_ns    # wall ns of the first record: the line's past begins
    cdef readonly int64_t coarsened     # how many times the slots were merged
    cdef readonly int64_t future_trades  # trades dropped: stamped beyond the line's horizon
    cdef readonly list views            # DelayedView, the oldest (max_delay_ns) first
    cdef Buf buf[3]
    cdef int32_t depth                  # book levels kept per side (the served depth)
    cdef Slot* S
    cdef int64_t s_lo, s_n, s_cap       # live slots are S[s_lo .. s_n)
    cdef int64_t s_abs                  # absolute number of S[0]
    cdef int64_t* mgen                  # per instrument: stamp of the slot it was last put in
    cdef int64_t* mpos                  # and where (merging)
    cdef int32_t* pend                  # instruments whose state has a ts still ahead
    cdef uint64_t* pbits
    cdef int64_t npend, icap, gen
    cdef uint64_t last_ver, last_bver
    cdef int64_t last_scan

    def __cinit__(self, Table real, int64_t max_delay_ns, int64_t slot_ns=100_000_000,
                  int64_t budget_bytes=256 << 20, Books books=None, Trades trades=None):
        cdef int k
        if max_delay_ns <= 0 or slot_ns <= 0 or budget_bytes <= 0:
            raise ValueError("max_delay_ns, slot_ns and budget_bytes must be positive")
        if books is not None and books.table is not real or \
                trades is not None and trades.table is not real:
            raise ValueError("the books and trades must be the table's own")
        self.real = real
        self.real_books = books
        self.real_trades = trades
        self.max_delay_ns = max_delay_ns
        self.slot_ns = slot_ns
        self.budget_bytes = budget_bytes
        self.views = []
        self.depth = books.depth if books is not None else 0
        for k in range(NBUF):
            self.buf[k].p = NULL
            self.buf[k].lo = self.buf[k].n = self.buf[k].cap = self.buf[k].open = 0
        self.buf[QUOTES].rec = ENTRY_BYTES
        self.buf[BOOKS].rec = sizeof(BookHead) + 2 * self.depth * sizeof(Level)
        self.buf[TRADES].rec = sizeof(TradeRec)
        self.s_lo = self.s_n = self.s_cap = self.s_abs = 0
        self.npend = self.icap = self.gen = 0
        self.last_ver = self.last_bver = 0
        self.last_scan = 0
        self.started_ns = 0
        self.coarsened = 0
        self.future_trades = 0
        if trades is not None:
            trades.journaling = True  # from now: the first record takes them all
        self.views.append(self._new_view(max_delay_ns, 0))

    def __init__(self, Table real, int64_t max_delay_ns, int64_t slot_ns=100_000_000,
                 int64_t budget_bytes=256 << 20, Books books=None, Trades trades=None):
        pass

    def __dealloc__(self):
        cdef int k
        for k in range(NBUF):
            free(self.buf[k].p)
        free(self.S)
        free(self.mgen)
        free(self.mpos)
        free(self.pend)
        free(self.pbits)

    cdef DelayedView _new_view(self, int64_t delay_ns, int64_t cursor):
        cdef Table r = self.real
        cdef Table t = Table(max(1024, r.capacity), r.max_instruments)
        cdef Books b = None
        cdef Trades tr = None
        cdef Bars bars = None
        if self.real_books is not None:
            b = Books(t, self.depth, self.depth)
        if self.real_trades is not None:
            rb = self.real_trades.bars
            if rb is not None:
                bars = Bars(t, (<Bars>rb).history, (<Bars>rb).tz)
            # its tape, fed by the released trades, is the delayed market-wide tape
            tr = Trades(t, self.real_trades.ring, self.real_trades.backlog,
                        self.real_trades.tape.ring, bars)
        return DelayedView(t, b, tr, delay_ns, cursor)

    # ---- bookkeeping

    @property
    def nbytes(self):
        """Bytes the line holds (allocated), the delayed copies not included."""
        cdef int k
        cdef int64_t n = self.s_cap * SLOT_BYTES + self.icap * PER_INSTRUMENT
        for k in range(NBUF):
            n += self.buf[k].cap * self.buf[k].rec
        return n

    @property
    def entries(self):
        """Quote entries held (one instrument's state in one slot)."""
        return self.buf[QUOTES].n - self.buf[QUOTES].lo

    @property
    def book_entries(self):
        return self.buf[BOOKS].n - self.buf[BOOKS].lo

    @property
    def trade_entries(self):
        return self.buf[TRADES].n - self.buf[TRADES].lo

    @property
    def book_entry_bytes(self):
        """Bytes of one book entry: its head and 2 x depth levels."""
        return self.buf[BOOKS].rec

    @property
    def slots(self):
        return self.s_n - self.s_lo

    @property
    def pending(self):
        """Instruments whose latest state carries a source ts still in the future."""
        return self.npend

    def past_ns(self, int64_t now=0):
        """How much past the line holds: 0 before the first record."""
        if self.started_ns == 0:
            return 0
        return (now or _clock(CLOCK_REALTIME)) - self.started_ns

    cdef int64_t _held(self) noexcept:
        cdef int k
        cdef int64_t n = self.s_cap * SLOT_BYTES + self.icap * PER_INSTRUMENT
        for k in range(NBUF):
            n += (self.buf[k].n - self.buf[k].lo) * self.buf[k].rec
        return n

    cdef int _instruments(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap = self.icap or 1024
        while cap < n:
            cap *= 2
        if cap != self.icap:
            self.mgen = <int64_t*>_grow(self.mgen, self.icap * 8, cap * 8, 0)
            self.mpos = <int64_t*>_grow(self.mpos, self.icap * 8, cap * 8, 0)
            self.pend = <int32_t*>_grow(self.pend, self.icap * 4, cap * 4, 0)
            self.pbits = <uint64_t*>_grow(self.pbits, (self.icap // 64) * 8, (cap // 64) * 8, 0)
            self.icap = cap
        return 0

    def sync(self):
        """Give the delayed copies the symbols the real table learnt since the
        last record: a snapshot must name a symbol that has no delayed state yet."""
        self._intern_views()

    cdef int _intern_views(self) except -1:
        # same ids as the real table, in the same order
        cdef DelayedView v
        cdef Table r = self.real, t
        cdef int32_t i
        for v in self.views:
            t = v.table
            while t.size < r.size:
                i = <int32_t>t.size
                if t.intern(r.syms + i * SYM_MAX, r.symlen[i]) != i:
                    raise AssertionError(f"delayed table gave instrument {i} another id")
        return 0

    cdef char* _room(self, int k) except NULL:
        cdef Buf* B = &self.buf[k]
        cdef int64_t j, cap
        if B.n == B.cap:
            if B.lo > B.cap // 2:  # slide the live records down
                memmove(B.p, B.p + B.lo * B.rec, (B.n - B.lo) * B.rec)
                for j in range(self.s_lo, self.s_n):
                    self.S[j].off[k] -= B.lo
                B.open -= B.lo
                B.n -= B.lo
                B.lo = 0
            else:
                cap = max(1024, B.cap * 2)
                B.p = <char*>_grow(B.p, B.cap * B.rec, cap * B.rec, 0)
                B.cap = cap
        B.n += 1
        return B.p + (B.n - 1) * B.rec

    cdef int _push(self, int32_t iid) except -1:
        cdef Table r = self.real
        cdef Entry* e = <Entry*>self._room(QUOTES)
        cdef int k
        e.iid = iid
        e.seq = r.seq[iid]
        e.ts = r.ts[iid]
        for k in range(NVALS):
            e.val[k] = r.val[k][iid]
        self.mgen[iid] = self.gen
        return 0

    cdef int _push_book(self, int32_t iid) except -1:
        cdef Books rb = self.real_books
        cdef int32_t b = rb.slot[iid]
        cdef Book* B = &rb.books[b]
        cdef BookHead* h = <BookHead*>self._room(BOOKS)
        cdef Level* lv = <Level*>(<char*>h + sizeof(BookHead))
        h.iid = iid
        h.seq = B.seq
        h.ts = rb.arrived[iid]
        h.nb = min(B.n[0], self.depth)
        h.na = min(B.n[1], self.depth)
        memcpy(lv, rb._side(b, 0), h.nb * sizeof(Level))
        memcpy(lv + h.nb, rb._side(b, 1), h.na * sizeof(Level))
        return 0

    cdef int64_t _ts(self, int k, int64_t j) noexcept:
        cdef char* r = self.buf[k].p + j * self.buf[k].rec
        if k == QUOTES:
            return (<Entry*>r).ts
        if k == BOOKS:
            return (<BookHead*>r).ts
        return (<TradeRec*>r).ts

    cdef int _slot(self, int64_t start, const int64_t* off, const int64_t* n) except -1:
        cdef int64_t cap, j, ts, mx = 0
        cdef int k
        cdef bint empty = True
        for k in range(NBUF):
            if n[k]:
                empty = False
        if empty:
            return 0
        if self.s_n == self.s_cap:
            if self.s_lo > self.s_cap // 2:
                memmove(self.S, self.S + self.s_lo, (self.s_n - self.s_lo) * sizeof(Slot))
                self.s_abs += self.s_lo
                self.s_n -= self.s_lo
                self.s_lo = 0
            else:
                cap = max(256, self.s_cap * 2)
                self.S = <Slot*>_grow(self.S, self.s_cap * sizeof(Slot), cap * sizeof(Slot), 0)
                self.s_cap = cap
        for k in range(NBUF):
            for j in range(off[k], off[k] + n[k]):
                ts = self._ts(k, j)
                if ts > mx:
                    mx = ts
            self.S[self.s_n].off[k] = off[k]
            self.S[self.s_n].n[k] = n[k]
        self.S[self.s_n].start = start
        self.S[self.s_n].maxts = mx
        self.s_n += 1
        return 0

    # ---- the two steps

    cdef int _take_trades(self, int64_t now) except -1:
        """Copy the trades applied since the last record, in their order."""
        cdef Trades rt = self.real_trades
        cdef Py_ssize_t j
        cdef TradeRec* t
        for j in range(rt.jn):
            # one stamped beyond the line's horizon would hold every slot after
            # it back: it is dropped, and delayed clients count it lost
            if rt.journal[j].ts - now > self.max_delay_ns:
                self.future_trades += 1
                continue
            t = <TradeRec*>self._room(TRADES)
            t[0] = rt.journal[j]
        rt.jn = 0
        return 0

    def record(self, int64_t now=0):
        """Close a slot: put in it every instrument changed since the last
        record (and every pending one whose ts has come), every book changed
        and every trade applied. Returns the entries put in."""
        cdef Table r = self.real
        cdef Books rb = self.real_books
        cdef int64_t w, k, start, b, lo, total = 0
        cdef int64_t e0, b0, t0
        cdef int64_t off[3]
        cdef int64_t cnt[3]
        cdef int32_t iid
        cdef Py_ssize_t i
        cdef int q
        cdef bint first = self.started_ns == 0
        if now == 0:
            now = _clock(CLOCK_REALTIME)
        self._intern_views()
        self._instruments(max(r.size, rb.size) if rb is not None else r.size)
        start = self.last_scan
        for q in range(NBUF):
            self.buf[q].open = self.buf[q].n
        self.gen += 1
        w = 0
        for k in range(self.npend):
            iid = self.pend[k]
            if not (self.pbits[iid >> 6] >> (iid & 63)) & 1:
                continue  # superseded by a state recorded since
            if r.ts[iid] <= now:
                self.pbits[iid >> 6] &= ~(1ULL << (iid & 63))
                self._push(iid)
            else:
                self.pend[w] = iid
                w += 1
        self.npend = w
        for i in range(r.size):
            if r.chg[i] <= self.last_ver or r.seq[i] < 0 or self.mgen[i] == self.gen:
                continue
            if r.ts[i] > now:  # ahead of its arrival: it must not go out before its ts
                if not (self.pbits[i >> 6] >> (i & 63)) & 1:
                    self.pbits[i >> 6] |= 1ULL << (i & 63)
                    self.pend[self.npend] = <int32_t>i
                    self.npend += 1
                continue
            self.pbits[i >> 6] &= ~(1ULL << (i & 63))
            self._push(<int32_t>i)
        self.last_ver = r.version
        if rb is not None:
            for i in range(rb.size):
                if rb.chg[i] > self.last_bver and rb.slot[i] >= 0 and \
                        rb.books[rb.slot[i]].seq > 0:
                    self._push_book(<int32_t>i)
            self.last_bver = rb.version
        if self.real_trades is not None:
            self._take_trades(now)
        self.last_scan = now
        if first:
            self.started_ns = now
        for q in range(NBUF):  # where _room may have slid them
            off[q] = self.buf[q].open
            cnt[q] = self.buf[q].n - off[q]
            total += cnt[q]
        if total == 0:
            return 0
        if not first:
            self._slot(start, off, cnt)
        else:
            # the first slot holds the whole table (a bus snapshot, a replay's
            # start): sorted by ts into slots, rows already old enough go out at
            # once, the rest as their ts comes of age; the books and trades
            # held then follow in a slot of their own (by their newest ts)
            e0 = off[QUOTES]
            b0, t0 = cnt[BOOKS], cnt[TRADES]
            cnt[BOOKS] = cnt[TRADES] = 0
            qsort(self.buf[QUOTES].p + e0 * ENTRY_BYTES, self.buf[QUOTES].n - e0,
                  ENTRY_BYTES, _by_ts)
            lo = now - self.max_delay_ns
            b = e0
            k = e0
            while k < self.buf[QUOTES].n and (<Entry*>self.buf[QUOTES].p)[k].ts <= lo:
                k += 1
            off[QUOTES], cnt[QUOTES] = b, k - b
            self._slot(0, off, cnt)
            while k < self.buf[QUOTES].n:
                b = k
                start = lo + (((<Entry*>self.buf[QUOTES].p)[b].ts - lo) // self.slot_ns) \
                    * self.slot_ns
                while k < self.buf[QUOTES].n and \
                        (<Entry*>self.buf[QUOTES].p)[k].ts < start + self.slot_ns:
                    k += 1
                off[QUOTES], cnt[QUOTES] = b, k - b
                self._slot(start, off, cnt)
            off[QUOTES], cnt[QUOTES] = self.buf[QUOTES].n, 0
            cnt[BOOKS], cnt[TRADES] = b0, t0
            self._slot(0, off, cnt)
        self._budget()
        return total

    cdef int _release(self, DelayedView v, int64_t now) except -1:
        cdef int64_t cutoff = now - v.delay_ns
        cdef int64_t j
        cdef Slot* s
        cdef Entry* e
        cdef BookHead* h
        cdef Level* lv
        cdef TradeRec* t
        cdef Table tab = v.table
        cdef Books bk = v.books
        cdef Trades tr = v.trades
        cdef Buf* Q = &self.buf[QUOTES]
        cdef Buf* B = &self.buf[BOOKS]
        cdef Buf* T = &self.buf[TRADES]
        cdef int applied = 0
        if v.cursor < self.s_abs + self.s_lo:
            v.cursor = self.s_abs + self.s_lo
        while v.cursor < self.s_abs + self.s_n:
            s = &self.S[v.cursor - self.s_abs]
            if s.start > cutoff or s.maxts > cutoff:
                break
            for j in range(s.off[QUOTES], s.off[QUOTES] + s.n[QUOTES]):
                e = <Entry*>(Q.p + j * ENTRY_BYTES)
                # full state, so every field is set; an older state than the
                # table holds (a slot applied again after a merge) is stale
                applied += tab.apply(e.iid, e.seq, e.ts, M_ALL, e.val, now) == 0
            if bk is not None:
                for j in range(s.off[BOOKS], s.off[BOOKS] + s.n[BOOKS]):
                    h = <BookHead*>(B.p + j * B.rec)
                    lv = <Level*>(<char*>h + sizeof(BookHead))
                    applied += bk.replace(h.iid, h.seq, h.nb, h.na, lv, lv + h.nb, now) == 0
            if tr is not None:
                for j in range(s.off[TRADES], s.off[TRADES] + s.n[TRADES]):
                    t = <TradeRec*>(T.p + j * T.rec)
                    applied += tr.apply(t.iid, t.tseq, t.ts, t.price, t.size, t.side, now) == 0
            v.cursor += 1
        return applied

    def advance(self, int64_t now=0):
        """Apply to every delayed copy the slots that have come of age; drop
        the slots every copy has. Returns the entries applied."""
        cdef DelayedView v
        cdef int applied = 0
        cdef int64_t low
        cdef int k
        if now == 0:
            now = _clock(CLOCK_REALTIME)
        low = self.s_abs + self.s_n
        for v in self.views:
            applied += self._release(v, now)
            low = min(low, v.cursor)
        while self.s_abs + self.s_lo < low:
            self.s_lo += 1
        for k in range(NBUF):
            self.buf[k].lo = self.S[self.s_lo].off[k] if self.s_lo < self.s_n else self.buf[k].n
        if self.s_lo == self.s_n:  # empty: start the buffers over
            self.s_abs += self.s_n
            self.s_lo = self.s_n = 0
            for k in range(NBUF):
                self.buf[k].lo = self.buf[k].n = self.buf[k].open = 0
        return applied

    def view(self, int64_t delay_ns, int64_t now=0):
        """The delayed copy (`DelayedView`: table, books, trades, bars) for
        `delay_ns` (0 < delay_ns <= max_delay_ns); a new one is the oldest one's
        state with the line applied up to `now`."""
        cdef DelayedView v, base
        cdef Table t, b
        cdef Books bb
        cdef Level* lv
        cdef Py_ssize_t i
        cdef int32_t bi
        cdef int k
        cdef double vals[7]
        if not 0 < delay_ns <= self.max_delay_ns:
            raise ValueError(f"delay {delay_ns} ns is outside 0..{self.max_delay_ns}")
        for v in self.views:
            if v.delay_ns == delay_ns:
                return v
        base = self.views[0]
        b = base.table
        self._intern_views()
        v = self._new_view(delay_ns, base.cursor)
        t = v.table
        for i in range(self.real.size):
            t.intern(self.real.syms + i * SYM_MAX, self.real.symlen[i])
            if b.seq[i] >= 0:
                for k in range(NVALS):
                    vals[k] = b.val[k][i]
                t.apply(<int32_t>i, b.seq[i], b.ts[i], M_ALL, vals, b.arrived[i])
        bb = base.books
        if bb is not None:
            for i in range(bb.size):
                bi = bb.slot[i]
                if bi >= 0 and bb.books[bi].seq > 0:
                    lv = bb._side(bi, 1)
                    v.books.replace(<int32_t>i, bb.books[bi].seq, bb.books[bi].n[0],
                                    bb.books[bi].n[1], bb._side(bi, 0), lv, bb.arrived[i])
        if base.trades is not None:
            v.trades.copy_state(base.trades)
            if base.bars is not None:
                v.bars.copy_state(base.bars)
        self.views.append(v)
        self._release(v, now or _clock(CLOCK_REALTIME))
        return v

    def delays(self):
        """The delays served, in ns, the oldest first."""
        return [(<DelayedView>v).delay_ns for v in self.views]

    # ---- the budget

    cdef int _budget(self) except -1:
        cdef int64_t need
        cdef int k
        cdef Buf* B
        # no coarser than half the delay: past that a merge saves next to nothing
        # (every slot already holds nearly every instrument) and delayed clients
        # would move in steps longer than their delay
        while self.s_n - self.s_lo >= 2 and self._held() > self.budget_bytes \
                and self.slot_ns * 2 <= self.max_delay_ns // 2:
            self._merge()
        for k in range(NBUF):
            B = &self.buf[k]
            need = B.n - B.lo
            if B.cap * B.rec > self.budget_bytes and need * 2 < B.cap:
                self._shrink(k, max(1024, need + need // 2))
        return 0

    @property
    def coarsest(self):
        """The slots are as long as they get (half the maximum delay, or more
        than that after the next merge): over budget now, the line stays so."""
        return self.slot_ns * 2 > self.max_delay_ns // 2

    cdef int _shrink(self, int k, int64_t cap) except -1:
        cdef Buf* B = &self.buf[k]
        cdef int64_t j
        if B.lo:
            memmove(B.p, B.p + B.lo * B.rec, (B.n - B.lo) * B.rec)
            for j in range(self.s_lo, self.s_n):
                self.S[j].off[k] -= B.lo
            B.n -= B.lo
            B.lo = 0
        B.open = B.n
        B.p = <char*>_grow(B.p, cap * B.rec, cap * B.rec, 0)
        B.cap = cap
        return 0

    cdef int _merge(self) except -1:
        """Merge the live slots two by two (an instrument in both keeps its later
        quote and book; trades are kept whole) and double the slot length. A
        delayed copy that had applied the first of a pair gets it again: stale
        rows, books and trades, which it drops."""
        cdef int64_t k, j, e_i, ws, nlive = self.s_n - self.s_lo, start
        cdef int64_t w[3]
        cdef int64_t first_abs = self.s_abs + self.s_lo
        cdef int q
        cdef int32_t iid
        cdef Buf* B
        cdef Slot* a
        cdef DelayedView v
        for q in range(NBUF):
            w[q] = self.buf[q].lo
        ws = self.s_lo
        k = self.s_lo
        while k < self.s_n:
            a = &self.S[k]
            self.S[ws].start = a.start
            self.S[ws].maxts = a.maxts
            if k + 1 < self.s_n and self.S[k + 1].maxts > self.S[ws].maxts:
                self.S[ws].maxts = self.S[k + 1].maxts
            for q in range(NBUF):
                B = &self.buf[q]
                self.gen += 1
                start = w[q]
                for j in range(k, min(k + 2, self.s_n)):
                    for e_i in range(self.S[j].off[q], self.S[j].off[q] + self.S[j].n[q]):
                        if q != TRADES:
                            iid = _iid(B, q, e_i)
                            if self.mgen[iid] == self.gen:
                                memcpy(B.p + self.mpos[iid] * B.rec, B.p + e_i * B.rec, B.rec)
                                continue
                            self.mgen[iid] = self.gen
                            self.mpos[iid] = w[q]
                        if w[q] != e_i:
                            memcpy(B.p + w[q] * B.rec, B.p + e_i * B.rec, B.rec)
                        w[q] += 1
                self.S[ws].off[q] = start
                self.S[ws].n[q] = w[q] - start
            ws += 1
            k += 2
        self.s_n = ws
        for q in range(NBUF):
            self.buf[q].n = w[q]
            self.buf[q].open = w[q]
        for v in self.views:
            if v.cursor >= first_abs + nlive:  # had every slot: has every merged one
                v.cursor = first_abs + (ws - self.s_lo)
            elif v.cursor > first_abs:  # inside a pair: gets the pair again
                v.cursor = first_abs + (v.cursor - first_abs) // 2
        self.slot_ns *= 2
        self.coarsened += 1
        return 0
