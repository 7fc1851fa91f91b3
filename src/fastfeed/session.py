"""One client connection: requests, subscriptions, watched set, limits, flow control.

Update frames never pass through here: the core writes them straight to the
socket. A session only handles what the client asks and keeps the core's view
of the connection (subscription set, watched set, interval) up to date.
"""

from __future__ import annotations

import bisect
import fnmatch
import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import orjson
from picows import WSCloseCode, WSMsgType, WSTransport

from . import _core
from .auth import Entitlements
from .framing import MessageListener

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("fastfeed.session")

FIELDS = list(_core.FIELDS)
# The control plane's JSON is strict both ways (RFC 8259): orjson refuses
# lone surrogates, NaN, Infinity, numbers beyond a double and nesting past
# 1024 levels with one JSONDecodeError, so whatever it decodes encodes again.
_loads = orjson.loads
_dumps = orjson.dumps
_SCALAR = (str, int, float, bool, type(None))


_WILD = re.compile(r"[*?\[]")
LIST_SCAN_UNIT = 1000  # a list costs one more token per this many symbols it examines
SYMBOLS_UNIT = 100  # other requests: one more token per this many symbols they name
MAX_GLOB = 128  # symbols are at most 32 characters: a longer glob is a mistake
_ENT_CACHE = 256  # entitlement sets whose visible symbols are kept sorted


