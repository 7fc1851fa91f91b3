"""The /ingest endpoint: publishers push JSON ticks (or binary batches) into the gateway."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from picows import WSCloseCode, WSMsgType, WSTransport

from .. import _core
from .._tickjson import TickParser
from ..framing import MessageListener

if TYPE_CHECKING:
    from ..server import Gateway

log = logging.getLogger("fastfeed.ingest")
# strict JSON both ways, as on /ws (see session.py)
_loads = orjson.loads
_dumps = orjson.dumps
MAX_ERRORS_PER_MESSAGE = 50
LOOPBACK = ("127.", "::1", "::ffff:127.")
# One per process: parse() and apply() run back to back, never interleaved.
_PARSER = TickParser()


class IngestSession(MessageListener):
    """One publisher connection. Bad ticks are answered by name; the rest apply."""

    path = "/ingest"

    def __init__(self, gw: Gateway, trusted: bool) -> None:
        super().__init__(gw, gw.cfg.max_ingest_bytes)
        self.trusted = trusted
        self.allowance = gw.cfg.ingest_rate
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
            self.close(WSCloseCode.POLICY_VIOLATION,
                       "ingest is loopback-only without a publisher token")

    def on_message(self, t: WSMsgType, data: bytes) -> None:
        gw = self.gw
        if t == WSMsgType.BINARY:
            # the tick count is in the batch header (a bad header is refused below)
            n = int.from_bytes(data[4:8], "little") if data[:4] == b"FFT1" else 0
            if not self._allow(n):
                return self._rate_limited(n)
            if gw.bus is not None:
                return self._publish_batch(data)
            try:
                _, _, rejected = gw.table.apply_batch(data, 0)
            except ValueError as e:
                return self._error("bad_request", str(e))
            gw.after_ticks()
            if rejected:
                self._error("bad_request", f"{rejected} ticks with a bad symbol or seq")
            return
        if gw.bus is None:
            n = _PARSER.parse(data)
            if n >= 0:  # the common shape, parsed without building dicts
                if not self._allow(n):
                    return self._rate_limited(n)
                _, _, errors = _PARSER.apply(gw.table, 0)
                gw.after_ticks()
                return self._report(errors)
        try:
            msg = _loads(data)
        except orjson.JSONDecodeError as e:
            return self._error("bad_request", f"not JSON: {e}")
        ticks = msg if isinstance(msg, list) else [msg]
        if not self._allow(len(ticks)):
            return self._rate_limited(len(ticks))
        if gw.bus is not None:
            return self._publish(ticks)
        self._report(gw.ingest_ticks(ticks, 0))

    def _publish(self, ticks: list) -> None:
        async def go() -> None:
            try:
                errors = await self.gw.bus.publish(ticks)
                if errors:  # refused before Redis: the table never counts these
                    self.gw.count_ticks("ingest", "rejected", len(errors))
                self._report(errors)
            except Exception as e:  # the bus is down: say so, never drop silently
                self._error("unavailable", f"{len(ticks)} ticks NOT published: {e}")
        self.gw.loop.create_task(go())

    def _publish_batch(self, data: bytes) -> None:
        try:
            ticks = _core.decode_batch(data)
        except (ValueError, IndexError) as e:
            return self._error("bad_request", f"bad tick batch: {e}")
        self._publish(ticks)

    def _rate_limited(self, n: int) -> None:
        self._error("rate_limited", f"over {self.gw.cfg.ingest_rate:g} ticks/s for this "
                    f"publisher: {n} ticks NOT applied; slow down and resend")

    def _report(self, errors: list) -> None:
        for k in range(0, min(len(errors), MAX_ERRORS_PER_MESSAGE)):
            idx, sym, why = errors[k]
            syms = [sym] if isinstance(sym, str) else None
            self._error("bad_request", f"tick {idx} refused: {why}", syms, index=idx)
        if len(errors) > MAX_ERRORS_PER_MESSAGE:
            self._error("bad_request", f"{len(errors) - MAX_ERRORS_PER_MESSAGE} more ticks refused")

    def _allow(self, n: int) -> bool:
        now = time.monotonic()
        rate = self.gw.cfg.ingest_rate
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
        self.gw.count_error(code)
        tr.send(WSMsgType.TEXT, _dumps(msg))
