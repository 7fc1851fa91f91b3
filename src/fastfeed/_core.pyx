# cython: language_level=3
"""The compiled core, as Python sees it: one module, the names of its parts.

The core is three compiled parts, each with a .pxd for Cython callers:

* `fastfeed._wire`: field lists, symbols, partitions, the binary tick batch;
* `fastfeed._table`: state per kind (`Kind`) and the first kind, quotes
  (`Table`: instrument arrays, symbol map, change stamps, dirty bitmap);
* `fastfeed._books`: order books (`Books`: levels per side, tombstones,
  checksums, the FFK1 book record);
* `fastfeed._bars`, `fastfeed._trades`: the bar and trade kinds (`Bars`,
  `Trades` and its market-wide `Tape`);
* `fastfeed._hub`: the fan-out (`Hub`: groups, deadline heap, frames, sockets).

Python callers import from here; docs/core.md describes the layout and how to
add a kind of state.
"""

from fastfeed._defs cimport FF_DEBUG

from fastfeed._bars import BAR_INTERVALS, BarClock, Bars, day_bounds
from fastfeed._books import (
    BOOK_MAGIC,
    BOOK_OUTCOMES,
    Books,
    decode_books,
    encode_books,
)
from fastfeed._books import has_type
from fastfeed._delay import DelayedView, DelayLine
from fastfeed._hub import HUB_KINDS, Hub, can_send, connected
from fastfeed._table import Table
from fastfeed._trades import (
    TRADE_BATCH_MAGIC, Tape, Trades, bar_starts, check_trade, decode_trade_batch,
    encode_trade_batch,
)
from fastfeed._wire import (
    BATCH_MAGIC,
    BIN_HEADER_SIZE,
    BIN_MAGIC,
    FIELDS,
    OUTCOMES,
    ROW_DTYPE,
    SOURCES,
    VALUE_FIELDS,
    check_tick,
    decode_batch,
    encode_batch,
    join_records,
    pack_ticks,
    partition,
    valid_symbol,
    wall_ns,
)

# True in a build made with FASTFEED_DEBUG=1 (the core checks its invariants)
DEBUG = bool(FF_DEBUG)

__all__ = [
    "BAR_INTERVALS", "BATCH_MAGIC", "BIN_HEADER_SIZE", "BIN_MAGIC", "BOOK_MAGIC",
    "BOOK_OUTCOMES", "BarClock", "Bars", "Books", "DEBUG", "DelayLine", "DelayedView",
    "FIELDS", "HUB_KINDS", "Hub",
    "OUTCOMES", "ROW_DTYPE", "SOURCES", "TRADE_BATCH_MAGIC", "Table", "Tape", "Trades",
    "VALUE_FIELDS", "bar_starts", "can_send", "check_tick", "check_trade", "connected",
    "day_bounds", "decode_batch", "decode_books", "decode_trade_batch", "encode_batch",
    "encode_books", "encode_trade_batch", "has_type", "join_records", "pack_ticks",
    "partition", "valid_symbol", "wall_ns",
]
