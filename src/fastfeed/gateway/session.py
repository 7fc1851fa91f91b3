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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from picows import WSMsgType, WSTransport

from .. import _core
from .. import protocol as P
from ..auth import Entitlements
from .framing import FramingContext, MessageListener
from .registry import Channel, Channels, Limits, Registry

log = logging.getLogger("fastfeed.session")

FIELDS = list(P.FIELDS)
# The control plane's JSON is strict both ways (RFC 8259): orjson refuses
# lone surrogates, NaN, Infinity, numbers beyond a double and nesting past
# 1024 levels with one JSONDecodeError, so whatever it decodes encodes again.
_loads = orjson.loads
_dumps = orjson.dumps
_SCALAR = (str, int, float, bool, type(None))
TAPE = P.TAPE_SYMBOL  # on the trades channel: every instrument's trades, in one stream


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


@dataclass(frozen=True, slots=True)
class SessionContext:
    """All a client connection reaches of the gateway."""

    link: FramingContext
    limits: Limits
    hub: Any  # _core.Hub: this connection's subscription set, watched set, interval
    table: Any  # _core.Table, read only here: symbol lookups and snapshot rows
    symbols: SymbolIndex  # for list
    registry: Registry  # attach, detach, subscription counts
    count_error: Callable[[str], None]  # an error reply, by code
    channels: Channels  # what `channels` may name: hub slot, items, snapshot
    # delayed data: delay (s) -> (channel name -> the channel that serves it
    # delayed, named "book@900"; seconds of past the line holds); None when the
    # gateway keeps no delay line (--max-delay-s 0)
    delayed: Callable[[int], tuple[dict[str, Channel], float]] | None = None


