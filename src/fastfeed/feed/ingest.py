"""The /ingest endpoint: publishers push JSON ticks (or binary batches) into the gateway."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from picows import WSMsgType, WSTransport

from .. import _core
from .. import protocol as P
from .._tickjson import TickParser
from ..gateway.framing import FramingContext, MessageListener

log = logging.getLogger("fastfeed.ingest")
# strict JSON both ways, as on /ws (see session.py)
_loads = orjson.loads
_dumps = orjson.dumps
MAX_ERRORS_PER_MESSAGE = 50
LOOPBACK = ("127.", "::1", "::ffff:127.")
# One per process: parse() and apply() run back to back, never interleaved.
_PARSER = TickParser()


@dataclass(frozen=True, slots=True)
class IngestContext:
    """All a publisher connection reaches of the gateway."""

    link: FramingContext
    table: Any  # _core.Table the ticks apply to (embedded mode)
    applied: Callable[[], None]  # ticks were applied to the table: frames go out soon
    bus: Any  # fastfeed.bus.RedisBus in Redis mode (ticks are published), else None
    metrics: Any  # fastfeed.metrics.Metrics: count_error, count_ticks
    max_bytes: int  # --max-ingest-bytes
    rate: float  # --ingest-rate, ticks per second per publisher
    recorder: Any = None  # fastfeed.feed.record.Recorder under serve --record


class IngestSession(MessageListener):
    """One publisher connection. Bad ticks are answered by name; the rest apply."""

    path = "/ingest"

    def __init__(self, ctx: IngestContext, trusted: bool) -> None:
        super().__init__(ctx.link, ctx.max_bytes)
        self.ctx = ctx
        self.trusted = trusted
        self.allowance = ctx.rate
        self.refill_at = time.monotonic()
        self.peer = "?"

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.guard_frames(transport)
        peer = transport.underlying_transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        if not self.trusted and not str(peer[0]).startswith(LOOPBACK):
            log.warning("refused /ingest from %s: no publisher token is configured, so only "
                        "loopback publishers are accepted (set --publisher-token)", self.peer)
            self.close(P.CLOSE_POLICY,
                       "ingest is loopback-only without a publisher token")

    def on_message(self, t: WSMsgType, data: bytes) -> None:
        ctx = self.ctx
        if t == WSMsgType.BINARY:
            # the tick count is in the batch header (a bad header is refused below)
            n = int.from_bytes(data[4:8], "little") if data[:4] == P.BATCH_MAGIC else 0
            if not self._allow(n):
                return self._rate_limited(n)
            if ctx.bus is not None:
                return self._publish_batch(data)
            try:
                _, _, rejected = ctx.table.apply_batch(data, 0)
            except ValueError as e:
                return self._error(P.BAD_REQUEST, str(e))
            ctx.applied()
            if ctx.recorder is not None:
                ctx.recorder.batch(data)
            if rejected:
                self._error(P.BAD_REQUEST, f"{rejected} ticks with a bad symbol or seq")
            return
        if ctx.bus is None:
            n = _PARSER.parse(data)
            if n >= 0:  # the common shape, parsed without building dicts
                if not self._allow(n):
                    return self._rate_limited(n)
                _, _, errors = _PARSER.apply(ctx.table, 0)
                ctx.applied()
                if ctx.recorder is not None:
                    ctx.recorder.json(data)
                return self._report(errors)
        try:
            msg = _loads(data)
        except orjson.JSONDecodeError as e:
            return self._error(P.BAD_REQUEST, f"not JSON: {e}")
        ticks = msg if isinstance(msg, list) else [msg]
        if not self._allow(len(ticks)):
            return self._rate_limited(len(ticks))
        if ctx.bus is not None:
            return self._publish(ticks)
        _, _, errors = ctx.table.apply_objects(ticks, 0)
        ctx.applied()
        if ctx.recorder is not None:
            ctx.recorder.json(data)
        self._report(errors)

    def _publish(self, ticks: list) -> None:
        async def go() -> None:
            try:
                errors = await self.ctx.bus.publish(ticks)
                if errors:  # refused before Redis: the table never counts these
                    self.ctx.metrics.count_ticks("ingest", "rejected", len(errors))
                self._report(errors)
            except Exception as e:  # the bus is down: say so, never drop silently
                self._error(P.UNAVAILABLE, f"{len(ticks)} ticks NOT published: {e}")
        self.link.loop.create_task(go())

    def _publish_batch(self, data: bytes) -> None:
        try:
            ticks = _core.decode_batch(data)
        except (ValueError, IndexError) as e:
            return self._error(P.BAD_REQUEST, f"bad tick batch: {e}")
        self._publish(ticks)

    def _rate_limited(self, n: int) -> None:
        self._error(P.RATE_LIMITED, f"over {self.ctx.rate:g} ticks/s for this "
                    f"publisher: {n} ticks NOT applied; slow down and resend")

    def _report(self, errors: list) -> None:
        for k in range(0, min(len(errors), MAX_ERRORS_PER_MESSAGE)):
            idx, sym, why = errors[k]
            syms = [sym] if isinstance(sym, str) else None
            self._error(P.BAD_REQUEST, f"tick {idx} refused: {why}", syms, index=idx)
        if len(errors) > MAX_ERRORS_PER_MESSAGE:
            self._error(P.BAD_REQUEST, f"{len(errors) - MAX_ERRORS_PER_MESSAGE} more ticks refused")

    def _allow(self, n: int) -> bool:
        now = time.monotonic()
        rate = self.ctx.rate
        self.allowance = min(rate, self.allowance + (now - self.refill_at) * rate)
        self.refill_at = now
        if n > self.allowance:
            return False
        self.allowance -= n
        return True

    def _error(self, code: str, message: str, symbols: Any = None, index: Any = None) -> None:
        tr = self.transport
        if tr is None or not _core.can_send(tr):
            return
        msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if index is not None:
            msg["index"] = index
        if symbols is not None:
            msg["symbols"] = symbols
        self.ctx.metrics.count_error(code)
        tr.send(WSMsgType.TEXT, _dumps(msg))
