"""The Redis tick bus and state store shared by workers and pods.

Every worker of every pod holds the whole instrument table. Ticks reach all of
them through Redis pub/sub, and the latest row of every instrument is kept in
Redis so that a worker that starts late (or comes back after Redis was away)
can load a snapshot first.

Names (``P`` is ``--redis-prefix``, ``N`` the partition of a symbol,
``fastfeed._core.partition(sym, --redis-channels)``):

``P:ticks:N``   pub/sub channel of partition N; every message is one binary
                tick batch (``FFT1``, see `fastfeed._core.encode_batch`)
``P:row:N``     hash, symbol -> the instrument's latest row as one ``FFT1``
                record (u8 symbol length, symbol, u8 field mask, i64 seq,
                the fields in the mask), all fields it ever had merged in
``P:meta``      hash; ``channels`` is the partition count, which every
                gateway and publisher on this prefix must share (checked
                on connect)

With ``sharded=True`` the partition number is a hash tag, ``P:ticks:{N}``
and ``P:row:{N}``, so a partition's channel and hash live in the same slot,
and the bus uses ``SSUBSCRIBE``/``SPUBLISH`` (on one Redis 7 node). A
``redis+cluster://`` URL gives `fastfeed.bus.cluster.ClusterBus` instead,
which routes every partition to the master owning its slot (its own tags,
spread evenly over the slots). A ``redis+sentinel://`` URL asks the
Sentinels for the master on every (re)connection and then works as on one
Redis.

Publishing: the ticks of a call are encoded into one batch per partition and
each batch goes to Redis in one ``EVALSHA`` of `ROW_SCRIPT`, which, for every
record, compares ``seq`` with the stored row, merges the newer ones into it,
stores them, and publishes the merged rows that were newer as one batch. State
and pub/sub therefore never disagree: a message carries exactly the rows the
store took, and they are full rows, so applying the same set of messages and
snapshot rows in any order gives the same table.

Subscribing, on every (re)connection: SUBSCRIBE all channels first, then read
the store (``HSCAN`` in chunks) and apply it. A tick published in between
arrives on the channel and is also in the store; the table keeps the newer
``seq`` and drops the other, so no window loses a tick. Only then is the bus
ready (`on_feed(True)`).

Failure handling: a circuit breaker. Losing either connection, or a ``PING``
unanswered for `ping_timeout` seconds, opens it (`on_feed(False)`,
`publish` raises `BusDown`); reconnection attempts follow after a jittered
exponential backoff (half-open while trying), and the breaker closes once
subscriptions, script and snapshot are back.

The hot path (pub/sub messages into the table) is a raw asyncio protocol with
`hiredis.Reader`; no redis-py anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from fastfeed._core import encode_batch

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "ROW_SCRIPT",
    "BusConfigError",
    "BusDown",
    "RedisBus",
    "RedisError",
    "RedisURL",
    "is_cluster_url",
    "parse_sentinel_url",
    "parse_url",
]

log = logging.getLogger("fastfeed.bus")

# circuit breaker states, as exported in metrics
CLOSED, OPEN, HALF_OPEN = 0, 1, 2
BREAKER_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}

_HEADER = struct.Struct("<4sI")

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


class RedisError(Exception):
    """Redis answered a command with an error."""


class BusDown(ConnectionError):
    """The bus cannot take ticks now (Redis unreachable, circuit open)."""


class BusConfigError(RuntimeError):
    """This process and the data in Redis disagree (e.g. the channel count)."""


# ---- URLs --------------------------------------------------------------------


@dataclass(frozen=True)
class RedisURL:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    path: str | None = None  # unix socket
    # redis+sentinel://: ask these Sentinels for the master of `service`
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""

    def __str__(self) -> str:  # never shows the password
        s = "rediss" if self.tls else "redis"
        if self.sentinels:
            hosts = ",".join(fmt_addr(a) for a in self.sentinels)
            return f"{s}+sentinel://{hosts}/{self.service}/{self.db}"
        where = self.path or f"{self.host}:{self.port}"
        return f"{s}://{where}/{self.db}"


def fmt_addr(addr: tuple[str, int]) -> str:
    h, p = addr
    return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"


def split_hosts(netloc: str, default_port: int, url: str
                ) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[user[:password]@]host[:port],host[:port]...`` -> (user, password, addresses)."""
    user = password = None
    if "@" in netloc:
        cred, _, netloc = netloc.rpartition("@")
        u, colon, pw = cred.partition(":")
        user = unquote(u) or None
        password = unquote(pw) if colon else None
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        try:
            hosts.append((host or "127.0.0.1", int(port) if port else default_port))
        except ValueError:
            raise ValueError(f"bad port in Redis URL {url!r}: {item!r}") from None
    if not hosts:
        raise ValueError(f"the Redis URL names no host: {url!r}")
    return user, password, hosts


