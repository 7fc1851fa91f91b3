# The fan-out, for Cython callers (`cimport fastfeed._hub`): connections, their
# subscription groups, the deadline heap and the frame arena. The hub knows
# nothing of quotes: it reads change stamps and dirty bits of a `Kind` and asks
# it to encode frames (see _table.pxd and docs/core.md).

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from picows.picows cimport WSTransport

from fastfeed._table cimport Kind


cdef bint writable(WSTransport tr) noexcept


cdef enum ConnFlag:
    F_ACTIVE = 1
    F_IN_HEAP = 2
    F_PAUSED = 4
    F_BINARY = 8


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
        readonly Kind table
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
    cdef int _check(self) except -1
