"""Trades on the bus: the trade script, the rings kept in Redis, and loading them.

``P:trades:N`` is a hash, symbol -> the instrument's last trades (at most the
publishing gateway's ``--trade-ring``) as concatenated ``FTR1`` records,
oldest first. Every batch goes to Redis in one ``EVALSHA`` of
`TRADE_SCRIPT` per partition, which, for every record, compares ``tseq``
with the newest stored trade of its symbol, appends the newer ones (cutting
the ring to its size) and publishes exactly those, as one ``FTR1`` batch on
the partition's channel ``P:ticks:N`` (beside the tick batches: the magic
tells them apart). The ring and pub/sub therefore never disagree, and every
gateway applies the same trades in the same order: the bars they make from
them are the same.

`TradeStore` is a job of the link: on every (re)connection, after the
subscriber has subscribed, it loads every ring into the gateway's `Trades`
kind (a trade published in between is in both; the kind drops the second as
stale by ``tseq``), and if Redis holds fewer rings than the kind (it
restarted without persistence) writes the kind's rings back, only-if-newer,
without publishing. A late worker thus starts with the last ``--trade-ring``
trades of every instrument; its bars are rebuilt from them (docs/protocol.md
says what that means for bars older than the ring).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from typing import Any

import hiredis
import orjson

from fastfeed._core import encode_trade_batch, partition

from .link import Addr, BusDown, Link, RedisError

__all__ = ["TRADE_SCRIPT", "TradeStore"]

log = logging.getLogger("fastfeed.bus")

# KEYS[1] trade hash of the partition; ARGV[1] FTR1 batch; ARGV[2] channel ('' = store
# only); ARGV[3] '1' for SPUBLISH; ARGV[4] ring size. tseq compared as (high, low) u32.
TRADE_SCRIPT = r"""
local key, batch, chan, ring = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[4])
local n = #batch
if n < 8 or string.sub(batch, 1, 4) ~= 'FTR1' then
  return redis.error_reply('ERR fastfeed: not a trade batch')
