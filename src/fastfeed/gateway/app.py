"""The gateway process: wiring of its parts, and their lifecycle (start, drain, stop).

Data flows one way: sources (simulator, /ingest, the bus's subscriber) -> sink
(the local table, or the Redis bus) -> Table -> Hub -> sockets. The sink is
chosen once, in `start` (docs/sources.md). This is the only module that knows
every part of the gateway; each part gets the narrow context it needs
(gateway/__init__.py has the layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import _core, logs, metrics
from .. import protocol as P
from ..auth import DelayRefused
from ..config import Config
from ..feed import record
from ..feed.delay import DelaySource
from ..feed.ingest import IngestContext, IngestSource
from ..feed.replay import ReplaySource
from ..feed.simulator import SimulatorSource
from ..feed.sink import BusSink, LocalSink, Sink
from ..feed.source import BusSource, Source
from .books import book_channel, book_events
from .clock import FrameClock
from .framing import ECHO_MAX_BYTES, FramingContext
from .httpfront import create_server
from .registry import (
    Channel,
    Channels,
    Limits,
    Registry,
    delayed_quote_channel,
    quote_channel,
    tape_channel,
    trade_channels,
)
from .routes import Routes
from .session import SessionContext, SymbolIndex

log = logging.getLogger("fastfeed.server")
READ_BUFFER_BYTES = 2048
REFUSED_LOG_EVERY_S = 60.0  # a full instrument table is logged at most this often
SUBPROTOCOLS = P.SUBPROTOCOLS



def delayed_channels(hub: Any, view: Any, delay_s: int, sync: Callable[[], None]
                     ) -> dict[str, Channel]:
    """The channels of a delayed copy (a `DelayedView`), each in a hub slot of
    its own, by the real channel's name; named "book@900" and so on, so a
    connection holds a symbol's real-time and delayed subscriptions apart.
    `sync` gives the copies the symbols the real table learnt since the line's
    last slot, before a snapshot names them."""
    chans = [delayed_quote_channel(view.table, hub.add_kind(view.table))]
    if view.books is not None:
        chans.append(book_channel(hub, view.books))
    if view.trades is not None:
        chans += trade_channels(view.trades, hub.add_kind(view.trades),
                                view.bars, hub.add_kind(view.bars))
        # the delayed market-wide tape: the released trades, in the order released
        chans.append(tape_channel(view.trades.tape, hub.add_kind(view.trades.tape)))

    def twin(ch: Channel) -> Channel:
        def snapshot(items: list[int], since: dict[int, int], upto: int) -> bytes:
            sync()
            return ch.snapshot(items, since, upto)

        return dataclasses.replace(ch, name=f"{ch.name}@{delay_s}", snapshot=snapshot)

    return {ch.name: twin(ch) for ch in chans}


class Gateway:
    """Everything one worker process holds: the table, the hub, its sessions."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.table = _core.Table(capacity=min(max(1024, 2 * cfg.simulate), cfg.max_instruments),
                                 max_instruments=cfg.max_instruments)
        self.hub = _core.Hub(self.table)
        # what `channels` may name; a kind adds its slot (hub.add_kind) and channel here
        self.channels = Channels()
        self.channels.register(quote_channel(self.table))
        # order books: the same instrument ids as the table (docs/core.md)
        self.books = _core.Books(self.table, cfg.book_depth, cfg.book_levels)
        book = book_channel(self.hub, self.books)
        self.channels.register(book)
        # trades (and the market-wide tape) and the bars made from them
        self.bars = _core.Bars(self.table, history=cfg.bars_history, tz=cfg.bars_tz)
        self.trades = _core.Trades(self.table, ring=cfg.trade_ring, backlog=cfg.trade_backlog,
                                   tape_ring=cfg.tape_ring, bars=self.bars)
        for ch in trade_channels(self.trades, self.hub.add_kind(self.trades),
                                 self.bars, self.hub.add_kind(self.bars)):
            self.channels.register(ch)
        # the tape (`*` on trades) in a slot of its own: a connection holds it
        # whole or not at all, so its pending starts at its snapshot (Hub.subscribe_ids)
        self.channels.register_tape(tape_channel(self.trades.tape,
                                                 self.hub.add_kind(self.trades.tape)))
        self.metrics = metrics.Metrics()
        self.limits = Limits.from_config(cfg)
        self.registry = Registry(self.limits, self.metrics, lambda: self.has_market_data)
        self.clock = FrameClock(self.loop, self.hub, cfg.frame_ms, cfg.max_frame_ms,
                                cfg.min_frame_ms, self.metrics.frame_floor.set)
        self.clock.before.append(book_events(self.hub, book.slot, self.books))
        # picows' one frame-size limit, the largest endpoint's; FrameGuard holds
        # the others to theirs from the frame header
        frame_limit = max(cfg.max_message_bytes, cfg.max_ingest_bytes,
                          ECHO_MAX_BYTES if cfg.conformance_echo else 0)
        self.link = FramingContext(self.loop, frame_limit, self.metrics.count_close)
        self.symbol_index = SymbolIndex(self.table)  # sorted symbols for list
        # the table as a sink: the bus's subscriber writes here, and in embedded
        # mode every source does; --record records what it takes
        self.table_sink: LocalSink | record.RecordingSink = LocalSink(
            self.table, self.clock.after_ticks, self.books, self.trades)
        recorder = record.open_recorder(cfg.record, self.loop)
        if recorder is not None:
            self.table_sink = record.RecordingSink(self.table_sink, recorder)
        self.routes: Routes | None = None  # at start, once the bus (or none) is known
        self.bus: Any = None  # fastfeed.bus.RedisBus in multi-worker / multi-pod mode
        self.sink: Sink = self.table_sink  # where the sources write (start decides)
        self.sources: list[Source] = []
        self.ingest: IngestSource | None = None
        self.delay: DelaySource | None = None  # the delay line, unless --max-delay-s 0
        self.delay_twins: dict[int, dict[str, Channel]] = {}  # delay (s) -> its channels
        self.started = False
        self.draining = False
        self.server: asyncio.base_events.Server | None = None
        self.stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._refused = 0  # ticks for new symbols refused (table full) not logged yet
        self._refused_logged_at = -REFUSED_LOG_EVERY_S

    @property
    def sessions(self) -> dict[int, Any]:
        return self.registry.sessions

    # ---- routes

    def factory(self, req: Any):
        """picows' listener factory (and the HTTP router). It never raises."""
        assert self.routes is not None
        return self.routes.safely(self._route, req)

    def _route(self, req: Any):
        assert self.routes is not None
        return self.routes.route(req)

    def _wire_routes(self) -> Routes:
        assert self.ingest is not None
        session_ctx = SessionContext(self.link, self.limits, self.hub, self.table,
                                     self.symbol_index, self.registry, self.metrics.count_error,
                                     self.channels,
                                     self.delayed if self.delay is not None else None)
        return Routes(self.cfg, registry=self.registry, metrics=self.metrics, link=self.link,
                      session_ctx=session_ctx, ingest=self.ingest,
                      draining=lambda: self.draining, ready_reasons=self.ready_reasons)

    # ---- feed: the sink, and the sources that write to it

    def wire_feed(self) -> None:
        """Choose the sink, once: the Redis bus if there is one (ticks come back
        to the table through the bus's subscriber, a source of its own), else
        the local table. Then the sources that write to it."""
        cfg = self.cfg
        self.sources = []
        if self.bus is not None:
            self.sink = BusSink(self.bus, self.metrics.count_ticks)
            self.sources.append(BusSource(self.bus, self.table_sink, cfg.feed_grace_s))
        else:
            self.sink = self.table_sink
        self.ingest = IngestSource(IngestContext(self.link, self.sink, self.metrics,
                                                 cfg.max_ingest_bytes, cfg.ingest_rate))
        self.sources.append(self.ingest)
        if cfg.simulate:
            # trades only into a sink that takes them (the local table with
            # its trades kind, or a bus that carries them)
            takes = bool(getattr(self.sink, "takes_trades", False))
            self.sources.append(SimulatorSource(
                self.sink, cfg.simulate, cfg.rate, cfg.seed,
                trade_rate=cfg.rate * cfg.trades_per_tick if takes else 0.0))
        if cfg.replay:
            self.sources.append(ReplaySource(self.sink, cfg.replay, cfg.replay_speed))
        if cfg.max_delay_s:
            # last: it starts once the bus's source holds the snapshot, which is
            # then the line's first slot
            self.delay = DelaySource(self.table, cfg.max_delay_s, cfg.delay_slot_ms,
                                     cfg.delay_budget_mb, cfg.delay_gates_ready,
                                     self.clock.after_ticks, self.books, self.trades)
            self.delay.on_full = self._delay_full
            self.sources.append(self.delay)

    def delayed(self, delay_s: int) -> tuple[dict[str, Channel], float]:
        """The channels that serve `delay_s` (by the real channel's name), made
        on first use, and the past the line holds. Each delayed kind is another
        hub slot under its kind's key: the hub merges them in one array, and
        has `_core.HUB_KINDS` slots: a delay past those is `DelayRefused`."""
        assert self.delay is not None
        twins = self.delay_twins.get(delay_s)
        if twins is None:
            served = sorted(self.delay_twins, reverse=True)
            # the hub slots one delay takes: those of a delay already served
            per = len({c.slot for c in self.delay_twins[served[0]].values()}) if served else 0
            if len(self.hub.kinds) + per > _core.HUB_KINDS:
                raise DelayRefused(
                    f"token asks for a {delay_s}s delay, and this worker already serves "
                    f"{len(served)} delays ({', '.join(map(str, served))} s), the most it "
                    "serves at once: mint delayed tokens with one of those delays")
            twins = self.delay_twins[delay_s] = delayed_channels(
                self.hub, self.delay.view_for(delay_s), delay_s, self.delay.line.sync)
        return twins, self.delay.past_s()

    def _delay_full(self, delay_s: int) -> None:
        for s in list(self.sessions.values()):
            s.delay_line_full(delay_s)

    def after_ticks(self) -> None:
        """Ticks were applied: watched instruments that changed go out in this loop pass."""
        self.clock.after_ticks()

    def set_feed(self, up: bool) -> None:
        self.registry.set_feed(up)

    @property
    def has_market_data(self) -> bool:
        """False while a worker on Redis has never loaded the snapshot: its table
        is empty or partial, so it must not serve clients. After the first load
        it keeps serving through Redis outages, with the last known rows."""
        return all(s.has_data for s in self.sources)

    def ready_reasons(self) -> list[str]:
        reasons = []
        if not self.started:
            reasons.append("starting")
        if self.draining:
            reasons.append("draining")
        reasons.extend(p for p in (s.problem() for s in self.sources) if p)
        reg = self.registry
        if not reg.feed_up and time.monotonic() - reg.feed_down_since > self.cfg.feed_grace_s:
            reasons.append(f"feed down for {time.monotonic() - reg.feed_down_since:.0f}s")
        return reasons

    # ---- once a second

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
                    s.close(P.CLOSE_POLICY, f"stalled: not reading for {self.cfg.stall_s:g}s",
                            grace_s=5.0)
            stats = self.table.take_stats()
            self.metrics.flush(stats, self.hub.take_latencies())
            self._log_refused(stats["refused"], stats["refused_symbol"])
            logs.unexpected.flush()
            self.metrics.stalled.set(self.hub.paused_count())
            self.metrics.instruments.set(len(self.table))
            self.metrics.ready.set(0 if self.ready_reasons() else 1)
            for src in self.sources:
                src.observe(self.metrics)
            self.sink.observe(self.metrics)

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

    # ---- lifecycle

    async def start(self, sock: socket.socket | None = None) -> None:
        cfg = self.cfg
        self.wire_feed()
        # every source starts before the gateway listens: the bus's holds the
        # snapshot first (workers share one listening socket, and a worker
        # takes connections as soon as it listens, whatever /readyz says)
        for src in self.sources:
            await src.start()
        self.routes = self._wire_routes()
        kw: dict[str, Any] = dict(
            websocket_handshake_timeout=cfg.handshake_timeout_s,
            enable_auto_ping=True,
            enable_auto_pong=False,  # gateway.framing.MessageListener answers, after its checks
            auto_ping_idle_timeout=cfg.idle_timeout_s / 2,
            auto_ping_reply_timeout=cfg.idle_timeout_s / 2,
            max_frame_size=self.link.frame_limit,
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
        self._tasks.append(asyncio.ensure_future(self.clock.run()))
        self._tasks.append(asyncio.ensure_future(self._housekeeping()))
        self._tasks.append(asyncio.ensure_future(self.clock.pace()))
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
                s.close(P.CLOSE_RESTART,
                        "server restarting: reconnect to another replica with since")
            if w + 1 < waves:
                await asyncio.sleep(cfg.drain_s / waves * random.uniform(0.5, 1.5))
        deadline = time.monotonic() + 3.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for src in self.sources:
            with contextlib.suppress(Exception):
                await src.stop()
        if self.server is not None:
            self.server.close()
        for s in list(self.sessions.values()):
            if s.transport is not None:
                s.transport.disconnect(graceful=False)
        if isinstance(self.table_sink, record.RecordingSink):
            self.table_sink.close()
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
    mode = "redis bus" if isinstance(gw.sink, BusSink) else "embedded"
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
