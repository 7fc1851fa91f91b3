"""The bus's subscriber: pub/sub into the table, and the snapshot.

On every (re)connection of its `fastfeed.bus.link.Link`: SUBSCRIBE all
channels first (``SSUBSCRIBE`` on a sharded layout, one connection per
master holding partitions), then read the store (``HSCAN`` in chunks) and
apply it. A tick published in between arrives on the channel and is also in
the store; the table keeps the newer ``seq`` and drops the other, so no
window loses a tick. Only then does the link close its breaker.

The hot path (pub/sub messages into the table) is a raw asyncio protocol with
`hiredis.Reader`: `_SubConn.data_received`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastfeed.protocol import FIELDS

from .link import Addr, Link, _Conn
from .store import RowStore

__all__ = ["Subscriber"]

log = logging.getLogger("fastfeed.bus")

_HEADER = struct.Struct("<4sI")


class _SubConn(_Conn):
    """A SUBSCRIBE connection: pushes go straight into the table."""

    def __init__(self, name: str, on_lost: Callable[[_Conn, Exception | None], None],
                 sub: Subscriber):
        super().__init__(name, on_lost)
        self.sub = sub

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        sub = self.sub
        apply = sub.apply_batch
        got = 0
        while True:
            r = reader.gets()
            if r is False:
                break
            if type(r) is list and len(r) == 3 and (r[0] == b"message" or r[0] == b"smessage"):
                sub.messages += 1
                try:
                    a, s, _ = apply(r[2])
                    sub.ticks_applied += a
                    sub.ticks_stale += s
                    got += a
                except (ValueError, TypeError) as e:
                    sub.bad_batches += 1
                    if sub.bad_batches <= 10 or sub.bad_batches % 1000 == 0:
                        log.warning("bus: dropped a bad batch on %r (%d so far): %s",
                                    r[1], sub.bad_batches, e)
            elif (type(r) is list and r and r[0] == b"sunsubscribe" and not self.waiters):
                # Redis dropped our sharded subscription: the slot moved
                sub.link.slot_moved(self, r[1] if len(r) > 1 else b"?")
            else:
                self._reply(r)
        if got and sub.on_ticks is not None:
            sub.on_ticks()


class Subscriber:
    """Keeps `table` (a `fastfeed._core.Table`) equal to the store, through
    `link`. ``on_ticks()`` is called after ticks were applied (once per read
    from the socket, not per message). With `reseed`, a store that holds
    fewer instruments than the table (Redis restarted without persistence)
    gets the table's rows back, only-if-newer and without publishing.
    ``apply(batch)`` applies one binary batch (default: ``table.apply_batch``;
    a gateway gives its local sink's, so recording sees what the bus applies)."""

    def __init__(self, link: Link, table: Any, store: RowStore, *,
                 on_ticks: Callable[[], None] | None = None, reseed: bool = True,
                 snapshot_chunk: int = 2000,
                 apply: Callable[[bytes], tuple[int, int, int]] | None = None):
        self.link = link
        self.table = table
        self.apply_batch = apply if apply is not None else table.apply_batch
        self.store = store
        self.on_ticks = on_ticks
        self.reseed = reseed
        self.snapshot_chunk = snapshot_chunk
        self._where: dict[int, Addr | None] = {}  # partition -> the master it is subscribed on
        # counters (metrics read them; never reset)
        self.messages = 0
        self.ticks_applied = 0
        self.ticks_stale = 0
        self.bad_batches = 0
        self.snapshot_rows = 0
        self.snapshot_seconds = 0.0
        self.reseeded_rows = 0

    def stats(self) -> dict[str, float]:
        return {
            "messages": self.messages,
            "ticks_applied": self.ticks_applied,
            "ticks_stale": self.ticks_stale,
            "bad_batches": self.bad_batches,
            "snapshot_rows": self.snapshot_rows,
            "snapshot_seconds": self.snapshot_seconds,
            "reseeded_rows": self.reseeded_rows,
        }

    def describe(self) -> str:
        return f"{self.snapshot_rows} snapshot rows in {self.snapshot_seconds:.3f}s"

    # ---- the link's job ----

    async def on_connect(self) -> None:
        link = self.link
        futs: list[asyncio.Future[Any]] = []
        self._where = {}
        for addr, parts in link.groups():
            if not parts:
                continue
            conn = await link.open_watched(
                "sub", lambda name, on_lost: _SubConn(name, on_lost, self), addr)
            names = [link.channel_names[n] for n in parts]
            if link.sharded:
                # one slot per SSUBSCRIBE: a cluster refuses channels of several slots
                for ch in names:
                    futs.extend(conn.write((b"SSUBSCRIBE", ch)))
            else:
                futs.extend(conn.write((b"SUBSCRIBE", *names), replies=len(names)))
            self._where.update((n, addr) for n in parts)
        async with asyncio.timeout(link.connect_timeout):
            await asyncio.gather(*futs)
        await self._load_snapshot()

    def still_routed(self, owners: Sequence[Addr | None]) -> bool:
        return all(a is None or self._where.get(n, a) == a for n, a in enumerate(owners))

    async def _load_snapshot(self) -> None:
        link = self.link
        t0 = time.perf_counter()
        rows = 0
        total = 0
        table = self.table
        for n, key in enumerate(link.row_keys):
            cursor = b"0"
            conn = link.key_conn(n)
            total += await conn.call("HLEN", key, timeout=link.ping_timeout)
            while True:
                cursor, flat = await conn.call(
                    "HSCAN", key, cursor, "COUNT", self.snapshot_chunk, timeout=link.ping_timeout)
                recs = flat[1::2]
                if recs:
                    self.apply_batch(_HEADER.pack(b"FFT1", len(recs)) + b"".join(recs))
                    rows += len(recs)
                if cursor == b"0":
                    break
        self.snapshot_rows = rows
        self.snapshot_seconds = time.perf_counter() - t0
        if self.on_ticks is not None and rows:
            self.on_ticks()
        if self.reseed and total < len(table):
            await self._reseed()

    async def _reseed(self) -> None:
        """Redis holds fewer instruments than this table (it restarted without
        persistence): write our rows back, only-if-newer, without publishing."""
        table = self.table
        ticks = []
        for iid in range(len(table)):
            if table.seq_of(iid) >= 0:
                ticks.append(dict(zip(FIELDS, table.row(iid), strict=True)))
        sent = 0
        for i in range(0, len(ticks), 1000):
            async with asyncio.timeout(self.link.ping_timeout):
                sent += await self.store.write_rows(ticks[i:i + 1000])
        self.reseeded_rows += sent
        if sent:
            log.warning("bus: redis had lost state; wrote back %d rows from this worker", sent)
