# cython: language_level=3
"""Instrument table, change tracking and frame fan-out.

The two hot paths live here and nowhere else:

* per tick: `Table.apply` checks seq and finiteness, writes the field arrays,
  stamps the change with the table version and sets a bit in the dirty bitmap;
* per frame: `Hub.pump` turns dirty bits into due connections (through the
  groups that hold each instrument), pops them from a deadline heap, builds
  each distinct frame once from cached row encodings and writes it to every
  socket that shares it.

A connection's pending set is derived, not stored: the instruments of its
subscription group whose change stamp is newer than the version of its last
frame. That is what makes conflation free (nothing queues per client) and what
lets connections of one group that were served together share one frame.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_GET_ITEM
from cpython.mem cimport PyMem_Free
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from picows.picows cimport WSMsgType, WSTransport

import numpy as np

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision,
                                int flags, int* ptype) except NULL
    int Py_DTSF_ADD_DOT_0

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil
    int __builtin_popcount(unsigned int x) nogil

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* tp)
    int CLOCK_REALTIME
    int CLOCK_MONOTONIC


FIELDS = ("sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume")
VALUE_FIELDS = FIELDS[3:]
ROW_DTYPE = np.dtype([
    ("sym", "S32"), ("seq", "<i8"), ("ts", "<i8"),
    ("bid", "<f8"), ("ask", "<f8"), ("last", "<f8"),
    ("bid_size", "<f8"), ("ask_size", "<f8"), ("last_size", "<f8"), ("volume", "<f8"),
])
BIN_MAGIC = b"FFB1"
BATCH_MAGIC = b"FFT1"
BIN_HEADER_SIZE = BIN_HEADER
SOURCES = ("ingest", "bus", "simulator")
OUTCOMES = ("applied", "stale", "rejected")

cdef const char* UPDATE_PREFIX = b'{"type":"update","t":'
cdef const char* ROWS_PREFIX = b',"rows":['

# symbol characters: A-Z a-z 0-9 . _ - : /
cdef uint8_t SYMCHAR[256]
for _c in bytearray(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:/"):
    SYMCHAR[_c] = 1


cdef inline int64_t _clock(int which) noexcept nogil:
    cdef timespec tp
    clock_gettime(which, &tp)
    return <int64_t>tp.tv_sec * 1000000000 + tp.tv_nsec


def wall_ns():
    """Wall clock, nanoseconds since the epoch (what `t` and `ts` use)."""
    return _clock(CLOCK_REALTIME)


cdef bint symbol_ok(const char* s, Py_ssize_t n) noexcept:
    """1 to SYM_MAX characters of A-Z a-z 0-9 . _ - : / (the protocol's symbol)."""
    cdef Py_ssize_t k
    if n < 1 or n > SYM_MAX:
        return False
    for k in range(n):
        if not SYMCHAR[<uint8_t>s[k]]:
            return False
    return True


def valid_symbol(str sym):
    """True if `sym` is 1 to 32 characters of A-Z a-z 0-9 . _ - : /."""
    b = sym.encode("utf-8", "replace")
    return symbol_ok(b, len(b))


cdef inline uint64_t _hash(const char* s, Py_ssize_t n) noexcept:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ <uint8_t>s[k]) * 1099511628211ULL
    return h


cdef bint writable(WSTransport tr) noexcept:
    """False once the connection is lost or its close frame is sent.

    picows sets `is_disconnected` only when the loop delivers connection_lost,
    one loop pass after the socket failed; until then the transport under it
    says `is_closing()`, and every write to it is dropped with a warning.
    """
    if tr.is_disconnected or tr.is_close_frame_sent:
        return False
    try:
        return not tr.underlying_transport.is_closing()
    except BaseException:
        return False


def connected(WSTransport tr not None):
    """True while `tr` may still be written to (a close frame included)."""
    if tr.is_disconnected:
        return False
    return not tr.underlying_transport.is_closing()


def can_send(WSTransport tr not None):
    """True while `tr` takes messages: connected and no close frame sent yet."""
    return writable(tr)


def partition(str sym, int parts):
    """Bus partition of a symbol: stable across processes and releases."""
    b = sym.encode()
    return <int>(_hash(b, len(b)) % <uint64_t>parts)


