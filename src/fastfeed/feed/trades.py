"""Trades at the sink: messages of `"type":"trade"` among the ticks of one
/ingest message (docs/protocol.md "Ingest of books and trades").

`split` sorts one decoded message's objects by type, keeping each one's
index in the message so errors name the object the publisher sent;
`apply_local` applies the trades to the gateway's `Trades` kind (which feeds
the tape and the bars). Binary trade batches (magic ``FTR1``) go straight to
`Trades.apply_batch`.
"""

from __future__ import annotations

from typing import Any

from .. import protocol as P

Errors = list[tuple[int, Any, str]]


def split(msgs: list[Any]) -> tuple[list[Any], list[int], list[Any], list[int], Errors]:
    """(quotes, their indices, trades, their indices, errors for unknown types)."""
    quotes: list[Any] = []
    qidx: list[int] = []
    trades: list[Any] = []
    tidx: list[int] = []
    errors: Errors = []
    for i, m in enumerate(msgs):
        kind = m.get("type") if type(m) is dict else None
        if kind is None or kind == P.TYPE_QUOTE:
            quotes.append(m)
            qidx.append(i)
        elif kind == P.TYPE_TRADE:
            trades.append(m)
            tidx.append(i)
        else:
            errors.append((i, m.get("sym"), f"unknown type {kind!r}: this gateway takes "
                                            f"{', '.join(P.INGEST_TYPES)}"))
    return quotes, qidx, trades, tidx, errors


def renumber(errors: Errors, idx: list[int]) -> Errors:
    """Errors of a sub-list, with the indices of the whole message."""
    return [(idx[i], sym, why) for i, sym, why in errors]


def apply_local(trades_kind: Any, trades: list[Any], idx: list[int], source: int) -> Errors:
    """Apply trades to the kind; the refused ones, indexed in the message."""
    if trades_kind is None:
        return [(i, t.get("sym"), "this gateway does not take trades") for i, t in
                zip(idx, trades, strict=True)]
    _, _, errors = trades_kind.apply_objects(trades, source)
    return renumber(errors, idx)
