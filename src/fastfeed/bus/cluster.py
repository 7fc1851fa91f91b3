"""The bus on a Redis Cluster: ``redis+cluster://host1:port,host2:port``.

The names, the row script and the subscribe-then-snapshot order are those of
`fastfeed.bus.RedisBus`; what changes is where each command goes.

Slots. Redis Cluster puts key (or shard channel) ``k`` in slot
``CRC16(k) mod 16384`` (the XMODEM CRC), hashing only the part between the
first ``{`` and the next ``}`` when that is not empty (the hash tag). Partition
``n`` is named ``P:ticks:{T}`` / ``P:row:{T}`` with one tag ``T`` for both, so
its channel and hash share a slot, as the row script needs. ``T`` is the
smallest decimal number whose slot is the middle slot of the ``n``-th of
``N`` equal slices of the slot space (`spread_tags`): the partitions sit
evenly over the 16384 slots, so a cluster whose masters own equal contiguous
slot ranges (what ``redis-cli --cluster create`` and rebalancing give) gets
``N / masters`` partitions per master, give or take one. The tags depend on
``N`` only, so every gateway and publisher computes the same names without
asking anyone; the spread over the actual masters is logged at connect.

Routing. The slot map is read with ``CLUSTER SLOTS`` from the first node that
answers (last known masters, then the seeds of the URL). Each master gets one
command connection (the row script, snapshot reads) and, for a subscribing
bus, one subscription connection holding ``SSUBSCRIBE`` for the partitions
it owns. A ``MOVED`` reply is followed (the command is sent again to the node
named) and the slot map re-read; ``ASK`` is followed with ``ASKING`` first.

Topology changes. Losing any node's connection, a ``PING`` unanswered, or a
``sunsubscribe`` pushed by Redis (it ends sharded subscriptions of a slot that
moved away) takes the whole bus down and back up through the usual breaker:
slot map re-read, connections opened to the masters serving now, subscribe,
snapshot. The whole bus and not only the lost master's partitions: by default
(``cluster-require-full-coverage yes``) a cluster with a slot unserved refuses
every command until the failover completes anyway, and one reconnection path
is simpler to reason about than a partially open breaker. The outage lasts
about the cluster's failover time (``cluster-node-timeout`` plus the
election); while it lasts, reconnection (a ``CLUSTER SLOTS`` read
and a connection attempt per master) is retried at least every `backoff_cap`
seconds (0.5 s by default here), so the bus is back soon after the promotion.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis

from . import (
    BREAKER_NAMES,
    CLOSED,
    ROW_SCRIPT,
    BusConfigError,
    BusDown,
    RedisBus,
    RedisError,
    _Conn,
    _SubConn,
    fmt_addr,
    split_hosts,
)

__all__ = ["SLOTS", "ClusterBus", "ClusterURL", "crc16", "key_slot", "parse_cluster_url",
           "spread_tags"]

log = logging.getLogger("fastfeed.bus")

SLOTS = 16384


# ---- slots -------------------------------------------------------------------------


def _crc_table() -> list[int]:
    out = []
    for i in range(256):
        c = i << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        out.append(c & 0xFFFF)
    return out


_CRC = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster uses."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC[((crc >> 8) ^ b) & 0xFF]
    return crc


def key_slot(key: bytes | str) -> int:
    """The cluster slot of a key or shard channel (hash tags honoured)."""
    if isinstance(key, str):
        key = key.encode()
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc16(key) % SLOTS


@functools.lru_cache(maxsize=8)
def spread_tags(parts: int) -> tuple[str, ...]:
    """For each of `parts` partitions, the smallest decimal number whose slot is
    the middle slot of the partition's slice of the slot space."""
    want = {((2 * n + 1) * SLOTS) // (2 * parts): n for n in range(parts)}
    tags: list[str | None] = [None] * parts
    left = len(want)
    k = 0
    while left:
        tag = str(k)
        n = want.get(crc16(tag.encode()) % SLOTS)
        if n is not None and tags[n] is None:
            tags[n] = tag
            left -= 1
        k += 1
    # two partitions share a middle slot only when parts > SLOTS; refused earlier
    return tuple(t for t in tags if t is not None)


# ---- URLs --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterURL:
    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    path: str | None = None  # never a unix socket; here so RedisBus._open reads it alike
    db: int = 0

    def __str__(self) -> str:  # never shows the password
        hosts = ",".join(_fmt(a) for a in self.seeds[:3])
        more = f",+{len(self.seeds) - 3}" if len(self.seeds) > 3 else ""
        return f"{'rediss' if self.tls else 'redis'}+cluster://{hosts}{more}"


_fmt = fmt_addr


def parse_cluster_url(url: str) -> ClusterURL:
    """``redis+cluster://[[user]:password@]host1[:port][,host2[:port]...]``
    (``rediss+cluster://`` for TLS): any reachable seed is enough, the others
    are tried in turn. Redis Cluster has one database: a ``/N`` other than 0
    is refused."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://host:port,...): {url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, the URL names /{path}: {url!r}")
    if query:
        raise ValueError(f"no query options are understood in a cluster URL: {url!r}")
    user, password, seeds = split_hosts(netloc, 6379, url)
    return ClusterURL(tuple(seeds), user, password, scheme.lower().startswith("rediss"))


# ---- the bus -----------------------------------------------------------------------


@dataclass
class _Node:
    addr: tuple[str, int]
    cmd: _Conn
    sub: _SubConn | None = None
    parts: list[int] = field(default_factory=list)


class ClusterBus(RedisBus):
    """`RedisBus` routed over the masters of a Redis Cluster (see the module)."""

    def __init__(self, url: str, table: Any = None, **kw: Any) -> None:
        kw["sharded"] = True
        kw.setdefault("backoff_cap", 0.5)
        cu = parse_cluster_url(url)
        super().__init__("redis://127.0.0.1", table, **kw)
        if self.parts > SLOTS:
            raise ValueError(f"at most {SLOTS} channels on a Redis Cluster")
        self.url = cu
        tags = spread_tags(self.parts)
        self.tags = tags
        self.channel_names = [f"{self.prefix}:ticks:{{{t}}}".encode() for t in tags]
        self.row_keys = [f"{self.prefix}:row:{{{t}}}".encode() for t in tags]
        self.part_slots = [key_slot(k) for k in self.row_keys]
        self.meta_key = f"{self.prefix}:meta"
        self.nodes: dict[tuple[str, int], _Node] = {}
        self.part_node: list[tuple[str, int] | None] = [None] * self.parts
        self.slot_map: list[tuple[int, int, tuple[str, int]]] = []
        self.known: list[tuple[str, int]] = []  # masters last seen, tried before the seeds
        self.redirects = 0  # MOVED/ASK replies followed
        self.slot_map_reads = 0
        self._opening: dict[tuple[str, int], asyncio.Future[_Conn]] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._redirecting = 0  # redirected commands not answered yet
        self._bad: set[tuple[str, int]] = set()  # nodes that failed us last time

    # ---- the slot map ----

    def owner(self, slot: int) -> tuple[str, int] | None:
        m = self.slot_map
        i = bisect.bisect_right([a for a, _, _ in m], slot) - 1
        if i >= 0 and m[i][0] <= slot <= m[i][1]:
            return m[i][2]
        return None

    async def _read_slots(self) -> list[tuple[int, int, tuple[str, int]]]:
        tried: list[str] = []
        # a node that failed last time (maybe dead, maybe a connect timeout
        # away) is asked last
        cands = sorted(dict.fromkeys([*self.known, *self.url.seeds]), key=lambda a: a in self._bad)
        for addr in cands:
            conn: _Conn | None = None
            try:
                conn = await self._open("slots", lambda: _Conn("slots", lambda _c, _e: None),
                                        addr)
                raw = await conn.call("CLUSTER", "SLOTS", timeout=self.connect_timeout)
            except (OSError, TimeoutError, BusDown, RedisError) as e:
                tried.append(f"{_fmt(addr)}: {e or type(e).__name__}")
                self._bad.add(addr)
                continue
            finally:
                if conn is not None:
                    conn.abort()
            out = []
            unknown = False
            for r in raw:
                # empty (or NULL, with cluster-preferred-endpoint-type
                # unknown-endpoint): the address we reached this node by
                host = r[2][0].decode() if r[2][0] else addr[0]
                if host == "?":
                    unknown = True
                out.append((int(r[0]), int(r[1]), (host, int(r[2][1]))))
            if unknown:
                tried.append(f"{_fmt(addr)}: a master's endpoint is unknown ('?' in CLUSTER "
                             "SLOTS: set cluster-announce-hostname or cluster-announce-ip)")
                continue
            out.sort()
            covered = sum(b - a + 1 for a, b, _ in out)
            if covered < SLOTS:
                tried.append(f"{_fmt(addr)}: only {covered} of {SLOTS} slots served")
                continue
            self.slot_map_reads += 1
            return out
        raise BusDown("no cluster node gave a full slot map (" + "; ".join(tried) + ")")

    def _slots_of(self, addr: tuple[str, int]) -> str:
        return ",".join(f"{a}-{b}" for a, b, m in self.slot_map if m == addr)

    def _spread(self) -> str:
        by: dict[tuple[str, int], list[int]] = {}
        for n, a in enumerate(self.part_node):
            if a is not None:
                by.setdefault(a, []).append(n)
        return ", ".join(f"{_fmt(a)}: {len(ps)}" for a, ps in sorted(by.items()))

    # ---- connections ----

    async def _node_conn(self, addr: tuple[str, int]) -> _Conn:
        node = self.nodes.get(addr)
        if node is not None and not node.cmd.closed:
            return node.cmd
        pending = self._opening.get(addr)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self._opening[addr] = fut
        name = f"cmd@{_fmt(addr)}"
        try:
            try:
                conn = await self._open(name, lambda: _Conn(name, self._on_lost), addr)
            except (OSError, TimeoutError) as e:
                self._bad.add(addr)
                slots = self._slots_of(addr)
                hint = f" (slots {slots}; if it died, its replica takes over after " \
                       "cluster-node-timeout)" if slots else ""
                raise BusDown(f"master {_fmt(addr)}: {e or type(e).__name__}{hint}") from e
            self._bad.discard(addr)
            self.nodes[addr] = _Node(addr, conn)
            fut.set_result(conn)
            return conn
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else BusDown(str(e)))
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            self._opening.pop(addr, None)

    def _on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        for node in self.nodes.values():
            if conn is node.cmd or conn is node.sub:
                kind = conn.name.partition("@")[0]
                self.last_error = (f"master {_fmt(node.addr)} (partitions {_ranges(node.parts)}):"
                                   f" {kind} connection lost" + (f": {exc}" if exc else ""))
                self.lost_node = _fmt(node.addr)
                self._bad.add(node.addr)
                if self._lost is not None:
                    self._lost.set()
                return

    async def _connect_once(self) -> None:
        t = self.connect_timeout
        self.slot_map = await self._read_slots()
        self.known = list(dict.fromkeys(a for _, _, a in self.slot_map))
        before = self.part_node
        self.part_node = [self.owner(s) for s in self.part_slots]
        moves: dict[tuple[str, str], list[int]] = {}
        for n, (old, new) in enumerate(zip(before, self.part_node, strict=True)):
            if old is not None and new is not None and old != new:
                moves.setdefault((_fmt(old), _fmt(new)), []).append(n)
        # a master that failed last time first: if it is still away, this
        # attempt ends before connecting to the others
        for addr in sorted(self.known, key=lambda a: a not in self._bad):
            conn = await self._node_conn(addr)
            sha = await conn.call("SCRIPT", "LOAD", ROW_SCRIPT, timeout=t)
            self._sha = sha
        for n, a in enumerate(self.part_node):
            assert a is not None
            self.nodes[a].parts.append(n)
        meta = self.owner(key_slot(self.meta_key))
        assert meta is not None
        mconn = await self._node_conn(meta)
        await mconn.call("HSETNX", self.meta_key, "channels", self.parts, timeout=t)
        have = await mconn.call("HGET", self.meta_key, "channels", timeout=t)
        if have is not None and int(have) != self.parts:
            raise BusConfigError(
                f"Redis prefix {self.prefix!r} is used with {int(have)} channels, this process "
                f"has --redis-channels {self.parts}: use the same count everywhere (or another "
                f"--redis-prefix, or DEL {self.meta_key} after stopping every gateway and "
                "publisher)")
        if self.subscribing:
            futs: list[asyncio.Future[Any]] = []
            for addr, node in list(self.nodes.items()):
                if not node.parts:
                    continue
                name = f"sub@{_fmt(addr)}"
                sub = await self._open(
                    name, lambda name=name: _SubConn(name, self._on_lost, self), addr)  # type: ignore[misc]
                assert isinstance(sub, _SubConn)
                node.sub = sub
                # one slot per SSUBSCRIBE: a cluster refuses channels of several slots
                for n in node.parts:
                    futs.extend(sub.write((b"SSUBSCRIBE", self.channel_names[n])))
            await asyncio.wait_for(asyncio.gather(*futs), t)
            await self._load_snapshot()
        for (was, now), ns in moves.items():
            log.warning("bus: partitions %s moved from %s to %s", _ranges(ns), was, now)
        log.info("bus: cluster slot map from %d masters; partitions per master: %s",
                 len(self.known), self._spread())

    def _key_conn(self, n: int) -> _Conn:
        a = self.part_node[n]
        node = self.nodes.get(a) if a is not None else None
        if node is None or node.cmd.closed:
            raise BusDown(f"redis cluster: no connection to the master of partition {n}")
        return node.cmd

    def _conns(self) -> list[_Conn]:
        out: list[_Conn] = []
        for node in self.nodes.values():
            out.append(node.cmd)
            if node.sub is not None:
                out.append(node.sub)
        return out

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            for node in list(self.nodes.values()):
                for c in (node.cmd, node.sub):
                    if c is None:
                        continue
                    try:
                        await c.call("PING", timeout=self.ping_timeout)
                    except (TimeoutError, BusDown, RedisError) as e:
                        self.last_error = (f"master {_fmt(node.addr)} (partitions "
                                           f"{_ranges(node.parts)}): no answer to PING on "
                                           f"{c.name.partition('@')[0]}: {e or type(e).__name__}")
                        self.lost_node = _fmt(node.addr)
                        assert self._lost is not None
                        self._lost.set()
                        return

    def _teardown(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        for c in self._conns():
            c.on_lost = lambda _c, _e: None
            c.abort()
            if not c.closed:
                c.connection_lost(None)
        self.nodes = {}

    # ---- publishing ----

    def _check_up(self) -> None:
        if self.breaker != CLOSED or not self.nodes:
            self.publish_refused += 1
            why = f": {self.last_error}" if self.last_error else ""
            raise BusDown(f"redis bus is down (circuit {BREAKER_NAMES[self.breaker]}{why}); "
                          "ticks were not published")

    def _send(self, parts: list[bytes], publish: bool = True,
              callback: Callable[[Any], None] | None = None) -> list[asyncio.Future[Any]]:
        futs: list[asyncio.Future[Any]] = []
        loop = asyncio.get_running_loop()
        for n, b in enumerate(parts):
            if not b:
                continue
            conn = self._key_conn(n)
            args = (b"EVALSHA", self._sha, b"1", self.row_keys[n], b,
                    self.channel_names[n] if publish else b"", self._spub)
            if callback is None:
                fut = loop.create_future()
                futs.append(fut)
                cb = _settle(fut)
            else:
                cb = callback
            conn.write(args, callback=self._reply_to(conn, n, args, cb, 0))
            self.published_batches += 1
        return futs

    def _reply_to(self, conn: _Conn, n: int, args: Sequence[Any],
                  callback: Callable[[Any], None], hops: int) -> Callable[[Any], None]:
        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError):
                msg = str(r)
                if msg.startswith("NOSCRIPT") and not conn.closed:
                    conn.write((b"EVAL", ROW_SCRIPT, *args[2:]), callback=done)
                    return
                if msg.startswith(("MOVED ", "ASK ")) and hops < 5:
                    asyncio.get_running_loop().create_task(
                        self._redirect(msg, n, args, callback, hops + 1))
                    return
            callback(r)
        return done

    async def _redirect(self, msg: str, n: int, args: Sequence[Any],
                        callback: Callable[[Any], None], hops: int) -> None:
        kind, _slot, where = msg.split()[:3]
        host, _, port = where.rpartition(":")
        addr = (host.strip("[]") or "127.0.0.1", int(port))
        self.redirects += 1
        self._redirecting += 1

        def fin(r: Any) -> None:
            self._redirecting -= 1
            callback(r)

        try:
            conn = await self._node_conn(addr)
            if kind == "ASK":
                conn.write((b"ASKING",), callback=lambda _r: None)
            conn.write(args, callback=self._reply_to(conn, n, args, fin, hops))
        except (OSError, TimeoutError, BusDown, RedisError) as e:
            fin(BusDown(f"redis cluster: {kind} to {where} could not be followed: {e}"))
            return
        if kind == "MOVED":
            if self.part_node[n] != addr:
                log.warning("bus: partition %d (slot %s) moved to %s; re-reading the slot map",
                            n, _slot, where)
            self.part_node[n] = addr
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._refresh_slots())

    async def _refresh_slots(self) -> None:
        """After MOVED: re-read the slot map. Publishing follows it in place; a
        subscribing bus must move its subscriptions, so it reconnects."""
        try:
            self.slot_map = await self._read_slots()
        except BusDown as e:
            self.last_error = str(e)
            if self._lost is not None:
                self._lost.set()
            return
        now = [self.owner(s) for s in self.part_slots]
        moved = [n for n, (a, b) in enumerate(zip(now, self.part_node, strict=True)) if a != b]
        if self.subscribing and any(
                self.nodes.get(a) is None or n not in self.nodes[a].parts
                for n, a in enumerate(now) if a is not None):
            self.last_error = "the slot map changed (MOVED)"
            if self._lost is not None:
                self._lost.set()
            return
        for a in now:
            if a is not None:
                with contextlib.suppress(OSError, TimeoutError, BusDown, RedisError):
                    await self._node_conn(a)
        self.part_node = now
        if moved:
            log.info("bus: slot map re-read; partitions %s moved; per master: %s",
                     _ranges(moved), self._spread())

    def inflight(self) -> int:
        return sum(len(node.cmd.waiters) for node in self.nodes.values())

    async def drain(self) -> None:
        for node in list(self.nodes.values()):
            await node.cmd.drain()

    async def flush(self) -> None:
        """Wait until every master answered everything sent so far."""
        self._check_up()
        await asyncio.gather(*(node.cmd.call("PING", timeout=self.ping_timeout + 30)
                               for node in list(self.nodes.values())))
        # a redirected command is answered by its new node, maybe after our
        # PING of it: wait for those too
        while self._redirecting:
            await asyncio.sleep(0.005)
            self._check_up()

    async def delete_state(self) -> None:
        self._check_up()
        for n, key in enumerate(self.row_keys):
            await self._key_conn(n).call("DEL", key)


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


def _ranges(ns: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out: list[str] = []
    s = sorted(ns)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out) or "none"

