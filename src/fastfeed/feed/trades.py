"""Trades at the sink: messages of `"type":"trade"` among the ticks of one
/ingest message (docs/protocol.md "Ingest of books and trades").

The sink sorts one decoded message's objects by type (`sink.split_kinds`),
keeping each one's index in the message so errors name the object the
publisher sent; `apply_local` applies the trades to the gateway's `Trades` kind (which feeds
the tape and the bars). Binary trade batches (magic ``FTR1``) go straight to
`Trades.apply_batch`.
"""

from __future__ import annotations

from typing import Any

Errors = list[tuple[int, Any, str]]


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
