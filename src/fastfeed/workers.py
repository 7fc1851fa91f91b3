"""The supervisor: N pinned worker processes on one listening socket.

    fastfeed serve --workers auto --redis redis://redis:6379/0

The supervisor binds the port once and forks the workers, which all accept on
that inherited socket (the kernel hands each new connection to one of them).
A worker that dies leaves the socket open in the others and in the
supervisor, so no connection attempt is refused or reset meanwhile; with
SO_REUSEPORT each worker would own a queue, and the connections queued on a
dead or hung worker would be lost.

* Worker ``i`` is pinned to the i-th CPU this process may use
  (``os.sched_setaffinity``); ``auto`` starts one worker per such CPU.
* A worker that exits unexpectedly is logged (index, pid, exit code or
  signal) and started again after a backoff that doubles for a worker that
  keeps dying (0.5 s up to 30 s, jittered: `fastfeed.backoff.Backoff`) and
  resets once it has run for a minute.
* SIGTERM/SIGINT are forwarded to every worker, which drain (``/readyz``
  503, clients closed with 1012 in waves); the supervisor waits for them and
  exits 0 once all of them exited cleanly. A second signal is forwarded too
  (workers then exit at once).
* With ``--simulate`` the simulated feed runs once per pod, in its own child
  process that publishes through Redis, never once per worker.
* Delayed data: each worker keeps its own delay line, and a restarted worker
  starts with no past (docs/delay.md). For ``--max-delay-s`` after its restart
  the delayed clients it accepts get ``delay_line: filling`` and lack the
  symbols that ticked within their delay, while its siblings serve theirs
  whole. With ``--delay-gates-ready`` its ``/readyz`` answers 503 meanwhile;
  a probe reaches one worker at random, so such a pod may flap in and out of
  its Service's endpoints until the line is full (docs/operations.md).

The workers share ticks and state through Redis (`fastfeed.bus`); more than
one worker without ``--redis`` is refused: their tables would diverge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from .backoff import Backoff
from .config import Config

log = logging.getLogger("fastfeed.workers")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# doubling from RESTART_MIN_S up to RESTART_MAX_S, "equal jitter"
RESTART_BACKOFF = Backoff(base=RESTART_MIN_S, factor=2.0, cap=RESTART_MAX_S, jitter=0.5)
HEALTHY_AFTER_S = 60.0
WORKER_ENV = "FASTFEED_WORKER"


def worker_count(spec: str) -> int:
    if spec == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(spec)


def check(cfg: Config) -> int:
    """The number of workers, or SystemExit with a clear message."""
    n = worker_count(cfg.workers)
    if n > 1 and not cfg.redis:
        raise SystemExit(
            f"fastfeed: --workers {cfg.workers} ({n} processes) needs --redis: workers share "
            "ticks and state only through Redis, without it each would hold a different "
            "table. Use --workers 1 for the embedded single-process mode, or pass "
            "--redis redis://HOST:6379/0.")
    return n


def bus_factory(cfg: Config, name: str = "bus") -> Any:
    """What `server.serve` calls with the gateway to get its bus (None: embedded)."""
    if not cfg.redis:
        return None

    def make(gw: Any) -> Any:
        from .bus import RedisBus

        # the subscriber writes into the gateway's table through its local sink
        bus = RedisBus.from_config(cfg, sink=gw.table_sink, on_feed=gw.set_feed, name=name)
        return bus

    return make


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status}"


def listen(cfg: Config) -> socket.socket:
    """The shared listening socket (SO_REUSEADDR, not SO_REUSEPORT)."""
    infos = socket.getaddrinfo(cfg.host or None, cfg.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    sock.listen(4096)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


@dataclass
class Slot:
    index: int  # -1: the simulated feed
    cpu: int | None
    pid: int = 0
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0

    @property
    def label(self) -> str:
        return "feed" if self.index < 0 else f"worker {self.index}"


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


def _exit_before_serving(signum: int, frame: Any) -> None:
    # A stop request while still starting: no clients, nothing to drain.
    # Not SystemExit: raised inside an event-loop callback, uvloop would
    # log it as a transport error and carry on serving.
    sys.stderr.flush()
    os._exit(0)


def _child_init(slot: Slot) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # until the gateway installs its own (draining) handlers
    signal.signal(signal.SIGTERM, _exit_before_serving)
    signal.signal(signal.SIGINT, _exit_before_serving)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    if slot.cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {slot.cpu})
    os.environ[WORKER_ENV] = str(slot.index)


def run_worker(cfg: Config, sock: socket.socket | None = None, name: str = "w0") -> int:
    """One gateway process, in this process: the only place a worker starts
    (the supervisor's children, and a single process with or without Redis)."""
    import uvloop

    from .server import serve

    return uvloop.run(serve(cfg, sock=sock, bus_factory=bus_factory(cfg, name)))


def _run_feed(cfg: Config) -> int:
    from .feed.publish import run_simulator

    return run_simulator(cfg.redis, cfg.simulate, cfg.rate, seed=cfg.seed,
                         channels=cfg.redis_channels, prefix=cfg.redis_prefix,
                         book_levels=cfg.book_levels,
                         trade_rate=cfg.rate * cfg.trades_per_tick)


class Supervisor:
    def __init__(self, cfg: Config, n: int, sock: socket.socket | None = None):
        self.cfg = cfg
        self.n = n
        self.sock = sock or listen(cfg)
        cpus = sorted(os.sched_getaffinity(0))
        self.slots = [Slot(i, cpus[i % len(cpus)] if len(cpus) > 1 else None)
                      for i in range(n)]
        if cfg.simulate:
            self.slots.append(Slot(-1, None))
        # workers never simulate: the pod's one feed process publishes through Redis
        self.worker_cfg = replace(cfg, simulate=0)
        self.stopping = False
        self.restarts = 0
        self._restart_counter: Any = None

    def _spawn(self, slot: Slot) -> None:
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                _child_init(slot)
                if slot.index < 0:
                    code = _run_feed(self.cfg)
                else:
                    code = run_worker(self.worker_cfg, self.sock, f"w{slot.index}")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("%s crashed", slot.label)
                code = 1
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                os._exit(code or 0)
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("%s started (pid %d%s)", slot.label, pid,
                 f", cpu {slot.cpu}" if slot.cpu is not None else "")

    def _count_restart(self) -> None:
        self.restarts += 1
        try:
            if self._restart_counter is None:
                from prometheus_client import Counter

                # registry=None: the multiprocess files carry it; the
                # workers' registries (forked from ours) stay free of it
                self._restart_counter = Counter(
                    "fastfeed_worker_restarts", "Worker processes restarted by the supervisor",
                    registry=None)
            self._restart_counter.inc()
        except Exception:  # metrics must never stop a restart
            log.debug("could not count the restart", exc_info=True)

    def _reaped(self, pid: int, status: int) -> None:
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            return
        slot.pid = 0
        with contextlib.suppress(Exception):
            from . import metrics

            metrics.mark_dead(pid)
        if self.stopping:
            log.info("%s (pid %d) exited: %s", slot.label, pid, describe_status(status))
            slot.failures = 0 if status == 0 else slot.failures + 1
            return
        lived = time.monotonic() - slot.started
        if lived > HEALTHY_AFTER_S:
            slot.failures = 0
        delay = RESTART_BACKOFF.delay(slot.failures)
        slot.failures += 1
        slot.restart_at = time.monotonic() + delay
        log.error("%s (pid %d) died after %.1fs: %s; restarting in %.1fs",
                  slot.label, pid, lived, describe_status(status), delay)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reaped(pid, status)

    def _forward(self, sig: int) -> None:
        for s in self.slots:
            if s.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, sig)

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        for slot in self.slots:
            self._spawn(slot)
        addr = self.sock.getsockname()
        log.info("supervisor (pid %d): %d workers on %s:%d", os.getpid(), self.n, addr[0], addr[1])
        deadline = 0.0
        signals = 0
        while True:
            timeout = 1.0
            if not self.stopping:
                pending = [s.restart_at for s in self.slots if not s.pid]
                if pending:
                    timeout = max(0.0, min(pending) - time.monotonic())
            info = signal.sigtimedwait(_SIGNALS, max(timeout, 0.001))
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                signals += 1
                name = signal.Signals(info.si_signo).name
                if not self.stopping:
                    self.stopping = True
                    grace = self.cfg.drain_delay_s + self.cfg.drain_s + 15.0
                    deadline = time.monotonic() + grace
                    log.info("%s: draining %d workers (up to %.0fs)", name,
                             sum(1 for s in self.slots if s.pid), grace)
                else:
                    log.warning("second %s: workers exit without draining", name)
                self._forward(info.si_signo)
            self._reap()
            if self.stopping:
                if not any(s.pid for s in self.slots):
                    break
                if time.monotonic() > deadline:
                    log.error("workers still running after the drain deadline: SIGKILL")
                    self._forward(signal.SIGKILL)
                    deadline = time.monotonic() + 5.0
                continue
            now = time.monotonic()
            for slot in self.slots:
                if not slot.pid and now >= slot.restart_at:
                    self._count_restart()
                    self._spawn(slot)
        self.sock.close()
        failed = [s.label for s in self.slots if s.failures]
        if failed:
            log.error("drained; %s did not exit cleanly", ", ".join(failed))
            return 1
        log.info("drained, exiting")
        return 0


def main(cfg: Config) -> int:
    """`fastfeed serve`: one process (embedded, or one worker on the bus), or
    the supervisor and its workers."""
    from . import metrics

    n = check(cfg)
    metrics_dir = metrics.prepare_dir(cfg.metrics_dir)
    log.info("starting with %s", cfg.public())
    try:
        if n == 1 and not (cfg.simulate and cfg.redis):
            # nothing to share a socket with; without Redis the simulator runs
            # in this process, with it in a feed process (the supervisor's)
            return run_worker(cfg)
        return Supervisor(cfg, n).run()
    finally:
        if not cfg.metrics_dir:
            metrics.cleanup(metrics_dir)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(Config()))
