"""The /ingest endpoint: publishers push JSON ticks (or binary batches) into the gateway."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from picows import WSMsgType, WSTransport

from .. import _core
from .. import protocol as P
from ..gateway.framing import FramingContext, MessageListener
from .sink import INGEST, Errors, Sink
from .source import Source

log = logging.getLogger("fastfeed.ingest")
# strict JSON both ways, as on /ws (see session.py)
_dumps = orjson.dumps
MAX_ERRORS_PER_MESSAGE = 50
LOOPBACK = ("127.", "::1", "::ffff:127.")


@dataclass(frozen=True, slots=True)
class IngestContext:
    """All a publisher connection reaches of the gateway."""

    link: FramingContext
    sink: Sink  # where the ticks go: the local table, or the Redis bus
    metrics: Any  # fastfeed.metrics.Metrics: count_error
    max_bytes: int  # --max-ingest-bytes
    rate: float  # --ingest-rate, ticks per second per publisher


class IngestSource(Source):
    """The /ingest endpoint as a source: one `IngestSession` per publisher
    connection (`session`), every one writing to the same sink. `stop`
    disconnects the publishers still connected."""

    name = "ingest"

    def __init__(self, ctx: IngestContext) -> None:
        super().__init__(ctx.sink)
        self.ctx = ctx
        self.open: set[IngestSession] = set()

    def session(self, trusted: bool) -> IngestSession:
        return IngestSession(self.ctx, trusted, self.open)

    async def stop(self) -> None:
        for s in list(self.open):
            if s.transport is not None:
                s.transport.disconnect(graceful=False)


class IngestSession(MessageListener):
    """One publisher connection. Bad ticks are answered by name; the rest go
    to the sink. It is the sink's `Reply`: it admits ticks within its rate,
    and sends what the sink refused back as errors."""

    path = "/ingest"

    def __init__(self, ctx: IngestContext, trusted: bool,
                 members: set[IngestSession] | None = None) -> None:
        super().__init__(ctx.link, ctx.max_bytes)
        self.ctx = ctx
        self.sink = ctx.sink
        self.trusted = trusted
        self.allowance = ctx.rate
        self.refill_at = time.monotonic()
        self.peer = "?"
        self.members = members

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.members is not None:
            self.members.add(self)
        self.guard_frames(transport)
        peer = transport.underlying_transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        if not self.trusted and not str(peer[0]).startswith(LOOPBACK):
            log.warning("refused /ingest from %s: no publisher token is configured, so only "
                        "loopback publishers are accepted (set --publisher-token)", self.peer)
            self.close(P.CLOSE_POLICY,
                       "ingest is loopback-only without a publisher token")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.members is not None:
            self.members.discard(self)
        super().on_ws_disconnected(transport)

    def on_message(self, t: WSMsgType, data: bytes) -> None:
        if t == WSMsgType.BINARY:
            self.sink.batch(data, INGEST, self)
        else:
            self.sink.json(data, INGEST, self)

    # ---- the sink's Reply

    def admit(self, n: int) -> bool:
        if self._allow(n):
            return True
        self._rate_limited(n)
        return False

    def refused(self, errors: Errors) -> None:
        self._report(errors)

    def error(self, code: str, message: str) -> None:
        self._error(code, message)

    def pause(self) -> None:
        # the sink has a backlog (Redis): leave the rest in the socket, so
        # TCP slows the publisher down instead of the gateway buffering it
        if self.transport is not None:
            self.transport.underlying_transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.underlying_transport.resume_reading()

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
