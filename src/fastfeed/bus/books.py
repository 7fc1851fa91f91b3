"""Order books on the bus: the book script, publishing, pub/sub and the snapshot.

Names (``P`` the prefix, ``N`` the partition of the symbol, as for quotes;
with sharding or a cluster ``N`` is the same hash tag as the quote keys'):

``P:books:N``  pub/sub channel: FFK1 batches of the book records the store took
``P:book:N``   hash, symbol -> the book as one full FFK1 record (all kept levels,
               flag 2 set while the book is stale)
``P:meta``     ``book_levels``: the kept levels per side, which every gateway
               and publisher on the prefix must share (checked on connect)

`BOOK_SCRIPT` runs the contract's rules on the stored book, atomically per
partition: a record whose seq is not above the stored one is dropped (stale);
a full book replaces it (and heals a stale one); changes to a stale book are
dropped; a change with a seq gap, or one that would cross the book, marks
the stored book stale and nothing else; other changes are applied exactly as
`fastfeed._core.Books` applies them. Every record that changed the stored
book is published, so every worker, applying the same records to the same
book, holds the same bytes; a worker that starts late loads the hash first.

On every (re)connection: SUBSCRIBE the book channels, then read the hashes
(``HSCAN``) and apply them as snapshot records (only newer seqs replace a
book); book messages that arrive meanwhile wait and are applied after the
snapshot, in their order.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from fastfeed._core import BOOK_MAGIC, decode_books, encode_books

from .link import Addr, BusConfigError, BusDown, Link, RedisError, _Conn

__all__ = ["BOOK_SCRIPT", "BookBus"]

log = logging.getLogger("fastfeed.bus")
_HEADER = struct.Struct("<4sI")
_F_STALE = 2  # a record's flag: the book is stale

# KEYS[1] book hash of the partition; ARGV[1] FFK1 batch; ARGV[2] channel ('' =
# store only); ARGV[3] '1' for SPUBLISH; ARGV[4] kept levels per side.
# A record: u8 symbol length, symbol, u8 flags (1 full, 2 stale), i64 seq,
# u16 bids, u16 asks, then 20 bytes a level (f64 price, f64 volume, u32 orders).
# Levels stay raw 20-byte strings: only their price and volume are read.
# seq is compared as (high u32, low u32), exact where Lua numbers are not.
BOOK_SCRIPT = r"""
local key, batch, chan, maxl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[4])
local n = #batch
if n < 8 or string.sub(batch, 1, 4) ~= 'FFK1' then
  return redis.error_reply('ERR fastfeed: not a book batch')
