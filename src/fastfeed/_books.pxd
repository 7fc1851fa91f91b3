# Order books, the second kind of state (`cimport fastfeed._books`).
#
# Item id = instrument id of the quote Table's symbol map. Per instrument a
# book keeps up to `levels` price levels per side (sorted, best first) and
# serves the best `depth`; a level's change stamp says when it last changed
# or came into view, a tombstone when a price left the view. docs/core.md
# ("The Books kind") has the rules.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

from fastfeed._table cimport Kind, Table


cdef struct Level:
    double price
    double vol
    uint64_t stamp        # version when it last changed or came into view
    uint32_t orders
    uint32_t _pad


cdef struct Tomb:
    double price          # a price that left the best depth
    uint64_t stamp        # at this version


cdef struct Book:
    int64_t seq
    uint64_t floor        # a client whose since is below this gets a full book
    int32_t n[2]          # kept levels: [0] bids, [1] asks
    int32_t nt[2]         # tombstones per side
    uint8_t stale
    uint32_t crc
    uint64_t crc_ver
    char* snap            # cached snapshot entry (lazily allocated, `entry_bound` bytes)
    int32_t snap_len
    uint64_t snap_ver
    char* diff            # cached update entry for one (chg, since class)
    int32_t diff_len
    uint64_t diff_ver
    uint64_t diff_cs


cdef class Books(Kind):
    cdef:
        readonly Table table
        readonly int32_t depth        # levels served per side
        readonly int32_t levels       # levels kept per side
        readonly int32_t tombs        # tombstones kept per side
        readonly Py_ssize_t capacity  # item ids allocated
        readonly Py_ssize_t nbooks    # books that hold (or held) state
        readonly Py_ssize_t entry_bound
        int32_t* slot                 # iid -> book index, -1 for none
        int32_t* owner                # book index -> iid
        Book* books
        Level* lv                     # (book * 2 + side) * levels + k
        Tomb* tb                      # (book * 2 + side) * tombs + k
        Py_ssize_t books_cap
        Level* scratch                # 2 * levels: an incremental's result before it is kept
        Level* oldvis                 # 2 * depth: the view before a change
        list events
        uint64_t counts[6]

    cdef int32_t _book(self, int32_t iid) except -1
    cdef Level* _side(self, int32_t b, int32_t side) noexcept
    cdef Tomb* _tside(self, int32_t b, int32_t side) noexcept
    cdef char* _head(self, char* p, int32_t iid, int64_t seq) noexcept
    cdef char* _tail(self, char* p, int32_t b) noexcept
    cdef int apply_book(self, int32_t iid, int64_t seq, bint full, int32_t nb, int32_t na,
                        const double* px, const double* vol, const uint32_t* orders,
                        int64_t now) except -1
    cdef int replace(self, int32_t iid, int64_t seq, int32_t nb, int32_t na,
                     const Level* bids, const Level* asks, int64_t now) except -1
    cdef void _commit(self, int32_t b, int32_t iid, int64_t seq, const int32_t* nnew,
                      int64_t now) noexcept
    cdef void _stamp(self, int32_t b, int32_t side, int32_t nold) noexcept
    cdef void _tomb(self, int32_t b, int32_t side, double price, uint64_t stamp) noexcept
    cdef void _untomb(self, int32_t b, int32_t side, double price) noexcept
    cdef void _mark(self, int32_t iid, int64_t now) noexcept
    cdef int _set_stale(self, int32_t b, int32_t iid, bint stale) except -1
    cdef uint32_t _crc(self, int32_t b) noexcept
    cdef char* _levels(self, char* p, int32_t b, int32_t side) except NULL
    cdef const char* _snap(self, int32_t iid, int32_t* n) except NULL
    cdef char* _entry(self, char* p, int32_t iid, uint64_t since) except NULL
