"""Trades on the bus: the trade script, the rings and bars kept in Redis, loading them.

``P:trades:N`` is a hash, symbol -> the instrument's last trades (at most the
publishing gateway's ``--trade-ring``) as concatenated ``FTR1`` records,
oldest first. ``P:bars:N`` (the same partition tag) holds the bars made of
every trade the store ever took: symbol -> the newest bar of each of the six
intervals (6 x 56 bytes), and ``chr(k) + symbol`` -> the older held bars of
interval k, oldest first (at most ``bars_history - 1``; a bar is an i64
start and six f64: open, high, low, close, volume, count). ``P:meta`` holds
``bars_tz`` and ``bars_history``, which every gateway and publisher on the
prefix must share (checked on connect; a publisher adopts them).

Every batch goes to Redis in one ``EVALSHA`` of `TRADE_SCRIPT` per
partition, which, for every record, compares ``tseq`` with the newest
stored trade of its symbol, appends the newer ones (cutting the ring to its
size), puts each of them into the stored bars exactly as
`fastfeed._core.Bars` does, and publishes exactly those trades, as one
``FTR1`` batch on the partition's channel ``P:ticks:N`` (beside the tick
batches: the magic tells them apart). The publisher computes each trade's
six bar starts (`fastfeed._core.bar_starts`, the code `Bars` uses: Redis
has no time-zone database) and sends them beside the batch. Ring, bars and
pub/sub therefore never disagree, and every gateway applies the same trades
in the same order on top of the same bars.

`TradeStore` is a job of the link: on every (re)connection, after the
subscriber has subscribed, it reads every ring with the instrument's bars
(`TRADE_LOAD_SCRIPT`: both of one instrument in one script run, so the bars
hold exactly the trades up to the ring's newest) while trade batches from
pub/sub wait. An instrument whose stored newest ``tseq`` is at or above the
one held here takes the stored bars, and the ring's newer trades without
feeding them to the bars (the stored bars hold them); the waiting batches are
applied after, in order (a trade already loaded is stale by ``tseq``). A late
worker thus holds the same bars as one that was up all along, however far
back they reach. If Redis holds fewer rings than the kind (it restarted
without persistence) the kind's rings and bars go back, only where the store
holds nothing newer (`TRADE_SEED_SCRIPT`), without publishing.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import orjson

from fastfeed._core import (
    TRADE_BATCH_MAGIC,
    BarClock,
    bar_starts,
    encode_trade_batch,
    partition,
)

from .link import Addr, BusConfigError, BusDown, Link, RedisError

__all__ = ["TRADE_LOAD_SCRIPT", "TRADE_SCRIPT", "TRADE_SEED_SCRIPT", "TradeStore"]

log = logging.getLogger("fastfeed.bus")

# KEYS[1] trade hash, KEYS[2] bar hash of the partition; ARGV[1] FTR1 batch; ARGV[2]
# channel ('' = store only); ARGV[3] '1' for SPUBLISH; ARGV[4] ring size; ARGV[5] the
# trades' bar starts (bar_starts: 48 bytes a trade; '' = rings only, no bars); ARGV[6]
# bars held per interval. tseq and starts compare as (high, low) u32: exact, where
# Lua numbers (doubles) are not. Bar values are doubles in C and in Lua alike, so
# max, min and the volume sum come out bit for bit as in fastfeed._core.Bars.
TRADE_SCRIPT = r"""
local key, bkey, batch, chan = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local ring, starts, H = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local n = #batch
if n < 8 or string.sub(batch, 1, 4) ~= 'FTR1' then
  return redis.error_reply('ERR fastfeed: not a trade batch')
end
local count = struct.unpack('<I4', batch, 5)
local keep = starts ~= ''
if keep and #starts ~= 48 * count then
  return redis.error_reply('ERR fastfeed: bar starts do not match the trade batch')
end
local function before(a, b)
  local alo, ahi = struct.unpack('<I4i4', a)
  local blo, bhi = struct.unpack('<I4i4', b)
  return ahi < bhi or (ahi == bhi and alo < blo)
end
local function rd(s, p)
  local o, h, l, c, v, m = struct.unpack('<dddddd', s, p + 8)
  return {string.sub(s, p, p + 7), o, h, l, c, v, m}
end
local function wr(b)
  return b[1] .. struct.pack('<dddddd', b[2], b[3], b[4], b[5], b[6], b[7])
