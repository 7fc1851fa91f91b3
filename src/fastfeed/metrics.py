"""Prometheus metrics for all workers of a pod.

The core counts in C; `Metrics.flush` moves the counts into prometheus-client
about once a second, because a multiprocess `inc()` costs over a microsecond,
too much per message. prometheus-client's multiprocess mode needs its
directory set before it is imported, so everything here imports it lazily.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import Any

# the label sets exported at 0 from the start are the protocol's
from .protocol import CLOSE_CODES, ERROR_CODES, TICK_OUTCOMES, TICK_SOURCES, UPGRADE_STATUSES

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_dir(path: str = "") -> str:
    """Create (or wipe) the multiprocess directory; call once per pod, before workers start."""
    path = path or os.environ.get(_ENV) or tempfile.mkdtemp(prefix="fastfeed-metrics-")
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        os.unlink(f)
    os.environ[_ENV] = path
    return path


def mark_dead(pid: int) -> None:
    """A worker exited: drop its live gauges so they stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def render() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg)
    return generate_latest(reg), CONTENT_TYPE_LATEST


def cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    """The series of one worker. Names follow Prometheus conventions."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.connections = Gauge("fastfeed_connections", "Open client connections",
                                 multiprocess_mode="livesum")
        self.subscriptions = Gauge("fastfeed_subscriptions", "Subscribed symbols, all clients",
                                   multiprocess_mode="livesum")
        self.instruments = Gauge("fastfeed_instruments", "Instruments held",
                                 multiprocess_mode="livemax")
        self.ticks = Counter("fastfeed_ticks", "Ticks received, by source and outcome",
                             ["source", "outcome"])
        self.frames = Counter("fastfeed_frames", "Update frames written to client sockets")
        self.frames_built = Counter("fastfeed_frames_built",
                                    "Distinct update frames encoded (the rest were shared)")
        self.bytes_sent = Counter("fastfeed_bytes_sent", "Update frame payload bytes sent")
        self.conflated = Counter("fastfeed_conflated_frames",
                                 "Frames held back because the client was not reading")
        self.watched = Counter("fastfeed_watched_pushes",
                               "Immediate pushes caused by a watched instrument")
        self.heartbeats = Counter("fastfeed_heartbeats", "Heartbeats sent to quiet connections")
        self.overruns = Counter("fastfeed_frame_overruns",
                                "Frame cycles that ran out of time: one per 1 ms of work "
                                "that yielded with frames still due")
        self.stalled = Gauge("fastfeed_stalled_clients", "Clients above the write high-water mark",
                             multiprocess_mode="livesum")
        self.stall_closes = Counter("fastfeed_stall_closes", "Clients closed 1008 for stalling")
        self.errors = Counter("fastfeed_errors", "Error replies sent to clients, by code", ["code"])
        self.closes = Counter("fastfeed_closes", "Connections closed by the server, by close code",
                              ["code"])
        self.rejected_upgrades = Counter("fastfeed_rejected_upgrades",
                                         "HTTP upgrades refused, by status", ["status"])
        self.latency = Histogram("fastfeed_tick_to_send_seconds",
                                 "Tick arrival to frame send, sampled one row per built frame",
                                 buckets=LATENCY_BUCKETS)
        self.build = Histogram("fastfeed_frame_build_seconds",
                               "Time of one frame cycle (build and write all due frames)",
                               buckets=LATENCY_BUCKETS)
        self.feed_up = Gauge("fastfeed_feed_up", "1 while the upstream feed is up",
                             multiprocess_mode="livemin")
        self.breaker = Gauge("fastfeed_redis_breaker_state",
                             "Redis circuit breaker: 0 closed, 1 open, 2 half-open",
                             multiprocess_mode="livemax")
        self.frame_floor = Gauge("fastfeed_frame_floor_seconds",
                                 "Shortest update interval under load (0: not stretched)",
                                 multiprocess_mode="livemax")
        self.draining = Gauge("fastfeed_draining", "1 while draining for shutdown",
                              multiprocess_mode="livemax")
        self.ready = Gauge("fastfeed_ready", "1 while /readyz answers 200",
                           multiprocess_mode="livemin")
        self.redis_outages = Counter("fastfeed_redis_outages",
                                     "Times the Redis bus went down after being up, by the "
                                     "Redis node (host:port) whose loss began it", ["node"])
        self.redis_outage = Gauge("fastfeed_redis_last_outage_seconds",
                                  "Length of the last Redis bus outage that ended "
                                  "(from losing Redis to the snapshot loaded again)",
                                  multiprocess_mode="livemax")
        self.redis_down = Counter("fastfeed_redis_down_seconds",
                                  "Seconds the Redis bus was down after being up, all outages")
        self.redis_masters = Gauge("fastfeed_redis_cluster_masters",
                                   "Redis Cluster masters the bus is connected to (0: not a "
                                   "cluster)", multiprocess_mode="livemin")
        self.redis_redirects = Counter("fastfeed_redis_redirects",
                                       "Redis Cluster MOVED/ASK replies followed")
        self._bus_seen: dict[str, float] = {}
        self.delay_line_bytes = Gauge("fastfeed_delay_line_bytes",
                                      "Memory the delay line holds (docs/delay.md has the "
                                      "formula), per worker", multiprocess_mode="livemax")
        self.delay_slot = Gauge("fastfeed_delay_slot_seconds",
                                "The delay line's slot length (grows when it is coarsened "
                                "to stay in --delay-budget-mb)", multiprocess_mode="livemax")
        self.delay_past = Gauge("fastfeed_delay_past_seconds",
                                "Past the delay line holds (it is full at --max-delay-s)",
                                multiprocess_mode="livemin")
        self.delay_entries = Gauge("fastfeed_delay_line_entries",
                                   "What the delay line holds, by kind: quote and book states "
                                   "(one per instrument changed in a slot), trades (every one)",
                                   ["kind"], multiprocess_mode="livesum")
        self.delay_dropped = Counter("fastfeed_delay_dropped_trades",
                                     "Trades left out of the delayed copies: stamped further "
                                     "ahead of the gateway's clock than --max-delay-s (delayed "
                                     "clients count them lost)")
        self.worker_restarts = Counter("fastfeed_worker_restarts",
                                       "Worker processes restarted by the supervisor")
        self.internal_errors = Counter("fastfeed_internal_errors",
                                       "Unexpected exceptions (bugs) met, all of them; "
                                       "the log has the first of each kind")
        self.instruments_refused = Counter(
            "fastfeed_instruments_refused",
            "Ticks for new symbols refused because the table is at --max-instruments")
        from . import logs

        logs.on_unexpected = self.internal_errors.inc
        for source in TICK_SOURCES:
            for outcome in TICK_OUTCOMES:
                self.ticks.labels(source, outcome)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for close in CLOSE_CODES:
            self.closes.labels(str(close))
        for status in UPGRADE_STATUSES:
            self.rejected_upgrades.labels(str(status))

    def count_error(self, code: str) -> None:
        """An error reply sent (a protocol.ERROR_CODES code)."""
        self.errors.labels(code).inc()

    def count_close(self, code: int) -> None:
        """A close the server sent by itself (a protocol.CLOSE_CODES code)."""
        self.closes.labels(str(code)).inc()

    def count_ticks(self, source: str, outcome: str, n: int) -> None:
        """Ticks the table never saw (refused or dropped before it, in Redis mode)."""
        self.ticks.labels(source, outcome).inc(n)

    def observe_bus(self, bus: Any) -> None:
        """Copy the Redis bus's state and counters (once a second)."""
        self.breaker.set(bus.breaker)
        seen = self._bus_seen
        outages = bus.outages - seen.get("outages", 0)
        if outages > 0:
            self.redis_outages.labels(bus.lost_node or "?").inc(outages)
        if bus.outage_seconds_total > seen.get("down", 0.0):
            self.redis_down.inc(bus.outage_seconds_total - seen.get("down", 0.0))
            self.redis_outage.set(bus.outage_seconds)
        redirects = getattr(bus, "redirects", 0)
        if redirects > seen.get("redirects", 0):
            self.redis_redirects.inc(redirects - seen.get("redirects", 0))
        nodes = getattr(bus, "nodes", None)
        self.redis_masters.set(len(getattr(bus, "known", ())) if nodes is not None else 0)
        seen.update(outages=bus.outages, down=bus.outage_seconds_total, redirects=redirects)

    def flush(self, stats: dict[str, Any], latencies_ns: list[int]) -> None:
        for (source, outcome), n in stats["ticks"].items():
            self.ticks.labels(source, outcome).inc(n)
        for name, counter in (("frames", self.frames), ("frames_built", self.frames_built),
                              ("bytes_sent", self.bytes_sent), ("conflated", self.conflated),
                              ("watched_pushes", self.watched), ("heartbeats", self.heartbeats),
                              ("overruns", self.overruns)):
            if stats[name]:
                counter.inc(stats[name])
        if stats.get("refused"):
            self.instruments_refused.inc(stats["refused"])
        for ns in latencies_ns:
            self.latency.observe(max(ns, 0) / 1e9)
        if stats["pumps"]:
            # the core sums cycle time; one observation of the mean per flush
            self.build.observe(stats["build_seconds"] / stats["pumps"])
