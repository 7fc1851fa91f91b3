"""The bus's connection and circuit breaker: URLs, one RESP connection, `Link`.

A `Link` holds the connections to one Redis (or, through Sentinel, to the
master Sentinel names; `fastfeed.bus.cluster.ClusterLink` for a Redis
Cluster), routes each partition to the connection that holds it, and runs
the breaker: connect, let each job attached to it (the state store, the
subscriber) set itself up on the new connections, close the breaker; on a
lost connection or an unanswered ``PING``, open it and reconnect after a
`fastfeed.backoff.Backoff`. The jobs know nothing of topology; the link
knows nothing of rows or tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from fastfeed.backoff import Backoff

__all__ = [
    "BREAKER_NAMES",
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BusConfigError",
    "BusDown",
    "Job",
    "Link",
    "RedisError",
    "RedisURL",
    "fmt_addr",
    "is_cluster_url",
    "parse_sentinel_url",
    "parse_url",
    "split_hosts",
]

log = logging.getLogger("fastfeed.bus")

# circuit breaker states, as exported in metrics
CLOSED, OPEN, HALF_OPEN = 0, 1, 2
BREAKER_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}

Addr = tuple[str, int]


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
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancel
        # that lands as the reply does, and the caller's task (the ping loop
        # a closing link waits for) then runs on for good
        async with asyncio.timeout(timeout):
            return await fut

    async def drain(self) -> None:
        if self.paused:
            if self.closed:
                # lost while paused: nothing will resume writing, so waiting
                # would hang the caller (a publisher after a master was killed)
                raise BusDown(f"redis {self.name} connection is closed")
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()



class Job(Protocol):
    """Something a `Link` sets up on every (re)connection, before the breaker
    closes: the state store (loads its script), the subscriber (subscribes
    and loads the snapshot). An exception fails the attempt."""

    async def on_connect(self) -> None: ...

    def still_routed(self, owners: Sequence[Addr | None]) -> bool:
        """After a slot map change (cluster): can this job go on as it is
        with these partition owners? False makes the link reconnect."""
        ...


# ---- the link ----------------------------------------------------------------------


class Link:
    """Connections to one Redis (or the master Sentinel names) and the breaker.

    ``channels`` partitions named ``P:ticks:N`` / ``P:row:N`` (``{N}`` with
    ``sharded``, for ``SSUBSCRIBE``/``SPUBLISH``). ``on_feed(up)`` is called
    when the breaker closes (every job set up) or opens.
    """

    def __init__(
        self,
        url: str,
        *,
        channels: int = 16,
        prefix: str = "fastfeed",
        on_feed: Callable[[bool], None] | None = None,
        sharded: bool = False,
        backoff_base: float = 0.1,
        backoff_cap: float | None = None,
        connect_timeout: float = 3.0,
        ping_interval: float = 1.0,
        ping_timeout: float = 3.0,
        name: str = "bus",
    ):
        if channels < 1:
            raise ValueError("channels must be at least 1")
        self.url: Any = self._parse(url)
        self.parts = channels
        self.prefix = prefix
        self.on_feed = on_feed
        self.sharded = sharded
        self.backoff_base = backoff_base
        # with Sentinel (and a cluster), a failover is seconds away: look again often
        self.backoff_cap = backoff_cap if backoff_cap is not None else self._default_cap()
        self._backoff = Backoff(backoff_base, 2.0, self.backoff_cap, 0.5)
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.name = name
        self.channel_names, self.row_keys = self._names()
        self.meta_key = f"{prefix}:meta"
        self.spub = b"1" if sharded else b"0"
        self.jobs: list[Job] = []
        self._cmd: _Conn | None = None
        self._extra: list[tuple[_Conn, Addr | None]] = []  # the jobs' connections
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._closing = False
        self._feed: bool | None = None
        self.breaker = HALF_OPEN
        self.last_error = ""
        # counters (metrics read them; never reset)
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.outages = 0  # times the link went down after having been up
        self.outage_seconds = 0.0  # length of the last outage (0 while none ended)
        self.outage_seconds_total = 0.0
        self.lost_node = ""  # the Redis (host:port) whose loss began the last outage
        self._down_at: float | None = None
        self._addr: Addr | None = None  # the master Sentinel named

    def _parse(self, url: str) -> Any:
        return parse_url(url)

    def _default_cap(self) -> float:
        return 0.5 if self.url.sentinels else 5.0

    def _names(self) -> tuple[list[bytes], list[bytes]]:
        def tag(n: int) -> str:
            return f"{{{n}}}" if self.sharded else str(n)

        return ([f"{self.prefix}:ticks:{tag(n)}".encode() for n in range(self.parts)],
                [f"{self.prefix}:row:{tag(n)}".encode() for n in range(self.parts)])

    def attach(self, job: Job) -> None:
        """Set `job` up on every connection, in the order attached."""
        self.jobs.append(job)

    # ---- state ----

    @property
    def ready(self) -> bool:
        """Connected, every job set up (breaker closed)."""
        return self.breaker == CLOSED

    def stats(self) -> dict[str, float]:
        return {
            "breaker": self.breaker,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "disconnects": self.disconnects,
            "outages": self.outages,
            "outage_seconds": self.outage_seconds,
            "outage_seconds_total": self.outage_seconds_total,
        }

    def backoff(self, attempt: int) -> float:
        """Seconds before reconnection attempt `attempt` (0-based): the
        `fastfeed.backoff.Backoff` of `backoff_base` and `backoff_cap`
        (doubling, "equal jitter": half fixed, half random, so that many
        workers do not reconnect in lockstep)."""
        return self._backoff.delay(attempt)

    def check_up(self) -> None:
        """Raise `BusDown` unless the breaker is closed."""
        if self.breaker != CLOSED or not self.cmd_conns():
            why = f": {self.last_error}" if self.last_error else ""
            raise BusDown(f"redis bus is down (circuit {BREAKER_NAMES[self.breaker]}{why}); "
                          "ticks were not published")

    # ---- lifecycle ----

    async def start(self) -> None:
        """Start connecting in the background; see `wait_ready`."""
        if self._task is None:
            self._lost = asyncio.Event()
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        assert self._ready is not None, "start() first"
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    async def close(self) -> None:
        self._closing = True
        if self._lost is not None:
            # the loop also ends without the cancel: Python 3.11's wait_for can
            # swallow a cancellation that lands as its inner call completes,
            # and then the loop would wait on a healthy link forever
            self._lost.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._teardown()
        self.breaker = OPEN

    def _set_feed(self, up: bool) -> None:
        if self._feed is up:
            return
        self._feed = up
        if self.on_feed is not None:
            try:
                self.on_feed(up)
            except Exception:
                log.exception("bus: on_feed callback failed")

    def _up_message(self) -> str:
        said = [f"{self.parts} channels" + (", sharded" if self.sharded else "")]
        for job in self.jobs:
            describe = getattr(job, "describe", None)
            if describe is not None:
                said.append(describe())
        return ", ".join(s for s in said if s)

    async def _run(self) -> None:
        attempt = 0
        assert self._lost is not None and self._ready is not None
        while not self._closing:
            self.breaker = HALF_OPEN
            self._lost.clear()
            try:
                await self._connect_once()
                for job in self.jobs:
                    await job.on_connect()
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
            if self._closing:  # closed while connecting (see close)
                self._teardown()
                break
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
            log.info("bus: up on %s (%s%s)", self.url, self._up_message(), down)
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

    def lose(self, why: str, node: str = "") -> None:
        """A job found the link unusable: open the breaker and reconnect."""
        self.last_error = why
        self.lost_node = node or str(self.url)
        if self._lost is not None:
            self._lost.set()

    def _where(self, addr: Addr | None) -> str:
        """How a connection's server is named in messages."""
        a = addr or self._addr
        return f"master {fmt_addr(a)}: " if a is not None else ""

    def _on_lost(self, conn: _Conn, exc: Exception | None) -> None:
        for c, addr in self._watched():
            if c is conn:
                kind = conn.name.partition("@")[0]
                a = addr or self._addr
                self.lose(self._where(addr) + f"{kind} connection lost"
                          + (f": {exc}" if exc else ""), fmt_addr(a) if a else "")
                return

    def slot_moved(self, conn: _Conn, channel: bytes) -> None:
        """Redis ended a sharded subscription itself (its slot moved to
        another node): reconnect, which re-reads the slot map."""
        self.lose(f"{conn.name}: Redis dropped the subscription of "
                  f"{channel.decode(errors='replace')} (slot moved)",
                  conn.name.partition("@")[2])

    def conn_name(self, kind: str, addr: Addr | None) -> str:
        """The name of a connection of `kind` (``cmd``, ``sub``) to `addr`."""
        return kind

    async def open(self, name: str, factory: Callable[[], _Conn],
                   addr: Addr | None = None) -> _Conn:
        """A new connection (authenticated, database selected, named
        ``fastfeed-NAME-name``), to `addr` or the URL's server."""
        loop = asyncio.get_running_loop()
        u = self.url
        ctx = ssl.create_default_context() if u.tls else None
        if addr is not None:
            coro = loop.create_connection(factory, addr[0], addr[1], ssl=ctx)
        elif u.path:
            coro = loop.create_unix_connection(factory, u.path)
        else:
            coro = loop.create_connection(factory, u.host, u.port, ssl=ctx)
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await coro
        t = self.connect_timeout
        if u.password is not None:
            args = ("AUTH", u.username, u.password) if u.username else ("AUTH", u.password)
            await conn.call(*args, timeout=t)
        if u.db:
            await conn.call("SELECT", u.db, timeout=t)
        await conn.call("CLIENT", "SETNAME", f"fastfeed-{self.name}-{name}", timeout=t)
        return conn

    async def open_watched(
            self, kind: str, factory: Callable[[str, Callable[[_Conn, Exception | None], None]],
                                               _Conn],
            addr: Addr | None) -> _Conn:
        """A job's connection to `addr` (None: where the command connection
        goes), made by ``factory(name, on_lost)``: pinged, and its loss takes
        the link down like any other."""
        name = self.conn_name(kind, addr)
        conn = await self.open(name, lambda: factory(name, self._on_lost), addr or self._addr)
        self._extra.append((conn, addr))
        return conn

    async def _ask_sentinels(self) -> Addr:
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
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await coro
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
        """Open the command connection(s); the jobs follow."""
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
                self._cmd = await self.open("cmd", lambda: _Conn("cmd", self._on_lost), addr)
            except (OSError, TimeoutError) as e:
                raise BusDown(f"master {fmt_addr(addr)} (named by Sentinel): "
                              f"{e or type(e).__name__}; Sentinel fails it over after its "
                              "down-after-milliseconds") from e
        else:
            self._cmd = await self.open("cmd", lambda: _Conn("cmd", self._on_lost))
        if addr is not None:
            role = await self._cmd.call("ROLE", timeout=t)
            if role[0] != b"master":
                raise BusDown(f"{fmt_addr(addr)}, named master by Sentinel, is a "
                              f"{role[0].decode()} (a failover is under way)")

    # ---- routing ----

    def cmd_conns(self) -> list[_Conn]:
        """The command connection of every master."""
        cmd = self._cmd
        return [cmd] if cmd is not None and not cmd.closed else []

    def key_conn(self, n: int) -> _Conn:
        """The command connection holding partition `n`'s row hash."""
        if self._cmd is None or self._cmd.closed:
            raise BusDown("redis bus is down")
        return self._cmd

    def meta_conn(self) -> _Conn:
        """The command connection holding the meta hash."""
        return self.key_conn(0)

    def groups(self) -> list[tuple[Addr | None, list[int]]]:
        """The partitions by the master holding them (None: the only one)."""
        return [(None, list(range(self.parts)))]

    def send(self, n: int, args: Sequence[Any], callback: Callable[[Any], None]) -> None:
        """One command for partition `n`, to the master holding it; `callback`
        gets its reply (redirections followed)."""
        self.key_conn(n).write(args, callback=callback)

    def inflight(self) -> int:
        """Commands sent and not answered yet (all command connections)."""
        return sum(len(c.waiters) for c in self.cmd_conns())

    async def drain(self) -> None:
        """Wait until the command connections' write buffers are below their limit."""
        for c in self.cmd_conns():
            await c.drain()

    async def barrier(self) -> None:
        """Wait until every master answered everything sent so far (a PING
        round trip on each command connection)."""
        self.check_up()
        await asyncio.gather(*(c.call("PING", timeout=self.ping_timeout + 30)
                               for c in self.cmd_conns()))

    def _watched(self) -> list[tuple[_Conn, Addr | None]]:
        out: list[tuple[_Conn, Addr | None]] = []
        if self._cmd is not None:
            out.append((self._cmd, None))
        return out + self._extra

    async def _ping_loop(self) -> None:
        lost = self._lost
        assert lost is not None
        # ends with the connection it watches, even if a cancel were lost
        while not lost.is_set():
            await asyncio.sleep(self.ping_interval)
            for c, addr in self._watched():
                try:
                    await c.call("PING", timeout=self.ping_timeout)
                except (TimeoutError, BusDown, RedisError) as e:
                    where = self._where(addr)
                    a = addr or self._addr
                    self.lose(f"{where}no answer to PING on {c.name.partition('@')[0]}: "
                              f"{e or type(e).__name__}" if where else
                              f"ping failed: {e or type(e).__name__}",
                              fmt_addr(a) if a else "")
                    return

    def _teardown(self) -> None:
        for c, _ in self._watched():
            c.on_lost = lambda _c, _e: None
            c.abort()
            if not c.closed:
                c.connection_lost(None)
        self._cmd = None
        self._extra = []
