"""A strict fast path for JSON ticks on /ingest.

`json.loads` builds a dict per tick only for `Table.apply_objects` to take
it apart again: three quarters of the ingest cost. `TickParser` reads the
shape publishers send -- one flat object or an array of them, known keys,
JSON numbers, ASCII symbols without escapes -- straight into C values.
Anything else (an escape, an unknown key, a nested value, a bad number, a
missing `sym`) makes `parse` return -1, and the caller takes the
`json.loads` path, which gives the exact error messages. The fast path thus
only ever accepts what the slow path would apply, and applies it the same
way (tests/test_tickjson.py checks the two against each other).
"""

cimport cython
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy

from fastfeed._defs cimport APPLIED, M_TS, NVALS, REJECTED, STALE, __builtin_popcount
from fastfeed._table cimport Table
from fastfeed._wire cimport _batch_parts, _hash, ff_p10, symbol_ok

cdef extern from "Python.h":
    # overflow_exception NULL: an overflow gives inf (refused below), not an error
    double PyOS_string_to_double(const char* s, char** endptr, void* exc) except? -1.0

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec* ts)
    clockid_t CLOCK_REALTIME


cdef struct Tick:
    Py_ssize_t sym_at       # offset of the symbol in the message
    int32_t sym_len
    int32_t part            # bus partition (encode_batch)
    uint32_t mask
    int64_t seq
    int64_t ts
    double v[7]


cdef enum Key:
    K_SYM = 0
    K_SEQ = 1
    K_TS = 2
    K_VAL = 3    # K_VAL + k: bid ask last bid_size ask_size last_size volume


cdef inline const char* _ws(const char* p, const char* e) noexcept:
    while p < e and (p[0] == b' ' or p[0] == b'\n' or p[0] == b'\r' or p[0] == b'\t'):
        p += 1
    return p


cdef inline bint _digit(char c) noexcept:
    return b'0' <= c <= b'9'


cdef int _key(const char* s, Py_ssize_t n) noexcept:
    """Index of a tick field name, -1 for any other key."""
    if n == 3:
        if s[0] == b's' and s[1] == b'y' and s[2] == b'm':
            return K_SYM
        if s[0] == b's' and s[1] == b'e' and s[2] == b'q':
            return K_SEQ
        if s[0] == b'b' and s[1] == b'i' and s[2] == b'd':
            return K_VAL + 0
        if s[0] == b'a' and s[1] == b's' and s[2] == b'k':
            return K_VAL + 1
    elif n == 2:
        if s[0] == b't' and s[1] == b's':
            return K_TS
    elif n == 4:
        if s[0] == b'l' and s[1] == b'a' and s[2] == b's' and s[3] == b't':
            return K_VAL + 2
    elif n == 8:
        if memcmp(s, b"bid_size", 8) == 0:
            return K_VAL + 3
        if memcmp(s, b"ask_size", 8) == 0:
            return K_VAL + 4
    elif n == 9:
        if memcmp(s, b"last_size", 9) == 0:
            return K_VAL + 5
    elif n == 6:
        if memcmp(s, b"volume", 6) == 0:
            return K_VAL + 6
    return -1


@cython.cdivision(True)   # divisors are powers of ten: never zero
cdef const char* _number(const char* p, const char* e, double* d, int64_t* i,
                         bint* integral) except? NULL:
    """One JSON number at p (the grammar exactly: no '+', no leading zeros,
    no '.5', no NaN); NULL if there is none. An integer sets `i` too, or -1
    when it is negative or beyond int64 (never a valid seq or ts)."""
    cdef const char* start = p
    cdef char tok[40]
    cdef bint neg = False
    cdef uint64_t acc = 0        # the digits, integer and fraction, while they fit
    cdef int ndig = 0            # significant digits read (leading zeros not counted)
    cdef int idig = 0            # digits of the integer part
    cdef int frac = 0            # fraction digits taken into acc
    cdef int ex = 0
    cdef bint exneg = False
    integral[0] = True
    if p < e and p[0] == b'-':
        neg = True
        p += 1
    if p >= e:
        return NULL
    if p[0] == b'0':
        p += 1
        idig = 1
    elif _digit(p[0]):
        while p < e and _digit(p[0]):
            if ndig < 19:
                acc = acc * 10 + <uint64_t>(p[0] - 48)
            ndig += 1
            p += 1
        idig = ndig
    else:
        return NULL
    if p < e and p[0] == b'.':
        integral[0] = False
        p += 1
        if p >= e or not _digit(p[0]):
            return NULL
        while p < e and _digit(p[0]):
            if ndig < 19:
                acc = acc * 10 + <uint64_t>(p[0] - 48)
                frac += 1
                if acc:
                    ndig += 1
            else:
                ndig += 1
            p += 1
    if p < e and (p[0] == b'e' or p[0] == b'E'):
        integral[0] = False
        p += 1
        if p < e and (p[0] == b'+' or p[0] == b'-'):
            exneg = p[0] == b'-'
            p += 1
        if p >= e or not _digit(p[0]):
            return NULL
        while p < e and _digit(p[0]):
            if ex < 10000:
                ex = ex * 10 + (p[0] - 48)
            p += 1
    if p - start >= 40 or (integral[0] and idig > 19):
        return NULL           # rare: let json.loads and Python ints deal with it
    if integral[0]:
        # 19 digits fit in uint64; C's conversion rounds to nearest like float(int)
        # ("-0" is the int 0 to json.loads, so +0.0)
        d[0] = -<double>acc if neg and acc else <double>acc
        i[0] = -1 if (neg and acc != 0) or acc >= <uint64_t>INT64_MAX else <int64_t>acc
        return p
    if exneg:
        ex = -ex
    ex -= frac
    if ndig <= 19 and acc <= 9007199254740992ULL and -22 <= ex <= 22:
        # Clinger's fast path: the digits and 10**|ex| are exact doubles, so one
        # IEEE multiplication or division rounds correctly, as strtod does
        if ex < 0:
            d[0] = <double>acc / ff_p10[-ex]
        else:
            d[0] = <double>acc * ff_p10[ex]
        if neg:
            d[0] = -d[0]
        return p
    memcpy(tok, start, p - start)
    tok[p - start] = 0
    d[0] = PyOS_string_to_double(tok, NULL, NULL)
    return p


