"""The gateway process: HTTP routes, the upgrade, the frame clock, drain.

Data flows one way: feed (simulator, /ingest, bus) -> Table -> Hub -> sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import os
import random
import signal
import socket
import time
from collections import Counter
from importlib import resources
from typing import Any

import numpy as np
from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from . import _core, auth, logs, metrics
from .config import Config
from .feed.ingest import IngestSession
from .feed.simulator import Simulator
from .framing import ECHO_MAX_BYTES, EchoListener
from .httpfront import create_server
from .session import Session, SymbolIndex

log = logging.getLogger("fastfeed.server")
READ_BUFFER_BYTES = 2048
# A frame cycle yields to the loop after this long: a watched tick that
# arrives meanwhile waits at most one slice before it goes out.
PUMP_SLICE_NS = 1_000_000
PACE_EVERY_S = 0.1
PACE_BUSY = 0.75  # share of a core the frame pacing aims at under load
REFUSED_LOG_EVERY_S = 60.0  # a full instrument table is logged at most this often

SUBPROTOCOLS = ("fastfeed.v1.json", "fastfeed.v1.bin")


INTERNAL_ERROR_LOG_EVERY_S = 60.0  # one log line per kind of unexpected error


def _tokens(headers, name: str) -> set[str]:
    """The comma-separated tokens of every `name` header, lowercased."""
    return {t.strip().lower() for v in headers.getall(name, ()) for t in v.split(",")}


def _shown(value: str, limit: int = 100) -> str:
    """A header value fit to quote in a reply: picows decodes header bytes as
    ASCII with surrogate escapes, so a byte over 0x7f comes back as \\xNN."""
    try:
        text = value.encode("ascii", "surrogateescape").decode("ascii", "backslashreplace")
    except UnicodeEncodeError:
        text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _resp(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", **headers: str):
    hdrs = {"Content-Type": ctype, "Cache-Control": "no-store", **headers}
    if status == 200:
        r = WSUpgradeResponse.create_ok_response(body, extra_headers=hdrs)
    else:
        r = WSUpgradeResponse.create_error_response(status, body, extra_headers=hdrs)
    return WSUpgradeResponseWithListener(r, None)


def _load_web() -> dict[bytes, tuple[bytes, str]]:
    out = {}
    root = resources.files("fastfeed") / "web"
    if root.is_dir():
        for f in root.iterdir():
            if f.is_file():
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                if f.name.endswith(".js"):
                    ctype = "text/javascript"
                if ctype.startswith("text/"):
                    ctype += "; charset=utf-8"
                out[b"/" + f.name.encode()] = (f.read_bytes(), ctype)
    if b"/index.html" in out:
        out[b"/"] = out[b"/index.html"]
    return out


class Gateway:
    """Everything one worker process holds: the table, the hub, its sessions."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.table = _core.Table(capacity=min(max(1024, 2 * cfg.simulate), cfg.max_instruments),
                                 max_instruments=cfg.max_instruments)
        self.hub = _core.Hub(self.table)
        self.symbol_index = SymbolIndex(self.table)  # sorted symbols for list
        self.sessions: dict[int, Session] = {}
        self.per_ip: Counter[str] = Counter()
        self.nsubs = 0
        self.metrics = metrics.Metrics()
        self.secret = cfg.secret()
        self.publisher_token = cfg.publisher_secret()
        self.origins = {o.strip() for o in cfg.allowed_origins.split(",") if o.strip()}
        self.web = _load_web()
        self.bus: Any = None  # fastfeed.bus.RedisBus in multi-worker / multi-pod mode
        self.started = False
        self.draining = False
        self.feed_up = True
        self.feed_down_since = 0.0
        self.server: asyncio.base_events.Server | None = None
        self.stopped = asyncio.Event()
        self._kicked = False
        self._ingest_stale = 0
        self._tasks: list[asyncio.Task] = []
        self._pump_every = min(0.004, cfg.min_frame_ms / 4000)
        self._internal_errors: dict[str, float] = {}
        # picows' one frame-size limit, the largest endpoint's; FrameGuard holds
        # the others to theirs from the frame header
        self.frame_limit = max(cfg.max_message_bytes, cfg.max_ingest_bytes,
                               ECHO_MAX_BYTES if cfg.conformance_echo else 0)
        self._refused = 0  # ticks for new symbols refused (table full) not logged yet
        self._refused_logged_at = -REFUSED_LOG_EVERY_S

    # ---- routes

    def factory(self, req: WSUpgradeRequest):
        """picows' listener factory (and the HTTP router). It never raises: an
        unexpected error is logged and answered with a plain 500, never with
        the exception's text (picows would put that in the body)."""
        try:
            return self._route(req)
        except Exception as e:
            kind = type(e).__name__
            now = time.monotonic()
            if now - self._internal_errors.get(kind, -1e9) >= INTERNAL_ERROR_LOG_EVERY_S:
                self._internal_errors[kind] = now
                log.error("unexpected %s answering %s %s: answered 500 (logged once a minute "
                          "per kind)", kind, req.method.decode("latin-1"),
                          _shown(req.path.decode("latin-1")), exc_info=True)
            self.metrics.rejected_upgrades.labels("500").inc()
            return _resp(500, b"internal error; it is logged at the gateway\n")

    def _route(self, req: WSUpgradeRequest):
        path = req.path.split(b"?", 1)[0]
        if path == b"/ws":
            return self._upgrade_client(req)
        if path == b"/ingest":
            return self._upgrade_ingest(req)
        if path == b"/echo" and self.cfg.conformance_echo:
            return self._upgrade_echo(req)
        if path == b"/healthz":
            return _resp(200, b"ok\n")
        if path == b"/readyz":
            reasons = self.ready_reasons()
            if reasons:
                return _resp(503, ("not ready: " + "; ".join(reasons) + "\n").encode())
            return _resp(200, b"ready\n")
        if path == b"/metrics":
            body, ctype = metrics.render()
            return _resp(200, body, ctype)
        page = self.web.get(path)
        if page is not None:
            return _resp(200, page[0], page[1])
        return _resp(404, b"not found: try /, /ws, /ingest, /healthz, /readyz, /metrics\n")

    def _refuse(self, status: int, why: str, **headers: str):
        self.metrics.rejected_upgrades.labels(str(status)).inc()
        return _resp(status, (why + "\n").encode("utf-8", "backslashreplace"), **headers)

    def _not_upgradable(self, req: WSUpgradeRequest, path: str):
        """A refusal, or None for a WebSocket handshake picows will accept.

        RFC 6455 asks that Connection *contain* the token "upgrade" and Upgrade
        the token "websocket"; picows, validating after this factory, compares
        the whole first header of each (`Connection: keep-alive, Upgrade` from
        older Firefox and some proxies would get its 400). So the request's
        headers are normalised here to what picows reads, once checked."""
        h = req.headers
        if "websocket" not in _tokens(h, "Upgrade"):
            return self._refuse(426, f"upgrade required: {path} is a WebSocket endpoint",
                                Upgrade="websocket")
        if "upgrade" not in _tokens(h, "Connection"):
            return self._refuse(400, "a WebSocket handshake needs 'upgrade' in its Connection "
                                     "header")
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol"):
            for v in h.getall(name, ()):
                if not v.isascii():  # picows would fail on it with an encoding error
                    return self._refuse(400, f"{name} is not ASCII: {_shown(v)}")
        h["Upgrade"] = "websocket"
        h["Connection"] = "Upgrade"
        return None

    def _upgrade_client(self, req: WSUpgradeRequest):
        refusal = self._not_upgradable(req, "/ws")
        if refusal is not None:
            return refusal
        if self.draining:
            return self._refuse(503, "draining for a restart: connect to another replica")
        if len(self.sessions) >= self.cfg.max_connections:
            return self._refuse(503, f"worker is at its {self.cfg.max_connections} connections")
        if self.origins:
            origin = req.headers.get("Origin")
            if origin is not None and origin not in self.origins:
                return self._refuse(403, f"origin {_shown(origin)} is not allowed")
        ent = auth.EVERYTHING
        if self.secret:
            try:
                ent = auth.verify(auth.token_from_request(req.path, req.headers), self.secret)
            except auth.AuthError as e:
                return self._refuse(401, str(e))
        offered = [p.strip() for p in req.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        offered = [p for p in offered if p]
        chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
        if offered and chosen is None:
            return self._refuse(
                400, f"unsupported subprotocol; offer one of {', '.join(SUBPROTOCOLS)}")
        session = Session(self, ent, chosen == "fastfeed.v1.bin", "")
        headers = {"Sec-WebSocket-Protocol": chosen} if chosen else None
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra_headers=headers), session)

    def _upgrade_ingest(self, req: WSUpgradeRequest):
        refusal = self._not_upgradable(req, "/ingest")
        if refusal is not None:
            return refusal
        if self.publisher_token:
            if not auth.publisher_ok(auth.token_from_request(req.path, req.headers),
                                     self.publisher_token):
                return self._refuse(401, "publisher token missing or wrong")
            return IngestSession(self, trusted=True)
        return IngestSession(self, trusted=False)

    def _upgrade_echo(self, req: WSUpgradeRequest):
        """A testing aid (--conformance-echo): an echo on the framing /ws uses."""
        refusal = self._not_upgradable(req, "/echo")
        if refusal is not None:
            return refusal
        return EchoListener(self)

    # ---- sessions

    def attach(self, s: Session) -> None:
        assert s.transport is not None
        peer = s.transport.underlying_transport.get_extra_info("peername") or ("?", 0)
        s.peer = f"{peer[0]}:{peer[1]}"
        ip = str(peer[0])
        self.sessions[s.cid] = s
        self.per_ip[ip] += 1
        s.ip = ip
        self.metrics.connections.inc()
        if self.per_ip[ip] > self.cfg.max_connections_per_ip:
            s.close(1008, f"over {self.cfg.max_connections_per_ip} connections from {ip}")
        elif not self.has_market_data:
            # accepted, because only a close code reaches a browser (a refused
            # upgrade is a bare 1006 there); 1013: come back, or go to a replica
            s.close(1013, "try again later: no market data here yet "
                          "(the snapshot from Redis is not loaded)")
        elif not self.feed_up:
            s.send_text(b'{"type":"status","feed":"down"}')

    def detach(self, s: Session) -> None:
        if self.sessions.pop(s.cid, None) is not None:
            self.per_ip[s.ip] -= 1
            if self.per_ip[s.ip] <= 0:
                del self.per_ip[s.ip]
            self.metrics.connections.dec()
            self.subscriptions_changed(-len(s.subs))

    def subscriptions_changed(self, delta: int) -> None:
        self.nsubs += delta
        self.metrics.subscriptions.inc(delta)

    def count_error(self, code: str) -> None:
        self.metrics.errors.labels(code).inc()

    def count_close(self, code: int) -> None:
        self.metrics.closes.labels(str(code)).inc()

    def count_ticks(self, source: str, outcome: str, n: int) -> None:
        """Ticks the table never saw (refused or dropped before it, in Redis mode)."""
        self.metrics.ticks.labels(source, outcome).inc(n)

    # ---- feed

    def ingest_ticks(self, ticks: list, source: int = 0) -> list:
        """Apply decoded JSON ticks locally; returns the errors of refused ones."""
        _, _, errors = self.table.apply_objects(ticks, source)
        self.after_ticks()
        return errors

    def after_ticks(self) -> None:
        """Ticks were applied: watched instruments that changed go out in this loop pass."""
        if not self._kicked:
            self._kicked = True
            self.loop.call_soon(self._pump)

    def set_feed(self, up: bool) -> None:
        if up == self.feed_up:
            return
        self.feed_up = up
        self.feed_down_since = 0.0 if up else time.monotonic()
        self.metrics.feed_up.set(1 if up else 0)
        log.warning("feed is %s; telling %d clients", "up" if up else "DOWN", len(self.sessions))
        msg = b'{"type":"status","feed":"up"}' if up else b'{"type":"status","feed":"down"}'
        for s in list(self.sessions.values()):
            s.send_text(msg)

    @property
    def has_market_data(self) -> bool:
        """False while a worker on Redis has never loaded the snapshot: its table
        is empty or partial, so it must not serve clients. After the first load
        it keeps serving through Redis outages, with the last known rows."""
        return self.bus is None or self.bus.connects > 0

    def ready_reasons(self) -> list[str]:
        reasons = []
        if not self.started:
            reasons.append("starting")
        if self.draining:
            reasons.append("draining")
        if self.bus is not None and not self.bus.ready:
            reasons.append("snapshot from Redis not loaded yet")
        if not self.feed_up and time.monotonic() - self.feed_down_since > self.cfg.feed_grace_s:
            reasons.append(f"feed down for {time.monotonic() - self.feed_down_since:.0f}s")
        return reasons

    # ---- the frame clock

    def _pump(self) -> None:
        self._kicked = False
        if self.hub.pump(PUMP_SLICE_NS):
            # out of time slice: let ingest and reads run, then carry on with
            # the most overdue connections first (the heap is deadline-ordered)
            self.after_ticks()

    async def _clock(self) -> None:
        while True:
            self._pump()
            await asyncio.sleep(self._pump_every)

    async def _pace(self) -> None:
        """Spend the latency budget rather than saturate: past PACE_BUSY of a
        core, raise every client's shortest frame interval alike (up to
        --max-frame-ms), so frames get fuller and fewer; a saturated loop
        would leave reads, ingest and the tail latency to chance instead."""
        base, top = self.cfg.frame_ms, self.cfg.max_frame_ms
        floor = float(base)
        cpu, t = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(PACE_EVERY_S)
            cpu1, t1 = time.process_time(), time.monotonic()
            busy = (cpu1 - cpu) / max(t1 - t, 1e-3)
            cpu, t = cpu1, t1
            # frames cost about in proportion to 1/floor: aim at PACE_BUSY, halfway per step
            want = min(max(floor * busy / PACE_BUSY, base), top)
            new = 0.5 * floor + 0.5 * want
            if abs(new - floor) >= 0.5 or (new == base) != (floor == base):
                floor = new if new - base >= 0.5 else float(base)
                self.hub.set_floor(0 if floor == base else int(floor * 1e6))
                self.metrics.frame_floor.set(0 if floor == base else floor / 1000)

    async def _housekeeping(self) -> None:
        hb = int(self.cfg.heartbeat_s * 1e9)
        stall = int(self.cfg.stall_s * 1e9)
        while True:
            await asyncio.sleep(1.0)
            for cid in self.hub.sweep(hb, stall):
                s = self.sessions.get(cid)
                if s is not None and not s.closing:
                    log.warning("closing stalled client: its socket has not drained for %gs",
                                self.cfg.stall_s, extra={"ctx": {"client": s.peer, "cid": cid}})
                    self.metrics.stall_closes.inc()
                    # queued behind what it has not read: a client that wakes up
                    # finds the reason; one that doesn't is cut off after the grace
                    s.close(1008, f"stalled: not reading for {self.cfg.stall_s:g}s", grace_s=5.0)
            stats = self.table.take_stats()
            self.metrics.flush(stats, self.hub.take_latencies())
            self._log_refused(stats["refused"], stats["refused_symbol"])
            logs.unexpected.flush()
            self.metrics.stalled.set(self.hub.paused_count())
            self.metrics.instruments.set(len(self.table))
            self.metrics.ready.set(0 if self.ready_reasons() else 1)
            if self.bus is not None:
                self.metrics.observe_bus(self.bus)
                # /ingest ticks Redis dropped as not newer never come back on
                # the bus: count them here, as the table counts its own
                stale = self.bus.publish_stale - self._ingest_stale
                if stale:
                    self._ingest_stale += stale
                    self.count_ticks("ingest", "stale", stale)

    def _log_refused(self, n: int, symbol: str) -> None:
        self._refused += n
        now = time.monotonic()
        if self._refused and now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            log.warning("instrument table is full at %d instruments: refused %d ticks for new "
                        "symbols (the latest: %s) since the last such line; raise "
                        "--max-instruments (FASTFEED_MAX_INSTRUMENTS) if these symbols are real, "
                        "else find the publisher that invents them", self.cfg.max_instruments,
                        self._refused, symbol, extra=logs.ctx(symbol=symbol,
                                                              refused=self._refused))
            self._refused = 0
            self._refused_logged_at = now

    async def _simulate(self) -> None:
        sim = Simulator(self.cfg.simulate, self.cfg.rate, self.cfg.seed)
        # the simulator's instrument numbers -> this table's ids
        table_ids = np.array([self.table.intern_symbol(s) for s in sim.symbols], np.int32)
        step = 0.005
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            ids, seqs, ts, vals = sim.step(min(now - last, 0.1))
            last = now
            if len(ids):
                self.table.apply_arrays(table_ids[ids], seqs, ts, vals)
                self.after_ticks()

    # ---- lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        cfg = self.cfg
        if self.bus is not None:
            # Workers share one listening socket: a worker takes connections as
            # soon as it listens, whatever /readyz says. Hold the snapshot first
            # (or give up after the grace and serve with the feed down).
            await self.bus.start()
            try:
                await self.bus.wait_ready(cfg.feed_grace_s)
            except TimeoutError:
                log.warning("no snapshot from Redis after %gs (%s): serving with the feed down",
                            cfg.feed_grace_s, getattr(self.bus, "last_error", "") or "connecting")
        kw: dict[str, Any] = dict(
            websocket_handshake_timeout=cfg.handshake_timeout_s,
            enable_auto_ping=True,
            enable_auto_pong=False,  # framing.MessageListener answers, after its checks
            auto_ping_idle_timeout=cfg.idle_timeout_s / 2,
            auto_ping_reply_timeout=cfg.idle_timeout_s / 2,
            max_frame_size=self.frame_limit,
            logger_name="picows.server",
            backlog=4096,
            # Client requests are small; the buffer grows for a big one. At
            # picows' default (16 KiB) it was half of an idle client's memory.
            read_buffer_init_size=READ_BUFFER_BYTES,
        )
        if sock is not None:
            self.server = await create_server(self.factory, sock=sock, **kw)
        else:
            self.server = await create_server(self.factory, cfg.host, cfg.port, **kw)
        self.metrics.feed_up.set(1)
        self.metrics.draining.set(0)
        self.metrics.frame_floor.set(0)
        self._tasks.append(asyncio.ensure_future(self._clock()))
        self._tasks.append(asyncio.ensure_future(self._housekeeping()))
        self._tasks.append(asyncio.ensure_future(self._pace()))
        if cfg.simulate and self.bus is None:
            self._tasks.append(asyncio.ensure_future(self._simulate()))
        self.started = True

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def drain(self) -> None:
        """Leave without a reconnect storm: unready, stop accepting, close in jittered waves."""
        if self.draining:
            return
        cfg = self.cfg
        self.draining = True
        self.metrics.draining.set(1)
        log.info("draining: /readyz is 503; closing %d clients over %gs after %gs",
                 len(self.sessions), cfg.drain_s, cfg.drain_delay_s)
        await asyncio.sleep(cfg.drain_delay_s)
        if self.server is not None:
            self.server.close()
        sessions = list(self.sessions.values())
        random.shuffle(sessions)
        waves = max(1, min(len(sessions), int(cfg.drain_s / 0.25)))
        per_wave = -(-len(sessions) // waves) if sessions else 0
        for w in range(waves):
            for s in sessions[w * per_wave:(w + 1) * per_wave]:
                s.close(1012, "server restarting: reconnect to another replica with since")
            if w + 1 < waves:
                await asyncio.sleep(cfg.drain_s / waves * random.uniform(0.5, 1.5))
        deadline = time.monotonic() + 3.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.stop()
        if self.server is not None:
            self.server.close()
        for s in list(self.sessions.values()):
            if s.transport is not None:
                s.transport.disconnect(graceful=False)
        self.stopped.set()


def _on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Exceptions no one awaited (tasks, callbacks): once per kind, like the listeners'."""
    exc = context.get("exception")
    if isinstance(exc, Exception):
        logs.report_exception(exc, str(context.get("message", "a loop callback")))
    else:
        loop.default_exception_handler(context)


async def serve(cfg: Config, sock: socket.socket | None = None, bus_factory=None) -> int:
    """Run one gateway until SIGTERM/SIGINT has drained it. Returns the exit code."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_on_loop_exception)
    gw = Gateway(cfg, loop)
    if bus_factory is not None:
        gw.bus = bus_factory(gw)
    await gw.start(sock)
    mode = "redis bus" if gw.bus is not None else "embedded"
    log.info("serving on http://%s:%d (%s, pid %d%s)", cfg.host, gw.port, mode, os.getpid(),
             f", simulating {cfg.simulate} instruments at {cfg.rate:g} ticks/s"
             if cfg.simulate else "")
    signals = 0
    drain_task: list[asyncio.Future] = []

    def on_signal(sig: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: exiting now without draining", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received", signal.Signals(sig).name)
        drain_task.append(asyncio.ensure_future(gw.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await gw.stopped.wait()
    log.info("drained, exiting")
    return 0