end
local count = struct.unpack('<I4', batch, 5)
local function parse(s, p)
  local slen = string.byte(s, p)
  local sym = string.sub(s, p + 1, p + slen)
  local flags = string.byte(s, p + slen + 1)
  local lo, hi, nb, na = struct.unpack('<I4I4I2I2', s, p + slen + 2)
  local lp = p + slen + 14
  local e = lp + 20 * (nb + na)
  if e - 1 > #s then return nil end
  local sides = {{}, {}}
  for k = 0, nb + na - 1 do
    local q = lp + 20 * k
    local price, vol = struct.unpack('<dd', s, q)
    local side = sides[1]
    if k >= nb then side = sides[2] end
    side[#side + 1] = {price, vol, string.sub(s, q, q + 19)}
  end
  return {sym = sym, flags = flags, lo = lo, hi = hi, sides = sides, e = e,
          raw = string.sub(s, p, e - 1)}
end
local function pack(sym, flags, lo, hi, sides)
  local parts = {string.char(#sym), sym, string.char(flags),
                 struct.pack('<I4I4I2I2', lo, hi, #sides[1], #sides[2])}
  for s = 1, 2 do
    for _, lv in ipairs(sides[s]) do parts[#parts + 1] = lv[3] end
  end
  return table.concat(parts)
end
local function apply(side, changes, bid)
  local t = {}
  for i, lv in ipairs(side) do t[i] = lv end
  for _, c in ipairs(changes) do
    local p = c[1]
    local k = 1
    if bid then
      while k <= #t and t[k][1] > p do k = k + 1 end
    else
      while k <= #t and t[k][1] < p do k = k + 1 end
    end
    local present = k <= #t and t[k][1] == p
    if c[2] == 0 then
      if present then table.remove(t, k) end
    elseif present then
      t[k] = {t[k][1], c[2], string.sub(t[k][3], 1, 8) .. string.sub(c[3], 9, 20)}
    elseif k <= maxl then
      if #t == maxl then table.remove(t) end
      table.insert(t, k, c)
    end
  end
  return t
end
local out = {}
local res = {0, 0, 0, 0, 0, 0}  -- applied stale refused gap crossed dropped
local pos = 9
for _ = 1, count do
  if pos > n then return redis.error_reply('ERR fastfeed: truncated book batch') end
  local r = parse(batch, pos)
  if not r then return redis.error_reply('ERR fastfeed: truncated book batch') end
  pos = r.e
  local old = redis.call('HGET', key, r.sym)
  local o
  if old then o = parse(old, 1) else o = {lo = 0, hi = 0, flags = 1, sides = {{}, {}}} end
  local stale = bit.band(o.flags, 2) ~= 0
  local what
  if r.hi < o.hi or (r.hi == o.hi and r.lo <= o.lo) then
    what = 2
  elseif bit.band(r.flags, 1) ~= 0 then
    redis.call('HSET', key, r.sym, pack(r.sym, r.flags, r.lo, r.hi, r.sides))
    what = 1
  elseif stale then
    what = 6
  else
    local nlo, nhi = o.lo + 1, o.hi
    if nlo == 4294967296 then nlo, nhi = 0, nhi + 1 end
    if r.lo ~= nlo or r.hi ~= nhi then
      what = 4
    else
      local b = apply(o.sides[1], r.sides[1], true)
      local a = apply(o.sides[2], r.sides[2], false)
      if #b > 0 and #a > 0 and b[1][1] >= a[1][1] then
        what = 5
      else
        redis.call('HSET', key, r.sym, pack(r.sym, 1, r.lo, r.hi, {b, a}))
        what = 1
      end
    end
    if what ~= 1 then
      redis.call('HSET', key, r.sym, pack(r.sym, 3, o.lo, o.hi, o.sides))
    end
  end
  res[what] = res[what] + 1
  if what == 1 or what == 4 or what == 5 then out[#out + 1] = r.raw end
end
if #out > 0 and chan ~= '' then
  local msg = 'FFK1' .. struct.pack('<I4', #out) .. table.concat(out)
  if ARGV[3] == '1' then
    redis.call('SPUBLISH', chan, msg)
  else
    redis.call('PUBLISH', chan, msg)
  end
end
return res
"""


def _names(link: Link) -> tuple[list[bytes], list[bytes]]:
    """The book channels and hashes: the quote names' partition tags, so a
    partition's quote and book keys share a slot."""
    pre = link.prefix.encode()
    chans = [pre + b":books:" + c[len(pre) + len(b":ticks:"):] for c in link.channel_names]
    keys = [pre + b":book:" + k[len(pre) + len(b":row:"):] for k in link.row_keys]
    return chans, keys


class _BookConn(_Conn):
    """A SUBSCRIBE connection for the book channels."""

    def __init__(self, name: str, on_lost: Callable[[_Conn, Exception | None], None],
                 job: BookBus):
        super().__init__(name, on_lost)
        self.job = job

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        job = self.job
        got = False
        while True:
            r = reader.gets()
            if r is False:
                break
            if type(r) is list and len(r) == 3 and (r[0] == b"message" or r[0] == b"smessage"):
                got = job.received(r[2]) or got
            elif type(r) is list and r and r[0] == b"sunsubscribe" and not self.waiters:
                job.link.slot_moved(self, r[1] if len(r) > 1 else b"?")
            else:
                self._reply(r)
        if got and job.on_change is not None:
            job.on_change()


class BookBus:
    """Books on a `Link`: publishing through the book script, and (given
    `books`, a `fastfeed._core.Books`) pub/sub and the snapshot into them.
    ``on_change()`` is called after book records were applied; ``levels``
    is the kept levels per side (``--book-levels``; without `books`)."""

    def __init__(self, link: Link, books: Any = None, *, levels: int = 50,
                 on_change: Callable[[], None] | None = None, snapshot_chunk: int = 500):
        self.link = link
        self.books = books
        self.levels = books.levels if books is not None else levels
        self.on_change = on_change
        self.snapshot_chunk = snapshot_chunk
        self.channels, self.keys = _names(link)
        self._sha = b""
        self._waiting: list[bytes] | None = None  # records that came during the snapshot
        self._where: dict[int, Addr | None] = {}
        # counters (metrics read them; never reset)
        self.published = 0
        self.publish_errors = 0
        self.outcomes = [0] * 6  # what the store did with them (BOOK_OUTCOMES order)
        self.applied = [0] * 6  # what this worker's books did with the records received
        self.bad_batches = 0
        self.snapshot_books = 0
        self.snapshot_seconds = 0.0

    def stats(self) -> dict[str, float]:
        return {"books_published": self.published, "books_publish_errors": self.publish_errors,
                "books_bad_batches": self.bad_batches, "books_snapshot": self.snapshot_books}

    def describe(self) -> str:
        if self.books is None:
            return ""
        return f"{self.snapshot_books} snapshot books in {self.snapshot_seconds:.3f}s"

    # ---- the link's job ----

    async def on_connect(self) -> None:
        link = self.link
        t = link.connect_timeout
        for conn in link.cmd_conns():
            self._sha = await conn.call("SCRIPT", "LOAD", BOOK_SCRIPT, timeout=t)
        meta = link.meta_conn()
        await meta.call("HSETNX", link.meta_key, "book_levels", self.levels, timeout=t)
        have = await meta.call("HGET", link.meta_key, "book_levels", timeout=t)
        if have is not None and int(have) != self.levels:
            raise BusConfigError(
                f"Redis prefix {link.prefix!r} keeps {int(have)} book levels a side, this "
                f"process has --book-levels {self.levels}: use the same everywhere, or "
                f"HDEL {link.meta_key} book_levels after stopping every gateway")
        if self.books is None:
            return
        self._waiting = []
        futs: list[asyncio.Future[Any]] = []
        self._where = {}
        for addr, parts in link.groups():
            if not parts:
                continue
            conn = await link.open_watched(
                "books", lambda name, on_lost: _BookConn(name, on_lost, self), addr)
            names = [self.channels[n] for n in parts]
            if link.sharded:
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
        t0 = time.perf_counter()
        got = total = 0
        try:
            for n, key in enumerate(self.keys):
                conn = self.link.key_conn(n)
                total += await conn.call("HLEN", key, timeout=self.link.ping_timeout)
                cursor = b"0"
                while True:
                    cursor, flat = await conn.call("HSCAN", key, cursor, "COUNT",
                                                   self.snapshot_chunk,
                                                   timeout=self.link.ping_timeout)
                    recs = flat[1::2]
                    if recs:
                        self.books.apply_records(
                            _HEADER.pack(BOOK_MAGIC, len(recs)) + b"".join(recs), True)
                        got += len(recs)
                    if cursor == b"0":
                        break
        finally:
            waiting, self._waiting = self._waiting or [], None
        for data in waiting:
            self._apply(data)
        self.snapshot_books = got
        self.snapshot_seconds = time.perf_counter() - t0
        if (got or waiting) and self.on_change is not None:
            self.on_change()
        if total < len(self.books):
            # Redis lost them (restarted without persistence): write ours back
            async with asyncio.timeout(self.link.ping_timeout):
                sent = await self.write_back()
            if sent:
                log.warning("bus: redis had lost book state; wrote back %d books from this "
                            "worker", sent)

    def received(self, data: bytes) -> bool:
        """A batch from the book channels: applied now, or after the snapshot."""
        if self._waiting is not None:
            self._waiting.append(data)
            return False
        return self._apply(data)

    def _apply(self, data: bytes) -> bool:
        try:
            res = self.books.apply_records(data)
        except (ValueError, TypeError) as e:
            self.bad_batches += 1
            if self.bad_batches <= 10 or self.bad_batches % 1000 == 0:
                log.warning("bus: dropped a bad book batch (%d so far): %s", self.bad_batches, e)
            return False
        for k in range(6):
            self.applied[k] += res[k]
        return True

    # ---- publishing ----

    def _send_one(self, n: int, batch: bytes, callback: Callable[[Any], None],
                  publish: bool = True) -> None:
        link = self.link
        args = (b"EVALSHA", self._sha, b"1", self.keys[n], batch,
                self.channels[n] if publish else b"", link.spub, str(self.levels).encode())

        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT"):
                try:
                    link.send(n, (b"EVAL", BOOK_SCRIPT, *args[2:]), callback)
                    return
                except BusDown as e:
                    r = e
            callback(r)

        link.send(n, args, done)

    async def publish(self, msgs: list[Any], index: Sequence[int] | None = None
                      ) -> list[tuple[int, Any, str]]:
        """Validate, store by the book rules and publish book messages, waiting
        for Redis. Returns the refused ones as ``(index, sym, why)``; raises
        `BusDown` if Redis is unreachable (resending is harmless: the store
        drops seqs it holds)."""
        self.link.check_up()
        parts, errors = encode_books(msgs, self.link.parts, self.levels, index)
        return errors + await self._store(parts, True, len(msgs) - len(errors))

    async def _store(self, parts: list[bytes], publish: bool, n: int) -> list[Any]:
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Any]] = []
        for k, b in enumerate(parts):
            if b:
                fut = loop.create_future()
                futs.append(fut)
                self._send_one(k, b, _settle(fut), publish)
        for r in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(r, BaseException):
                self.publish_errors += 1
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            for k in range(6):
                self.outcomes[k] += r[k]
        self.published += n
        return []

    async def write_back(self) -> int:
        """Store this worker's books, only-if-newer and without publishing
        (Redis lost its state); the number of books sent. A stale book goes
        back stale (flag 2), as the store held it."""
        if self.books is None:
            return 0
        msgs = decode_books(self.books.state_records())
        if not msgs:
            return 0
        # one batch per partition, as publishing does: each record is put in
        # its partition by encode_books, then given back its stale flag
        recs: list[list[bytes]] = [[] for _ in range(self.link.parts)]
        for m in msgs:
            stale = m.pop("stale", False)
            parts, _ = encode_books([m], self.link.parts, self.levels)
            n = next(k for k, b in enumerate(parts) if b)
            rec = bytearray(parts[n][_HEADER.size:])
            if stale:
                rec[1 + rec[0]] |= _F_STALE
            recs[n].append(bytes(rec))
        batches = [_HEADER.pack(BOOK_MAGIC, len(r)) + b"".join(r) if r else b"" for r in recs]
        await self._store(batches, False, len(msgs))
        return len(msgs)

    async def read_state(self) -> dict[str, bytes]:
        """The stored books as {symbol: record} (tools and tests)."""
        out: dict[str, bytes] = {}
        for n, key in enumerate(self.keys):
            flat = await self.link.key_conn(n).call("HGETALL", key)
            for i in range(0, len(flat), 2):
                out[flat[i].decode()] = flat[i + 1]
        return out


def _settle(fut: asyncio.Future[Any]) -> Callable[[Any], None]:
    def done(r: Any) -> None:
        if fut.done():
            return
        if isinstance(r, hiredis.ReplyError):
            fut.set_exception(RedisError(str(r)))
        elif isinstance(r, BaseException):
            fut.set_exception(r)
        else:
            fut.set_result(r)
    return done