cdef class TickParser:
    """Parses JSON tick messages into a reusable C array, then applies them.

    ``n = parser.parse(data)`` returns the tick count, or -1 when the
    message needs the `json.loads` path; nothing is applied or interned
    yet, so the caller can rate-limit on the count. ``parser.apply(table,
    source)`` then applies those ticks and returns ``(applied, stale,
    errors)`` like `Table.apply_objects`; or ``parser.encode_batch(parts)``
    writes them as the bus's binary batches, as `encode_batch` would write
    the same ticks decoded (a gateway on the Redis bus).
    """

    cdef Tick* ticks
    cdef Py_ssize_t cap
    cdef Py_ssize_t n
    cdef object data        # the message the ticks point into

    def __cinit__(self):
        self.ticks = NULL
        self.cap = 0
        self.n = 0

    def __dealloc__(self):
        free(self.ticks)

    cdef int _reserve(self, Py_ssize_t k) except -1:
        cdef Tick* t
        if k <= self.cap:
            return 0
        k = max(k, 2 * self.cap, 64)
        t = <Tick*>realloc(self.ticks, k * sizeof(Tick))
        if t == NULL:
            raise MemoryError()
        self.ticks = t
        self.cap = k
        return 0

    cdef const char* _object(self, const char* start, const char* p, const char* e,
                             Tick* t) except? NULL:
        cdef const char* q
        cdef int k
        cdef uint32_t seen = 0
        cdef double d
        cdef int64_t i
        cdef bint integral
        t.mask = 0
        t.ts = 0
        p = _ws(p, e)
        if p >= e or p[0] != b'{':
            return NULL
        p = _ws(p + 1, e)
        if p < e and p[0] == b'}':
            return NULL                       # no sym: the slow path says so
        while True:
            if p >= e or p[0] != b'"':
                return NULL
            q = p + 1
            while q < e and q[0] != b'"' and q[0] != b'\\':
                q += 1
            if q >= e or q[0] != b'"':
                return NULL
            k = _key(p + 1, q - p - 1)
            if k < 0 or seen & (1u << k):     # unknown or repeated key
                return NULL
            seen |= 1u << k
            p = _ws(q + 1, e)
            if p >= e or p[0] != b':':
                return NULL
            p = _ws(p + 1, e)
            if p >= e:
                return NULL
            if k == K_SYM:
                if p[0] != b'"':
                    return NULL
                q = p + 1
                while (q < e and q[0] != b'"' and q[0] != b'\\'
                       and 0x20 <= <unsigned char>q[0] < 0x80):
                    q += 1
                if q >= e or q[0] != b'"':
                    return NULL
                if not symbol_ok(p + 1, q - p - 1):
                    return NULL
                t.sym_at = p + 1 - start
                t.sym_len = <int32_t>(q - p - 1)
                p = q + 1
            elif p[0] == b'n' and e - p >= 4 and p[1] == b'u' and p[2] == b'l' and p[3] == b'l':
                if k == K_SEQ:
                    return NULL
                p += 4                            # null: the field is absent
            else:
                p = _number(p, e, &d, &i, &integral)
                if p == NULL:
                    return NULL
                if k == K_SEQ or k == K_TS:
                    if not integral or i < 0:     # the slow path refuses these
                        return NULL
                    if k == K_SEQ:
                        t.seq = i
                    else:
                        t.ts = i
                        t.mask |= M_TS
                else:
                    if d - d != 0:                # inf: the slow path refuses it
                        return NULL
                    t.v[k - K_VAL] = d
                    t.mask |= 2u << (k - K_VAL)
            p = _ws(p, e)
            if p >= e:
                return NULL
            if p[0] == b'}':
                break
            if p[0] != b',':
                return NULL
            p = _ws(p + 1, e)
        if not (seen & (1u << K_SYM)) or not (seen & (1u << K_SEQ)):
            return NULL
        return p + 1

    def parse(self, bytes data):
        """Tick count of a JSON tick message, or -1 if it needs json.loads."""
        cdef const char* start = data
        cdef const char* p = start
        cdef const char* e = start + len(data)
        self.n = 0
        self.data = None
        p = _ws(p, e)
        if p < e and p[0] == b'[':
            p = _ws(p + 1, e)
            if p < e and p[0] == b']':
                p += 1
            else:
                while True:
                    self._reserve(self.n + 1)
                    p = self._object(start, p, e, &self.ticks[self.n])
                    if p == NULL:
                        return -1
                    self.n += 1
                    p = _ws(p, e)
                    if p < e and p[0] == b',':
                        p += 1
                        continue
                    if p < e and p[0] == b']':
                        p += 1
                        break
                    return -1
        else:
            self._reserve(1)
            p = self._object(start, p, e, &self.ticks[0])
            if p == NULL:
                return -1
            self.n = 1
        if _ws(p, e) != e:
            return -1
        self.data = data
        return self.n

    def apply(self, Table table, int source=0):
        """Apply the ticks of the last successful parse, as
        `Table.apply_objects` would: (applied, stale, errors)."""
        cdef timespec now
        cdef int64_t now_ns
        cdef Py_ssize_t k
        cdef int32_t iid
        cdef int out, applied = 0, stale = 0
        cdef Tick* t
        cdef const char* base
        if self.data is None:
            raise ValueError("apply() without a successful parse()")
        base = <bytes>self.data
        errors = []
        clock_gettime(CLOCK_REALTIME, &now)
        now_ns = <int64_t>now.tv_sec * 1000000000 + now.tv_nsec
        for k in range(self.n):
            t = &self.ticks[k]
            iid = table.intern(base + t.sym_at, t.sym_len)
            if iid < 0:   # the symbol is valid: the table is full
                errors.append((k, (base + t.sym_at)[:t.sym_len].decode(),
                               "instrument table is full"))
                out = REJECTED
            else:
                out = table.apply(iid, t.seq, t.ts, t.mask, t.v, now_ns)
            table.stats.ticks[source][out] += 1
            if out == APPLIED:
                applied += 1
            elif out == STALE:
                stale += 1
        self.n = 0
        self.data = None
        return applied, stale, errors

    @cython.cdivision(True)   # parts >= 1, checked first
    def encode_batch(self, int parts=1):
        """The ticks of the last successful parse as binary tick batches, one
        per bus partition (b"" where a partition has none): the bytes
        `fastfeed._core.encode_batch` writes for the same ticks decoded."""
        cdef Py_ssize_t k
        cdef int j
        cdef Tick* t
        cdef const char* base
        cdef char* o
        cdef Py_ssize_t* size
        cdef char** at
        if self.data is None:
            raise ValueError("encode_batch() without a successful parse()")
        if parts < 1:
            raise ValueError("parts must be at least 1")
        base = <bytes>self.data
        # per partition: bytes, then tick count, then where the next record goes
        size = <Py_ssize_t*>calloc(2 * parts, sizeof(Py_ssize_t))
        at = <char**>calloc(parts, sizeof(char*))
        if size == NULL or at == NULL:
            free(size)
            free(at)
            raise MemoryError()
        try:
            for k in range(self.n):
                t = &self.ticks[k]
                t.part = <int32_t>(_hash(base + t.sym_at, t.sym_len) % <uint64_t>parts)
                size[t.part] += 10 + t.sym_len + 8 * __builtin_popcount(t.mask)
                size[parts + t.part] += 1
            outs = _batch_parts(size, parts, at)
            for k in range(self.n):
                t = &self.ticks[k]
                o = at[t.part]
                o[0] = <char>t.sym_len
                memcpy(o + 1, base + t.sym_at, t.sym_len)
                o += 1 + t.sym_len
                o[0] = <char>t.mask
                memcpy(o + 1, &t.seq, 8)
                o += 9
                if t.mask & M_TS:
                    memcpy(o, &t.ts, 8)
                    o += 8
                for j in range(NVALS):
                    if t.mask & (2u << j):
                        memcpy(o, &t.v[j], 8)
                        o += 8
                at[t.part] = o
        finally:
            free(size)
            free(at)
        self.n = 0
        self.data = None
        return outs
