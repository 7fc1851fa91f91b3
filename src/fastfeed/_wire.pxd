# The wire format's C-level pieces: number writers and readers, the symbol
# rule, the partition hash and tick validation (see _wire.pyx).

from libc.math cimport isfinite
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

cdef inline bint _finite(const double* v, uint32_t mask) noexcept:
    cdef int k
    for k in range(NVALS):
        if mask & (2 << k) and not isfinite(v[k]):
            return False
    return True