cdef inline char* _put_i64(char* p, int64_t v) noexcept:
    cdef char tmp[24]
    cdef int n = 0
    cdef uint64_t u
    if v < 0:
        p[0] = b"-"
        p += 1
        u = <uint64_t>(-(v + 1)) + 1
    else:
        u = <uint64_t>v
    while True:
        tmp[n] = <char>(48 + u % 10)
        n += 1
        u //= 10
        if u == 0:
            break
    while n:
        n -= 1
        p[0] = tmp[n]
        p += 1
    return p


cdef inline char* _put_f64(char* p, double v) except NULL:
    # Python's repr: shortest round-trip digits, as json.dumps writes floats
    cdef char* s = PyOS_double_to_string(v, b"r", 0, Py_DTSF_ADD_DOT_0, NULL)
    cdef Py_ssize_t k = 0
    while s[k]:
        p[k] = s[k]
        k += 1
    PyMem_Free(s)
    return p + k


cdef inline int64_t _rd_i64(const char* p) noexcept:
    cdef int64_t v
    memcpy(&v, p, 8)
    return v


cdef inline double _rd_f64(const char* p) noexcept:
    cdef double v
    memcpy(&v, p, 8)
    return v


cdef inline uint32_t _rd_u32(const char* p) noexcept:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef void* _grow(void* p, Py_ssize_t old_bytes, Py_ssize_t new_bytes, int fill) except NULL:
    cdef void* q = realloc(p, new_bytes)
    if q == NULL:
        raise MemoryError()
    memset(<char*>q + old_bytes, fill, new_bytes - old_bytes)
    return q


