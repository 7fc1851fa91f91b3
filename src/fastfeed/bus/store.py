"""The bus's state store: the row script, and publishing through it.

``P:row:N`` is a hash, symbol -> the instrument's latest row as one ``FFT1``
record; every batch goes to Redis in one ``EVALSHA`` of `ROW_SCRIPT` per
partition, which, for every record, compares ``seq`` with the stored row,
merges the newer ones into it, stores them, and publishes the merged rows
that were newer as one batch on ``P:ticks:N``. State and pub/sub therefore
never disagree. ``P:meta`` holds the partition count, which every gateway
and publisher on a prefix must share (checked on every connection).

`RowStore` is a job of a `fastfeed.bus.link.Link`: where each partition's
command goes (one Redis, the master Sentinel names, a cluster's masters) is
the link's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import hiredis

from fastfeed._core import encode_batch

from .link import Addr, BusConfigError, BusDown, Link, RedisError

__all__ = ["ROW_SCRIPT", "RowStore"]

log = logging.getLogger("fastfeed.bus")

# KEYS[1] row hash of the partition; ARGV[1] FFT1 batch; ARGV[2] channel
# ('' = store only); ARGV[3] '1' for SPUBLISH (cluster), else PUBLISH.
# seq is compared as (high u32, low u32): exact for all of 0..2^63-1, where
# Lua numbers (doubles) and string comparison (locale) are not.
ROW_SCRIPT = r"""
local key, batch, chan = KEYS[1], ARGV[1], ARGV[2]
local n = #batch
if n < 8 or string.sub(batch, 1, 4) ~= 'FFT1' then
  return redis.error_reply('ERR fastfeed: not a tick batch')
