# cython: language_level=3
"""The delay line: the quote table as of `delay` seconds ago (docs/delay.md).

`record` closes a time slot: every instrument the real table changed since
the last slot is copied once (its latest state: the slot conflates), read
from the table's change stamps, so whatever applied the tick (the local
sink, the bus's subscriber, a replay) is seen, and a tick costs nothing
here. `advance` applies, to each delayed copy (a plain `Table` the hub
serves like the real one), the slots whose every row is old enough: a slot
goes out when `now - delay` has passed both its start and the newest source
`ts` in it, so no row newer than `now - delay` ever reaches a delayed table.
A row whose `ts` lies ahead of the time it was recorded waits outside the
line (the pending set) until its `ts` has come, then joins the slot then
open.

Memory is entries (80 bytes: one instrument's state in one slot), slot
headers (32 bytes) and 21 bytes per instrument; over the budget the slots
are merged two by two (the slot length doubles), never dropped.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, qsort
from libc.string cimport memcpy, memmove

from fastfeed._defs cimport CLOCK_REALTIME, M_ALL, NVALS, SYM_MAX, _clock, _grow
from fastfeed._table cimport Table


cdef struct Entry:          # one instrument's state in one slot: 80 bytes
    int64_t seq
    int64_t ts
    double val[7]
    int32_t iid
    int32_t pad


cdef struct Slot:           # a time slot: its entries are E[off .. next slot's off)
    int64_t start           # wall ns: everything in it arrived after this
    int64_t maxts           # newest source ts among its entries
    int64_t off             # index of its first entry in E
    int64_t n               # its entries


cdef enum:
    ENTRY_BYTES = 80
    SLOT_BYTES = 32
    PER_INSTRUMENT = 21     # mgen, mpos (8 each), pend (4), pbits (1 bit, rounded up)


cdef int _by_ts(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const Entry*>a).ts, y = (<const Entry*>b).ts
    return (x > y) - (x < y)


@cython.final
cdef class DelayedView:
    """One delayed copy of the table: everything as of `delay_ns` ago."""

    cdef readonly Table table
    cdef readonly int64_t delay_ns
    cdef int64_t cursor     # absolute number of the next slot to apply

    def __cinit__(self, Table table, int64_t delay_ns, int64_t cursor):
        self.table = table
        self.delay_ns = delay_ns
        self.cursor = cursor


@cython.final
cdef class DelayLine:
    """Slots of the real table's changes, released to delayed copies as they come of age.

    `DelayLine(table, max_delay_ns, slot_ns, budget_bytes)`; `record(now)` once
    per slot, `advance(now)` as often as the delayed frames should move (the
    gateway: every half slot). `view(delay_ns)` is the delayed `Table` for that
    delay (at most `max_delay_ns`), made on first use from the oldest one.
    """

    cdef readonly Table real
    cdef readonly int64_t max_delay_ns
    cdef readonly int64_t slot_ns       # doubles each time the line is coarsened
    cdef readonly int64_t budget_bytes
    cdef readonly int64_t started_ns    # wall ns of the first record: the line's past begins
    cdef readonly int64_t coarsened     # how many times the slots were merged
    cdef readonly list views            # DelayedView, the oldest (max_delay_ns) first
    cdef Entry* E
    cdef int64_t e_lo, e_n, e_cap       # live entries are E[e_lo .. e_n)
    cdef int64_t e_open                 # entries of the slot being recorded: E[e_open .. e_n)
    cdef Slot* S
    cdef int64_t s_lo, s_n, s_cap       # live slots are S[s_lo .. s_n)
    cdef int64_t s_abs                  # absolute number of S[0]
    cdef int64_t* mgen                  # per instrument: stamp of the slot it was last put in
    cdef int64_t* mpos                  # and where (merging)
    cdef int32_t* pend                  # instruments whose state has a ts still ahead
    cdef uint64_t* pbits
    cdef int64_t npend, icap, gen
    cdef uint64_t last_ver
    cdef int64_t last_scan

    def __cinit__(self, Table real, int64_t max_delay_ns, int64_t slot_ns=100_000_000,
                  int64_t budget_bytes=256 << 20):
        if max_delay_ns <= 0 or slot_ns <= 0 or budget_bytes <= 0:
            raise ValueError("max_delay_ns, slot_ns and budget_bytes must be positive")
        self.real = real
        self.max_delay_ns = max_delay_ns
        self.slot_ns = slot_ns
        self.budget_bytes = budget_bytes
        self.views = []
        self.e_lo = self.e_n = self.e_cap = self.e_open = 0
        self.s_lo = self.s_n = self.s_cap = self.s_abs = 0
        self.npend = self.icap = self.gen = 0
        self.last_ver = 0
        self.last_scan = 0
        self.started_ns = 0
        self.coarsened = 0
        self.views.append(DelayedView(Table(max(1024, real.capacity), real.max_instruments),
                                      max_delay_ns, 0))

    def __init__(self, Table real, int64_t max_delay_ns, int64_t slot_ns=100_000_000,
                 int64_t budget_bytes=256 << 20):
        pass

    def __dealloc__(self):
        free(self.E)
        free(self.S)
        free(self.mgen)
        free(self.mpos)
        free(self.pend)
        free(self.pbits)

    # ---- bookkeeping

    @property
    def nbytes(self):
        """Bytes the line holds (allocated), the delayed tables not included."""
        return self.e_cap * ENTRY_BYTES + self.s_cap * SLOT_BYTES + self.icap * PER_INSTRUMENT

    @property
    def entries(self):
        return self.e_n - self.e_lo

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

    cdef Entry* _room(self) except NULL:
        cdef int64_t k, cap
        if self.e_n == self.e_cap:
            if self.e_lo > self.e_cap // 2:  # slide the live entries down
                memmove(self.E, self.E + self.e_lo, (self.e_n - self.e_lo) * sizeof(Entry))
                for k in range(self.s_lo, self.s_n):
                    self.S[k].off -= self.e_lo
                self.e_open -= self.e_lo
                self.e_n -= self.e_lo
                self.e_lo = 0
            else:
                cap = max(1024, self.e_cap * 2)
                self.E = <Entry*>_grow(self.E, self.e_cap * sizeof(Entry), cap * sizeof(Entry), 0)
                self.e_cap = cap
        self.e_n += 1
        return &self.E[self.e_n - 1]

    cdef int _push(self, int32_t iid) except -1:
        cdef Table r = self.real
        cdef Entry* e = self._room()
        cdef int k
        e.iid = iid
        e.seq = r.seq[iid]
        e.ts = r.ts[iid]
        for k in range(NVALS):
            e.val[k] = r.val[k][iid]
        self.mgen[iid] = self.gen
        return 0

    cdef int _slot(self, int64_t start, int64_t off, int64_t n) except -1:
        cdef int64_t cap, k, mx
        if n == 0:
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
        mx = self.E[off].ts
        for k in range(off + 1, off + n):
            if self.E[k].ts > mx:
                mx = self.E[k].ts
        self.S[self.s_n].start = start
        self.S[self.s_n].maxts = mx
        self.S[self.s_n].off = off
        self.S[self.s_n].n = n
        self.s_n += 1
        return 0

    # ---- the two steps

    def record(self, int64_t now=0):
        """Close a slot: put in it every instrument changed since the last
        record (and every pending one whose ts has come). Returns the rows put in."""
        cdef Table r = self.real
        cdef int64_t e0, w, k, start, b, lo
        cdef int32_t iid
        cdef Py_ssize_t i
        cdef bint first = self.started_ns == 0
        if now == 0:
            now = _clock(CLOCK_REALTIME)
        self._intern_views()
        self._instruments(r.size)
        start = self.last_scan
        self.e_open = self.e_n
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
        self.last_scan = now
        if first:
            self.started_ns = now
        e0 = self.e_open  # where _room may have slid it
        if self.e_n == e0:
            return 0
        if not first:
            self._slot(start, e0, self.e_n - e0)
        else:
            # the first slot holds the whole table (a bus snapshot, a replay's
            # start): sorted by ts into slots, rows already old enough go out at
            # once, the rest as their ts comes of age
            qsort(&self.E[e0], self.e_n - e0, sizeof(Entry), _by_ts)
            lo = now - self.max_delay_ns
            b = e0
            k = e0
            while k < self.e_n and self.E[k].ts <= lo:
                k += 1
            self._slot(0, b, k - b)
            while k < self.e_n:
                b = k
                start = lo + ((self.E[b].ts - lo) // self.slot_ns) * self.slot_ns
                while k < self.e_n and self.E[k].ts < start + self.slot_ns:
                    k += 1
                self._slot(start, b, k - b)
        self._budget()
        return self.e_n - e0

    cdef int _release(self, DelayedView v, int64_t now) except -1:
        cdef int64_t cutoff = now - v.delay_ns
        cdef int64_t j
        cdef Slot* s
        cdef Entry* e
        cdef Table t = v.table
        cdef int applied = 0
        if v.cursor < self.s_abs + self.s_lo:
            v.cursor = self.s_abs + self.s_lo
        while v.cursor < self.s_abs + self.s_n:
            s = &self.S[v.cursor - self.s_abs]
            if s.start > cutoff or s.maxts > cutoff:
                break
            for j in range(s.off, s.off + s.n):
                e = &self.E[j]
                # full state, so every field is set; an older state than the
                # table holds (a slot applied again after a merge) is stale
                applied += t.apply(e.iid, e.seq, e.ts, M_ALL, e.val, now) == 0
            v.cursor += 1
        return applied

    def advance(self, int64_t now=0):
        """Apply to every delayed table the slots that have come of age; drop
        the slots every table has. Returns the rows applied."""
        cdef DelayedView v
        cdef int applied = 0
        cdef int64_t low
        if now == 0:
            now = _clock(CLOCK_REALTIME)
        low = self.s_abs + self.s_n
        for v in self.views:
            applied += self._release(v, now)
            low = min(low, v.cursor)
        while self.s_abs + self.s_lo < low:
            self.s_lo += 1
        self.e_lo = self.S[self.s_lo].off if self.s_lo < self.s_n else self.e_n
        if self.s_lo == self.s_n:  # empty: start the buffers over
            self.s_abs += self.s_n
            self.s_lo = self.s_n = 0
            self.e_lo = self.e_n = self.e_open = 0
        return applied

    def view(self, int64_t delay_ns, int64_t now=0):
        """The delayed table for `delay_ns` (0 < delay_ns <= max_delay_ns); a new
        one is the oldest one's state with the line applied up to `now`."""
        cdef DelayedView v, base
        cdef Table t, b
        cdef Py_ssize_t i
        cdef int k
        cdef double vals[7]
        if not 0 < delay_ns <= self.max_delay_ns:
            raise ValueError(f"delay {delay_ns} ns is outside 0..{self.max_delay_ns}")
        for v in self.views:
            if v.delay_ns == delay_ns:
                return v.table
        base = self.views[0]
        b = base.table
        self._intern_views()
        t = Table(max(1024, self.real.capacity), self.real.max_instruments)
        for i in range(self.real.size):
            t.intern(self.real.syms + i * SYM_MAX, self.real.symlen[i])
            if b.seq[i] >= 0:
                for k in range(NVALS):
                    vals[k] = b.val[k][i]
                t.apply(<int32_t>i, b.seq[i], b.ts[i], M_ALL, vals, b.arrived[i])
        v = DelayedView(t, delay_ns, base.cursor)
        self.views.append(v)
        self._release(v, now or _clock(CLOCK_REALTIME))
        return t

    def delays(self):
        """The delays served, in ns, the oldest first."""
        return [(<DelayedView>v).delay_ns for v in self.views]

    # ---- the budget

    cdef int _budget(self) except -1:
        cdef int64_t need
        while self.s_n - self.s_lo >= 2 and \
                (self.e_n - self.e_lo) * ENTRY_BYTES + self.s_cap * SLOT_BYTES \
                + self.icap * PER_INSTRUMENT > self.budget_bytes:
            self._merge()
        need = self.e_n - self.e_lo
        if self.e_cap * ENTRY_BYTES > self.budget_bytes and need * 2 < self.e_cap:
            self._shrink(max(1024, need + need // 2))
        return 0

    cdef int _shrink(self, int64_t cap) except -1:
        cdef int64_t k
        if self.e_lo:
            memmove(self.E, self.E + self.e_lo, (self.e_n - self.e_lo) * sizeof(Entry))
            for k in range(self.s_lo, self.s_n):
                self.S[k].off -= self.e_lo
            self.e_n -= self.e_lo
            self.e_lo = 0
        self.e_open = self.e_n
        self.E = <Entry*>_grow(self.E, cap * sizeof(Entry), cap * sizeof(Entry), 0)
        self.e_cap = cap
        return 0

    cdef int _merge(self) except -1:
        """Merge the live slots two by two (an instrument in both keeps its later
        state) and double the slot length. A delayed table that had applied the
        first of a pair gets it again: stale rows, which it drops."""
        cdef int64_t k, j, e_i, w, ws, nlive = self.s_n - self.s_lo, start
        cdef int64_t first_abs = self.s_abs + self.s_lo
        cdef Entry* e
        cdef Slot* a
        cdef DelayedView v
        w = self.e_lo
        ws = self.s_lo
        k = self.s_lo
        while k < self.s_n:
            self.gen += 1
            start = w
            a = &self.S[k]
            self.S[ws].start = a.start
            self.S[ws].maxts = a.maxts
            for j in range(k, min(k + 2, self.s_n)):
                if self.S[j].maxts > self.S[ws].maxts:
                    self.S[ws].maxts = self.S[j].maxts
                for e_i in range(self.S[j].off, self.S[j].off + self.S[j].n):
                    e = &self.E[e_i]
                    if self.mgen[e.iid] == self.gen:
                        memcpy(&self.E[self.mpos[e.iid]], e, sizeof(Entry))
                    else:
                        self.mgen[e.iid] = self.gen
                        self.mpos[e.iid] = w
                        if w != e_i:
                            memcpy(&self.E[w], e, sizeof(Entry))
                        w += 1
            self.S[ws].off = start
            self.S[ws].n = w - start
            ws += 1
            k += 2
        self.s_n = ws
        self.e_n = w
        for v in self.views:
            if v.cursor >= first_abs + nlive:  # had every slot: has every merged one
                v.cursor = first_abs + (ws - self.s_lo)
            elif v.cursor > first_abs:  # inside a pair: gets the pair again
                v.cursor = first_abs + (v.cursor - first_abs) // 2
        self.slot_ns *= 2
        self.coarsened += 1
        return 0