def parse_sentinel_url(url: str) -> RedisURL:
    """``redis+sentinel://[[user]:password@]host1[:port][,host2[:port]...]/SERVICE[/db]``
    (port 26379 by default; ``rediss+sentinel://`` for TLS). The credentials
    are the master's; the Sentinels are asked without."""
    scheme, _, rest = url.partition("://")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if query:
        raise ValueError(f"no query options are understood in a Sentinel URL: {url!r}")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"a Sentinel URL names the monitored master: "
                         f"redis+sentinel://host:26379/NAME, not {url!r}")
    user, password, hosts = split_hosts(netloc, 26379, url)
    try:
        dbn = int(db) if db else 0
    except ValueError:
        raise ValueError(f"bad database number in {url!r}") from None
    return RedisURL(host=hosts[0][0], port=hosts[0][1], db=dbn, username=user,
                    password=password, tls=scheme.lower().startswith("rediss"),
                    sentinels=tuple(hosts), service=service)


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://`` or ``rediss+cluster://``: a Redis Cluster's seed nodes."""
    return url.split("://", 1)[0].lower() in ("redis+cluster", "rediss+cluster")


def parse_url(url: str) -> RedisURL:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or
    ``unix:///path/to/socket[?db=N]``, or Sentinel (`parse_sentinel_url`)."""
    if url.split("://", 1)[0].lower() in ("redis+sentinel", "rediss+sentinel"):
        return parse_sentinel_url(url)
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (redis://, rediss://, unix://, redis+sentinel:// "
                         f"or, for a cluster, redis+cluster://): {url!r}")
    q = parse_qs(u.query)
    db = 0
    if u.scheme != "unix" and u.path.strip("/"):
        db = int(u.path.strip("/"))
    elif "db" in q:
        db = int(q["db"][0])
    return RedisURL(
        host=u.hostname or "127.0.0.1",
        port=u.port or 6379 if u.scheme != "unix" else 0,
        db=db,
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
        tls=u.scheme == "rediss",
        path=u.path if u.scheme == "unix" else None,
    )