end
local function fold(b, price, size)
  if price > b[3] then b[3] = price end
  if price < b[4] then b[4] = price end
  b[5] = price
  b[6] = b[6] + size
  b[7] = b[7] + 1
end
-- a trade in an older bar than the newest: the older held bars, as Bars.add does
local function late(hk, s, price, size)
  local h = redis.call('HGET', bkey, hk) or ''
  local cnt = #h / 56
  if cnt == 0 or before(s, string.sub(h, 1, 8)) then return end
  local lo, hi = 0, cnt
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if before(string.sub(h, mid * 56 + 1, mid * 56 + 8), s) then lo = mid + 1 else hi = mid end
  end
  if lo < cnt and string.sub(h, lo * 56 + 1, lo * 56 + 8) == s then
    local b = rd(h, lo * 56 + 1)
    fold(b, price, size)
    h = string.sub(h, 1, lo * 56) .. wr(b) .. string.sub(h, lo * 56 + 57)
  else
    h = string.sub(h, 1, lo * 56) .. wr({s, price, price, price, price, size, 1})
        .. string.sub(h, lo * 56 + 1)
    if cnt + 1 == H then h = string.sub(h, 57) end
  end
  redis.call('HSET', bkey, hk, h)
end
local newest, touched = {}, {}
local function bars(sym, sp, price, size)
  local f = newest[sym]
  if f == nil then
    f = {}
    local raw = redis.call('HGET', bkey, sym)
    if raw then
      for k = 1, 6 do f[k] = rd(raw, k * 56 - 55) end
    end
    newest[sym] = f
    touched[#touched + 1] = sym
  end
  for k = 1, 6 do
    local s = string.sub(starts, sp + k * 8 - 8, sp + k * 8 - 1)
    local b = f[k]
    if b == nil then
      f[k] = {s, price, price, price, price, size, 1}
    elseif s == b[1] then
      fold(b, price, size)
    elseif before(b[1], s) then
      -- a new newest bar: the old one joins the older bars (the oldest goes if full)
      if H > 1 then
        local hk = string.char(k - 1) .. sym
        local h = (redis.call('HGET', bkey, hk) or '') .. wr(b)
        if #h > (H - 1) * 56 then h = string.sub(h, #h - (H - 1) * 56 + 1) end
        redis.call('HSET', bkey, hk, h)
      end
      f[k] = {s, price, price, price, price, size, 1}
    else
      late(string.char(k - 1) .. sym, s, price, size)
    end
  end
end
local pos = 9
local out = {}
local applied, stale = 0, 0
for i = 1, count do
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
    if keep then
      local price, size = struct.unpack('<dd', batch, pos + 1 + slen + 16)
      bars(sym, i * 48 - 47, price, size)
    end
    applied = applied + 1
    out[applied] = rec
  else
    stale = stale + 1
  end
  pos = pos + rlen
end
for _, sym in ipairs(touched) do
  local f = newest[sym]
  redis.call('HSET', bkey, sym, wr(f[1]) .. wr(f[2]) .. wr(f[3]) .. wr(f[4]) .. wr(f[5])
             .. wr(f[6]))
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

# KEYS[1] trade hash, KEYS[2] bar hash; ARGV[1] HSCAN cursor, ARGV[2] COUNT. Returns
# the next cursor, then per instrument: symbol, ring, newest bars, the six intervals'
# older bars (nil where none): one script run, so the bars are those of the ring.
TRADE_LOAD_SCRIPT = r"""
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out, flat = {r[1]}, r[2]
for i = 1, #flat, 2 do
  local sym = flat[i]
  out[#out + 1] = sym
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], sym)
  for k = 0, 5 do out[#out + 1] = redis.call('HGET', KEYS[2], string.char(k) .. sym) end
end
return out
"""

# KEYS[1] trade hash, KEYS[2] bar hash; ARGV: per instrument nine values: symbol, its
# ring (FTR1 records, oldest first), its newest bars ('' = none), the six intervals'
# older bars. Written where the store holds no trade of the symbol, or only older
# ones than the ring's newest. Returns the trades written.
TRADE_SEED_SCRIPT = r"""
local taken = 0
for i = 1, #ARGV, 9 do
  local sym, ring = ARGV[i], ARGV[i + 1]
  local rlen = #sym + 34
  local old = redis.call('HGET', KEYS[1], sym)
  local newer = true
  if old then
    local olo, ohi = struct.unpack('<I4I4', old, #old - rlen + 2 + #sym)
    local lo, hi = struct.unpack('<I4I4', ring, #ring - rlen + 2 + #sym)
    newer = hi > ohi or (hi == ohi and lo > olo)
  end
  if newer then
    redis.call('HSET', KEYS[1], sym, ring)
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', KEYS[2], sym, ARGV[i + 2])
      for k = 0, 5 do
        local h = ARGV[i + 3 + k]
        if h == '' then
          redis.call('HDEL', KEYS[2], string.char(k) .. sym)
        else
          redis.call('HSET', KEYS[2], string.char(k) .. sym, h)
        end
      end
    end
    taken = taken + #ring / rlen
  end
end
return taken
"""

_HEADER = struct.Struct("<4sI")


class TradeStore:
    """Publishes trades through `TRADE_SCRIPT` and loads the rings and bars into
    `trades` (a `fastfeed._core.Trades`, its bars those it feeds; None for a
    bus that only publishes). ``bars_tz`` and ``bars_history``: the bars the
    store keeps (default: those of `trades`' bars; without them, the
    prefix's from ``P:meta``, or UTC and 200 if it has none). With
    ``keep_bars=False`` the store keeps rings only (a bench's baseline: a
    late worker's bars are then rebuilt from the ring)."""

    def __init__(self, link: Link, trades: Any = None, ring: int = 100,
                 on_trades: Any = None, *, bars_tz: str | None = None,
                 bars_history: int | None = None, keep_bars: bool = True) -> None:
        self.link = link
        self.trades = trades
        self.bars = getattr(trades, "bars", None)
        if self.bars is not None:
            bars_tz = self.bars.tz if bars_tz is None else bars_tz
            bars_history = self.bars.history if bars_history is None else bars_history
        self.bars_tz = bars_tz
        self.bars_history = bars_history
        self.keep_bars = keep_bars
        self.clock: Any = None  # a BarClock of the prefix's zone, once it is known
        self.ring = ring
        self.on_trades = on_trades
        self.keys = [k.replace(b":row:", b":trades:") for k in link.row_keys]
        self.bar_keys = [k.replace(b":row:", b":bars:") for k in link.row_keys]
        self._sha = b""
        self._history = b""
        self._apply: Callable[[bytes], Any] | None = None
        self._waiting: list[bytes] | None = None  # trade batches that came during the load
        # counters (never reset)
        self.published_trades = 0
        self.publish_stale_trades = 0
        self.loaded_trades = 0
        self.loaded_bars = 0
        self.reseeded_trades = 0

    def describe(self) -> str:
        if self.trades is None:
            return ""
        return f"{self.loaded_trades} trades, bars of {self.loaded_bars} instruments loaded"

    def still_routed(self, owners: Sequence[Addr | None]) -> bool:
        return True

    def gate(self, apply: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        """`apply` (the subscriber's, for every batch from pub/sub), holding
        trade batches back while the rings and bars load."""
        self._apply = apply

        def gated(data: bytes) -> Any:
            if self._waiting is not None and data[:4] == TRADE_BATCH_MAGIC:
                self._waiting.append(data)
                return 0, 0, 0
            return apply(data)

        return gated

    async def on_connect(self) -> None:
        t = self.link.connect_timeout
        for conn in self.link.cmd_conns():
            self._sha = await conn.call("SCRIPT", "LOAD", TRADE_SCRIPT, timeout=t)
        await self._agree(t)
        if self.trades is not None:
            await self._load()

    async def _agree(self, t: float, settle: bool = False) -> None:
        """Every process on the prefix keeps the same bars: same zone, same
        history. A process that has none of its own adopts the prefix's; with
        none there yet (a publisher before any gateway) it sets the defaults
        only when it publishes trades (`settle`)."""
        link = self.link
        meta = link.meta_conn()
        have: list[str] = []
        for field, mine, default, flag in (("bars_tz", self.bars_tz, "UTC", "--bars-tz"),
                                           ("bars_history", self.bars_history, 200,
                                            "--bars-history")):
            if mine is not None or settle:
                await meta.call("HSETNX", link.meta_key, field,
                                default if mine is None else mine, timeout=t)
            raw = await meta.call("HGET", link.meta_key, field, timeout=t)
            if raw is None:
                return
            got = raw.decode()
            if mine is not None and got != str(mine):
                raise BusConfigError(
                    f"Redis prefix {link.prefix!r} keeps bars with {field} {got}, this process "
                    f"has {flag} {mine}: use the same everywhere, or HDEL {link.meta_key} "
                    f"{field} (and DEL the {link.prefix}:bars:* hashes) after stopping every "
                    "gateway and publisher")
            have.append(got)
        try:
            self.clock = BarClock(have[0])
        except Exception as e:
            raise BusConfigError(f"Redis prefix {link.prefix!r} keeps bars in the zone "
                                 f"{have[0]!r}, unknown here: {e}") from e
        self._history = have[1].encode()

    async def _load(self) -> None:
        link, kind, bars = self.link, self.trades, self.bars
        table = kind.table
        held = loaded = nbars = 0
        self._waiting = []
        try:
            for n, key in enumerate(self.keys):
                conn = link.key_conn(n)
                cursor = b"0"
                while True:
                    flat = await conn.call("EVAL", TRADE_LOAD_SCRIPT, 2, key, self.bar_keys[n],
                                           cursor, 500, timeout=link.ping_timeout)
                    cursor = flat[0]
                    for i in range(1, len(flat), 9):
                        sym, blob, newest = flat[i], flat[i + 1], flat[i + 2]
                        rlen = len(sym) + 34
                        count = len(blob) // rlen
                        batch = _HEADER.pack(TRADE_BATCH_MAGIC, count) + blob
                        iid = table.lookup(sym.decode())
                        mine = kind.last_tseq(iid) if iid >= 0 else -1
                        stored = int.from_bytes(blob[-rlen + 1 + len(sym):][:8], "little")
                        if bars is not None and newest is not None and stored >= mine:
                            # the stored bars hold every trade up to the ring's newest
                            a, _, _ = kind.apply_batch(batch, seed=True, bars=False)
                            iid = table.lookup(sym.decode())
                            if iid >= 0:  # else the table is full: the trades were refused
                                older = [h or b"" for h in flat[i + 3:i + 9]]
                                nbars += bars.load_packed(iid, newest, older) > 0
                        else:
                            # no stored bars (rings written without them): rebuilt from the ring
                            a, _, _ = kind.apply_batch(batch, seed=True)
                        loaded += a
                        held += 1
                    if cursor == b"0":
                        break
        finally:
            waiting, self._waiting = self._waiting or [], None
        apply = self._apply or kind.apply_batch
        for data in waiting:
            try:
                apply(data)
            except (ValueError, TypeError) as e:
                log.warning("bus: dropped a bad trade batch: %s", e)
        self.loaded_trades += loaded
        self.loaded_bars += nbars
        if (loaded or nbars or waiting) and self.on_trades is not None:
            self.on_trades()
        if held < sum(1 for iid in range(len(table)) if kind.last_tseq(iid) >= 0):
            await self._reseed()

    async def _reseed(self) -> None:
        """Redis lost the rings (a restart without persistence): write ours back,
        with our bars."""
        kind, bars = self.trades, self.bars
        by_part: list[list[bytes]] = [[] for _ in range(self.link.parts)]
        for iid in range(len(kind.table)):
            held = kind.recent(iid)[-self.ring:]
            if not held:
                continue
            sym = kind.table.symbol(iid)
            group = []
            for raw in held:
                tseq, ts, price, size, side = orjson.loads(raw)
                group.append({"sym": sym, "tseq": tseq, "ts": ts, "price": price,
                              "size": size, "side": side})
            packed = bars.packed(iid) if bars is not None and self.keep_bars else None
            newest, older = packed if packed is not None else (b"", [b""] * 6)
            by_part[partition(sym, self.link.parts)] += [
                sym.encode(), encode_trade_batch(group)[0][_HEADER.size:], newest, *older]
        sent = 0
        for n, args in enumerate(by_part):
            conn = self.link.key_conn(n)
            for i in range(0, len(args), 9 * 100):
                sent += await conn.call("EVAL", TRADE_SEED_SCRIPT, 2, self.keys[n],
                                        self.bar_keys[n], *args[i:i + 9 * 100],
                                        timeout=self.link.ping_timeout)
        self.reseeded_trades += sent
        if sent:
            log.warning("bus: redis had lost the trade rings; wrote back %d trades and their "
                        "bars from this worker", sent)

    def _send_one(self, n: int, batch: bytes, callback: Any, publish: bool) -> None:
        link = self.link
        starts = bar_starts(batch, self.clock) if self.keep_bars else b""
        args = (b"EVALSHA", self._sha, b"2", self.keys[n], self.bar_keys[n], batch,
                link.channel_names[n] if publish else b"", link.spub, str(self.ring).encode(),
                starts, self._history)

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
        if self.clock is None and self.keep_bars:
            await self._agree(self.link.ping_timeout, settle=True)
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
