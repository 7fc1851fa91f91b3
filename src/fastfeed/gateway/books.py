"""The book channel of the gateway (contract v1.1 "Order books"): its hub
slot, its entry in the channel registry, and the status messages of books
that go stale or heal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .registry import Channel

BOOK_CHANNEL = "book"


def book_channel(hub: Any, books: Any) -> Channel:
    """Give `books` (a `fastfeed._core.Books`) a hub slot; the channel that serves it.

    Item id = instrument id (`Books.item` makes room for any instrument, so
    a book may be subscribed and watched before it holds anything);
    snapshots leave out books that hold nothing yet.
    """
    slot = hub.add_kind(books)
    return Channel(name=BOOK_CHANNEL, slot=slot, key="books", item=books.item,
                   snapshot=lambda items, since, _upto: books.snapshot_json(items))


def book_events(hub: Any, slot: int, books: Any) -> Callable[[], None]:
    """What the frame clock runs before each frame cycle: every status message
    the books produced (stale, ok) goes to the book's subscribers, so a
    healed book's "ok" precedes the full book in the frames of that cycle."""

    def send() -> None:
        for iid, msg in books.take_events():
            for cid in hub.subscribers(slot, iid):
                hub._send_bytes(cid, msg)

    return send
