"""A client's copy of one order book, kept as the wire contract says.

    book = OrderBook("BBCA")
    book.apply(entry)          # a snapshot or update entry of "books"
    book.bids[0]               # [price, volume, orders], best first
    book.checksum() == entry["checksum"]

A level is ``[price, volume, orders]``; bids are held best (highest) first,
asks best (lowest) first. An entry with ``"full": true`` (and every snapshot
entry) replaces the book; otherwise its levels are price-keyed changes: volume
0 removes that price, any other volume sets it. After each entry only the best
`depth` levels per side are kept, as the gateway serves them, so `depth` must
be the gateway's (``BOOK_DEPTH``, 10, unless it runs with another).

`checksum` is the contract's: the unsigned CRC-32 (`zlib.crc32`) of, for
each held ask from best to worst and then each held bid from best to worst,
its price and volume as IEEE-754 binary64 little-endian.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .protocol import BOOK_DEPTH

__all__ = ["OrderBook", "book_checksum"]

_PAIR = struct.Struct("<dd")


def book_checksum(bids: Iterable[Sequence[float]], asks: Iterable[Sequence[float]],
                  depth: int = BOOK_DEPTH) -> int:
    """The contract's checksum of a book's best `depth` levels per side
    (levels best first, as ``[price, volume, ...]``)."""
    pack = _PAIR.pack
    crc = 0
    for side in (asks, bids):
        for k, lv in enumerate(side):
            if k >= depth:
                break
            crc = zlib.crc32(pack(float(lv[0]), float(lv[1])), crc)
    return crc


def _level(raw: Sequence[Any]) -> list[Any]:
    return [float(raw[0]), float(raw[1]), int(raw[2]) if len(raw) > 2 else 0]


class OrderBook:
    """One instrument's book as a client holds it (see the module)."""

    __slots__ = ("asks", "bids", "depth", "seq", "stale", "sym")

    def __init__(self, sym: str, depth: int = BOOK_DEPTH) -> None:
        self.sym = sym
        self.depth = depth
        self.seq = 0
        #: [price, volume, orders], best (highest) first
        self.bids: list[list[Any]] = []
        #: [price, volume, orders], best (lowest) first
        self.asks: list[list[Any]] = []
        #: the gateway said the book is stale (a gap or a crossed change at
        #: its source); its next full book makes it ok again
        self.stale = False

    def __repr__(self) -> str:
        return (f"OrderBook({self.sym!r}, seq={self.seq}, bids={self.bids[:3]}..., "
                f"asks={self.asks[:3]}...{', stale' if self.stale else ''})")

    def apply(self, entry: Mapping[str, Any], full: bool | None = None) -> bool:
        """Apply one ``books`` entry (a snapshot entry when `full` is true;
        otherwise its own ``"full"`` decides). Returns whether the book now
        matches the entry's ``checksum`` (True when it carries none)."""
        if full is None:
            full = bool(entry.get("full"))
        bids = entry.get("bids") or ()
        asks = entry.get("asks") or ()
        if full:
            self.bids = sorted((_level(lv) for lv in bids if lv[1] > 0),
                               key=lambda lv: -lv[0])[: self.depth]
            self.asks = sorted((_level(lv) for lv in asks if lv[1] > 0),
                               key=lambda lv: lv[0])[: self.depth]
        else:
            _change(self.bids, bids, True, self.depth)
            _change(self.asks, asks, False, self.depth)
        seq = entry.get("seq")
        if seq is not None:
            self.seq = int(seq)
        want = entry.get("checksum")
        return want is None or self.checksum() == int(want)

    def checksum(self) -> int:
        """The contract's checksum of the levels held."""
        return book_checksum(self.bids, self.asks, self.depth)

    @property
    def best_bid(self) -> list[Any] | None:
        return self.bids[0] if self.bids else None

    @property
    def best_ask(self) -> list[Any] | None:
        return self.asks[0] if self.asks else None


def _change(side: list[list[Any]], changes: Iterable[Sequence[Any]], bids: bool,
            depth: int) -> None:
    """Price-keyed changes into one side, kept best first and `depth` long.
    A side is at most `depth` (10) levels: a linear search beats bisect's
    key juggling here."""
    for raw in changes:
        price = float(raw[0])
        vol = float(raw[1])
        k = 0
        n = len(side)
        if bids:
            while k < n and side[k][0] > price:
                k += 1
        else:
            while k < n and side[k][0] < price:
                k += 1
        here = k < n and side[k][0] == price
        if vol == 0:
            if here:
                del side[k]
        elif here:
            side[k][1] = vol
            side[k][2] = int(raw[2]) if len(raw) > 2 else 0
        else:
            side.insert(k, [price, vol, int(raw[2]) if len(raw) > 2 else 0])
    del side[depth:]