end
local count = struct.unpack('<I4', batch, 5)
local band = bit.band
local pos = 9
local out = {}
local applied, stale = 0, 0
for _ = 1, count do
  if pos > n then return redis.error_reply('ERR fastfeed: truncated batch') end
  local slen = string.byte(batch, pos)
  local sym = string.sub(batch, pos + 1, pos + slen)
  local mask = string.byte(batch, pos + slen + 1)
  local sp = pos + slen + 2
  local lo, hi = struct.unpack('<I4I4', batch, sp)
  local vp = sp + 8
  local e = vp
  for k = 0, 7 do
    if band(mask, 2 ^ k) ~= 0 then e = e + 8 end
  end
  if e - 1 > n then return redis.error_reply('ERR fastfeed: truncated batch') end
  local old = redis.call('HGET', key, sym)
  local rec = nil
  if not old then
    rec = string.sub(batch, pos, e - 1)
  else
    local olen = string.byte(old, 1)
    local omask = string.byte(old, olen + 2)
    local olo, ohi = struct.unpack('<I4I4', old, olen + 3)
    if hi > ohi or (hi == ohi and lo > olo) then
      if mask == 255 or band(omask, mask) == omask then
        rec = string.sub(batch, pos, e - 1)
      else
        local parts = {string.sub(batch, pos, pos + slen), string.char(bit.bor(mask, omask)),
                       string.sub(batch, sp, sp + 7)}
        local op, np = olen + 11, vp
        for k = 0, 7 do
          local b = 2 ^ k
          local ov, nv = band(omask, b) ~= 0, band(mask, b) ~= 0
          if nv then
            parts[#parts + 1] = string.sub(batch, np, np + 7)
          elseif ov then
            parts[#parts + 1] = string.sub(old, op, op + 7)
          end
          if nv then np = np + 8 end
          if ov then op = op + 8 end
        end
        rec = table.concat(parts)
      end
    end
  end
  if rec then
    redis.call('HSET', key, sym, rec)
    applied = applied + 1
    out[applied] = rec
  else
    stale = stale + 1
  end
  pos = e
end
if applied > 0 and chan ~= '' then
  local msg = 'FFT1' .. struct.pack('<I4', applied) .. table.concat(out)
  if ARGV[3] == '1' then
    redis.call('SPUBLISH', chan, msg)
  else
    redis.call('PUBLISH', chan, msg)
  end
end
return {applied, stale}
"""



class RowStore:
    """Stores ticks only-if-newer and publishes them, through `link`."""

    def __init__(self, link: Link):
        self.link = link
        self._sha = b""
        # counters (metrics read them; never reset)
        self.published_ticks = 0
        self.published_batches = 0
        self.publish_stale = 0
        self.publish_errors = 0
        self.publish_refused = 0

    def stats(self) -> dict[str, float]:
        return {
            "published_ticks": self.published_ticks,
            "published_batches": self.published_batches,
            "publish_stale": self.publish_stale,
            "publish_errors": self.publish_errors,
            "publish_refused": self.publish_refused,
        }

    # ---- the link's job ----

    async def on_connect(self) -> None:
        link = self.link
        t = link.connect_timeout
        for conn in link.cmd_conns():
            self._sha = await conn.call("SCRIPT", "LOAD", ROW_SCRIPT, timeout=t)
        # every bus on this prefix must partition alike, or ticks go unheard
        meta = link.meta_key
        conn = link.meta_conn()
        await conn.call("HSETNX", meta, "channels", link.parts, timeout=t)
        have = await conn.call("HGET", meta, "channels", timeout=t)
        if have is not None and int(have) != link.parts:
            raise BusConfigError(
                f"Redis prefix {link.prefix!r} is used with {int(have)} channels, this process "
                f"has --redis-channels {link.parts}: use the same count everywhere (or another "
                f"--redis-prefix, or DEL {meta} after stopping every gateway and publisher)")

    def still_routed(self, owners: Sequence[Addr | None]) -> bool:
        return True  # commands follow MOVED where they are

    # ---- publishing ----

    def _check_up(self) -> None:
        try:
            self.link.check_up()
        except BusDown:
            self.publish_refused += 1
            raise

    def _send(self, parts: list[bytes], callback: Callable[[Any], None],
              publish: bool = True) -> None:
        for n, b in enumerate(parts):
            if b:
                self._send_one(n, b, callback, publish)

    def _send_one(self, n: int, batch: bytes, callback: Callable[[Any], None],
                  publish: bool = True) -> None:
        link = self.link
        args = (b"EVALSHA", self._sha, b"1", link.row_keys[n], batch,
                link.channel_names[n] if publish else b"", link.spub)
        link.send(n, args, self._script_reply(n, args, callback))
        self.published_batches += 1

    def _script_reply(self, n: int, args: tuple[Any, ...],
                      callback: Callable[[Any], None]) -> Callable[[Any], None]:
        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT"):
                # the script cache was flushed behind our back: EVAL caches it again
                try:
                    self.link.send(n, (b"EVAL", ROW_SCRIPT, *args[2:]), done)
                    return
                except BusDown as e:
                    r = e
            callback(r)
        return done

    def _count(self, r: Any) -> None:
        if isinstance(r, list):
            self.publish_stale += r[1]
        else:
            self.publish_errors += 1
            if self.publish_errors <= 10 or self.publish_errors % 1000 == 0:
                log.warning("bus: a published batch failed (%d so far): %s",
                            self.publish_errors, r)

    def publish_nowait(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Validate and send `ticks` without waiting for Redis.

        Returns the refused ticks as ``(index, sym, message)``; the others are
        on their way (a later failure is counted in ``publish_errors``).
        Raises `BusDown`, having sent nothing, while the circuit is open.
        """
        self._check_up()
        parts, errors = encode_batch(ticks, self.link.parts)
        self._send(parts, self._count)
        self.published_ticks += len(ticks) - len(errors)
        return errors

    def publish_batches_nowait(self, parts: list[bytes]) -> None:
        """Send already encoded batches, one per partition (b"" for none)."""
        self._check_up()
        self._send(parts, self._count)

    async def _call(self, parts: list[bytes], publish: bool = True) -> list[Any]:
        """Send one batch per partition; their replies (or exceptions)."""
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Any]] = []
        for n, b in enumerate(parts):
            if b:
                fut = loop.create_future()
                futs.append(fut)
                self._send_one(n, b, _settle(fut), publish)
        return list(await asyncio.gather(*futs, return_exceptions=True))

    async def publish(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Validate, store only-if-newer and publish `ticks`, waiting for Redis.

        Returns the ticks refused by validation as ``(index, sym, message)``.
        Raises `BusDown` if Redis is unreachable or the connection drops
        before Redis answered (the ticks may or may not have been taken;
        sending them again is harmless, the store drops what it has).
        """
        self._check_up()
        parts, errors = encode_batch(ticks, self.link.parts)
        await self.publish_batches(parts, len(ticks) - len(errors))
        return errors

    async def publish_batches(self, parts: list[bytes], count: int) -> None:
        """`publish` for ticks already encoded, one batch per partition (b""
        for none), `count` ticks in all (the C tick parser's batches)."""
        self._check_up()
        self.published_ticks += count
        for r in await self._call(parts):
            if isinstance(r, BaseException):
                self.publish_errors += 1
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            self.publish_stale += r[1]
        await self.link.drain()

    async def write_rows(self, ticks: list[dict[str, Any]]) -> int:
        """Store `ticks` only-if-newer without publishing them; the number
        of rows the store took (a reseed)."""
        parts, _ = encode_batch(ticks, self.link.parts)
        taken = 0
        for r in await self._call(parts, publish=False):
            if isinstance(r, BaseException):
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            taken += r[0]
        return taken

    async def flush(self) -> None:
        """Wait until Redis answered everything sent so far."""
        self._check_up()
        await self.link.barrier()

    async def read_state(self) -> dict[str, bytes]:
        """The store as {symbol: FFT1 record} (tools and tests; not hot)."""
        self._check_up()
        out: dict[str, bytes] = {}
        for n, key in enumerate(self.link.row_keys):
            flat = await self.link.key_conn(n).call("HGETALL", key)
            for i in range(0, len(flat), 2):
                out[flat[i].decode()] = flat[i + 1]
        return out

    async def delete_state(self) -> None:
        """Forget every stored row (tests, resets)."""
        self._check_up()
        for n, key in enumerate(self.link.row_keys):
            await self.link.key_conn(n).call("DEL", key)


def _settle(fut: asyncio.Future[Any]) -> Callable[[Any], None]:
    """A reply callback that settles `fut`."""
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
