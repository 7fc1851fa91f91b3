# cython: language_level=3
"""The compiled core, as Python sees it: one module, the names of its parts.

The core is three compiled parts, each with a .pxd for Cython callers:

* `fastfeed._wire`: field lists, symbols, partitions, the binary tick batch;
* `fastfeed._table`: state per kind (`Kind`) and the first kind, quotes
  (`Table`: instrument arrays, symbol map, change stamps, dirty bitmap);
* `fastfeed._books`: order books (`Books`: levels per side, tombstones,
  checksums, the FFK1 book record);
* `fastfeed._hub`: the fan-out (`Hub`: groups, deadline heap, frames, sockets).

Python callers import from here; docs/core.md describes the layout and how to
add a kind of state.
"""

from fastfeed._defs cimport FF_DEBUG

from fastfeed._books import (
    BOOK_MAGIC,
    BOOK_OUTCOMES,
    Books,
    decode_books,
    encode_books,
)
from fastfeed._books import has_type
from fastfeed._delay import DelayLine
from fastfeed._hub import Hub, can_send, connected
from fastfeed._table import Table
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
    partition,
    valid_symbol,
    wall_ns,
)

# True in a build made with FASTFEED_DEBUG=1 (the core checks its invariants)
DEBUG = bool(FF_DEBUG)

__all__ = [
    "BATCH_MAGIC", "BIN_HEADER_SIZE", "BIN_MAGIC", "BOOK_MAGIC", "BOOK_OUTCOMES", "DEBUG",
    "FIELDS", "DelayLine", "OUTCOMES", "ROW_DTYPE", "SOURCES", "VALUE_FIELDS", "Books", "Hub",
    "Table", "can_send", "check_tick", "connected", "decode_batch", "decode_books",
    "encode_batch", "encode_books", "has_type", "partition", "valid_symbol", "wall_ns",
]
