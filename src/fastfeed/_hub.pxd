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
    F_COMPACT = 16     # the compact subprotocol: quote rows carry only changed fields


cdef enum:
    # kinds one hub fans out: quotes, books, trades, bars and the tape, real time
    # and per delay served (a slot mask is a uint32_t)
    MAX_SLOTS = 32
    # cached frames per group: text; FFB1; the JSON companion of FFB1 and FFC1;
    # compact text; FFC1 (compact binary)
    NFMT = 5
    KEY_MAX = 24         # longest `,"key":[` a kind may have
    OVERRUN_NS = 1_000_000  # a frame cycle's work past this counts as an overrun


cdef struct Conn:
    int32_t group
    int32_t gnext
    int32_t gprev
    uint32_t flags
    int64_t due
    int64_t interval
    int64_t last_send
    int64_t paused_at
    uint64_t pump_sent
    uint64_t sent_ver[MAX_SLOTS]   # per slot: that kind's version at this connection's last frame


cdef struct Group:
    int32_t* ids                  # every slot's ids, sorted, slot after slot
    int32_t off[MAX_SLOTS + 1]    # slot s holds ids[off[s]:off[s+1]]
    uint32_t slots                # bit s: slot s holds ids
    int32_t head
    int32_t members
    uint64_t mark
    uint64_t cache_pump[NFMT]
    uint64_t cache_ver[NFMT * MAX_SLOTS]
    Py_ssize_t cache_off[NFMT]
    Py_ssize_t cache_len[NFMT]


cdef struct HeapItem:
    int64_t due
    int32_t cid


cdef class Hub:
    cdef:
        readonly Kind table           # slot 0
        readonly list kinds           # slot -> Kind
        Py_ssize_t nslots
        void* kptr[MAX_SLOTS]         # borrowed from `kinds`
        int32_t keyof[MAX_SLOTS]      # slot -> its key's index (slots sharing a key share one)
        int32_t nkeys
        char keytxt[MAX_SLOTS][KEY_MAX]   # per key: ,"key":[
        int32_t keylen[MAX_SLOTS]
        uint32_t fmt_mask[NFMT]       # per cached format, the slots it carries
        dict key_of                   # group -> its key in group_keys
        list transports
        list closing                  # per connection: its socket transport's is_closing
        public object capture         # list of (cid, bytes) instead of sockets; for tests
        Conn* conns
        Py_ssize_t nconns_cap
        int32_t* free_conns
        Py_ssize_t nfree_conns
        readonly Py_ssize_t nconns
        readonly Py_ssize_t watches   # (connection, item) watch entries
        Group* groups
        Py_ssize_t ngroups_cap
        int32_t* free_groups
        Py_ssize_t nfree_groups
        dict group_keys
        int32_t** rev[MAX_SLOTS]      # per slot: item -> groups holding it
        int32_t* rev_n[MAX_SLOTS]
        int32_t* rev_cap[MAX_SLOTS]
        int32_t** wrev[MAX_SLOTS]     # per slot: item -> connections watching it
        int32_t* wrev_n[MAX_SLOTS]
        int32_t* wrev_cap[MAX_SLOTS]
        Py_ssize_t inst_cap[MAX_SLOTS]
        HeapItem* heap
        Py_ssize_t heap_n
        Py_ssize_t heap_cap
        char* arena
        Py_ssize_t arena_len
        Py_ssize_t arena_cap
        uint64_t pump_no
        int64_t slack
        int64_t cycle_ns              # work of the frame cycle so far, over the slices it ran in
        readonly int64_t floor_ns     # under load: no update frame sooner than this
        int64_t* lat_ring
        Py_ssize_t lat_n

    cdef int32_t _alloc_group(self) except -1
    cdef void _ensure_inst(self, Py_ssize_t s, Py_ssize_t n) except *
    cdef void _push_vec(self, int32_t** vec, int32_t* vn, int32_t* vcap, int32_t i,
                        int32_t x) except *
    cdef bint _drop_vec(self, int32_t** vec, int32_t* vn, int32_t i, int32_t x) noexcept
    cdef void _leave_group(self, int32_t cid) except *
    cdef void _unwatch_all(self, int32_t cid) noexcept
    cdef void _heap_push(self, int64_t due, int32_t cid) except *
    cdef HeapItem _heap_pop(self) noexcept
    cdef void _schedule(self, int32_t cid, int64_t due) except *
    cdef void _sweep(self, Py_ssize_t s) except *
    cdef int _send(self, int32_t cid, int binary, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int _build(self, Group* G, Conn* c, int fmt, int64_t wall) except -1
    cdef int _serve(self, int32_t cid, Group* G, Conn* c, int fmt, int64_t wall) except -1
    cdef int _frame(self, int32_t cid, int64_t now, int64_t wall) except -1
    cdef int _check(self) except -1
