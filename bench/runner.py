"""Processes of one bench run: the server under test, the tick publisher and
the load-client workers; and `load_run`, which drives one measured load.

Every measurement goes through the same path for every server: start it
fresh, seed every instrument, connect and subscribe the clients, publish a
schedule of tick rates, and per phase read the clients' counters and
histograms and the server's CPU (from /proc/<pid>/stat, the process and its
children) and RSS.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from bench import hist
from tests import fixtures
from tests.fixtures import free_port, stop_process

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

ALL_SERVERS = ("fastfeed", "fastfeed_bin", "fastfeed_compact", "fastfeed_delayed", "bun",
               "node_ws", "py_websockets")
# fastfeed_bin is fastfeed with clients on the binary subprotocol;
# fastfeed_compact on the compact binary one (rows with the changed fields only)
CLIENT_PROTOCOLS = {"fastfeed_bin": "fastfeed.v1.bin",
                    "fastfeed_compact": "fastfeed.v1.compact.bin"}
# fastfeed_delayed is fastfeed with every other load process's clients on a
# token delayed by DELAY_S: what the delay line costs beside the same load all
# real time. Latency figures are the real-time clients'; the delayed ones' are
# reported apart (they are DELAY_S plus at most a slot).
DELAY_S = 1
DELAY_SECRET = "bench-secret-for-delayed-tokens-only"
FASTFEEDS = ("fastfeed", "fastfeed_bin", "fastfeed_compact", "fastfeed_delayed")


def bench_token(delay: int) -> str:
    import jwt

    claims = {"sub": "bench", "exp": int(time.time() + 86400)}
    if delay:
        claims["delay"] = delay
    return jwt.encode(claims, DELAY_SECRET, algorithm="HS256")


class Skip(Exception):
    """A server that cannot run here; the message says why."""


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- servers

def fastfeed_command() -> list[str]:
    exe = Path(sys.executable).with_name("fastfeed")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fastfeed")
    if found:
        return [found]
    try:
        if importlib.util.find_spec("fastfeed.cli") is not None:
            return [sys.executable, "-c", "import sys; from fastfeed.cli import main; "
                    "sys.argv[0] = 'fastfeed'; sys.exit(main())"]
    except ImportError:
        pass
    raise Skip("fastfeed is not installed here yet (pip install -e . from the repo root)")


def server_command(name: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    if name in FASTFEEDS:
        delayed = ["--jwt-secret", DELAY_SECRET] if name == "fastfeed_delayed" else []
        return [*fastfeed_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--simulate", "0", "--max-connections", "100000",
                "--max-connections-per-ip", "100000", "--log-level", "warning", *delayed,
                *extra]
    if name == "bun":
        exe = BENCH / "node_modules" / ".bin" / "bun"
        if not exe.exists():
            raise Skip("bun is not installed (run bench/setup.sh)")
        return [str(exe), str(BENCH / "peers" / "bun_server.js"), str(port)]
    if name == "node_ws":
        if not (BENCH / "node_modules" / "ws").exists():
            raise Skip("the ws package is not installed (run bench/setup.sh)")
        node = shutil.which("node")
        if not node:
            raise Skip("node is not on PATH")
        return [node, str(BENCH / "peers" / "node_ws.js"), str(port)]
    if name == "py_websockets":
        if importlib.util.find_spec("websockets") is None:
            raise Skip("the websockets package is not installed (run bench/setup.sh)")
        return [sys.executable, str(BENCH / "peers" / "py_websockets.py"), str(port)]
    raise Skip(f"unknown server {name!r}")


def pin(cpus: str | None) -> list[str]:
    if cpus is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", cpus]


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User and kernel CPU seconds of these processes (/proc/<pid>/stat)."""
    user = kernel = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            kernel += int(fields[12])
        except (OSError, IndexError):
            pass
    return user / CLK_TCK, kernel / CLK_TCK


def cpus_busy(cpus: str | None) -> float:
    """Busy seconds (all modes but idle and iowait) of a CPU list like "0" or
    "0,1" from /proc/stat: with the server's own CPU time it tells how much of
    its core went to other processes and to interrupts."""
    if cpus is None:
        want = None
    else:
        want = set()
        for part in cpus.split(","):
            lo, _, hi = part.partition("-")
            want.update(range(int(lo), int(hi or lo) + 1))
    total = 0
    with open("/proc/stat") as fh:
        for line in fh:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            if want is not None and int(name[3:]) not in want:
                continue
            v = [int(x) for x in vals]
            total += sum(v[:8]) - v[3] - v[4]
    return total / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError):
            pass
    return total


