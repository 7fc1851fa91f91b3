# Constants, counters and small inline helpers shared by the compiled parts of
# the core (_wire, _table, _hub). Header only: there is no _defs module, every
# part gets its own copy of the inline functions, so none costs a call.

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport realloc
from libc.string cimport memcpy, memset

# FF_DEBUG is 1 in a build made with FASTFEED_DEBUG=1 (setup.py defines the C
# macro) and 0 otherwise, as a C constant: `if FF_DEBUG:` blocks are compiled
# away from release builds.
cdef extern from *:
    """
    #ifndef FASTFEED_DEBUG
    #define FASTFEED_DEBUG 0
    #endif
    """
    bint FF_DEBUG "FASTFEED_DEBUG"

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


cdef enum:
    NVALS = 7            # bid, ask, last, bid_size, ask_size, last_size, volume
    NFCHG = 8            # per-field change stamps per instrument: ts, then the NVALS values
    SYM_MAX = 32
    ROW_SLOT = 288       # longest JSON row: 32-char symbol, two int64, seven 24-char floats
    BIN_ROW = 104        # ROW_DTYPE.itemsize
    BIN_HEADER = 16
    HEADROOM = 16        # room picows needs in front of a frame for its header

cdef enum:  # tick outcomes
    APPLIED = 0
    STALE = 1
    REJECTED = 2

cdef enum:  # tick sources
    SRC_INGEST = 0
    SRC_BUS = 1
    SRC_SIMULATOR = 2
    NSOURCES = 3

# mask bits of a tick: which fields it carries besides sym and seq
cdef enum:
    M_TS = 1
    M_ALL = 0xFF


cdef struct Stats:
    uint64_t ticks[3][3]       # [source][outcome]
    uint64_t frames            # update frames written to sockets
    uint64_t frames_built      # distinct frames encoded (the rest were shared)
    uint64_t rows_encoded
    uint64_t bytes_sent
    uint64_t conflated         # frames skipped because the client was not draining
    uint64_t watched_pushes
    uint64_t heartbeats
    uint64_t pumps
    uint64_t overruns          # pumps that ran out of their time slice
    uint64_t refused           # new symbols refused: the table is at max_instruments
    int64_t build_ns           # time spent building and sending frames


cdef inline int64_t _clock(int which) noexcept nogil:
    cdef timespec tp
    clock_gettime(which, &tp)
    return <int64_t>tp.tv_sec * 1000000000 + tp.tv_nsec


cdef inline void* _grow(void* p, Py_ssize_t old_bytes, Py_ssize_t new_bytes,
                        int fill) except NULL:
    cdef void* q = realloc(p, new_bytes)
    if q == NULL:
        raise MemoryError()
    memset(<char*>q + old_bytes, fill, new_bytes - old_bytes)
    return q
