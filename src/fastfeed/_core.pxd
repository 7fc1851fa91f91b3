# The C-level interface of the core, for Cython callers (`cimport fastfeed._core`).
# Python callers see the same objects through _core.pyi.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from picows.picows cimport WSTransport


cdef enum:
    NVALS = 7            # bid, ask, last, bid_size, ask_size, last_size, volume
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


cdef bint symbol_ok(const char* s, Py_ssize_t n) noexcept
cdef bint writable(WSTransport tr) noexcept


cdef class Table:
    cdef:
        readonly Py_ssize_t capacity
        readonly Py_ssize_t size
        readonly Py_ssize_t max_instruments
        readonly uint64_t version
        readonly object arrays        # dict field name -> numpy array (length capacity)
        int64_t* seq
        int64_t* ts
        double* val[7]
        uint64_t* chg                 # version of each instrument's last change
        int64_t* arrived              # wall ns of the last applied tick, for latency
        uint64_t* dirty               # bitmap: changed since the last pump
        uint8_t* watched              # watcher count > 0
        uint64_t* hot_bits            # bitmap: watched and changed since the last pump
        int32_t* hot                  # the same, as a list
        Py_ssize_t nhot
        char* syms                    # SYM_MAX bytes per instrument
        uint8_t* symlen
        char* rowbuf                  # ROW_SLOT bytes per instrument: cached JSON row
        int32_t* rowlen
        uint64_t* rowver              # chg the cached row was encoded at
        int32_t* hslots               # open-addressing symbol map
        Py_ssize_t hcap
        Stats stats
        char refused_sym[32]          # the last symbol refused for a full table
        uint8_t refused_len

    cdef void _rehash_c(self, Py_ssize_t hcap) noexcept
    cdef int32_t find(self, const char* s, Py_ssize_t n) noexcept
    cdef int32_t intern(self, const char* s, Py_ssize_t n) except -2
    cdef int apply(self, int32_t iid, int64_t seq, int64_t ts, uint32_t mask,
                   const double* v, int64_t now) noexcept
    cdef const char* row_json(self, int32_t iid, int32_t* n) except NULL
    cdef void row_bin(self, int32_t iid, char* out) noexcept


cdef struct Conn:
    int32_t group
    int32_t gnext
    int32_t gprev
    uint32_t flags
    uint64_t sent_ver
    int64_t due
    int64_t interval
    int64_t last_send
    int64_t paused_at
    uint64_t pump_sent


cdef struct Group:
    int32_t* ids
    int32_t n
    int32_t head
    int32_t members
    uint64_t mark
    uint64_t cache_pump[2]
    uint64_t cache_ver[2]
    Py_ssize_t cache_off[2]
    Py_ssize_t cache_len[2]


cdef struct HeapItem:
    int64_t due
    int32_t cid


cdef class Hub:
    cdef:
        readonly Table table
        list transports
        public object capture         # list of (cid, bytes) instead of sockets; for tests
        Conn* conns
        Py_ssize_t nconns_cap
        int32_t* free_conns
        Py_ssize_t nfree_conns
        readonly Py_ssize_t nconns
        Group* groups
        Py_ssize_t ngroups_cap
        int32_t* free_groups
        Py_ssize_t nfree_groups
        dict group_keys
        int32_t** rev                 # instrument -> groups holding it
        int32_t* rev_n
        int32_t* rev_cap
        int32_t** wrev                # instrument -> connections watching it
        int32_t* wrev_n
        int32_t* wrev_cap
        Py_ssize_t inst_cap
        HeapItem* heap
        Py_ssize_t heap_n
        Py_ssize_t heap_cap
        char* arena
        Py_ssize_t arena_len
        Py_ssize_t arena_cap
        uint64_t pump_no
        int64_t slack
        readonly int64_t floor_ns     # under load: no update frame sooner than this
        int64_t* lat_ring
        Py_ssize_t lat_n

    cdef int32_t _alloc_group(self) except -1
    cdef void _ensure_inst(self, Py_ssize_t n) except *
    cdef void _push_vec(self, int32_t** vec, int32_t* vn, int32_t* vcap, int32_t i,
                        int32_t x) except *
    cdef void _drop_vec(self, int32_t** vec, int32_t* vn, int32_t i, int32_t x) noexcept
    cdef void _leave_group(self, int32_t cid) except *
    cdef void _heap_push(self, int64_t due, int32_t cid) except *
    cdef HeapItem _heap_pop(self) noexcept
    cdef void _schedule(self, int32_t cid, int64_t due) except *
    cdef int _send(self, int32_t cid, int binary, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int _frame(self, int32_t cid, int64_t now, int64_t wall) except -1