class Server:
    def __init__(self, name: str, cpus: str | None, extra: Sequence[str] = ()) -> None:
        self.name = name
        self.port = free_port()
        self.cmd = [*pin(cpus), *server_command(name, self.port, extra)]
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.logfile = None

    def start(self, timeout: float = 30.0) -> Server:
        self.logfile = open(os.devnull, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, cwd=str(BENCH), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {err}")
            if _healthy(self.port):
                self.refresh()
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            time.sleep(0.1)
        self.stop()
        err = self.proc.stderr.read().decode(errors="replace")[-1500:] if self.proc.stderr else ""
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout:.0f} s: {err}")

    def _drain(self) -> None:
        # keep the server's stderr pipe from filling up; remember the tail
        self.err_tail = b""
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_tail = (self.err_tail + line)[-4000:]

    def refresh(self) -> None:
        assert self.proc is not None
        pids = process_tree(self.proc.pid)
        # taskset execs the server, so the tree starts at the server itself
        self.pids = pids

    def cpu(self) -> float:
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, kernel) CPU seconds: the kernel's share is mostly send()."""
        self.refresh()
        return cpu_seconds(self.pids)

    def rss(self) -> int:
        self.refresh()
        return rss_bytes(self.pids)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, group=True)


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


# ---------------------------------------------------------- child processes

class Child:
    """A helper process that speaks JSON lines on stdout, commands on stdin."""

    def __init__(self, args: list[str], cpus: str | None) -> None:
        self.proc = subprocess.Popen([*pin(cpus), sys.executable, *args], cwd=str(ROOT),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.q: Queue = Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.q.put(json.loads(line))
        self.q.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            del self.err[:-40]

    def send(self, line: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event!r} within {timeout:.0f} s; stderr: "
                                   + "".join(self.err[-10:]))
            try:
                msg = self.q.get(timeout=left)
            except Empty:
                continue
            if msg is None:
                raise RuntimeError(f"helper exited before {event!r}: " + "".join(self.err[-15:]))
            if msg.get("event") == "error":
                raise RuntimeError(f"helper error: {msg.get('message')}")
            if msg.get("event") == event:
                return msg

    def close(self) -> None:
        self.send("quit")
        stop_process(self.proc, 0)  # signal 0: only wait for it, then SIGKILL


# ---------------------------------------------------------------- a load run

@dataclass
class Load:
    clients: int
    subs: int = 50
    instruments: int = 500
    watch_clients: int = 0
    watch: int = 0
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # (name, secs, rate)
    settle: float = 2.0
    procs: int = 0                   # load-client processes (0: one per 1,500 clients)
    per_proc: int = 1500
    interval_ms: float = 1.0
    seed: int = 1
    # "book": `subs` books per client on the book channel, the rates are
    # level changes/s (publisher --kind book); see sc_book in __main__
    kind: str = "quote"
    book_depth: int = 10             # the gateway's served depth (its default)
    book_levels: int = 15            # publisher ladder steps per side
    # send-time slots per book (a power of two): a sparse file, only the
    # pages written cost memory, and 65,536 cover ~9 s of the hottest book
    # at 50k changes/s
    ring: int = 65536
    # "trades": `subs` instruments per client on the trades channel, the
    # rates are trades/s (publisher --kind trades); see sc_trades in __main__


@dataclass
class Pins:
    server: str | None = "0"
    load: str | None = "1"


