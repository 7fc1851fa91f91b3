"""The bus on a Redis Cluster: ``redis+cluster://host1:port,host2:port``.

The names, the row script and the subscribe-then-snapshot order are those of
`fastfeed.bus.RedisBus`; what changes is where each command goes: that is
`ClusterLink`, the cluster's `fastfeed.bus.link.Link`, under the same state
store and subscriber as on one Redis.

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

from .link import Addr, BusDown, Link, RedisError, _Conn, fmt_addr, split_hosts

__all__ = ["SLOTS", "ClusterLink", "ClusterURL", "crc16", "key_slot",
           "parse_cluster_url", "spread_tags"]

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
    path: str | None = None  # never a unix socket; here so Link.open reads it alike
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


# ---- the link -----------------------------------------------------------------------


@dataclass
class _Node:
    addr: Addr
    cmd: _Conn
    parts: list[int] = field(default_factory=list)


class ClusterLink(Link):
    """`Link` routed over the masters of a Redis Cluster (see the module)."""

    def __init__(self, url: str, **kw: Any) -> None:
        kw["sharded"] = True
        self.redirects = 0  # MOVED/ASK replies followed
        self.slot_map_reads = 0
        super().__init__(url, **kw)
        if self.parts > SLOTS:
            raise ValueError(f"at most {SLOTS} channels on a Redis Cluster")
        self.part_slots = [key_slot(k) for k in self.row_keys]
        self.nodes: dict[Addr, _Node] = {}
        self.part_node: list[Addr | None] = [None] * self.parts
        self.slot_map: list[tuple[int, int, Addr]] = []
        self.known: list[Addr] = []  # masters last seen, tried before the seeds
        self._opening: dict[Addr, asyncio.Future[_Conn]] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._redirecting = 0  # redirected commands not answered yet
        self._bad: set[Addr] = set()  # nodes that failed us last time

    def _parse(self, url: str) -> Any:
        return parse_cluster_url(url)

    def _default_cap(self) -> float:
        return 0.5

    def _names(self) -> tuple[list[bytes], list[bytes]]:
        self.tags = spread_tags(self.parts)
        return ([f"{self.prefix}:ticks:{{{t}}}".encode() for t in self.tags],
                [f"{self.prefix}:row:{{{t}}}".encode() for t in self.tags])

    # ---- the slot map ----

    def owner(self, slot: int) -> Addr | None:
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
                conn = await self.open("slots", lambda: _Conn("slots", lambda _c, _e: None),
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
                conn = await self.open(name, lambda: _Conn(name, self._on_lost), addr)
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

    def conn_name(self, kind: str, addr: Addr | None) -> str:
        return f"{kind}@{_fmt(addr)}" if addr is not None else kind

    def _where(self, addr: Addr | None) -> str:
        node = self.nodes.get(addr) if addr is not None else None
        if node is None:
            return super()._where(addr)
        return f"master {_fmt(node.addr)} (partitions {_ranges(node.parts)}): "

    def _on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        for c, addr in self._watched():
            if c is conn and addr is not None:
                self._bad.add(addr)
                break
        super()._on_lost(conn, exc)

    async def _connect_once(self) -> None:
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
            await self._node_conn(addr)
        for n, a in enumerate(self.part_node):
            assert a is not None
            self.nodes[a].parts.append(n)
        for (was, now), ns in moves.items():
            log.warning("bus: partitions %s moved from %s to %s", _ranges(ns), was, now)

    def _up_message(self) -> str:
        return (f"{super()._up_message()}; cluster slot map from {len(self.known)} masters; "
                f"partitions per master: {self._spread()}")

    # ---- routing ----

    def cmd_conns(self) -> list[_Conn]:
        return [node.cmd for node in self.nodes.values() if not node.cmd.closed]

    def key_conn(self, n: int) -> _Conn:
        a = self.part_node[n]
        node = self.nodes.get(a) if a is not None else None
        if node is None or node.cmd.closed:
            raise BusDown(f"redis cluster: no connection to the master of partition {n}")
        return node.cmd

    def meta_conn(self) -> _Conn:
        meta = self.owner(key_slot(self.meta_key))
        node = self.nodes.get(meta) if meta is not None else None
        if node is None or node.cmd.closed:
            raise BusDown(f"redis cluster: no connection to the master of {self.meta_key}")
        return node.cmd

    def groups(self) -> list[tuple[Addr | None, list[int]]]:
        return [(addr, list(node.parts)) for addr, node in self.nodes.items()]

    def _watched(self) -> list[tuple[_Conn, Addr | None]]:
        return [(node.cmd, addr) for addr, node in self.nodes.items()] + self._extra

    def _teardown(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        super()._teardown()
        self.nodes = {}

    def send(self, n: int, args: Sequence[Any], callback: Callable[[Any], None]) -> None:
        conn = self.key_conn(n)
        conn.write(args, callback=self._reply_to(conn, n, args, callback, 0))

    def _reply_to(self, conn: _Conn, n: int, args: Sequence[Any],
                  callback: Callable[[Any], None], hops: int) -> Callable[[Any], None]:
        def done(r: Any) -> None:
            if isinstance(r, hiredis.ReplyError):
                msg = str(r)
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
        except Exception as e:
            fin(BusDown(f"redis cluster: {kind} to {where} could not be followed: "
                        f"{e or type(e).__name__}"))
            return
        except BaseException:
            # cancelled: answer anyway, or the count barrier() waits on never drops
            fin(BusDown(f"redis cluster: {kind} to {where} abandoned"))
            raise
        if kind == "MOVED":
            if self.part_node[n] != addr:
                log.warning("bus: partition %d (slot %s) moved to %s; re-reading the slot map",
                            n, _slot, where)
            self.part_node[n] = addr
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._refresh_slots())

    async def _refresh_slots(self) -> None:
        """After MOVED: re-read the slot map. Publishing follows it in place; a
        job that cannot (the subscriber, whose subscriptions must move) makes
        the link reconnect."""
        try:
            self.slot_map = await self._read_slots()
        except BusDown as e:
            self.last_error = str(e)
            if self._lost is not None:
                self._lost.set()
            return
        now = [self.owner(s) for s in self.part_slots]
        moved = [n for n, (a, b) in enumerate(zip(now, self.part_node, strict=True)) if a != b]
        if not all(job.still_routed(now) for job in self.jobs):
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

    async def barrier(self) -> None:
        """Wait until every master answered everything sent so far."""
        await super().barrier()
        # a redirected command is answered by its new node, maybe after our
        # PING of it: wait for those too
        # (bounded, as the PINGs are: a reply that never comes is a timeout,
        # not a publisher stuck for good)
        deadline = asyncio.get_running_loop().time() + self.ping_timeout + 30
        while self._redirecting > 0:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"redis cluster: {self._redirecting} redirected commands "
                                   "not answered")
            await asyncio.sleep(0.005)
            self.check_up()


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