@cython.final
cdef class Table:
    """Latest state of every instrument, one numpy array per protocol field."""

    def __cinit__(self, Py_ssize_t capacity=1024, Py_ssize_t max_instruments=1_000_000):
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

    def __init__(self, Py_ssize_t capacity=1024, Py_ssize_t max_instruments=1_000_000):
        pass

    def __dealloc__(self):
        free(self.chg)
        free(self.arrived)
        free(self.dirty)
        free(self.watched)
        free(self.hot_bits)
        free(self.hot)
        free(self.syms)
        free(self.symlen)
        free(self.rowbuf)
        free(self.rowlen)
        free(self.rowver)
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
        self.chg = <uint64_t*>_grow(self.chg, old * 8, cap * 8, 0)
        self.arrived = <int64_t*>_grow(self.arrived, old * 8, cap * 8, 0)
        self.dirty = <uint64_t*>_grow(self.dirty, (old // 64) * 8, (cap // 64) * 8, 0)
        self.hot_bits = <uint64_t*>_grow(self.hot_bits, (old // 64) * 8, (cap // 64) * 8, 0)
        self.hot = <int32_t*>_grow(self.hot, old * 4, cap * 4, 0)
        self.watched = <uint8_t*>_grow(self.watched, old, cap, 0)
        self.syms = <char*>_grow(self.syms, old * SYM_MAX, cap * SYM_MAX, 0)
        self.symlen = <uint8_t*>_grow(self.symlen, old, cap, 0)
        self.rowbuf = <char*>_grow(self.rowbuf, old * ROW_SLOT, cap * ROW_SLOT, 0)
        self.rowlen = <int32_t*>_grow(self.rowlen, old * 4, cap * 4, 0)
        self.rowver = <uint64_t*>_grow(self.rowver, old * 8, cap * 8, 0xFF)
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
        if seq <= self.seq[iid]:
            return STALE
        self.seq[iid] = seq
        if mask & M_TS:
            self.ts[iid] = ts
        for k in range(NVALS):
            if mask & (2 << k):
                self.val[k][iid] = v[k]
        self.version += 1
        self.chg[iid] = self.version
        self.arrived[iid] = now
        self.dirty[iid >> 6] |= 1ULL << (iid & 63)
        if self.watched[iid] and not (self.hot_bits[iid >> 6] & (1ULL << (iid & 63))):
            self.hot_bits[iid >> 6] |= 1ULL << (iid & 63)
            self.hot[self.nhot] = iid
            self.nhot += 1
        return APPLIED

    cdef const char* row_json(self, int32_t iid, int32_t* n) except NULL:
        """The instrument's JSON row, encoded at most once per change."""
        cdef char* base = self.rowbuf + iid * ROW_SLOT
        cdef char* p
        cdef int k
        if self.rowver[iid] != self.chg[iid]:
            p = base
            p[0] = b"["
            p[1] = b'"'
            memcpy(p + 2, self.syms + iid * SYM_MAX, self.symlen[iid])
            p += 2 + self.symlen[iid]
            p[0] = b'"'
            p[1] = b","
            p = _put_i64(p + 2, self.seq[iid])
            p[0] = b","
            p = _put_i64(p + 1, self.ts[iid])
            for k in range(NVALS):
                p[0] = b","
                p = _put_f64(p + 1, self.val[k][iid])
            p[0] = b"]"
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


cdef inline bint _finite(const double* v, uint32_t mask) noexcept:
    cdef int k
    for k in range(NVALS):
        if mask & (2 << k) and not isfinite(v[k]):
            return False
    return True


cdef object _check_tick(object t, double* v, uint32_t* mask, int64_t* seq, int64_t* ts):
    """Validate one decoded JSON tick into C values; returns an error message or None."""
    if type(t) is not dict:
        return "tick is not an object"
    d = <dict>t
    sym = d.get("sym")
    if type(sym) is not str:
        return "sym missing or not a string"
    s = d.get("seq")
    if type(s) is not int:
        return "seq missing or not an integer"
    if not 0 <= s < 9223372036854775807:
        return "seq out of range"
    seq[0] = s
    mask[0] = 0
    x = d.get("ts")
    if x is not None:
        if type(x) is not int or not 0 <= x < 9223372036854775807:
            return "ts is not a non-negative integer"
        ts[0] = x
        mask[0] |= M_TS
    for k in range(NVALS):
        x = d.get(VALUE_FIELDS[k])
        if x is not None:
            if type(x) is float or type(x) is int:
                v[k] = x
            else:
                return f"{VALUE_FIELDS[k]} is not a number"
            mask[0] |= 2 << k
    if not _finite(v, mask[0]):
        return "price or size is NaN or infinite"
    return None


def check_tick(tick):
    """Why the gateway would refuse this tick object, or None if it accepts it."""
    cdef double v[7]
    cdef uint32_t mask
    cdef int64_t seq, ts
    err = _check_tick(tick, v, &mask, &seq, &ts)
    if err is None:
        b = tick["sym"].encode("utf-8", "replace")
        if not symbol_ok(b, len(b)):
            err = "bad symbol: 1 to 32 characters of A-Z a-z 0-9 . _ - : /"
    return err


def encode_batch(ticks, int parts=1):
    """Encode validated tick objects as binary batches, one per bus partition.

    Layout (little-endian): b"FFT1", u32 count, then per tick: u8 symbol length,
    symbol bytes, u8 field mask (bit 0 ts, bits 1-7 bid ask last bid_size
    ask_size last_size volume), i64 seq, i64 ts if bit 0, f64 per set bit 1-7.
    Returns (list of `parts` bytes objects (b"" where a partition has none),
    errors as (index, symbol or None, message)).
    """
    cdef double v[7]
    cdef uint32_t mask
    cdef int64_t seq, ts
    cdef int k
    outs = [bytearray(b"FFT1\0\0\0\0") for _ in range(parts)]
    counts = [0] * parts
    errors = []
    for idx, t in enumerate(ticks):
        err = _check_tick(t, v, &mask, &seq, &ts)
        b = b""
        if err is None:
            b = t["sym"].encode()
            if not symbol_ok(b, len(b)):
                err = "bad symbol"
        if err is not None:
            errors.append((idx, t.get("sym") if type(t) is dict else None, err))
            continue
        part = <int>(_hash(b, len(b)) % <uint64_t>parts)
        o = outs[part]
        o.append(len(b))
        o += b
        o.append(mask)
        o += (<char*>&seq)[:8]
        if mask & M_TS:
            o += (<char*>&ts)[:8]
        for k in range(NVALS):
            if mask & (2 << k):
                o += (<char*>&v[k])[:8]
        counts[part] += 1
    res = []
    for part in range(parts):
        if counts[part]:
            o = outs[part]
            o[4:8] = (<uint32_t>counts[part]).to_bytes(4, "little")
            res.append(bytes(o))
        else:
            res.append(b"")
    return res, errors


def decode_batch(data):
    """Decode a binary batch into tick dicts (tools and tests; not hot)."""
    mv = memoryview(data).cast("B")
    if len(mv) < 8 or bytes(mv[:4]) != BATCH_MAGIC:
        raise ValueError("not a fastfeed tick batch (magic FFT1 missing)")
    count = int.from_bytes(mv[4:8], "little")
    pos = 8
    out = []
    for _ in range(count):
        slen = mv[pos]
        sym = bytes(mv[pos + 1:pos + 1 + slen]).decode()
        mask = mv[pos + 1 + slen]
        pos += 2 + slen
        t = {"sym": sym, "seq": int.from_bytes(mv[pos:pos + 8], "little", signed=True)}
        pos += 8
        if mask & M_TS:
            t["ts"] = int.from_bytes(mv[pos:pos + 8], "little", signed=True)
            pos += 8
        for k in range(NVALS):
            if mask & (2 << k):
                t[VALUE_FIELDS[k]] = np.frombuffer(mv[pos:pos + 8], "<f8")[0].item()
                pos += 8
        out.append(t)
    return out


# ---- fan-out ---------------------------------------------------------------

cdef enum ConnFlag:
    F_ACTIVE = 1
    F_IN_HEAP = 2
    F_PAUSED = 4
    F_BINARY = 8


@cython.final
cdef class Hub:
    """Connections, their subscription groups and the frame scheduler.

    The server registers each socket with `add`; the event loop calls `pump`
    every frame tick (and at once when a watched instrument changed).
    """

    def __cinit__(self, Table table, int64_t slack_ns=1_000_000):
        self.table = table
        self.transports = []
        self.capture = None
        self.nconns_cap = 0
        self.nfree_conns = 0
        self.nconns = 0
        self.ngroups_cap = 0
        self.nfree_groups = 0
        self.group_keys = {}
        self.inst_cap = 0
        self.heap_n = 0
        self.heap_cap = 0
        self.arena_len = 0
        self.arena_cap = 0
        self.pump_no = 0
        self.slack = slack_ns
        self.floor_ns = 0
        self.lat_ring = <int64_t*>malloc(256 * 8)
        self.lat_n = 0

    def __init__(self, Table table, int64_t slack_ns=1_000_000):
        pass

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.ngroups_cap):
            free(self.groups[i].ids)
        for i in range(self.inst_cap):
            free(self.rev[i])
            free(self.wrev[i])
        free(self.conns)
        free(self.free_conns)
        free(self.groups)
        free(self.free_groups)
        free(self.rev)
        free(self.rev_n)
        free(self.rev_cap)
        free(self.wrev)
        free(self.wrev_n)
        free(self.wrev_cap)
        free(self.heap)
        free(self.arena)
        free(self.lat_ring)

    # -- connections

    def add(self, transport, int64_t interval_ns, bint binary=False, int64_t mono=0):
        """Register a connection; returns its id. `transport` is a picows WSTransport.

        `mono` (tests only) stands in for the monotonic clock.
        """
        cdef int32_t cid
        cdef Conn* c
        if self.nfree_conns:
            self.nfree_conns -= 1
            cid = self.free_conns[self.nfree_conns]
            self.transports[cid] = transport
        else:
            if <Py_ssize_t>len(self.transports) >= self.nconns_cap:
                n = max(64, self.nconns_cap * 2)
                self.conns = <Conn*>_grow(self.conns, self.nconns_cap * sizeof(Conn),
                                          n * sizeof(Conn), 0)
                self.free_conns = <int32_t*>_grow(self.free_conns, self.nconns_cap * 4, n * 4, 0)
                self.nconns_cap = n
            cid = <int32_t>len(self.transports)
            self.transports.append(transport)
        c = &self.conns[cid]
        memset(c, 0, sizeof(Conn))
        c.group = -1
        c.gnext = c.gprev = -1
        c.flags = F_ACTIVE | (F_BINARY if binary else 0)
        c.interval = interval_ns
        c.sent_ver = self.table.version
        c.last_send = mono or _clock(CLOCK_MONOTONIC)
        self.nconns += 1
        return cid

    def remove(self, int32_t cid):
        """Forget a connection (after its socket closed). Idempotent."""
        cdef Conn* c = &self.conns[cid]
        if not c.flags & F_ACTIVE:
            return
        self._leave_group(cid)
        c.flags = 0
        self.transports[cid] = None
        self.free_conns[self.nfree_conns] = cid
        self.nfree_conns += 1
        self.nconns -= 1

    def set_floor(self, int64_t floor_ns):
        """The shortest update interval of every connection while the gateway
        is loaded (0: none). Raising it for all clients alike stretches their
        frames evenly and makes each one fuller, where a saturated loop would
        let the backlog decide who waits."""
        self.floor_ns = max(floor_ns, 0)

    def set_interval(self, int32_t cid, int64_t interval_ns):
        self.conns[cid].interval = interval_ns

    def touch(self, int32_t cid):
        """The connection was just written to (a reply): its heartbeat clock restarts."""
        self.conns[cid].last_send = _clock(CLOCK_MONOTONIC)

    def pause(self, int32_t cid):
        """Its socket's write buffer passed the high-water mark: conflate from now."""
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_ACTIVE and not c.flags & F_PAUSED:
            c.flags |= F_PAUSED
            c.paused_at = _clock(CLOCK_MONOTONIC)

    def resume(self, int32_t cid):
        """Its socket drained: send what it missed, conflated, at the next pump."""
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_PAUSED:
            c.flags &= ~F_PAUSED
            self._schedule(cid, 0)

    def group_size(self, int32_t cid):
        """How many connections share this connection's subscription set."""
        g = self.conns[cid].group
        return self.groups[g].members if g >= 0 else 0

    def subscribe_ids(self, int32_t cid, ids):
        """Make `ids` (any iterable of instrument ids) this connection's subscription set."""
        arr = np.unique(np.asarray(list(ids), dtype=np.int32))
        key = arr.tobytes()
        self._leave_group(cid)
        if not len(arr):
            return
        g = self.group_keys.get(key)
        if g is None:
            g = self._new_group(arr)
            self.group_keys[key] = g
        self._join_group(cid, g)

    # -- groups

    cdef int32_t _alloc_group(self) except -1:
        cdef int32_t g
        cdef Py_ssize_t n
        if self.nfree_groups:
            self.nfree_groups -= 1
            return self.free_groups[self.nfree_groups]
        n = max(64, self.ngroups_cap * 2)
        self.groups = <Group*>_grow(self.groups, self.ngroups_cap * sizeof(Group),
                                    n * sizeof(Group), 0)
        self.free_groups = <int32_t*>_grow(self.free_groups, self.ngroups_cap * 4, n * 4, 0)
        for g in range(n - 1, self.ngroups_cap, -1):
            self.free_groups[self.nfree_groups] = g
            self.nfree_groups += 1
        g = <int32_t>self.ngroups_cap
        self.ngroups_cap = n
        return g

    cdef void _ensure_inst(self, Py_ssize_t n) except *:
        cdef Py_ssize_t cap = self.inst_cap
        if n <= cap:
            return
        n = max(n, cap * 2, 64)
        self.rev = <int32_t**>_grow(self.rev, cap * sizeof(void*), n * sizeof(void*), 0)
        self.rev_n = <int32_t*>_grow(self.rev_n, cap * 4, n * 4, 0)
        self.rev_cap = <int32_t*>_grow(self.rev_cap, cap * 4, n * 4, 0)
        self.wrev = <int32_t**>_grow(self.wrev, cap * sizeof(void*), n * sizeof(void*), 0)
        self.wrev_n = <int32_t*>_grow(self.wrev_n, cap * 4, n * 4, 0)
        self.wrev_cap = <int32_t*>_grow(self.wrev_cap, cap * 4, n * 4, 0)
        self.inst_cap = n

    cdef void _push_vec(self, int32_t** vec, int32_t* vn, int32_t* vcap, int32_t i,
                        int32_t x) except *:
        if vn[i] == vcap[i]:
            vcap[i] = max(4, vcap[i] * 2)
            vec[i] = <int32_t*>_grow(vec[i], vn[i] * 4, vcap[i] * 4, 0)
        vec[i][vn[i]] = x
        vn[i] += 1

    cdef void _drop_vec(self, int32_t** vec, int32_t* vn, int32_t i, int32_t x) noexcept:
        cdef int32_t k
        for k in range(vn[i]):
            if vec[i][k] == x:
                vn[i] -= 1
                vec[i][k] = vec[i][vn[i]]
                return

    def _new_group(self, ids):
        cdef int32_t g = self._alloc_group()
        cdef Group* G = &self.groups[g]
        cdef const int32_t[::1] mv = ids
        cdef Py_ssize_t k, n = mv.shape[0]
        self._ensure_inst(self.table.size)
        memset(G, 0, sizeof(Group))
        G.ids = <int32_t*>malloc(n * 4)
        memcpy(G.ids, &mv[0], n * 4)
        G.n = <int32_t>n
        G.head = -1
        G.cache_pump[0] = G.cache_pump[1] = 0
        for k in range(n):
            self._push_vec(self.rev, self.rev_n, self.rev_cap, G.ids[k], g)
        return g

    def _join_group(self, int32_t cid, int32_t g):
        cdef Conn* c = &self.conns[cid]
        cdef Group* G = &self.groups[g]
        c.group = g
        c.gprev = -1
        c.gnext = G.head
        if G.head >= 0:
            self.conns[G.head].gprev = cid
        G.head = cid
        G.members += 1

    cdef void _leave_group(self, int32_t cid) except *:
        cdef Conn* c = &self.conns[cid]
        cdef int32_t g = c.group
        cdef Group* G
        cdef int32_t k
        if g < 0:
            return
        G = &self.groups[g]
        if c.gprev >= 0:
            self.conns[c.gprev].gnext = c.gnext
        else:
            G.head = c.gnext
        if c.gnext >= 0:
            self.conns[c.gnext].gprev = c.gprev
        c.group = c.gnext = c.gprev = -1
        G.members -= 1
        if G.members == 0:
            for k in range(G.n):
                self._drop_vec(self.rev, self.rev_n, G.ids[k], g)
            key = PyBytes_FromStringAndSize(<char*>G.ids, G.n * 4)
            del self.group_keys[key]
            free(G.ids)
            G.ids = NULL
            G.n = 0
            self.free_groups[self.nfree_groups] = g
            self.nfree_groups += 1

    # -- watching

    def watch_ids(self, int32_t cid, ids, bint on):
        """Start (on) or stop watching instruments: their changes make `cid` due at once."""
        self._ensure_inst(self.table.size)
        for iid in ids:
            if on:
                self._push_vec(self.wrev, self.wrev_n, self.wrev_cap, iid, cid)
            else:
                self._drop_vec(self.wrev, self.wrev_n, iid, cid)
            self.table.watched[<int32_t>iid] = self.wrev_n[<int32_t>iid] > 0

    # -- scheduling

    cdef void _heap_push(self, int64_t due, int32_t cid) except *:
        cdef Py_ssize_t i, parent, n
        if self.heap_n == self.heap_cap:
            n = self.heap_cap * 2 if self.heap_cap else 64
            self.heap = <HeapItem*>_grow(self.heap, self.heap_cap * sizeof(HeapItem),
                                         n * sizeof(HeapItem), 0)
            self.heap_cap = n
        i = self.heap_n
        self.heap_n += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent].due <= due:
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i].due = due
        self.heap[i].cid = cid

    cdef HeapItem _heap_pop(self) noexcept:
        cdef HeapItem top = self.heap[0]
        cdef HeapItem last
        cdef Py_ssize_t i = 0, child, n
        self.heap_n -= 1
        n = self.heap_n
        if n:
            last = self.heap[n]
            while True:
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and self.heap[child + 1].due < self.heap[child].due:
                    child += 1
                if self.heap[child].due >= last.due:
                    break
                self.heap[i] = self.heap[child]
                i = child
            self.heap[i] = last
        return top

    cdef void _schedule(self, int32_t cid, int64_t due) except *:
        # A connection sits in the heap once; an earlier deadline re-pushes it
        # and the stale entry is skipped when it surfaces.
        cdef Conn* c = &self.conns[cid]
        if c.flags & F_IN_HEAP and c.due <= due:
            return
        c.flags |= F_IN_HEAP
        c.due = due
        self._heap_push(due, cid)

    def pump(self, int64_t budget_ns=4_000_000, int64_t wall=0, int64_t mono=0):
        """Send every frame that is due. Returns True if the time slice ran out first.

        `wall` (ns since the epoch) is the frame's `t`; 0 reads the clock.
        `mono` (tests only) fixes the monotonic clock and lifts the time slice.
        """
        cdef Table T = self.table
        cdef int64_t start = mono or _clock(CLOCK_MONOTONIC)
        cdef int64_t due
        cdef int64_t now = start
        cdef uint64_t word
        cdef Py_ssize_t w, k, nwords
        cdef int32_t iid, g, cid
        cdef Group* G
        cdef Conn* c
        cdef HeapItem item
        cdef int sent = 0
        cdef bint overrun = False
        if wall == 0:
            wall = _clock(CLOCK_REALTIME)
        self.pump_no += 1
        self.arena_len = 0
        T.stats.pumps += 1
        self._ensure_inst(T.size)
        # dirty instruments -> their groups -> member connections become due
        nwords = (T.size + 63) >> 6
        for w in range(nwords):
            word = T.dirty[w]
            if not word:
                continue
            T.dirty[w] = 0
            while word:
                iid = <int32_t>((w << 6) + __builtin_ctzll(word))
                word &= word - 1
                for k in range(self.rev_n[iid]):
                    g = self.rev[iid][k]
                    G = &self.groups[g]
                    if G.mark == self.pump_no:
                        continue
                    G.mark = self.pump_no
                    cid = G.head
                    while cid >= 0:
                        c = &self.conns[cid]
                        if c.flags & F_PAUSED:
                            T.stats.conflated += 1
                        else:
                            due = c.last_send + max(c.interval, self.floor_ns)
                            self._schedule(cid, due)
                        cid = c.gnext
        # watched instruments that changed make their watchers due now
        for k in range(T.nhot):
            iid = T.hot[k]
            T.hot_bits[iid >> 6] = 0
            for w in range(self.wrev_n[iid]):
                cid = self.wrev[iid][w]
                if not self.conns[cid].flags & F_PAUSED:
                    self._schedule(cid, 0)
                    T.stats.watched_pushes += 1
        T.nhot = 0
        while self.heap_n and self.heap[0].due <= now + self.slack:
            item = self._heap_pop()
            c = &self.conns[item.cid]
            if not c.flags & F_IN_HEAP or c.due != item.due:
                continue
            c.flags &= ~F_IN_HEAP
            if c.flags & F_PAUSED:
                T.stats.conflated += 1
                continue
            self._frame(item.cid, now, wall)
            sent += 1
            if sent & 15 == 0 and not mono:
                now = _clock(CLOCK_MONOTONIC)
                if now - start > budget_ns:
                    overrun = True
                    T.stats.overruns += 1
                    break
        if not mono:
            T.stats.build_ns += _clock(CLOCK_MONOTONIC) - start
        return overrun

    cdef int _frame(self, int32_t cid, int64_t now, int64_t wall) except -1:
        cdef Table T = self.table
        cdef Conn* c = &self.conns[cid]
        cdef Group* G = &self.groups[c.group]
        cdef int b = 1 if c.flags & F_BINARY else 0
        cdef Py_ssize_t off, k, need
        cdef int32_t iid, n
        cdef uint32_t count = 0
        cdef const char* row
        cdef char* p
        cdef int64_t oldest = 0
        if c.group < 0:
            # nothing subscribed: nothing is pending either (as a frame with
            # no rows would say), so a later subscribe starts from now
            c.sent_ver = T.version
            return 0
        if G.cache_pump[b] == self.pump_no and G.cache_ver[b] == c.sent_ver:
            if G.cache_len[b]:
                self._send(cid, b, G.cache_off[b], G.cache_len[b])
                c.last_send = now
            c.sent_ver = T.version
            return 0
        # worst case: every row of the group plus the envelope
        need = HEADROOM + 64 + <Py_ssize_t>G.n * (ROW_SLOT + 1 if not b else BIN_ROW)
        if self.arena_len + need > self.arena_cap:
            n2 = max(self.arena_cap * 2, self.arena_len + need, 65536)
            self.arena = <char*>_grow(self.arena, self.arena_cap, n2, 0)
            self.arena_cap = n2
        off = self.arena_len + HEADROOM
        p = self.arena + off
        if b:
            memcpy(p, b"FFB1", 4)
            memcpy(p + 8, &wall, 8)
            p += BIN_HEADER
        else:
            memcpy(p, UPDATE_PREFIX, 21)
            p = _put_i64(p + 21, wall)
            memcpy(p, ROWS_PREFIX, 9)
            p += 9
        for k in range(G.n):
            iid = G.ids[k]
            if T.chg[iid] <= c.sent_ver:
                continue
            if count == 0 or T.arrived[iid] < oldest:
                oldest = T.arrived[iid]
            if b:
                T.row_bin(iid, p)
                p += BIN_ROW
            else:
                if count:
                    p[0] = b","
                    p += 1
                row = T.row_json(iid, &n)
                memcpy(p, row, n)
                p += n
            count += 1
        G.cache_pump[b] = self.pump_no
        G.cache_ver[b] = c.sent_ver
        G.cache_off[b] = off
        if count == 0:
            G.cache_len[b] = 0
            c.sent_ver = T.version
            return 0
        if b:
            memcpy(self.arena + off + 4, &count, 4)
        else:
            p[0] = b"]"
            p[1] = b"}"
            p += 2
        G.cache_len[b] = p - (self.arena + off)
        self.arena_len = off + G.cache_len[b]
        T.stats.frames_built += 1
        self.lat_ring[self.lat_n & 255] = wall - oldest
        self.lat_n += 1
        self._send(cid, b, off, G.cache_len[b])
        c.sent_ver = T.version
        c.last_send = now
        return 0

    cdef int _send(self, int32_t cid, int binary, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef WSTransport tr
        cdef object o = <object>PyList_GET_ITEM(self.transports, cid)
        self.table.stats.frames += 1
        self.table.stats.bytes_sent += n
        if self.capture is not None:
            self.capture.append((cid, PyBytes_FromStringAndSize(self.arena + off, n)))
            return 0
        tr = <WSTransport>o
        if not writable(tr):
            return 0
        tr.send_reuse_external_buffer(WSMsgType.BINARY if binary else WSMsgType.TEXT,
                                      self.arena + off, n)
        return 0

    def sweep(self, int64_t heartbeat_ns, int64_t stall_ns):
        """Once a second: heartbeats to quiet connections; returns ids stalled past the limit."""
        cdef int64_t now = _clock(CLOCK_MONOTONIC)
        cdef Py_ssize_t cid
        cdef Conn* c
        stalled = []
        hb = None
        for cid in range(len(self.transports)):
            c = &self.conns[cid]
            if not c.flags & F_ACTIVE:
                continue
            if c.flags & F_PAUSED:
                if now - c.paused_at > stall_ns:
                    stalled.append(cid)
                continue
            if now - c.last_send >= heartbeat_ns:
                if hb is None:
                    hb = b'{"type":"heartbeat","t":%d}' % _clock(CLOCK_REALTIME)
                self._send_bytes(cid, hb)
                c.last_send = now
                self.table.stats.heartbeats += 1
        return stalled

    def _send_bytes(self, int32_t cid, bytes data):
        if self.capture is not None:
            self.capture.append((cid, data))
            return
        tr = <WSTransport>self.transports[cid]
        if writable(tr):
            tr.send(WSMsgType.TEXT, data)

    def take_latencies(self):
        """Tick-arrival-to-send latencies (ns) sampled since the last call, one per built frame."""
        n = min(self.lat_n, 256)
        out = [self.lat_ring[k] for k in range(n)]
        self.lat_n = 0
        return out

    def paused_count(self):
        cdef Py_ssize_t cid, n = 0
        for cid in range(len(self.transports)):
            if self.conns[cid].flags & F_PAUSED:
                n += 1
        return n