def summarize(stats: list[dict[str, Any]], wall: float, cpu: tuple[float, float], rss: int,
              core: float | None = None) -> dict[str, Any]:
    user, kernel = cpu
    h = hist.merge(s["hist"] for s in stats)
    wh = hist.merge(s["whist"] for s in stats)
    upd = sum(s["updates"] for s in stats)
    frames = sum(s["frames"] for s in stats)

    def rate(key: str) -> float:
        return sum(s.get(key, 0) for s in stats) / wall if wall else 0.0

    out = {
        "seconds": round(wall, 3),
        "updates_per_s": upd / wall if wall else 0.0,
        "frames_per_s": frames / wall if wall else 0.0,
        "bytes_per_s": rate("bytes"),          # WebSocket payload bytes
        # books: source changes the clients' books took in (seq advance),
        # levels on the wire, and entries too old for the send-time ring
        "changes_per_s": rate("changes"),
        "levels_per_s": rate("levels"),
        "untimed": sum(s.get("untimed", 0) for s in stats),
        # trades: trades missing in clients' tseq sequences, and the lost
        # counts the gateway itself reported
        "lost": sum(s.get("lost", 0) for s in stats),
        "gw_lost": sum(s.get("gw_lost", 0) for s in stats),
        "rows_per_frame": upd / frames if frames else None,
        "p50_ms": hist.percentile(h, 0.50),
        "p99_ms": hist.percentile(h, 0.99),
        "p999_ms": hist.percentile(h, 0.999),
        "max_ms": max((s["max_lat_ms"] for s in stats), default=None),
        "watched_updates": sum(s["watched_updates"] for s in stats),
        "watched_p50_ms": hist.percentile(wh, 0.50),
        "watched_p99_ms": hist.percentile(wh, 0.99),
        "watched_p999_ms": hist.percentile(wh, 0.999),
        "server_cpu": (user + kernel) / wall if wall else None,          # cores busy
        # per frame the clients received: user time is the gateway's own
        # work, kernel time mostly the send() syscalls and loopback TCP
        "server_user_us_per_frame": user / frames * 1e6 if frames else None,
        "server_kernel_us_per_frame": kernel / frames * 1e6 if frames else None,
        # the server's CPU(s) busy with anything (server, other processes,
        # interrupts): near 1 per pinned CPU while server_cpu is lower means
        # the server did not have its core to itself
        "server_core_busy": core / wall if (wall and core is not None) else None,
        "server_rss_mb": rss / 2**20,
        "load_cpu_max": max(((s["cpu_user"] + s["cpu_sys"]) / s["wall"]
                             for s in stats if s["wall"]), default=None),
        "load_cpu_total": (sum((s["cpu_user"] + s["cpu_sys"]) for s in stats) / wall
                           if wall else None),
        "stale_rows": sum(s["stale_rows"] for s in stats),
        "errors": sum(s["errors"] for s in stats),
        "disconnected": sum(s["disconnected"] for s in stats),
        "close_codes": dict(hist.merge(s["close_codes"] for s in stats)),
        "hist": h,
    }
    if wh:
        out["whist"] = wh
    return out