end
local count = struct.unpack('<I4', batch, 5)
local pos = 9
local out = {}
local applied, stale = 0, 0
for _ = 1, count do
  if pos > n then return redis.error_reply('ERR fastfeed: truncated trade batch') end
  local slen = string.byte(batch, pos)
  local rlen = slen + 34
  if pos + rlen - 1 > n then return redis.error_reply('ERR fastfeed: truncated trade batch') end
  local sym = string.sub(batch, pos + 1, pos + slen)
  local rec = string.sub(batch, pos, pos + rlen - 1)
  local lo, hi = struct.unpack('<I4I4', batch, pos + 1 + slen)
  local old = redis.call('HGET', key, sym)
  local newer = true
  if old then
    local olo, ohi = struct.unpack('<I4I4', old, #old - rlen + 2 + slen)
    newer = hi > ohi or (hi == ohi and lo > olo)
  end
  if newer then
    local blob = (old or '') .. rec
    if #blob > ring * rlen then blob = string.sub(blob, #blob - ring * rlen + 1) end
    redis.call('HSET', key, sym, blob)
    applied = applied + 1
    out[applied] = rec
  else
    stale = stale + 1
  end
  pos = pos + rlen
end
if applied > 0 and chan ~= '' then
  local msg = 'FTR1' .. struct.pack('<I4', applied) .. table.concat(out)
  if ARGV[3] == '1' then
    redis.call('SPUBLISH', chan, msg)
  else
    redis.call('PUBLISH', chan, msg)
  end
end
return {applied, stale}
"""

_HEADER = struct.Struct("<4sI")


class TradeStore:
    """Publishes trades through `TRADE_SCRIPT` and loads the rings into `trades`
    (a `fastfeed._core.Trades`, or None for a bus that only publishes)."""

    def __init__(self, link: Link, trades: Any = None, ring: int = 100,
                 on_trades: Any = None) -> None:
        self.link = link
        self.trades = trades
        self.ring = ring
        self.on_trades = on_trades
        self.keys = [k.replace(b":row:", b":trades:") for k in link.row_keys]
        self._sha = b""
        # counters (never reset)
        self.published_trades = 0
        self.publish_stale_trades = 0
        self.loaded_trades = 0
        self.reseeded_trades = 0

    def describe(self) -> str:
        return f"{self.loaded_trades} trades loaded" if self.trades is not None else ""

    def still_routed(self, owners: Sequence[Addr | None]) -> bool:
        return True

    async def on_connect(self) -> None:
        t = self.link.connect_timeout
        for conn in self.link.cmd_conns():
            self._sha = await conn.call("SCRIPT", "LOAD", TRADE_SCRIPT, timeout=t)
        if self.trades is not None:
            await self._load()

    async def _load(self) -> None:
        link, kind = self.link, self.trades
        held = 0
        loaded = 0
        for n, key in enumerate(self.keys):
            conn = link.key_conn(n)
            cursor = b"0"
            while True:
                cursor, flat = await conn.call("HSCAN", key, cursor, "COUNT", 500,
                                               timeout=link.ping_timeout)
                for i in range(0, len(flat), 2):
                    blob = flat[i + 1]
                    count = len(blob) // (len(flat[i]) + 34)
                    a, _, _ = kind.apply_batch(_HEADER.pack(b"FTR1", count) + blob, seed=True)
                    loaded += a
                    held += 1
                if cursor == b"0":
                    break
        self.loaded_trades += loaded
        if loaded and self.on_trades is not None:
            self.on_trades()
        if held < sum(1 for iid in range(len(kind.table)) if kind.last_tseq(iid) >= 0):
            await self._reseed()

    async def _reseed(self) -> None:
        """Redis lost the rings (a restart without persistence): write ours back."""
        kind = self.trades
        by_part: list[list[dict[str, Any]]] = [[] for _ in range(self.link.parts)]
        for iid in range(len(kind.table)):
            held = kind.recent(iid)
            if not held:
                continue
            sym = kind.table.symbol(iid)
            p = partition(sym, self.link.parts)
            for raw in held:
                tseq, ts, price, size, side = orjson.loads(raw)
                by_part[p].append({"sym": sym, "tseq": tseq, "ts": ts, "price": price,
                                   "size": size, "side": side})
        parts = [encode_trade_batch(g)[0] if g else b"" for g in by_part]
        sent = 0
        for r in await self._call(parts, publish=False):
            if isinstance(r, BaseException):
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            sent += r[0]
        self.reseeded_trades += sent
        if sent:
            log.warning("bus: redis had lost the trade rings; wrote back %d trades from this "
                        "worker", sent)

    def _send_one(self, n: int, batch: bytes, callback: Any, publish: bool) -> None:
        link = self.link
        args = (b"EVALSHA", self._sha, b"1", self.keys[n], batch,
                link.channel_names[n] if publish else b"", link.spub, str(self.ring).encode())

        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT"):
                try:
                    link.send(n, (b"EVAL", TRADE_SCRIPT, *args[2:]), done)
                    return
                except BusDown as e:
                    r = e
            callback(r)

        link.send(n, args, done)

    async def _call(self, parts: list[bytes], publish: bool = True) -> list[Any]:
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Any]] = []
        for n, b in enumerate(parts):
            if b:
                fut = loop.create_future()
                futs.append(fut)
                self._send_one(n, b, _settle(fut), publish)
        return list(await asyncio.gather(*futs, return_exceptions=True))

    async def publish(self, trades: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Validate, store only-if-newer and publish `trades`, waiting for Redis.
        Returns the refused ones as ``(index, sym, message)``; raises `BusDown`
        if Redis did not answer (resending is harmless: the store drops what
        it has)."""
        self.link.check_up()
        by_part: list[list[dict[str, Any]]] = [[] for _ in range(self.link.parts)]
        where: list[int] = []
        for t in trades:
            sym = t.get("sym") if type(t) is dict else None
            p = partition(sym, self.link.parts) if isinstance(sym, str) else 0
            by_part[p].append(t)
            where.append(p)
        parts: list[bytes] = []
        errors: list[tuple[int, Any, str]] = []
        local: list[list[int]] = [[] for _ in range(self.link.parts)]
        for i, p in enumerate(where):
            local[p].append(i)
        for p, group in enumerate(by_part):
            if not group:
                parts.append(b"")
                continue
            data, errs = encode_trade_batch(group)
            errors += [(local[p][k], sym, why) for k, sym, why in errs]
            parts.append(data if len(errs) < len(group) else b"")
        self.published_trades += len(trades) - len(errors)
        for r in await self._call(parts):
            if isinstance(r, BaseException):
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            self.publish_stale_trades += r[1]
        errors.sort(key=lambda e: e[0])
        return errors


def _settle(fut: asyncio.Future[Any]) -> Any:
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
