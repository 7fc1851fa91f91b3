# The state the hub fans out, for Cython callers (`cimport fastfeed._table`).
#
# `Kind` is the seam between a kind of state (quotes today; books, trades and
# bars next) and the hub (_hub.pyx): the hub reads the fields below directly
# and calls its C methods once per distinct frame (section). docs/core.md says
# what a kind must provide and what it must never do on the hot path.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from fastfeed._defs cimport Stats


cdef class Kind:
    cdef:
        readonly Py_ssize_t size      # items (instruments) known; ids are 0 .. size-1
        readonly uint64_t version     # bumped by every applied change
        uint64_t* chg                 # version of each item's last change (its change stamp)
        int64_t* arrived              # wall ns of the last applied change, for latency
        uint64_t* dirty               # bitmap: changed since the hub last cleared it
        uint64_t swept                # version when the hub last cleared `dirty`
        uint8_t* watched              # watcher count > 0 (the hub keeps it)
        uint64_t* hot_bits            # bitmap: watched and changed since the last pump
        int32_t* hot                  # the same, as a list
        Py_ssize_t nhot
        Stats stats
        readonly str key              # JSON key of its section in an update frame ("rows", ...)
        readonly bint has_binary      # its items go in FFB1 frames to binary connections

    cdef Py_ssize_t section_bound(self, int32_t n) noexcept
    cdef char* encode_section(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              uint32_t* count, int64_t* oldest) except NULL
    cdef Py_ssize_t bin_bound(self, int32_t n, bint compact) noexcept
    cdef char* encode_bin(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                          bint compact, int64_t t, uint32_t* count,
                          int64_t* oldest) except NULL
    cdef Py_ssize_t compact_bound(self, int32_t n) noexcept
    cdef char* encode_compact(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                              int64_t t, uint32_t* count, int64_t* oldest) except NULL
    cdef int check(self) except -1
    cdef int _grow_items(self, Py_ssize_t old, Py_ssize_t cap) except -1


cdef class Table(Kind):
    cdef:
        readonly Py_ssize_t capacity
        readonly Py_ssize_t max_instruments
        readonly object arrays        # dict field name -> numpy array (length capacity)
        int64_t* seq
        int64_t* ts
        double* val[7]
        char* syms                    # SYM_MAX bytes per instrument
        uint8_t* symlen
        char* rowbuf                  # ROW_SLOT bytes per instrument: cached JSON row
        int32_t* rowlen
        uint64_t* rowver              # chg the cached row was encoded at
        uint16_t* rowoff              # NVALS + 1 per instrument: where each value's text starts
        uint64_t* fchg                # NFCHG per instrument: change stamp of ts and each value
        char* tokbuf                  # TOK_SLOT per instrument: its values' FFC1 tokens
        uint64_t* tokver              # chg the tokens were encoded at
        int32_t* hslots               # open-addressing symbol map
        Py_ssize_t hcap
        char refused_sym[32]          # the last symbol refused for a full table
        uint8_t refused_len

    cdef void _rehash_c(self, Py_ssize_t hcap) noexcept
    cdef int32_t find(self, const char* s, Py_ssize_t n) noexcept
    cdef int32_t intern(self, const char* s, Py_ssize_t n) except -2
    cdef int apply(self, int32_t iid, int64_t seq, int64_t ts, uint32_t mask,
                   const double* v, int64_t now) noexcept
    cdef char* _row_head(self, char* p, int32_t iid) noexcept
    cdef const char* row_json(self, int32_t iid, int32_t* n) except NULL
    cdef char* _rows(self, char* p, const int32_t* ids, int32_t n, uint64_t since,
                     bint compact, int64_t t, uint32_t* count, int64_t* oldest) except NULL
    cdef uint32_t _changed(self, int32_t iid, uint64_t since) noexcept
    cdef char* _compact_row(self, char* p, int32_t iid, uint64_t since, int64_t t) except NULL
    cdef const char* _tokens(self, int32_t iid) noexcept
    cdef char* _compact_bin_row(self, char* p, int32_t iid, uint64_t since, int64_t t) noexcept
    cdef void row_bin(self, int32_t iid, char* out) noexcept