def _summarize(st: list[dict[str, Any]], late: list[bool], *args: Any) -> dict[str, Any]:
    """A phase's figures: latency from the real-time clients; with delayed
    ones, their median and 99th percentile apart (`delayed_p50_ms`, ...) and
    the frames of all (the server's CPU per frame counts every frame)."""
    if not any(late):
        return summarize(st, *args)
    out = summarize([s for s, d in zip(st, late, strict=True) if not d], *args)
    dl = summarize([s for s, d in zip(st, late, strict=True) if d], *args)
    every = summarize(st, *args)
    out["delayed_p50_ms"], out["delayed_p99_ms"] = dl["p50_ms"], dl["p99_ms"]
    out["delayed_updates_per_s"] = dl["updates_per_s"]
    for k in ("frames_per_s", "server_user_us_per_frame", "server_kernel_us_per_frame"):
        out[k] = every[k]
    return out


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def load_run(server_name: str, load: Load, pins: Pins, extra: Sequence[str] = (),
             progress: str = "") -> dict[str, Any]:
    """Run one load against a fresh server; returns per-phase results and
    the final convergence."""
    server = Server(server_name, pins.server, extra).start()
    pub: Child | None = None
    workers: list[Child] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-ring-") if load.kind == "book" else None
    try:
        url = f"ws://127.0.0.1:{server.port}"
        schedule = ",".join(f"{secs}:{rate}" for _n, secs, rate in load.phases)
        book_args: list[str] = []
        book_cfg = None
        if tmp is not None:
            # the publisher's send time of every book change, read by the
            # load clients by (book, seq): zeros to start (a sparse file)
            ring = os.path.join(tmp.name, "ring")
            with open(ring, "wb") as fh:
                fh.truncate(load.instruments * load.ring * 16)
            book_args = ["--kind", "book", "--ring", ring, "--ring-size", str(load.ring),
                         "--book-levels", str(load.book_levels),
                         "--book-depth", str(load.book_depth)]
            # fastfeed serves the best depth and says what comes into view, so
            # its clients keep the best depth (the contract); a peer forwards
            # every change, so its clients keep every level they are sent
            book_cfg = {"depth": load.book_depth, "truncate": server_name in FASTFEEDS,
                        "ring": ring, "ring_size": load.ring}
        pub = Child(["-m", "bench.publisher", "--url", url, "--instruments", str(load.instruments),
                     "--schedule", schedule, "--interval-ms", str(load.interval_ms),
                     "--seed", str(load.seed), *book_args,
                     *(["--kind", "trades"] if load.kind == "trades" else []),
                     *(["--token", bench_token(0)] if server_name == "fastfeed_delayed" else [])],
                    pins.load)
        pub.expect("seeded", 60)
        procs = load.procs or max(1, math.ceil(load.clients / load.per_proc))
        mixed = server_name == "fastfeed_delayed"
        if mixed:
            procs = max(2, procs + procs % 2)  # half the processes delayed
        per = [load.clients // procs + (1 if k < load.clients % procs else 0) for k in range(procs)]
        first = 0
        late: list[bool] = []
        for k, n in enumerate(per):
            path = "/ws"
            late.append(mixed and k % 2 == 1)
            if mixed:
                path += "?token=" + bench_token(DELAY_S if late[-1] else 0)
            cfg = {"url": url + path, "instruments": load.instruments, "first": first, "count": n,
                   "subs": load.subs, "watch_clients": load.watch_clients, "watch": load.watch,
                   "seed": load.seed, "protocol": CLIENT_PROTOCOLS.get(server_name),
                   "snapshot_timeout": 30 + n / 100, "book": book_cfg,
                   "trades": load.kind == "trades"}
            workers.append(Child(["-m", "bench.loadgen.worker", json.dumps(cfg)], pins.load))
            first += n
        ready = [w.expect("ready", 90 + load.clients / 50) for w in workers]
        connected = sum(r["connected"] for r in ready)
        snap = sum(r["snapshots"] for r in ready)
        conn_errors = [e for r in ready for e in r["errors"]]
        rss_idle = server.rss()
        if progress:
            log(f"{progress}: {connected}/{load.clients} connected, {snap} snapshots")

        phases: dict[str, Any] = {}
        for w in workers:
            w.send("stats")                       # drop the connect window
        for w in workers:
            w.expect("stats", 30)
        pub.send("go")
        t_prev, c_prev, b_prev = None, None, None
        name_prev = None
        for k, (name, _secs, _rate) in enumerate(load.phases):
            pub.expect("phase", 60 + _secs)
            now, cpu, busy = time.monotonic(), server.cpu_split(), cpus_busy(pins.server)
            if name_prev is not None:
                for w in workers:
                    w.send("stats")
                st = [w.expect("stats", 30) for w in workers]
                phases[name_prev] = _summarize(st, late, now - t_prev, _minus(cpu, c_prev),
                                               server.rss(), busy - b_prev)
                phases[name_prev]["rate"] = load.phases[k - 1][2]
            else:
                for w in workers:
                    w.send("stats")
                for w in workers:
                    w.expect("stats", 30)
            t_prev, c_prev, b_prev, name_prev = now, cpu, busy, name
        done = pub.expect("done", 60 + load.phases[-1][1])
        now, cpu, busy = time.monotonic(), server.cpu_split(), cpus_busy(pins.server)
        rss = server.rss()
        for w in workers:
            w.send("stats")
        st = [w.expect("stats", 30) for w in workers]
        phases[name_prev] = _summarize(st, late, now - t_prev, _minus(cpu, c_prev), rss,
                                       busy - b_prev)
        phases[name_prev]["rate"] = load.phases[-1][2]
        # settle (delayed clients: their delay more), then convergence
        time.sleep(load.settle + (DELAY_S if mixed else 0))
        final = json.dumps(done["final"])
        for w in workers:
            w.send("final " + final)
        fin = [w.expect("final", 60) for w in workers]
        converged = sum(f["converged"] for f in fin)
        result = {
            "server": server_name, "clients": load.clients, "connected": connected,
            "snapshots": snap, "connect_errors": conn_errors[:3],
            "converged": converged,
            "converged_share": converged / load.clients if load.clients else 1.0,
            "behind_rows": sum(f["behind_rows"] for f in fin),
            "disconnected": sum(f["disconnected"] for f in fin),
            # trades: over the whole run (snapshot to the end)
            "gapped": sum(f.get("gapped", 0) for f in fin),
            "lost": sum(f.get("lost", 0) for f in fin),
            "gw_lost": sum(f.get("gw_lost", 0) for f in fin),
            "behind_trades": sum(f.get("behind_trades", 0) for f in fin),
            "ticks_sent": done["sent"], "publisher_cpu": done.get("cpu"),
            "ingest_errors": done.get("errors", 0),
            "ingest_first_error": done.get("first_error", ""),
            "server_rss_idle_mb": rss_idle / 2**20, "server_alive": server.alive(),
            "phases": phases,
        }
        return result
    finally:
        for w in workers:
            w.close()
        if pub is not None:
            pub.close()
        server.stop()
        if tmp is not None:
            tmp.cleanup()


class RedisServer(fixtures.RedisServer):
    """A throw-away redis-server for the scenarios that need the bus, pinned to `cpus`."""

    def __init__(self, cpus: str | None) -> None:
        try:
            super().__init__(prefix=pin(cpus))
            self.start()
        except (fixtures.Unavailable, RuntimeError) as e:
            if hasattr(self, "dir"):
                self.close()
            raise Skip(str(e)) from e

    def __enter__(self) -> RedisServer:
        return self


class RedisCluster(fixtures.RedisCluster):
    """A throw-away Redis Cluster of `masters` masters and no replicas (the
    bus's cost of routing over several nodes, not of replication), pinned to
    `cpus`; the default node timeout, so a node slowed down by the load is
    not failed."""

    def __init__(self, cpus: str | None, masters: int = 3) -> None:
        try:
            super().__init__(masters, replicas=0, node_timeout_ms=15000, prefix=pin(cpus))
            self.start(timeout=60)
        except (fixtures.Unavailable, RuntimeError) as e:
            if hasattr(self, "nodes"):
                self.close()
            raise Skip(str(e)) from e

    def __enter__(self) -> RedisCluster:
        return self


def ingest_run(server_name: str, ticks: int, batch: int, pins: Pins, instruments: int = 500,
               extra: Sequence[str] = (), fmt: str = "json") -> dict[str, Any]:
    """Blast `ticks` ticks into /ingest; rate at which they are applied."""
    server = Server(server_name, pins.server, extra).start()
    pub = None
    try:
        url = f"ws://127.0.0.1:{server.port}"
        pub = Child(["-m", "bench.publisher", "--url", url, "--instruments", str(instruments),
                     "--mode", "ingest", "--ingest-ticks", str(ticks), "--format", fmt,
                     "--ingest-batch", str(batch)], pins.load)
        pub.expect("seeded", 120)
        c0, t0 = server.cpu(), time.monotonic()
        pub.send("go")
        res = pub.expect("ingest", 180)
        cpu = server.cpu() - c0
        res.update(server=server_name, server_cpu=cpu / max(1e-9, time.monotonic() - t0),
                   server_rss_mb=server.rss() / 2**20, server_cpu_s=cpu)
        return res
    finally:
        if pub is not None:
            pub.close()
        server.stop()


def idle_run(server_name: str, conns: int, pins: Pins, extra: Sequence[str] = (),
             progress: str = "") -> dict[str, Any]:
    """Open `conns` idle client connections; server memory per connection."""
    server = Server(server_name, pins.server, extra).start()
    workers: list[Child] = []
    try:
        url = f"ws://127.0.0.1:{server.port}/ws"
        time.sleep(0.5)
        before = server.rss()
        procs = max(1, math.ceil(conns / 5000))
        first = 0
        for k in range(procs):
            n = conns // procs + (1 if k < conns % procs else 0)
            cfg = {"url": url, "instruments": 1, "first": first, "count": n, "subs": 0,
                   "read_buffer": 1024}
            workers.append(Child(["-m", "bench.loadgen.worker", json.dumps(cfg)], pins.load))
            first += n
        ready = [w.expect("ready", 120 + conns / 50) for w in workers]
        connected = sum(r["connected"] for r in ready)
        if progress:
            log(f"{progress}: {connected}/{conns} connected")
        time.sleep(2.0)
        after = server.rss()
        return {"server": server_name, "connections": conns, "connected": connected,
                "rss_before_mb": before / 2**20, "rss_after_mb": after / 2**20,
                "bytes_per_conn": (after - before) / connected if connected else None,
                "connect_errors": [e for r in ready for e in r["errors"]][:3]}
    finally:
        for w in workers:
            w.close()
        server.stop()