class Session(MessageListener):
    path = "/ws"

    def __init__(self, ctx: SessionContext, ent: Entitlements, binary: bool, peer: str,
                 compact: bool = False) -> None:
        super().__init__(ctx.link, ctx.limits.max_message_bytes)
        self.ctx = ctx
        self.hub = ctx.hub
        self.limits = ctx.limits
        self.ent = ent
        self.binary = binary
        self.compact = compact  # the compact subprotocol: quote rows carry changed fields only
        self.peer = peer
        self.ip = ""
        self.cid = -1
        # the instrument ids subscribed / watched, per channel name; `subs`
        # and `watched` are the quote channel's (version 1's view)
        self.subs: set[int] = set()
        self.watched: set[int] = set()
        self.chan_subs: dict[str, set[int]] = {P.QUOTE_CHANNEL: self.subs}
        self.chan_watched: dict[str, set[int]] = {P.QUOTE_CHANNEL: self.watched}
        self.nsubs = 0  # (symbol, channel) pairs subscribed
        # a delayed token: channel name -> the channel serving its delayed symbols
        # (another hub slot, named "quote@900")
        self.twins: dict[str, Channel] = {}
        self.twin_names: dict[str, Channel] = {}
        self.told_filling = False
        self.nwatched = 0
        self.frame_ms = ctx.limits.frame_ms
        self.tokens = float(ctx.limits.request_burst)
        self.refill_at = time.monotonic()
        self.strikes = 0
        self.paused = False
        self.reading_paused = False

    # ---- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        hw = self.limits.high_water_bytes
        transport.underlying_transport.set_write_buffer_limits(high=hw)
        # a fixed kernel send buffer (no autotuning to megabytes) bounds what a
        # stuck client can pin in the kernel and lets the stall show quickly
        sock = transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, hw)
        self.guard_frames(transport)
        self.cid = self.hub.add(transport, self.frame_ms * 1_000_000, self.binary,
                                compact=self.compact)
        if self.ent.delay and self.ctx.delayed is not None:
            self.twins, _ = self.ctx.delayed(self.ent.delay)
            self.twin_names = {t.name: t for t in self.twins.values()}
        self.ctx.registry.attach(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.count_picows_close(transport)
        if self.cid >= 0:
            for name, ids in self.chan_watched.items():
                ch = self._chan(name)
                self.hub.watch_ids(self.cid, [ch.item(i) for i in ids], False, ch.slot)
            self.hub.remove(self.cid)
            self.ctx.registry.detach(self)
            self.cid = -1

    def pause_writing(self) -> None:
        self.paused = True
        self.hub.pause(self.cid)

    def resume_writing(self) -> None:
        self.paused = False
        self.hub.resume(self.cid)
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
            self._error(None, P.BAD_REQUEST, "requests are JSON text frames, not binary")
            return
        try:
            req = _loads(data)  # framing.MessageListener has checked the UTF-8
        except orjson.JSONDecodeError as e:
            self._error(None, P.BAD_REQUEST, f"not JSON: {e}")
            return
        if not isinstance(req, dict):
            self._error(None, P.BAD_REQUEST, "a request is a JSON object")
            return
        rid = req.get("id")
        if not isinstance(rid, _SCALAR):
            self._error(None, P.BAD_REQUEST, "id must be a JSON scalar")
            return
        op = req.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            if isinstance(op, str):
                self._error(rid, P.UNKNOWN_OP, f"unknown op {op!r}; ops: {', '.join(_OPS)}")
            else:
                self._error(rid, P.BAD_REQUEST, "op missing or not a string")
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
        cfg = self.limits
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
            self.close(P.CLOSE_POLICY, "request rate limit abused")
            # what else it sent is not wanted: reading it would only cost time
            if self.transport is not None:
                self.transport.underlying_transport.pause_reading()
        else:
            self._error(None, P.RATE_LIMITED,
                        f"over {cfg.requests_per_s:g} requests/s (a request for many "
                        "symbols counts as several, see docs/protocol.md); slow down")
        return False

    def _charge(self, cost: float) -> None:
        self.tokens -= cost

    def _symbols(self, req: dict, key: str = "symbols") -> list[str]:
        syms = req.get(key)
        if not isinstance(syms, list) or not all(isinstance(s, str) for s in syms):
            raise RequestError(P.BAD_REQUEST, f"{key} must be a list of symbol strings")
        self._charge(len(syms) // SYMBOLS_UNIT)
        # `*` is the market-wide tape, not a symbol: each op takes it out (_take_tape)
        bad = [s for s in syms if s != TAPE and not _core.valid_symbol(s)]
        if bad:
            raise RequestError(P.BAD_REQUEST,
                               "bad symbol: 1 to 32 characters of A-Z a-z 0-9 . _ - : /", bad[:20])
        return list(dict.fromkeys(syms))

    def _channels(self, req: dict, default: list[str] | None) -> tuple[list[Channel], bool]:
        """The request's channels (None default: every channel), and whether it
        named them (then it is a version 1.1 request)."""
        names = req.get("channels")
        reg = self.ctx.channels
        if names is None:
            return [reg.by_name[n] for n in (default or reg.names())], False
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise RequestError(P.BAD_REQUEST, "channels must be a non-empty list of channel "
                                              f"names: {', '.join(reg.names())}")
        bad = [n for n in names if reg.get(n) is None]
        if bad:
            raise RequestError(P.BAD_REQUEST, f"unknown channel {bad[0][:40]!r}; channels: "
                                              f"{', '.join(reg.names())}")
        return [reg.by_name[n] for n in dict.fromkeys(names)], True

    def _take_tape(self, syms: list[str], chans: list[Channel], named: bool) -> Channel | None:
        """Take `*`, the market-wide tape, out of `syms`: the tape's channel that
        serves this client (the delayed tape for a delayed token whose `rt` does
        not name `*`) if it was there. `*` is a symbol of the trades channel
        only: a request that names it with another channel (or without
        `channels`, where that means quotes) is refused whole."""
        if TAPE not in syms:
            return None
        syms.remove(TAPE)
        tape = self.ctx.channels.tape
        names = {ch.name for ch in chans}
        if tape is None or P.TRADES_CHANNEL not in names or (named and len(names) > 1):
            raise RequestError(P.BAD_REQUEST, "symbol * (the market-wide tape) is served on the "
                                              "trades channel only: "
                                              '{"symbols":["*"],"channels":["trades"]}', [TAPE])
        return self.twins[tape.name] if self.ent.tape_delayed() else tape

    def _chan(self, name: str) -> Channel:
        return self.twin_names.get(name) or self.ctx.channels.by_name[name]

    def _route(self, ch: Channel, sym: str) -> Channel:
        """The channel that serves `sym` on `ch` to this client: `ch` itself, or
        for a symbol it sees delayed, the delayed twin (a delayed token comes
        only through a gateway with a delay line, which has one for every channel)."""
        if not self.ent.delay or not self.ent.delayed(sym):
            return ch
        return self.twins[ch.name]

    def _push(self, slots: set[int]) -> None:
        """Tell the hub this connection's subscription set of each slot in `slots`."""
        for slot in sorted(slots):
            chans = self.ctx.channels.in_slot(slot) + [
                t for t in self.twins.values() if t.slot == slot]
            ids = [ch.item(i) for ch in chans for i in self.chan_subs.get(ch.name, ())]
            self.hub.subscribe_ids(self.cid, ids, slot)

    def _split(self, syms: list[str], chans: list[Channel], held: dict[str, set[int]]
               ) -> tuple[list[tuple[str, int, Channel]], list[str]]:
        """The (symbol, id, channel) pairs of `held` (subscribed or watched)
        among `syms` x `chans`, and the symbols with a pair not held."""
        table = self.ctx.table
        pairs: list[tuple[str, int, Channel]] = []
        missing: list[str] = []
        for sym in syms:
            iid = table.lookup(sym)
            routed = [self._route(ch, sym) for ch in chans]
            have = [ch for ch in routed if iid >= 0 and iid in held.get(ch.name, ())]
            pairs.extend((sym, iid, ch) for ch in have)
            if len(have) < len(chans):
                missing.append(sym)
        return pairs, missing

    def op_subscribe(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        chans, named = self._channels(req, [P.QUOTE_CHANNEL])
        tape = self._take_tape(syms, chans, named)
        since_of: dict[str, dict[int, int]] = {}
        table = self.ctx.table
        for key in {ch.since_key for ch in chans if ch.since_key}:
            since = req.get(key, {})
            if not isinstance(since, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in since.values()
            ):
                raise RequestError(P.BAD_REQUEST, f"{key} must map symbols to integer seq")
            ids_since = {table.lookup(s): seq for s, seq in since.items()}
            ids_since.pop(-1, None)
            since_of[key] = ids_since
        denied = [s for s in syms if not self.ent.allows(s)]
        ids = {s: table.lookup(s) for s in syms if self.ent.allows(s)}
        # each requested channel, and its delayed twin for the symbols seen delayed
        targets: dict[str, Channel] = {}
        picked: dict[str, set[int]] = {}
        late: list[str] = []  # the symbols served delayed
        for s, iid in ids.items():
            if iid < 0:
                continue
            for ch in chans:
                rc = self._route(ch, s)
                targets[rc.name] = rc
                if iid not in self.chan_subs.get(rc.name, ()):
                    picked.setdefault(rc.name, set()).add(iid)
                    if rc is not ch and (not late or late[-1] != s):
                        late.append(s)
        # the tape is one shared stream, unfiltered: only for a token that sees
        # every symbol; delayed as a whole unless `rt` names everything
        tape_denied = tape is not None and not self.ent.sees_every_symbol()
        if tape is not None and not tape_denied and not self.chan_subs.get(tape.name):
            targets[tape.name] = tape
            picked[tape.name] = {0}  # its one item: one (symbol, channel) pair
            if self.ent.tape_delayed():
                late.append(TAPE)
        for ch in chans:
            targets.setdefault(ch.name, ch)
        new = {name: sorted(picked.get(name, ())) for name in targets}
        added = sum(len(v) for v in new.values())
        if self.nsubs + added > self.limits.max_subscriptions:
            what = "(symbol, channel) pairs" if named else "symbols"
            raise RequestError(P.TOO_MANY_SUBSCRIPTIONS,
                               f"at most {self.limits.max_subscriptions} {what} per connection")
        if denied:
            self._error(rid, P.FORBIDDEN, "not entitled to these symbols", denied)
        if tape_denied:
            self._error(rid, P.FORBIDDEN, "the market-wide tape (*) needs a token that sees every "
                                          "symbol (no syms claim, or the pattern *)", [TAPE])
        if added:
            for ch in targets.values():
                self.chan_subs.setdefault(ch.name, set()).update(new[ch.name])
            self._push({ch.slot for ch in targets.values() if new[ch.name]})
            self.nsubs += added
            self.ctx.registry.subscriptions_changed(added)
        # one snapshot holds every requested channel; `rows` always (as in
        # update frames), the other keys when requested. Known symbols with
        # no state in a channel yet are left out of it: it comes as an update.
        parts: dict[str, list[bytes]] = {"rows": []}
        for ch in targets.values():
            since = since_of.get(ch.since_key, {}) if ch.since_key else {}
            body = ch.snapshot([ch.item(i) for i in new[ch.name]], since,
                               self.hub.sent_version(self.cid, ch.slot))
            if body:
                parts.setdefault(ch.key, []).append(body)
            else:
                parts.setdefault(ch.key, [])
        unknown = [s for s, iid in ids.items() if iid < 0]
        head: dict[str, Any] = {"type": "snapshot", "id": rid, "fields": FIELDS}
        if self.twins:
            head["delay"] = self.ent.delay
            head["delayed"] = late
        out = [_dumps(head)[:-1]]
        for key, bodies in parts.items():
            out.append(b',"%s":[%s]' % (key.encode(), b",".join(bodies)))
        out.append(b',"unknown":' + _dumps(unknown) + b"}")
        self.send_text(b"".join(out))
        if late and not self.told_filling and self.ctx.delayed is not None:
            _, past_s = self.ctx.delayed(self.ent.delay)
            if past_s < self.ent.delay:  # started late: no past for what ticked since
                self.told_filling = True
                self.send_text(_dumps({"type": "status", "delay_line": "filling",
                                       "delay": self.ent.delay, "past_s": int(past_s)}))

    def delay_line_full(self, delay_s: int) -> None:
        """The gateway's line now holds this client's delay: say so if it was told otherwise."""
        if self.told_filling and delay_s == self.ent.delay:
            self.told_filling = False
            self.send_text(_dumps({"type": "status", "delay_line": "full", "delay": delay_s}))

    def op_unsubscribe(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        chans, named = self._channels(req, None)
        tape = self._take_tape(syms, chans, named)
        pairs, missing = self._split(syms, chans, self.chan_subs)
        if not named:  # every channel: a symbol is missing only if none was subscribed
            hit = {sym for sym, _, _ in pairs}
            missing = [s for s in syms if s not in hit]
        if tape is not None and self.chan_subs.get(tape.name):
            pairs.append((TAPE, 0, tape))
        elif tape is not None:
            missing.append(TAPE)
        if pairs:
            unwatch = [(sym, iid, ch) for sym, iid, ch in pairs
                       if iid in self.chan_watched.get(ch.name, ())]
            if unwatch:
                self._unwatch(unwatch)
            for _, iid, ch in pairs:
                self.chan_subs[ch.name].discard(iid)
            self._push({ch.slot for _, _, ch in pairs})
            self.nsubs -= len(pairs)
            self.ctx.registry.subscriptions_changed(-len(pairs))
        if missing:
            self._error(rid, P.NOT_SUBSCRIBED, "these symbols were not subscribed", missing)
        self._ack(rid, "unsubscribe", list(dict.fromkeys(sym for sym, _, _ in pairs)),
                  chans if named else None)

    def op_watch(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        chans, named = self._channels(req, [P.QUOTE_CHANNEL])
        if self._take_tape(syms, chans, named) is not None:
            # a watched item is pushed at once on every change; the tape changes
            # with every trade of the market, so it keeps to the frame interval
            raise RequestError(P.BAD_REQUEST, "the market-wide tape (*) cannot be watched: it "
                                              "comes at this connection's frame interval "
                                              "(configure frame_ms)", [TAPE])
        pairs, missing = self._split(syms, chans, self.chan_subs)
        add = [(sym, iid, ch) for sym, iid, ch in pairs
               if iid not in self.chan_watched.get(ch.name, ())]
        if self.nwatched + len(add) > self.limits.max_watched:
            what = "(symbol, channel) pairs" if named else "symbols"
            raise RequestError(P.TOO_MANY_WATCHED,
                               f"at most {self.limits.max_watched} watched {what} per connection")
        if missing:
            self._error(rid, P.NOT_SUBSCRIBED, "subscribe before watching", missing)
        for ch in {c.name: c for _, _, c in add}.values():
            ids = [iid for _, iid, c in add if c is ch]
            if ids:
                self.chan_watched.setdefault(ch.name, set()).update(ids)
                self.hub.watch_ids(self.cid, [ch.item(i) for i in ids], True, ch.slot)
        self.nwatched += len(add)
        self._ack(rid, "watch", list(dict.fromkeys(sym for sym, _, _ in pairs)),
                  chans if named else None)

    def op_unwatch(self, rid: Any, req: dict) -> None:
        syms = self._symbols(req)
        chans, named = self._channels(req, None)
        self._take_tape(syms, chans, named)  # never watched: nothing to undo
        gone, _ = self._split(syms, chans, self.chan_watched)
        if gone:
            self._unwatch(gone)
        self._ack(rid, "unwatch", list(dict.fromkeys(sym for sym, _, _ in gone)),
                  chans if named else None)

    def _unwatch(self, pairs: list[tuple[str, int, Channel]]) -> None:
        by: dict[str, list[int]] = {}
        for _, iid, ch in pairs:
            by.setdefault(ch.name, []).append(iid)
        for name, ids in by.items():
            ch = self._chan(name)
            self.chan_watched[name].difference_update(ids)
            self.hub.watch_ids(self.cid, [ch.item(i) for i in ids], False, ch.slot)
        self.nwatched -= len(pairs)

    def op_configure(self, rid: Any, req: dict) -> None:
        ms = req.get("frame_ms")
        lo = self.limits.min_frame_ms
        if not isinstance(ms, int) or isinstance(ms, bool) or not lo <= ms <= 60000:
            raise RequestError(P.BAD_REQUEST, f"frame_ms must be an integer from {lo} to 60000")
        self.frame_ms = ms
        self.hub.set_interval(self.cid, ms * 1_000_000)
        self.send_text(_dumps({"type": "ack", "id": rid, "op": "configure", "frame_ms": ms}))

    def op_list(self, rid: Any, req: dict) -> None:
        match = req.get("match")
        if match is not None and not isinstance(match, str):
            raise RequestError(P.BAD_REQUEST, "match must be a glob pattern string")
        if match is not None and len(match) > MAX_GLOB:
            raise RequestError(P.BAD_REQUEST, f"match is at most {MAX_GLOB} characters")
        after = req.get("after")
        if after is not None and not isinstance(after, str):
            raise RequestError(P.BAD_REQUEST, "after must be a symbol string (the last one "
                                              "of the previous page)")
        syms, nxt, examined = list_page(self.ctx.symbols.visible(self.ent), match, after,
                                        self.limits.max_list_symbols)
        self._charge(examined // LIST_SCAN_UNIT)
        more = nxt is not None
        reply: dict[str, Any] = {"type": "list", "id": rid, "symbols": syms, "more": more}
        if nxt is not None:
            reply["next"] = nxt
        self.send_text(_dumps(reply))

    def op_ping(self, rid: Any, req: dict) -> None:
        self.send_text(_dumps({"type": "pong", "id": rid, "ts": _core.wall_ns()}))

    # ---- replies

    def _ack(self, rid: Any, op: str, symbols: list[str],
             channels: list[Channel] | None = None) -> None:
        msg: dict[str, Any] = {"type": "ack", "id": rid, "op": op, "symbols": symbols}
        if channels is not None:  # a version 1.1 request: say which channels it meant
            msg["channels"] = [ch.name for ch in channels]
        self.send_text(_dumps(msg))

    def _error(self, rid: Any, code: str, message: str, symbols: list[str] | None = None) -> None:
        msg: dict[str, Any] = {"type": "error", "id": rid, "code": code, "message": message}
        if symbols is not None:
            msg["symbols"] = symbols
        self.ctx.count_error(code)
        self.send_text(_dumps(msg))

    def send_text(self, data: str | bytes) -> None:
        tr = self.transport
        if tr is None or not _core.can_send(tr):
            return
        tr.send(WSMsgType.TEXT, data.encode() if isinstance(data, str) else data)
        if self.cid >= 0:
            self.hub.touch(self.cid)
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
        cfg = self.limits
        if queued > cfg.max_queued_bytes:
            log.warning("closing client that does not read its replies: %d bytes queued for it",
                        queued, extra={"ctx": {"client": self.peer, "cid": self.cid}})
            self.close(P.CLOSE_POLICY,
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
