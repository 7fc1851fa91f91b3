# Bars (OHLCV candles) built from applied trades, for Cython callers
# (`cimport fastfeed._bars`). Item id = instrument id * NBARIV + interval index
# (1s, 1m, 5m, 15m, 1h, 1d); see _bars.pyx and docs/core.md.

from libc.stdint cimport int32_t, int64_t, uint64_t

from fastfeed._table cimport Kind, Table

cdef enum:
    NBARIV = 6          # intervals: 1s 1m 5m 15m 1h 1d
    BAR_SLOT = 176      # longest JSON bar: two int64, five 24-char floats
    BUS_BAR = 56        # a bar as the bus stores it: i64 start, f64 o h l c v n


cdef struct Bar:
    int64_t start       # ns since the epoch
    double open, high, low, close, volume
    int64_t n           # trades in the bar
    uint64_t stamp      # version of the bar's last change


cdef struct BarRing:    # one (instrument, interval): held bars, oldest first
    Bar* b              # `history` slots, NULL until its first trade
    int32_t head        # slot of the oldest bar
    int32_t cnt
    uint64_t late       # stamp of the last change to a bar other than the newest


cdef class BarClock:          # the start of a trade's bar in each interval
    cdef:
        readonly str tz
        object zone
        int64_t day_lo[2]             # two cached days of the zone: [lo, hi)
        int64_t day_hi[2]

    cdef int64_t start(self, int64_t ts, int k) except? -1


cdef class Bars(Kind):
    cdef:
        readonly Table table
        readonly int32_t history      # bars held per (instrument, interval)
        readonly str tz
        readonly BarClock clock
        readonly Py_ssize_t held      # bars held in every ring together (bounds sections)
        BarRing* rings
        char* enc                     # BAR_SLOT per item: the newest bar's JSON, cached
        int32_t* enclen
        uint64_t* encstamp
        int64_t* encstart

    cdef int _reserve(self, Py_ssize_t items) except -1
    cdef int copy_state(self, Bars other) except -1
    cdef int add(self, int32_t iid, int64_t ts, double price, double size,
                 int64_t now) except -1
    cdef char* _bar(self, char* p, int32_t item, const Bar* b) except NULL
    cdef char* _head(self, char* p, int32_t item) noexcept
    cdef void _touch(self, int32_t item, uint64_t ver, int64_t now) noexcept
