"""The test and bench harness: real processes on free ports, and how to stop them.

Used by the tests (`from fixtures import ...`, or through `support` and
`redis_server`, which re-export from here) and by `bench/` (`from
tests.fixtures import ...`: `tests` is a package, importable from the
repository root, where `python -m bench` runs). It imports nothing from the
rest of `tests/`, so both import paths load the same code.

- `free_port()`, `free_cluster_port()`: a free TCP port (and one whose
  cluster bus port P + 10000 is free too).
- `stop_process(proc)`: SIGTERM (or the signal given), wait, then SIGKILL.
- `rss_kib(pid)`: a process's resident memory.
- `children(pid)`, `owner_pid(pids, server_port, client_port)`: a process's
  children (a supervisor's workers), and which of them holds a TCP connection.
- `strict_json(data)`: a reply decoded, or ValueError unless it is RFC 8259 JSON.
- `Gateway`, `start_gateway`, `running_gateway`: `fastfeed serve` as a subprocess;
  `GatewayURLs`, the URLs of a gateway on a local port (a process, a container).
- `RedisServer`, `RedisCluster`, `RedisSentinel`: a real `redis-server`, a
  Redis Cluster, a master + replica + Sentinel.
- `CHROMIUM`, `CHROMIUM_ARGS`: the system Chromium and its headless flags.

A tool that is not installed raises `Unavailable`; under pytest the test
skips with the reason instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

_installed_tried = False

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Unavailable(RuntimeError):
    """A tool the harness needs is not installed here; the message says which."""


def unavailable(why: str) -> None:
    """Skip the running test, or raise `Unavailable` outside pytest (bench)."""
    if "PYTEST_CURRENT_TEST" in os.environ:
        import pytest

        pytest.skip(why)
    raise Unavailable(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 5.0, group: bool = False) -> None:
    """Send `sig` (to the process group if `group`), wait up to `timeout`, then SIGKILL."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    proc.wait()


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def settled_rss_kib(pid: int, step_kib: int = 1024, timeout: float = 15.0) -> int:
    """`rss_kib` once the process has warmed up: two readings 0.5 s apart differ
    by less than `step_kib`. A gateway just started still grows by tens of MiB
    (its arrays, the simulator, first frames), slower on a loaded machine; a
    baseline taken then charges that warm-up to whatever the test does next."""
    end = time.monotonic() + timeout
    last = rss_kib(pid)
    while True:
        await asyncio.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) < step_kib or time.monotonic() > end:
            return now
        last = now


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children (a supervisor's workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def _socket_inode(server_port: int, client_port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh)
            for line in fh:
                f = line.split()
                lport = int(f[1].rsplit(":", 1)[1], 16)
                rport = int(f[2].rsplit(":", 1)[1], 16)
                if lport == server_port and rport == client_port:
                    return int(f[9])
    return None


def owner_pid(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of `pids` holds the server end of the local TCP connection
    from `client_port` to `server_port` (None if none does)."""
    inode = _socket_inode(server_port, client_port)
    if inode is None:
        return None
    want = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                        return pid
    return None


def strict_json(data: bytes) -> Any:
    """`data` decoded, or ValueError unless it is RFC 8259 JSON: UTF-8, no NaN
    or Infinity, no lone surrogate (raw or escaped)."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON: {data[:200]!r}")

    obj = json.loads(data.decode("utf-8"), parse_constant=no_constant)
    json.dumps(obj, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return obj


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http_ok(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None,
                 step: float = 0.05, log: str | os.PathLike | None = None) -> None:
    """Block until GET `url` answers 200; fail at once if `proc` exits meanwhile.
    The failure quotes the end of `log` (the process's output), if given."""
    def tail() -> str:
        if log is None:
            return ""
        try:
            with open(log, "rb") as fh:
                return "; its log ends: " + fh.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process behind {url} exited with {proc.returncode}{tail()}")
        with contextlib.suppress(OSError):
            if http_get(url, 0.5)[0] == 200:
                return
        time.sleep(step)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g}s{tail()}")


async def until(cond: Callable[[], bool], timeout: float = 20.0, step: float = 0.02,
                what: str = "condition") -> None:
    """Wait until `cond()` holds; fail saying what did not happen."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(step)


# ---------------------------------------------------------------- the gateway

class GatewayURLs:
    """The URLs of a gateway listening on 127.0.0.1:`port`."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ingest_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ingest"


class Gateway(GatewayURLs):
    """A running `fastfeed serve` process."""

    def __init__(self, args: list[str], env: dict[str, str] | None, port: int | None,
                 log: str | os.PathLike | None = None) -> None:
        self.args = list(args)
        self.log = log  # a file for the process's stdout and stderr (default: inherited)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("FASTFEED_LOG_LEVEL", "warning")
        # tests stop gateways with SIGINT: drain at once unless a test says otherwise
        self.env.setdefault("FASTFEED_DRAIN_DELAY_S", "0")
        self.env.setdefault("FASTFEED_DRAIN_S", "0.2")
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "fastfeed", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        if self.log is None:
            self.proc = subprocess.Popen(cmd, env=self.env)
            return
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 20.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                status, _ = await asyncio.to_thread(http_get, self.url + path, 0.5)
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready after {timeout}s")

    def wait_ready_sync(self, timeout: float = 20.0) -> None:
        wait_http_ok(self.url + "/readyz", timeout, self.proc, log=self.log)

    def kill(self) -> None:
        """SIGKILL: the process dies with no chance to drain."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.wait_ready()

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, timeout=10)


@contextlib.contextmanager
def running_gateway(*args: str, env: dict[str, str] | None = None):
    """The same as start_gateway, for synchronous (module-scoped) fixtures."""
    gw = Gateway(list(args), env, None)
    gw.start()
    try:
        gw.wait_ready_sync()
        yield gw
    finally:
        gw.stop()


@contextlib.asynccontextmanager
async def start_gateway(*args: str, env: dict[str, str] | None = None,
                        port: int | None = None, ready: bool = True,
                        log: str | os.PathLike | None = None) -> AsyncIterator[Gateway]:
    gw = Gateway(list(args), env, port, log)
    gw.start()
    try:
        if ready:
            await gw.wait_ready()
        yield gw
    finally:
        gw.stop()


# ---------------------------------------------------------------- Redis



def find_redis_server(install: bool = True) -> str | None:
    global _installed_tried
    for cand in (shutil.which("redis-server"), "/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if cand and os.access(cand, os.X_OK):
            return cand
    if install and not _installed_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _installed_tried = True
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return find_redis_server(install=False)
    return None


def redis_command(port: int, *args: str | bytes | int) -> Any:
    """One command to 127.0.0.1:`port` on a fresh connection; the parsed reply
    (a `hiredis.ReplyError` for an error reply)."""
    import hiredis

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hiredis.pack_command(tuple(args)))
        reader = hiredis.Reader()
        while True:
            reader.feed(s.recv(65536))
            r = reader.gets()
            if r is not False:
                return r


class RedisServer:
    """`prefix` goes before the binary (bench pins it: `taskset -c 1`)."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None,
                 prefix: Sequence[str] = ()):
        binary = find_redis_server()
        if binary is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra or []
        self.prefix = list(prefix)
        self.dir = tempfile.mkdtemp(prefix="fastfeed-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [*self.prefix, self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--protected-mode", "no", "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str | bytes | int) -> bytes:
        """One command, raw RESP reply (tests: CONFIG SET, CLIENT KILL, ...)."""
        return redis_command(self.port, *args)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_cluster_port(taken: set[int]) -> int:
    """A free port P whose cluster bus port P + 10000 is free too."""
    for _ in range(1000):
        p = free_port()
        if p + 10000 > 65535 or p in taken or p + 10000 in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair (P, P + 10000) for a cluster node")


class RedisCluster:
    """A real Redis Cluster: `masters` masters with `replicas` replicas each,
    on free ports, no persistence, a short `cluster-node-timeout` so that a
    killed master's replica takes over in about two node timeouts.

        with RedisCluster() as c:
            c.url                        # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...
            c.masters()                  # [RedisServer, ...] serving slots now
            c.kill(c.masters()[0])       # SIGKILL
            c.wait_ok()                  # every live node: cluster_state:ok, a master per slot
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 prefix: Sequence[str] = ()):
        self.node_timeout_ms = node_timeout_ms
        self.n_masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        taken: set[int] = set()
        for _ in range(masters * (1 + replicas)):
            port = free_cluster_port(taken)
            taken |= {port, port + 10000}
            node = RedisServer(port=port, prefix=prefix)
            node.extra = ["--cluster-enabled", "yes",
                          "--cluster-config-file", os.path.join(node.dir, "nodes.conf"),
                          "--cluster-node-timeout", str(node_timeout_ms),
                          "--cluster-replica-validity-factor", "0",
                          "--save", "", "--appendonly", "no"]
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            self.close()
            unavailable("redis-cli is not installed (apt-get install redis-tools)")
        for n in self.nodes:
            n.start()
        r = subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, timeout=timeout)
        if r.returncode != 0:
            self.close()
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout!r} {r.stderr!r}")
        self.wait_ok(timeout)

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    def info(self, node: RedisServer) -> dict[str, str]:
        text = node.command("CLUSTER", "INFO").decode()
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def slots(self, node: RedisServer | None = None) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as `node` sees them."""
        node = node or self.live()[0]
        return [(int(r[0]), int(r[1]), int(r[2][1])) for r in node.command("CLUSTER", "SLOTS")]

    def masters(self) -> list[RedisServer]:
        ports = {p for _, _, p in self.slots()}
        return [n for n in self.live() if n.port in ports]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node reports cluster_state:ok, all 16384 slots served by
        live masters, and every node agrees on the slot map."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                live = self.live()
                ports = {n.port for n in live}
                infos = [self.info(n) for n in live]
                maps = [sorted(self.slots(n)) for n in live]
                if (all(i.get("cluster_state") == "ok" for i in infos)
                        and all(m == maps[0] for m in maps)
                        and sum(b - a + 1 for a, b, _ in maps[0]) == 16384
                        and all(p in ports for _, _, p in maps[0])):
                    return
                last = f"{[i.get('cluster_state') for i in infos]}, {maps[0]}"
            except (OSError, RuntimeError) as e:
                last = str(e)
            time.sleep(0.05)
        raise RuntimeError(f"the cluster did not settle in {timeout}s: {last}")

    def kill(self, node: RedisServer) -> None:
        node.kill()

    def close(self) -> None:
        for n in self.nodes:
            n.close()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisSentinel:
    """A master, its replica and one Sentinel watching them (quorum 1), on
    free ports; `down_after_ms` short so that a killed master is failed over
    in a few seconds.

        with RedisSentinel() as s:
            s.url                      # redis+sentinel://127.0.0.1:P/fastfeed/0
            s.kill(s.master())         # SIGKILL
            s.wait_failover(old)       # the replica is the master, Sentinel says so
    """

    SERVICE = "fastfeed"

    def __init__(self, down_after_ms: int = 1000) -> None:
        self.down_after_ms = down_after_ms
        self.nodes = [RedisServer(), RedisServer()]
        self.sentinel_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fastfeed-sentinel-")
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def start(self, timeout: float = 30.0) -> None:
        first, second = self.nodes
        first.start()
        second.extra = ["--replicaof", "127.0.0.1", str(first.port)]
        second.start()
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.dir}\n"
                     f"sentinel monitor {self.SERVICE} 127.0.0.1 {first.port} 1\n"
                     f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                     f"sentinel failover-timeout {self.SERVICE} 10000\n")
        self.sentinel = subprocess.Popen(
            [first.binary, conf, "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # ready: the replica is in sync and the Sentinel has found it
        self._until(lambda: b"master_link_status:up" in second.command("INFO", "replication")
                    and len(self.ask("SENTINEL", "replicas", self.SERVICE)) == 1,
                    timeout, "the replica in sync and known to Sentinel")

    def ask(self, *args: str) -> Any:
        """One command to the Sentinel."""
        return redis_command(self.sentinel_port, *args)

    def master(self) -> RedisServer:
        port = int(self.ask("SENTINEL", "get-master-addr-by-name", self.SERVICE)[1])
        return next(n for n in self.nodes if n.port == port)

    def kill(self, node: RedisServer) -> None:
        node.kill()

    def wait_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        new = next(n for n in self.nodes if n is not old)
        self._until(lambda: self.master() is new
                    and redis_command(new.port, "ROLE")[0] == b"master",
                    timeout, "the replica promoted")
        return new

    @staticmethod
    def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (OSError, StopIteration, TypeError, IndexError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Sentinel set-up: no {what} after {timeout}s")

    def close(self) -> None:
        stop_process(self.sentinel, signal.SIGKILL)
        self.sentinel = None
        for n in self.nodes:
            n.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisSentinel:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
