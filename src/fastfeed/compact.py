"""Decode the compact subprotocol's update rows (docs/protocol.md, "Compact rows").

A compact row is ``[sym, seq, mask, ...]``: bit 0 of `mask` says the row carries
``t - ts`` (the frame's `t` minus the source time), bit k (1..7) that it carries
``VALUE_FIELDS[k-1]``; the values follow in that order. Fields a row leaves out
kept their value. `CompactState` holds the full rows one connection was sent
and turns every compact row back into one (the same row a v1 client holds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .protocol import VALUE_FIELDS

NVALS = len(VALUE_FIELDS)


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