# ---- connections ---------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One RESP connection. Commands are pipelined and answered in order."""

    def __init__(self, name: str, on_lost: Callable[[_Conn, Exception | None], None]):
        self.name = name
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any] | Callable[[Any], None]] = deque()
        self.transport: asyncio.Transport | None = None
        self.on_lost = on_lost
        self.closed = False
        self.paused = False
        self._drain: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            r = self.reader.gets()
            if r is False:
                break
            self._reply(r)

    def _reply(self, r: Any) -> None:
        if not self.waiters:
            log.warning("redis %s: unexpected reply %.80r", self.name, r)
            return
        w = self.waiters.popleft()
        if callable(w) and not isinstance(w, asyncio.Future):
            w(r)
        elif not w.done():
            if isinstance(r, hiredis.ReplyError):
                w.set_exception(RedisError(str(r)))
            else:
                w.set_result(r)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = BusDown(f"redis {self.name} connection lost" + (f": {exc}" if exc else ""))
        while self.waiters:
            w = self.waiters.popleft()
            if isinstance(w, asyncio.Future):
                if not w.done():
                    w.set_exception(err)
            else:
                w(err)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(err)
        self.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # commands
    def write(self, args: Sequence[Any], replies: int = 1,
              callback: Callable[[Any], None] | None = None) -> list[asyncio.Future[Any]]:
        """Send one command; returns one future per expected reply (none with
        `callback`, which gets the reply, a `hiredis.ReplyError` or `BusDown`)."""
        if self.closed or self.transport is None:
            raise BusDown(f"redis {self.name} connection is closed")
        self.transport.write(hiredis.pack_command(tuple(args)))
        if callback is not None:
            self.waiters.append(callback)
            return []
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(replies)]
        self.waiters.extend(futs)
        return futs

    async def call(self, *args: Any, timeout: float | None = None) -> Any:
        (fut,) = self.write(args)
        return await asyncio.wait_for(fut, timeout)

    async def drain(self) -> None:
        if self.paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _SubConn(_Conn):
    """The SUBSCRIBE connection: pushes go straight into the table."""

    def __init__(self, name: str, on_lost: Callable[[_Conn, Exception | None], None],
                 bus: RedisBus):
        super().__init__(name, on_lost)
        self.bus = bus

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        bus = self.bus
        apply = bus.table.apply_batch
        got = 0
        while True:
            r = reader.gets()
            if r is False:
                break
            if type(r) is list and len(r) == 3 and (r[0] == b"message" or r[0] == b"smessage"):
                bus.messages += 1
                try:
                    a, s, _ = apply(r[2])
                    bus.ticks_applied += a
                    bus.ticks_stale += s
                    got += a
                except (ValueError, TypeError) as e:
                    bus.bad_batches += 1
                    if bus.bad_batches <= 10 or bus.bad_batches % 1000 == 0:
                        log.warning("bus: dropped a bad batch on %r (%d so far): %s",
                                    r[1], bus.bad_batches, e)
            elif (type(r) is list and r and r[0] == b"sunsubscribe" and not self.waiters):
                # Redis dropped our sharded subscription: the slot moved
                bus._slot_moved(self, r[1] if len(r) > 1 else b"?")
            else:
                self._reply(r)
        if got and bus.on_ticks is not None:
            bus.on_ticks()


# ---- the bus ---------------------------------------------------------------------


