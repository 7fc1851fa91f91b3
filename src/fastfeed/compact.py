"""Decode the compact subprotocols' update rows (docs/protocol.md, "Compact rows").

A compact row is ``[sym, seq, mask, ...]``: bit 0 of `mask` says the row carries
``t - ts`` (the frame's `t` minus the source time), bit k (1..7) that it carries
``VALUE_FIELDS[k-1]``; the values follow in that order. Fields a row leaves out
kept their value. `CompactState` holds the full rows one connection was sent
and turns every compact row back into one (the same row a v1 client holds).
``fastfeed.v1.compact.bin`` carries the same rows in FFC1 frames
(`decode_compact_bin`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from .protocol import COMPACT_BIN_MAGIC, VALUE_FIELDS

NVALS = len(VALUE_FIELDS)
VALUE_F64 = 31  # a value token: the 8 bytes of a double follow
_HEADER = struct.Struct("<4sIq")
_F64 = struct.Struct("<d")
_P10 = [10.0**k for k in range(16)]  # every one exact


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    u = shift = 0
    while True:
        b = buf[i]
        i += 1
        u |= (b & 0x7F) << shift
        if b < 0x80:
            return u, i
        shift += 7
        if shift > 63:
            raise ValueError("compact binary frame: a varint longer than 10 bytes")


def decode_compact_bin(buf: bytes | bytearray | memoryview) -> tuple[int, list[list[Any]]]:
    """An FFC1 frame as ``(t, rows)``, each row as a JSON compact row is
    (``[sym, seq, mask, t - ts if bit 0, values...]``); ValueError if it is
    not one."""
    buf = bytes(buf)
    magic, count, t = _HEADER.unpack_from(buf, 0) if len(buf) >= 16 else (b"", 0, 0)
    if magic != COMPACT_BIN_MAGIC:
        raise ValueError(f"not a compact binary frame (magic {magic!r})")
    rows: list[list[Any]] = []
    i = 16
    try:
        for _ in range(count):
            n = buf[i]
            sym = buf[i + 1:i + 1 + n].decode("ascii")
            i += 1 + n
            mask = buf[i]
            seq, i = _varint(buf, i + 1)
            row: list[Any] = [sym, seq, mask]
            if mask & 1:
                z, i = _varint(buf, i)
                row.append((z >> 1) ^ -(z & 1))  # zigzag
            for j in range(NVALS):
                if mask & (2 << j):
                    u, i = _varint(buf, i)
                    if u == VALUE_F64:
                        row.append(_F64.unpack_from(buf, i)[0])
                        i += 8
                        continue
                    # +-m / 10**c (one correctly rounded division, as the gateway
                    # checked), or for c 12..15 the exact m * 10**(c - 11)
                    c = (u >> 1) & 15
                    v = (u >> 5) / _P10[c] if c < 12 else (u >> 5) * _P10[c - 11]
                    row.append(-v if u & 1 else v)
            rows.append(row)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise ValueError("compact binary frame: truncated or malformed") from None
    if i != len(buf):
        raise ValueError(f"compact binary frame: {len(buf) - i} bytes after its {count} rows")
    return t, rows


class CompactState:
    """Full rows by symbol, fed by snapshots (full rows) and compact updates.

    `base(sym)`: the row a client already holds for a symbol this connection
    has not sent yet (a resume's snapshot leaves out rows the client has up to
    date), or None: a row first met in an update then starts from it.
    """

    def __init__(self, base: Callable[[str], Sequence[Any] | None] | None = None) -> None:
        self.rows: dict[str, list] = {}
        self.base = base

    def snapshot(self, rows: Sequence[Sequence[Any]]) -> None:
        """Take the full rows of a `snapshot` message."""
        for r in rows:
            self.rows[r[0]] = list(r)

    def update_binary(self, buf: bytes | bytearray | memoryview) -> tuple[int, list[list]]:
        """Apply an FFC1 frame; returns its `t` and the full rows it made."""
        t, rows = decode_compact_bin(buf)
        return t, self.update({"t": t, "rows": rows})

    def update(self, msg: dict) -> list[list]:
        """Apply an `update` message's compact rows; returns the full rows they made."""
        t = msg["t"]
        out = []
        for r in msg["rows"]:
            sym, seq, mask = r[0], r[1], r[2]
            if not isinstance(mask, int) or not 0 <= mask < 1 << (NVALS + 1):
                raise ValueError(f"compact row of {sym!r}: bad field mask {mask!r}")
            row = self.rows.get(sym)
            if row is None:  # first met in an update: what the client holds, or the zero state
                held = self.base(sym) if self.base is not None else None
                row = self.rows[sym] = (list(held) if held is not None
                                        else [sym, 0, 0] + [0.0] * NVALS)
            row[1] = seq
            k = 3
            if mask & 1:
                row[2] = t - r[k]
                k += 1
            for j in range(NVALS):
                if mask & (2 << j):
                    row[3 + j] = float(r[k])
                    k += 1
            if k != len(r):
                raise ValueError(f"compact row of {sym!r}: {len(r)} items, mask says {k}")
            out.append(row)
        return out