class SymbolIndex:
    """The table's symbols, sorted, and per entitlement set the ones it may see.

    The instrument table only grows: on a `list` after growth the new symbols
    are merged in (a sort of two sorted runs), so a `list` never walks the
    whole table in Python, and a glob's literal prefix is found by bisection.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.n = 0
        self.all: list[str] = []
        self.by_ent: dict[tuple[str, ...], tuple[int, list[str]]] = {}

    def visible(self, ent: Entitlements) -> list[str]:
        n = len(self.table)
        if n != self.n:
            _merge(self.all, self.table_slice(self.n, n))
            self.n = n
        if ent.patterns is None:
            return self.all
        seen, syms = self.by_ent.get(ent.patterns, (0, []))
        if seen != n:
            if seen:
                _merge(syms, [s for s in self.table_slice(seen, n) if ent.allows(s)])
            else:  # each pattern's literal prefix is a range of the sorted list
                hits: set[str] = set()
                for p in ent.patterns:
                    page: str | None = ""
                    while page is not None:
                        out, page, _ = list_page(self.all, p, page or None, 1 << 30)
                        hits.update(out)
                syms = sorted(hits)
            if len(self.by_ent) >= _ENT_CACHE and ent.patterns not in self.by_ent:
                self.by_ent.clear()  # many distinct tokens: start over rather than grow
            self.by_ent[ent.patterns] = (n, syms)
        return syms

    def table_slice(self, lo: int, hi: int) -> list[str]:
        return [self.table.symbol(i) for i in range(lo, hi)]


def _merge(into: list[str], new: list[str]) -> None:
    """Add `new` to the sorted list `into`, in place."""
    if len(new) < 64:
        for s in new:
            bisect.insort(into, s)
    else:
        into.extend(new)
        into.sort()


def list_page(syms: list[str], match: str | None, after: str | None,
              cap: int) -> tuple[list[str], str | None, int]:
    """(up to `cap` symbols of sorted `syms` matching the glob after `after`,
    the `after` of the next page or None if this is the last, how many
    symbols were examined: at most 2 * cap)."""
    pattern = match or "*"
    wild = _WILD.search(pattern)
    prefix = pattern[:wild.start()] if wild else pattern
    lo = bisect.bisect_left(syms, prefix)
    if after is not None:
        lo = max(lo, bisect.bisect_right(syms, after))
    if wild is None:  # a plain symbol
        hit = lo < len(syms) and syms[lo] == pattern
        return ([pattern] if hit else []), None, 1
    # symbols are ASCII below DEL: every one with the prefix sorts before prefix + DEL
    hi = bisect.bisect_left(syms, prefix + "\x7f", lo) if prefix else len(syms)
    if pattern[wild.start():] == "*":  # prefix*: a slice
        out = syms[lo:min(hi, lo + cap)]
        return out, (out[-1] if lo + len(out) < hi else None), len(out)
    m = re.compile(fnmatch.translate(pattern)).match
    end = min(hi, lo + 2 * cap)  # a sparse match: a bounded stretch per page
    out = []
    i = lo
    while i < end and len(out) < cap:
        if m(syms[i]):
            out.append(syms[i])
        i += 1
    return out, (syms[i - 1] if i < hi else None), i - lo


class RequestError(Exception):
    def __init__(self, code: str, message: str, symbols: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.symbols = symbols


class Session(MessageListener):
    path = "/ws"

    def __init__(self, gw: Gateway, ent: Entitlements, binary: bool, peer: str) -> None:
        super().__init__(gw, gw.cfg.max_message_bytes)
        self.ent = ent
        self.binary = binary
        self.peer = peer
        self.ip = ""
        self.cid = -1
        self.subs: set[int] = set()
        self.watched: set[int] = set()
        self.frame_ms = gw.cfg.frame_ms
        self.tokens = float(gw.cfg.request_burst)
        self.refill_at = time.monotonic()
        self.strikes = 0
        self.paused = False
        self.reading_paused = False

    # ---- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        hw = self.gw.cfg.high_water_bytes
        transport.underlying_transport.set_write_buffer_limits(high=hw)
        # a fixed kernel send buffer (no autotuning to megabytes) bounds what a
        # stuck client can pin in the kernel and lets the stall show quickly
        sock = transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, hw)
        self.guard_frames(transport)
        self.cid = self.gw.hub.add(transport, self.frame_ms * 1_000_000, self.binary)
        self.gw.attach(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.count_picows_close(transport)
        if self.cid >= 0:
            if self.watched:
                self.gw.hub.watch_ids(self.cid, list(self.watched), False)
            self.gw.hub.remove(self.cid)
            self.gw.detach(self)
            self.cid = -1

    def pause_writing(self) -> None:
        self.paused = True
        self.gw.hub.pause(self.cid)

    def resume_writing(self) -> None:
        self.paused = False
        self.gw.hub.resume(self.cid)
        if self.reading_paused and not self.closing and self.transport is not None:
            self.reading_paused = False
            self.transport.underlying_transport.resume_reading()

    def on_ping(self, transport: WSTransport, payload: bytes) -> None:
        if self._take_token():  # a ping is a message too: it costs a pong
            transport.send_pong(payload)
            self._check_queued()

    # ---- requests

    def on_message(self, t: WSMsgType, data: bytes) -> None:
        if not self._take_token():  # every message counts, binary ones too
            return
        if t == WSMsgType.BINARY:
            self._error(None, "bad_request", "requests are JSON text frames, not binary")
            return
        try:
            req = _loads(data)  # framing.MessageListener has checked the UTF-8
        except orjson.JSONDecodeError as e:
            self._error(None, "bad_request", f"not JSON: {e}")
            return
        if not isinstance(req, dict):
            self._error(None, "bad_request", "a request is a JSON object")
            return
        rid = req.get("id")
        if not isinstance(rid, _SCALAR):
            self._error(None, "bad_request", "id must be a JSON scalar")
            return
        op = req.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            if isinstance(op, str):
                self._error(rid, "unknown_op", f"unknown op {op!r}; ops: {', '.join(_OPS)}")
            else:
                self._error(rid, "bad_request", "op missing or not a string")
            return
        try:
            handler(self, rid, req)
        except RequestError as e:
            self._error(rid, e.code, e.message, e.symbols)

    def _take_token(self) -> bool:
        """Admit a message while the bucket holds a token; it costs one. What a
        request does beyond that is charged by `_charge`, which may leave the
        bucket in debt: the requests after it wait until it has refilled."""
        now = time.monotonic()
        cfg = self.gw.cfg
        refill = (now - self.refill_at) * cfg.requests_per_s
        self.tokens = min(cfg.request_burst, self.tokens + refill)
        self.refill_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.strikes = 0
            return True
        self.strikes += 1
        if self.strikes >= cfg.abuse_strikes:
            log.warning("closing client for request flood: %d requests over the limit in a row",
                        self.strikes, extra={"ctx": {"client": self.peer, "cid": self.cid}})
            self.close(WSCloseCode.POLICY_VIOLATION, "request rate limit abused")
            # what else it sent is not wanted: reading it would only cost time
            if self.transport is not None:
                self.transport.underlying_transport.pause_reading()
        else:
            self._error(None, "rate_limited",
                        f"over {cfg.requests_per_s:g} requests/s (a request for many "
                        "symbols counts as several, see docs/protocol.md); slow down")
        return False

    def _charge(self, cost: float) -> None:
        self.tokens -= cost

    def _symbols(self, req: dict, key: str = "symbols") -> list[str]:
        syms = req.get(key)
        if not isinstance(syms, list) or not all(isinstance(s, str) for s in syms):
            raise RequestError("bad_request", f"{key} must be a list of symbol strings")
        self._charge(len(syms) // SYMBOLS_UNIT)
        bad = [s for s in syms if not _core.valid_symbol(s)]
        if bad:
            raise RequestError("bad_request",
                               "bad symbol: 1 to 32 characters of A-Z a-z 0-9 . _ - : /", bad[:20])
        return list(dict.fromkeys(syms))

    def op_subscribe(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        since = req.get("since", {})
        if not isinstance(since, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in since.values()
        ):
            raise RequestError("bad_request", "since must map symbols to integer seq")
        table = self.gw.table
        denied = [s for s in syms if not self.ent.allows(s)]
        ids = {s: table.lookup(s) for s in syms if self.ent.allows(s)}
        new = [iid for iid in ids.values() if iid >= 0 and iid not in self.subs]
        if len(self.subs) + len(new) > self.gw.cfg.max_subscriptions:
            raise RequestError("too_many_subscriptions",
                               f"at most {self.gw.cfg.max_subscriptions} symbols per connection")
        if denied:
            self._error(rid, "forbidden", "not entitled to these symbols", denied)
        if new:
            self.subs.update(new)
            self.gw.hub.subscribe_ids(self.cid, self.subs)
            self.gw.subscriptions_changed(len(new))
        since_ids = {table.lookup(s): seq for s, seq in since.items()}
        since_ids.pop(-1, None)
        rows = table.rows_json(sorted(new), since_ids or None)
        unknown = [s for s, iid in ids.items() if iid < 0]
        head = {"type": "snapshot", "id": rid, "fields": FIELDS}
        body = _dumps(head)[:-1] + b',"rows":[' + rows + b'],"unknown":' + _dumps(unknown) + b"}"
        self.send_text(body)

    def op_unsubscribe(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        ids = {self.gw.table.lookup(s): s for s in syms}
        gone = [iid for iid in ids if iid in self.subs]
        missing = [s for s in syms if self.gw.table.lookup(s) not in self.subs]
        if gone:
            self.subs.difference_update(gone)
            unwatch = self.watched.intersection(gone)
            if unwatch:
                self._unwatch(unwatch)
            self.gw.hub.subscribe_ids(self.cid, self.subs)
            self.gw.subscriptions_changed(-len(gone))
        if missing:
            self._error(rid, "not_subscribed", "these symbols were not subscribed", missing)
        self._ack(rid, "unsubscribe", [ids[i] for i in gone])

    def op_watch(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        ids = {self.gw.table.lookup(s): s for s in syms}
        missing = [s for s in syms if self.gw.table.lookup(s) not in self.subs]
        add = [iid for iid in ids if iid in self.subs and iid not in self.watched]
        if len(self.watched) + len(add) > self.gw.cfg.max_watched:
            raise RequestError("too_many_watched",
                               f"at most {self.gw.cfg.max_watched} watched symbols per connection")
        if missing:
            self._error(rid, "not_subscribed", "subscribe before watching", missing)
        if add:
            self.watched.update(add)
            self.gw.hub.watch_ids(self.cid, add, True)
        self._ack(rid, "watch", [s for iid, s in ids.items() if iid in self.subs])

    def op_unwatch(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        ids = {self.gw.table.lookup(s): s for s in syms}
        gone = self.watched.intersection(ids)
        if gone:
            self._unwatch(gone)
        self._ack(rid, "unwatch", [ids[i] for i in gone])

    def _unwatch(self, ids: set[int]) -> None:
        self.watched.difference_update(ids)
        self.gw.hub.watch_ids(self.cid, list(ids), False)

    def op_configure(self, rid: Any, req: dict) -> None:
        ms = req.get("frame_ms")
        lo = self.gw.cfg.min_frame_ms
        if not isinstance(ms, int) or isinstance(ms, bool) or not lo <= ms <= 60000:
            raise RequestError("bad_request", f"frame_ms must be an integer from {lo} to 60000")
        self.frame_ms = ms
        self.gw.hub.set_interval(self.cid, ms * 1_000_000)
        self.send_text(_dumps({"type": "ack", "id": rid, "op": "configure", "frame_ms": ms}))

    def op_list(self, rid: Any, req: dict) -> None:
        match = req.get("match")
        if match is not None and not isinstance(match, str):
            raise RequestError("bad_request", "match must be a glob pattern string")
        if match is not None and len(match) > MAX_GLOB:
            raise RequestError("bad_request", f"match is at most {MAX_GLOB} characters")
        after = req.get("after")
        if after is not None and not isinstance(after, str):
            raise RequestError("bad_request", "after must be a symbol string (the last one "
                                              "of the previous page)")
        syms, nxt, examined = list_page(self.gw.symbol_index.visible(self.ent), match, after,
                                        self.gw.cfg.max_list_symbols)
        self._charge(examined // LIST_SCAN_UNIT)
        more = nxt is not None
        reply: dict[str, Any] = {"type": "list", "id": rid, "symbols": syms, "more": more}
        if nxt is not None:
            reply["next"] = nxt
        self.send_text(_dumps(reply))

    def op_ping(self, rid: Any, req: dict) -> None:
        self.send_text(_dumps({"type": "pong", "id": rid, "ts": _core.wall_ns()}))

    # ---- replies

    def _ack(self, rid: Any, op: str, symbols: list[str]) -> None:
        self.send_text(_dumps({"type": "ack", "id": rid, "op": op, "symbols": symbols}))

    def _error(self, rid: Any, code: str, message: str, symbols: list[str] | None = None) -> None:
        msg: dict[str, Any] = {"type": "error", "id": rid, "code": code, "message": message}
        if symbols is not None:
            msg["symbols"] = symbols
        self.gw.count_error(code)
        self.send_text(_dumps(msg))

    def send_text(self, data: str | bytes) -> None:
        tr = self.transport
        if tr is None or not _core.can_send(tr):
            return
        tr.send(WSMsgType.TEXT, data.encode() if isinstance(data, str) else data)
        if self.cid >= 0:
            self.gw.hub.touch(self.cid)
        self._check_queued()

    def _check_queued(self) -> None:
        """What this client has not read yet is bounded: above the high-water
        mark the gateway stops reading its requests until it drains (update
        frames are conflated meanwhile); past --max-queued-bytes it is closed."""
        tr = self.transport
        if tr is None or self.closing or tr.is_disconnected:
            return
        under = tr.underlying_transport
        queued = under.get_write_buffer_size()
        cfg = self.gw.cfg
        if queued > cfg.max_queued_bytes:
            log.warning("closing client that does not read its replies: %d bytes queued for it",
                        queued, extra={"ctx": {"client": self.peer, "cid": self.cid}})
            self.close(WSCloseCode.POLICY_VIOLATION,
                       f"not reading: over {cfg.max_queued_bytes} bytes queued for this client")
            under.pause_reading()
        elif queued > cfg.high_water_bytes and not self.reading_paused:
            self.reading_paused = True
            under.pause_reading()


_OPS = {
    "subscribe": Session.op_subscribe,
    "unsubscribe": Session.op_unsubscribe,
    "watch": Session.op_watch,
    "unwatch": Session.op_unwatch,
    "configure": Session.op_configure,
    "list": Session.op_list,
    "ping": Session.op_ping,
}