class RedisBus:
    """Tick bus and state store on one Redis (or a Redis Cluster with `sharded`).

    ``table``: a `fastfeed._core.Table` that receives every tick (None with
    ``subscribe=False``, for publishers). ``on_ticks()`` is called after
    ticks were applied (once per read from the socket, not per message);
    ``on_feed(up)`` when the bus comes up (snapshot loaded) or goes down.
    """

    def __new__(cls, url: str, *args: Any, **kw: Any) -> RedisBus:
        # a redis+cluster:// URL gives the cluster-routing bus
        if cls is RedisBus and is_cluster_url(url):
            from .cluster import ClusterBus

            return super().__new__(ClusterBus)
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        table: Any = None,
        *,
        channels: int = 16,
        prefix: str = "fastfeed",
        on_ticks: Callable[[], None] | None = None,
        on_feed: Callable[[bool], None] | None = None,
        subscribe: bool = True,
        sharded: bool = False,
        reseed: bool = True,
        backoff_base: float = 0.1,
        backoff_cap: float | None = None,
        connect_timeout: float = 3.0,
        ping_interval: float = 1.0,
        ping_timeout: float = 3.0,
        snapshot_chunk: int = 2000,
        name: str = "bus",
    ):
        if channels < 1:
            raise ValueError("channels must be at least 1")
        if subscribe and table is None:
            raise ValueError("a subscribing bus needs a table")
        self.url: Any = parse_url(url)
        self.table = table
        self.parts = channels
        self.prefix = prefix
        self.on_ticks = on_ticks
        self.on_feed = on_feed
        self.subscribing = subscribe
        self.sharded = sharded
        self.reseed = reseed
        self.backoff_base = backoff_base
        # with Sentinel, a failover is seconds away: look again often
        self.backoff_cap = backoff_cap if backoff_cap is not None else (
            0.5 if self.url.sentinels else 5.0)
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.snapshot_chunk = snapshot_chunk
        self.name = name

        def tag(n: int) -> str:
            return f"{{{n}}}" if sharded else str(n)

        self.channel_names = [f"{prefix}:ticks:{tag(n)}".encode() for n in range(channels)]
        self.row_keys = [f"{prefix}:row:{tag(n)}".encode() for n in range(channels)]
        self._spub = b"1" if sharded else b"0"
        self._cmd: _Conn | None = None
        self._sub: _SubConn | None = None
        self._sha: bytes = b""
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._closing = False
        self._feed: bool | None = None
        self.breaker = HALF_OPEN
        self.last_error = ""
        # counters (metrics read them; never reset)
        self.messages = 0
        self.ticks_applied = 0
        self.ticks_stale = 0
        self.bad_batches = 0
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.snapshot_rows = 0
        self.snapshot_seconds = 0.0
        self.reseeded_rows = 0
        self.published_ticks = 0
        self.published_batches = 0
        self.publish_stale = 0
        self.publish_errors = 0
        self.publish_refused = 0
        self.outages = 0  # times the bus went down after having been up
        self.outage_seconds = 0.0  # length of the last outage (0 while none ended)
        self.outage_seconds_total = 0.0
        self.lost_node = ""  # the Redis (host:port) whose loss began the last outage
        self._down_at: float | None = None
        self._addr: tuple[str, int] | None = None  # the master Sentinel named

    @classmethod
    def from_config(cls, cfg: Any, table: Any, **kw: Any) -> RedisBus:
        return cls(cfg.redis, table, channels=cfg.redis_channels, prefix=cfg.redis_prefix, **kw)

    # ---- state ----

    @property
    def ready(self) -> bool:
        """Connected, subscribed and holding the snapshot (breaker closed)."""
        return self.breaker == CLOSED

    def stats(self) -> dict[str, float]:
        return {
            "breaker": self.breaker,
            "messages": self.messages,
            "ticks_applied": self.ticks_applied,
            "ticks_stale": self.ticks_stale,
            "bad_batches": self.bad_batches,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "disconnects": self.disconnects,
            "snapshot_rows": self.snapshot_rows,
            "snapshot_seconds": self.snapshot_seconds,
            "reseeded_rows": self.reseeded_rows,
            "published_ticks": self.published_ticks,
            "published_batches": self.published_batches,
            "publish_stale": self.publish_stale,
            "publish_errors": self.publish_errors,
            "publish_refused": self.publish_refused,
            "outages": self.outages,
            "outage_seconds": self.outage_seconds,
            "outage_seconds_total": self.outage_seconds_total,
        }

    # ---- lifecycle ----

    async def start(self) -> None:
        """Start connecting in the background; see `wait_ready`."""
        if self._task is None:
            self._lost = asyncio.Event()
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        assert self._ready is not None, "start() first"
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._teardown()
        self.breaker = OPEN

    stop = close

    async def __aenter__(self) -> RedisBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _set_feed(self, up: bool) -> None:
        if self._feed is up:
            return
        self._feed = up
        if self.on_feed is not None:
            try:
                self.on_feed(up)
            except Exception:
                log.exception("bus: on_feed callback failed")

    def backoff(self, attempt: int) -> float:
        """Seconds before reconnection attempt `attempt` (0-based): exponential,
        capped, with "equal jitter" (half fixed, half random) so that many
        workers do not reconnect in lockstep."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** min(attempt, 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _run(self) -> None:
        attempt = 0
        assert self._lost is not None and self._ready is not None
        while not self._closing:
            self.breaker = HALF_OPEN
            self._lost.clear()
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                self._teardown()
                raise
            except Exception as e:
                self._teardown()
                self.breaker = OPEN
                self.connect_failures += 1
                self.last_error = str(e) or type(e).__name__
                self._set_feed(False)
                delay = self.backoff(attempt)
                log_at = logging.WARNING if attempt < 3 or attempt % 10 == 0 else logging.DEBUG
                log.log(log_at, "bus: redis %s unreachable (attempt %d: %s); retry in %.2fs",
                        self.url, attempt + 1, self.last_error, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.connects += 1
            self.breaker = CLOSED
            self._ready.set()
            self._set_feed(True)
            down = ""
            if self._down_at is not None:
                self.outage_seconds = time.monotonic() - self._down_at
                self.outage_seconds_total += self.outage_seconds
                self._down_at = None
                down = (f"; was down {self.outage_seconds:.2f}s after losing "
                        f"{self.lost_node or self.url}")
            log.info("bus: up on %s (%d channels%s, %d snapshot rows in %.3fs%s)",
                     self.url, self.parts, ", sharded" if self.sharded else "",
                     self.snapshot_rows, self.snapshot_seconds, down)
            pinger = asyncio.get_running_loop().create_task(self._ping_loop())
            try:
                await self._lost.wait()
            finally:
                pinger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinger
            self._teardown()
            if self._closing:
                break
            self.breaker = OPEN
            self.disconnects += 1
            self.outages += 1
            self._down_at = time.monotonic()
            self._ready.clear()
            self._set_feed(False)
            log.warning("bus: lost redis %s (%s); reconnecting", self.url, self.last_error)
            await asyncio.sleep(self.backoff(0))
            attempt = 1

    def _on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        if conn is self._cmd or conn is self._sub:
            self.last_error = f"{conn.name} connection lost" + (f": {exc}" if exc else "")
            if self._addr is not None:
                self.last_error = f"master {fmt_addr(self._addr)}: {self.last_error}"
            self.lost_node = fmt_addr(self._addr) if self._addr else str(self.url)
            if self._lost is not None:
                self._lost.set()

    def _slot_moved(self, conn: _Conn, channel: bytes) -> None:
        """Redis ended a sharded subscription itself (its slot moved to
        another node): reconnect, which re-reads the slot map."""
        self.last_error = (f"{conn.name}: Redis dropped the subscription of "
                           f"{channel.decode(errors='replace')} (slot moved)")
        self.lost_node = conn.name.partition("@")[2] or str(self.url)
        if self._lost is not None:
            self._lost.set()

    async def _open(self, name: str, factory: Callable[[], _Conn],
                    addr: tuple[str, int] | None = None) -> _Conn:
        loop = asyncio.get_running_loop()
        u = self.url
        ctx = ssl.create_default_context() if u.tls else None
        if addr is not None:
            coro = loop.create_connection(factory, addr[0], addr[1], ssl=ctx)
        elif u.path:
            coro = loop.create_unix_connection(factory, u.path)
        else:
            coro = loop.create_connection(factory, u.host, u.port, ssl=ctx)
        _, conn = await asyncio.wait_for(coro, self.connect_timeout)
        t = self.connect_timeout
        if u.password is not None:
            args = ("AUTH", u.username, u.password) if u.username else ("AUTH", u.password)
            await conn.call(*args, timeout=t)
        if u.db:
            await conn.call("SELECT", u.db, timeout=t)
        await conn.call("CLIENT", "SETNAME", f"fastfeed-{self.name}-{name}", timeout=t)
        return conn

    async def _ask_sentinels(self) -> tuple[str, int]:
        """The master's address, from the first Sentinel that knows it."""
        loop = asyncio.get_running_loop()
        u = self.url
        ctx = ssl.create_default_context() if u.tls else None
        tried = []
        for addr in u.sentinels:
            conn: _Conn | None = None
            try:
                coro = loop.create_connection(lambda: _Conn("sentinel", lambda _c, _e: None),
                                              addr[0], addr[1], ssl=ctx)
                _, conn = await asyncio.wait_for(coro, self.connect_timeout)
                assert conn is not None
                r = await conn.call("SENTINEL", "get-master-addr-by-name", u.service,
                                    timeout=self.connect_timeout)
                if not r:
                    tried.append(f"{fmt_addr(addr)}: does not monitor {u.service!r}")
                    continue
                return r[0].decode(), int(r[1])
            except (OSError, TimeoutError, BusDown, RedisError) as e:
                tried.append(f"{fmt_addr(addr)}: {e or type(e).__name__}")
            finally:
                if conn is not None:
                    conn.abort()
        raise BusDown("no Sentinel named the master (" + "; ".join(tried) + ")")

    async def _connect_once(self) -> None:
        t = self.connect_timeout
        addr = None
        if self.url.sentinels:
            addr = await self._ask_sentinels()
            if addr != self._addr:
                log.log(logging.WARNING if self._addr else logging.INFO,
                        "bus: Sentinel names %s the master of %r%s", fmt_addr(addr),
                        self.url.service,
                        f" (was {fmt_addr(self._addr)})" if self._addr else "")
            self._addr = addr
            try:
                self._cmd = await self._open("cmd", lambda: _Conn("cmd", self._on_lost), addr)
            except (OSError, TimeoutError) as e:
                raise BusDown(f"master {fmt_addr(addr)} (named by Sentinel): "
                              f"{e or type(e).__name__}; Sentinel fails it over after its "
                              "down-after-milliseconds") from e
        else:
            self._cmd = await self._open("cmd", lambda: _Conn("cmd", self._on_lost))
        if addr is not None:
            role = await self._cmd.call("ROLE", timeout=t)
            if role[0] != b"master":
                raise BusDown(f"{fmt_addr(addr)}, named master by Sentinel, is a "
                              f"{role[0].decode()} (a failover is under way)")
        self._sha = await self._cmd.call("SCRIPT", "LOAD", ROW_SCRIPT, timeout=t)
        # every bus on this prefix must partition alike, or ticks go unheard
        meta = f"{self.prefix}:meta"
        await self._cmd.call("HSETNX", meta, "channels", self.parts, timeout=t)
        have = await self._cmd.call("HGET", meta, "channels", timeout=t)
        if have is not None and int(have) != self.parts:
            raise BusConfigError(
                f"Redis prefix {self.prefix!r} is used with {int(have)} channels, this process "
                f"has --redis-channels {self.parts}: use the same count everywhere (or another "
                f"--redis-prefix, or DEL {meta} after stopping every gateway and publisher)")
        if not self.subscribing:
            return
        self._sub = await self._open("sub", lambda: _SubConn("sub", self._on_lost, self),  # type: ignore[assignment]
                                     addr)
        assert self._sub is not None
        verb = "SSUBSCRIBE" if self.sharded else "SUBSCRIBE"
        futs = self._sub.write((verb, *self.channel_names), replies=self.parts)
        await asyncio.wait_for(asyncio.gather(*futs), t)
        await self._load_snapshot()

    def _key_conn(self, n: int) -> _Conn:
        """The command connection holding partition `n`'s row hash."""
        if self._cmd is None or self._cmd.closed:
            raise BusDown("redis bus is down")
        return self._cmd

    async def _load_snapshot(self) -> None:
        t0 = time.perf_counter()
        rows = 0
        total = 0
        table = self.table
        for n, key in enumerate(self.row_keys):
            cursor = b"0"
            conn = self._key_conn(n)
            total += await conn.call("HLEN", key, timeout=self.ping_timeout)
            while True:
                cursor, flat = await conn.call(
                    "HSCAN", key, cursor, "COUNT", self.snapshot_chunk, timeout=self.ping_timeout)
                recs = flat[1::2]
                if recs:
                    table.apply_batch(_HEADER.pack(b"FFT1", len(recs)) + b"".join(recs))
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
        fields = ("sym", "seq", "ts", "bid", "ask", "last",
                  "bid_size", "ask_size", "last_size", "volume")
        ticks = []
        for iid in range(len(table)):
            if table.seq_of(iid) >= 0:
                ticks.append(dict(zip(fields, table.row(iid), strict=True)))
        sent = 0
        for i in range(0, len(ticks), 1000):
            parts, _ = encode_batch(ticks[i:i + 1000], self.parts)
            futs = self._send(parts, publish=False)
            for f in futs:
                applied, _stale = await asyncio.wait_for(f, self.ping_timeout)
                sent += applied
        self.reseeded_rows += sent
        if sent:
            log.warning("bus: redis had lost state; wrote back %d rows from this worker", sent)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            try:
                for c in (self._cmd, self._sub):
                    if c is not None:
                        await c.call("PING", timeout=self.ping_timeout)
            except (TimeoutError, BusDown, RedisError) as e:
                self.last_error = f"ping failed: {e or type(e).__name__}"
                assert self._lost is not None
                self._lost.set()
                return

    def _teardown(self) -> None:
        for c in (self._cmd, self._sub):
            if c is not None:
                c.on_lost = lambda _c, _e: None
                c.abort()
                if not c.closed:
                    c.connection_lost(None)
        self._cmd = self._sub = None

    # ---- publishing ----

    def _send(self, parts: list[bytes], publish: bool = True,
              callback: Callable[[Any], None] | None = None) -> list[asyncio.Future[Any]]:
        cmd = self._cmd
        if cmd is None or cmd.closed:
            raise BusDown("redis bus is down")
        futs: list[asyncio.Future[Any]] = []
        for n, b in enumerate(parts):
            if not b:
                continue
            args = (b"EVALSHA", self._sha, b"1", self.row_keys[n], b,
                    self.channel_names[n] if publish else b"", self._spub)
            if callback is not None:
                cmd.write(args, callback=self._nowait_reply(args, callback))
            else:
                futs.extend(cmd.write(args))
            self.published_batches += 1
        return futs

    def _nowait_reply(self, args: tuple[Any, ...],
                      callback: Callable[[Any], None]) -> Callable[[Any], None]:
        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT"):
                cmd = self._cmd
                if cmd is not None and not cmd.closed:
                    cmd.write((b"EVAL", ROW_SCRIPT, *args[2:]), callback=done)
                    return
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

    def _check_up(self) -> None:
        if self.breaker != CLOSED or self._cmd is None or self._cmd.closed:
            self.publish_refused += 1
            why = f": {self.last_error}" if self.last_error else ""
            raise BusDown(f"redis bus is down (circuit {BREAKER_NAMES[self.breaker]}{why}); "
                          "ticks were not published")

    def publish_nowait(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Validate and send `ticks` without waiting for Redis.

        Returns the refused ticks as ``(index, sym, message)``; the others are
        on their way (a later failure is counted in ``publish_errors``).
        Raises `BusDown`, having sent nothing, while the circuit is open.
        """
        self._check_up()
        parts, errors = encode_batch(ticks, self.parts)
        self._send(parts, callback=self._count)
        self.published_ticks += len(ticks) - len(errors)
        return errors

    def publish_batches_nowait(self, parts: list[bytes]) -> None:
        """Send already encoded batches, one per partition (b"" for none)."""
        self._check_up()
        self._send(parts, callback=self._count)

    async def publish(self, ticks: list[dict[str, Any]]) -> list[tuple[int, Any, str]]:
        """Validate, store only-if-newer and publish `ticks`, waiting for Redis.

        Returns the ticks refused by validation as ``(index, sym, message)``.
        Raises `BusDown` if Redis is unreachable or the connection drops
        before Redis answered (the ticks may or may not have been taken;
        sending them again is harmless, the store drops what it has).
        """
        self._check_up()
        parts, errors = encode_batch(ticks, self.parts)
        futs = self._send(parts)
        self.published_ticks += len(ticks) - len(errors)
        for r in await asyncio.gather(*futs, return_exceptions=True):
            if isinstance(r, RedisError) and str(r).startswith("NOSCRIPT"):
                # the script cache was flushed behind our back: send it again
                assert self._cmd is not None
                self._sha = await self._cmd.call("SCRIPT", "LOAD", ROW_SCRIPT)
                return errors + await self._republish(parts, ticks, errors)
            if isinstance(r, BaseException):
                self.publish_errors += 1
                raise r if isinstance(r, BusDown) else BusDown(str(r))
            self.publish_stale += r[1]
        await self.drain()
        return errors

    async def _republish(self, parts: list[bytes], ticks: list[dict[str, Any]],
                         errors: list[tuple[int, Any, str]]) -> list[tuple[int, Any, str]]:
        for r in await asyncio.gather(*self._send(parts), return_exceptions=True):
            if isinstance(r, BaseException):
                self.publish_errors += 1
                raise BusDown(str(r))
            self.publish_stale += r[1]
        return []

    def inflight(self) -> int:
        """Commands sent and not answered yet (all command connections)."""
        return len(self._cmd.waiters) if self._cmd is not None else 0

    async def drain(self) -> None:
        """Wait until the command connection's write buffer is below its limit."""
        if self._cmd is not None:
            await self._cmd.drain()

    async def flush(self) -> None:
        """Wait until Redis answered everything sent so far (a PING round trip)."""
        self._check_up()
        assert self._cmd is not None
        await self._cmd.call("PING", timeout=self.ping_timeout + 30)

    async def read_state(self) -> dict[str, bytes]:
        """The store as {symbol: FFT1 record} (tools and tests; not hot)."""
        self._check_up()
        out: dict[str, bytes] = {}
        for n, key in enumerate(self.row_keys):
            flat = await self._key_conn(n).call("HGETALL", key)
            for i in range(0, len(flat), 2):
                out[flat[i].decode()] = flat[i + 1]
        return out

    async def delete_state(self) -> None:
        """Forget every stored row (tests, resets)."""
        self._check_up()
        assert self._cmd is not None
        await self._cmd.call("DEL", *self.row_keys)
