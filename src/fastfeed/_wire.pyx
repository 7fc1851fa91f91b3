# cython: language_level=3
"""The wire format: field lists, symbols, partitions and the binary tick batch.

Python-level names here are re-exported by `fastfeed._core`; Cython parts
cimport the C-level ones from _wire.pxd (`symbol_ok`, `_check_tick` and the
inline number writers and readers).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

from fastfeed._defs cimport (
    BIN_HEADER, CLOCK_REALTIME, M_TS, NVALS, SYM_MAX, __builtin_popcount, _clock,
)

import numpy as np


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

# symbol characters: A-Z a-z 0-9 . _ - : /
cdef uint8_t SYMCHAR[256]
for _c in bytearray(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:/"):
    SYMCHAR[_c] = 1


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


def partition(str sym, int parts):
    """Bus partition of a symbol: stable across processes and releases."""
    b = sym.encode()
    return <int>(_hash(b, len(b)) % <uint64_t>parts)


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


cdef inline char* _put_record(char* o, const char* sym, Py_ssize_t n, uint32_t mask,
                              int64_t seq, int64_t ts, const double* v) noexcept:
    cdef int k
    o[0] = <char>n
    memcpy(o + 1, sym, n)
    o += 1 + n
    o[0] = <char>mask
    memcpy(o + 1, &seq, 8)
    o += 9
    if mask & M_TS:
        memcpy(o, &ts, 8)
        o += 8
    for k in range(NVALS):
        if mask & (2 << k):
            memcpy(o, &v[k], 8)
            o += 8
    return o


def pack_ticks(list ticks):
    """Check and encode tick objects in one pass, one batch record each.

    Returns (records, errors): `records[i]` is tick i as one record of a
    binary batch (the layout `encode_batch` writes after its header), or
    None if it was refused, as (index, symbol or None, message) in `errors`.
    `join_records` makes the batches. The publisher keeps the records it
    queues, so a tick is checked and encoded once."""
    cdef double v[7]
    cdef uint32_t mask
    cdef int64_t seq, ts
    cdef Py_ssize_t n
    records = [None] * len(ticks)
    errors = []
    for idx, t in enumerate(ticks):
        err = _check_tick(t, v, &mask, &seq, &ts)
        if err is None:
            b = (<dict>t)["sym"].encode()
            if not symbol_ok(b, len(b)):
                err = "bad symbol"
        if err is not None:
            errors.append((idx, t.get("sym") if type(t) is dict else None, err))
            continue
        n = len(b)
        r = PyBytes_FromStringAndSize(NULL, 10 + n + 8 * __builtin_popcount(mask))
        _put_record(PyBytes_AS_STRING(r), b, n, mask, seq, ts, v)
        records[idx] = r
    return records, errors


@cython.cdivision(True)   # parts >= 1, checked first
cdef list _batch_parts(const Py_ssize_t* size, int parts, char** at):
    """The FFT1 batches of a bus publish, one per partition: `size[j]` bytes
    of records and `size[parts + j]` records in partition j (b"" for none);
    `at[j]` gets where partition j's first record goes."""
    cdef list outs = []
    cdef int j
    cdef uint32_t cnt
    cdef char* o
    for j in range(parts):
        if size[parts + j] == 0:
            outs.append(b"")
            continue
        b = PyBytes_FromStringAndSize(NULL, 8 + size[j])
        outs.append(b)
        o = PyBytes_AS_STRING(b)
        memcpy(o, b"FFT1", 4)
        cnt = <uint32_t>size[parts + j]
        memcpy(o + 4, &cnt, 4)
        at[j] = o + 8
    return outs


def join_records(list records, int parts=1):
    """Batches, one per bus partition (b"" where a partition has none), of
    records `pack_ticks` wrote: the bytes `encode_batch` writes for those ticks."""
    cdef Py_ssize_t k, n, m = len(records)
    cdef int j
    cdef const char* r
    cdef Py_ssize_t* size
    cdef char** at
    cdef int* part
    if parts < 1:
        raise ValueError("parts must be at least 1")
    # per partition: bytes, then record count; per record: its partition
    size = <Py_ssize_t*>calloc(2 * parts, sizeof(Py_ssize_t))
    at = <char**>calloc(parts, sizeof(char*))
    part = <int*>calloc(m + 1, sizeof(int))
    if size == NULL or at == NULL or part == NULL:
        free(size)
        free(at)
        free(part)
        raise MemoryError()
    try:
        for k in range(m):
            x = records[k]
            if type(x) is not bytes:
                raise ValueError("not a record written by pack_ticks")
            r = PyBytes_AS_STRING(<bytes>x)
            n = PyBytes_GET_SIZE(<bytes>x)
            if n < 10 + <uint8_t>r[0] or n != 10 + <uint8_t>r[0] + 8 * __builtin_popcount(
                    <uint8_t>r[1 + <uint8_t>r[0]]):
                raise ValueError("not a record written by pack_ticks")
            j = <int>(_hash(r + 1, <uint8_t>r[0]) % <uint64_t>parts)
            part[k] = j
            size[j] += PyBytes_GET_SIZE(<bytes>records[k])
            size[parts + j] += 1
        outs = _batch_parts(size, parts, at)
        for k in range(m):
            j = part[k]
            memcpy(at[j], PyBytes_AS_STRING(<bytes>records[k]),
                   PyBytes_GET_SIZE(<bytes>records[k]))
            at[j] += PyBytes_GET_SIZE(<bytes>records[k])
    finally:
        free(size)
        free(at)
        free(part)
    return outs


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
