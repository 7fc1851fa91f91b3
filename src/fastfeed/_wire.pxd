# The wire format's C-level pieces: number writers and readers, the symbol
# rule, the partition hash and tick validation (see _wire.pyx).

cimport cython
from libc.math cimport fabs, floor, isfinite, nearbyint, signbit
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from cpython.mem cimport PyMem_Free

from fastfeed._defs cimport NVALS

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision,
                                int flags, int* ptype) except NULL
    int Py_DTSF_ADD_DOT_0

cdef bint symbol_ok(const char* s, Py_ssize_t n) noexcept
cdef object _check_tick(object t, double* v, uint32_t* mask, int64_t* seq, int64_t* ts)
cdef list _batch_parts(const Py_ssize_t* size, int parts, char** at)

cdef inline uint64_t _hash(const char* s, Py_ssize_t n) noexcept:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t k
    for k in range(n):
        h = (h ^ <uint8_t>s[k]) * 1099511628211ULL
    return h

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

# Powers of ten, every one an exact double (10**22 is the last), and the
# integer ones for splitting a scaled value into its two parts.
cdef extern from *:
    """
    static const double ff_p10[23] = {
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
        1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    static const unsigned long long ff_u10[16] = {
        1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL,
        10000000ULL, 100000000ULL, 1000000000ULL, 10000000000ULL,
        100000000000ULL, 1000000000000ULL, 10000000000000ULL,
        100000000000000ULL, 1000000000000000ULL};
    """
    const double* ff_p10
    const unsigned long long* ff_u10


@cython.cdivision(True)
cdef inline char* _put_u64(char* p, uint64_t u, int width) noexcept:
    # at least `width` digits, zero-padded on the left
    cdef char tmp[24]
    cdef int n = 0
    while u or n < width:
        tmp[n] = <char>(48 + u % 10)
        n += 1
        u //= 10
    while n:
        n -= 1
        p[0] = tmp[n]
        p += 1
    return p


cdef inline int _short_dec(double a, double limit, uint64_t* m) noexcept:
    """The smallest k (0..15) for which m = round(a * 10**k) < `limit` gives
    m / 10**k == a (one correctly rounded IEEE division: what a reader
    computes from m and k), or -1. `a` >= 0."""
    cdef double r, fm
    cdef int k
    for k in range(16):
        r = a * ff_p10[k]
        if not r < limit:                # also NaN and inf
            return -1
        fm = nearbyint(r)
        # |r - m| is at most a few ulps of r when m / 10**k round-trips, and
        # far more otherwise: the division runs only for a likely candidate
        if fabs(r - fm) <= r * 8.881784197001252e-16 and fm / ff_p10[k] == a:
            m[0] = <uint64_t>fm
            return k
    return -1


@cython.cdivision(True)   # divisors are powers of ten: never zero
cdef inline char* _put_short(char* p, double v) noexcept:
    """repr(v) for a short decimal (m / 10**k exactly, m < 10**15, |v| >= 1e-4
    or 0) written with integer arithmetic; NULL for any other value.

    The smallest such k (`_short_dec`) is Python's shortest round-trip text:
    with m < 2**50 the interval of decimals that parse to v holds at most one
    multiple of 10**-k, so no shorter text round-trips and none of the same
    length is nearer. In [1e-4, 1e16) repr writes fixed-point, as here.
    tests/test_numbers.py checks it against repr for every kind of double."""
    cdef double a = fabs(v)
    cdef uint64_t m, ip
    cdef int k
    if a < 1e-4 and a != 0:
        return NULL
    k = _short_dec(a, 1e15, &m)
    if k < 0:
        return NULL
    if signbit(v):
        p[0] = b"-"
        p += 1
    ip = m // ff_u10[k]
    p = _put_u64(p, ip, 1)
    p[0] = b"."
    if k == 0:
        p[1] = b"0"
        return p + 2
    return _put_u64(p + 1, m - ip * ff_u10[k], k)


cdef inline char* _put_varint(char* p, uint64_t u) noexcept:
    # unsigned LEB128: 7 bits a byte, low first, the high bit says more follow
    while u >= 0x80:
        p[0] = <char>((u & 0x7F) | 0x80)
        p += 1
        u >>= 7
    p[0] = <char>u
    return p + 1


cdef inline char* _put_zigzag(char* p, int64_t v) noexcept:
    return _put_varint(p, (<uint64_t>v << 1) ^ <uint64_t>(v >> 63))


# a binary compact value (docs/protocol.md, "Compact binary frames"): the
# varint m*32 + c*2 + sign with m < 2**48 (so a JavaScript Number holds the
# varint exactly): c 0..11 for m / 10**c, c 12..15 for m * 10**(c-11) (whole
# sizes and volumes in round lots); the token 31 (m 0, c 15, negative: never
# one of those, as a multiple is at least 10) and the double's 8 bytes for
# anything else
cdef enum:
    VALUE_F64 = 31


@cython.cdivision(True)
cdef inline char* _put_value(char* p, double v) noexcept:
    cdef double a = fabs(v), q
    cdef uint64_t m
    cdef int k, c = -1
    cdef uint64_t sign = 1 if signbit(v) else 0
    if 10 <= a < 9007199254740992.0 and a == floor(a):  # whole, below 2**53
        # a multiple of 10**e: the quotient is exact, and so is the product back
        for k in range(4, 0, -1):
            q = a / ff_p10[k]
            if q == floor(q) and q * ff_p10[k] == a and q < 281474976710656.0:
                m = <uint64_t>q
                c = 11 + k
                break
    if c < 0:
        c = _short_dec(a, 281474976710656.0, &m)  # 2**48
        if c > 11:
            c = -1
    if c >= 0:
        return _put_varint(p, (m << 5) | (<uint64_t>c << 1) | sign)
    p[0] = VALUE_F64
    memcpy(p + 1, &v, 8)
    return p + 9


cdef inline char* _put_f64(char* p, double v) except NULL:
    # Python's repr: shortest round-trip digits, as json.dumps writes floats;
    # short decimals (most prices and sizes) without CPython's dtoa
    cdef char* q = _put_short(p, v)
    if q != NULL:
        return q
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

cdef inline bint _finite(const double* v, uint32_t mask) noexcept:
    cdef int k
    for k in range(NVALS):
        if mask & (2 << k) and not isfinite(v[k]):
            return False
    return True
