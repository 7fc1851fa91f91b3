# Trades (the running trade) and the market-wide tape, for Cython callers
# (`cimport fastfeed._trades`); see _trades.pyx and docs/core.md.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

from fastfeed._bars cimport Bars
from fastfeed._table cimport Kind, Table

cdef enum:
    TRADE_SLOT = 104    # longest JSON trade: two int64, two 24-char floats, side
    TAPE_SLOT = 144     # the same with the symbol in front


cdef struct TradeLog:   # one instrument, allocated at its first trade
    uint64_t* stamp     # `backlog` slots: change stamp of each recent trade, by ordinal
    int64_t* tseq       # `backlog` slots
    char* enc           # `ring` slots of TRADE_SLOT bytes: each trade's JSON, encoded once
    int32_t* enclen


cdef struct TradeRec:   # one applied trade as the delay line keeps it (docs/delay.md)
    int64_t tseq
    int64_t ts
    double price
    double size
    int32_t iid
    int32_t side


cdef class Tape(Kind):
    cdef:
        readonly int32_t ring         # trades held market-wide
        char* enc                     # ring * TAPE_SLOT
        int32_t* enclen

    cdef void push(self, const char* sym, Py_ssize_t symlen, const char* trade,
                   int32_t n, int64_t now) noexcept
    cdef void copy_state(self, Tape other) noexcept


cdef class Trades(Kind):
    cdef:
        readonly Table table
        readonly Tape tape
        readonly object bars          # a Bars fed by every applied trade, or None
        Bars _bars
        readonly int32_t ring         # trades held per instrument (bytes)
        readonly int32_t backlog      # change stamps held per instrument (exact `lost`)
        int64_t* last                 # tseq of the last applied trade, -1 before any
        uint64_t* ntr                 # trades applied (the next trade's ordinal)
        uint8_t* seeded               # the ring was loaded from the store (seed)
        uint64_t* heldfrom            # the ring holds no ordinal below this (a gap, see _gap)
        TradeLog* logs
        readonly uint64_t lost_inexact  # frames whose `lost` is a lower bound (see docs)
        readonly Py_ssize_t held      # trades held in every ring together (bounds sections)
        # every applied trade since the delay line last took them (journaling on)
        bint journaling
        TradeRec* journal
        Py_ssize_t jn, jcap

    cdef int _reserve(self, Py_ssize_t items) except -1
    cdef int _gap(self, int32_t iid, int64_t tseq) except -1
    cdef int apply(self, int32_t iid, int64_t tseq, int64_t ts, double price, double size,
                   int side, int64_t now) except -1
    cdef int copy_state(self, Trades other) except -1
    cdef tuple _apply_batch(self, const unsigned char[::1] data, int source, bint seed)
    cdef int _one(self, object t, int source, int64_t now, list errors,
                  Py_ssize_t idx) except -1
