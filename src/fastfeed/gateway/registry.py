"""The sessions of one worker: who is connected, from where, the limits they
are held to, and the channels they may subscribe to.

A session reaches the rest of the gateway through its `SessionContext`
(gateway/session.py), never through the gateway itself; the registry is the
part of it that knows every other session (per-address counts, the feed
status they are all told).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .. import protocol as P
from ..config import Config

log = logging.getLogger("fastfeed.server")


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings connections are held to, read once from the config."""

    frame_ms: int
    min_frame_ms: int
    max_message_bytes: int
    requests_per_s: float
    request_burst: int
    abuse_strikes: int
    max_subscriptions: int
    max_watched: int
    max_list_symbols: int
    high_water_bytes: int
    max_queued_bytes: int
    max_connections: int
    max_connections_per_ip: int
    max_ingest_bytes: int
    ingest_rate: float

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Channel:
    """A channel of the protocol (version 1.1 "Channels") and where its state is.

    `slot`: the hub slot of its kind (`Hub.add_kind`); several channels may
    share a slot (the bar intervals), their items never overlap.
    `item(iid)`: the kind's item id of an instrument (quotes, books, trades:
    the instrument id; bars: iid * 6 + interval index).
    `key`: the snapshot's key of its entries ("rows", "books", ...).
    `snapshot(items, since, upto)`: the comma-separated JSON entries of
    `items` for a snapshot; `since` maps instrument ids to the client's resume
    point (`since_key` of the request, e.g. "since", "since_trades"), or is
    empty; `upto` is the kind's version the connection's next frame starts
    after (an event kind leaves out what that frame will carry).
    """

    name: str
    slot: int
    key: str
    item: Callable[[int], int]
    snapshot: Callable[[list[int], dict[int, int], int], bytes]
    since_key: str | None = None


class Channels:
    """Channel name -> Channel. Quotes are registered by the app; books,
    trades and bars register theirs the same way. `tape` serves the symbol
    `*` of the trades channel (the market-wide tape): a channel of its own
    (hub slot, one item) that no request names."""

    def __init__(self) -> None:
        self.by_name: dict[str, Channel] = {}
        self.tape: Channel | None = None

    def register(self, ch: Channel) -> None:
        if ch.name in self.by_name:
            raise ValueError(f"channel {ch.name!r} is registered twice")
        self.by_name[ch.name] = ch

    def register_tape(self, ch: Channel) -> None:
        if self.tape is not None or ch.name in self.by_name:
            raise ValueError("the tape's channel is registered twice")
        self.tape = ch

    def get(self, name: str) -> Channel | None:
        return self.by_name.get(name)

    def names(self) -> list[str]:
        return list(self.by_name)

    def in_slot(self, slot: int) -> list[Channel]:
        out = [c for c in self.by_name.values() if c.slot == slot]
        if self.tape is not None and self.tape.slot == slot:
            out.append(self.tape)
        return out


def quote_channel(table: Any) -> Channel:
    """The version 1 channel: the quote table, hub slot 0. Rows of symbols
    with no quote yet (known from a book or a trade, seq -1) are left out of
    snapshots: their first quote comes as an update."""
    return Channel(name=P.QUOTE_CHANNEL, slot=0, key="rows", item=int,
                   snapshot=lambda items, since, _upto: table.rows_json(items, since),
                   since_key="since")


def delayed_quote_channel(dtable: Any, slot: int) -> Channel:
    """Quotes from a delayed table (docs/delay.md) in its hub slot, under the
    same key. A symbol with no delayed state yet is left out of snapshots (it is
    subscribed; its first delayed state comes as an update)."""
    def snapshot(items: list[int], since: dict[int, int], _upto: int) -> bytes:
        return dtable.rows_json([i for i in items if dtable.seq_of(i) >= 0], since)

    return Channel(name=P.QUOTE_CHANNEL, slot=slot, key="rows", item=int,
                   snapshot=snapshot, since_key="since")


def trade_channels(trades: Any, trade_slot: int, bars: Any, bar_slot: int) -> list[Channel]:
    """The trades channel (instrument ids, resumed with since_trades) and the
    six bar channels (one hub slot, item iid * 6 + interval). An item is made
    valid in its kind before the hub is given it (`reserve`): a symbol known
    from a quote has no trade or bar item yet."""

    def trade_item(iid: int) -> int:
        trades.reserve(iid + 1)
        return iid

    out = [Channel(name=P.TRADES_CHANNEL, slot=trade_slot, key="trades", item=trade_item,
                   snapshot=lambda items, since, upto: trades.snapshot_json(items, since, upto),
                   since_key="since_trades")]
    for k, name in enumerate(P.BAR_CHANNELS):
        def bar_item(iid: int, k: int = k) -> int:
            bars.reserve((iid + 1) * 6)
            return iid * 6 + k

        out.append(Channel(name=name, slot=bar_slot, key="bars", item=bar_item,
                           snapshot=lambda items, since, _upto: bars.snapshot_json(items)))
    return out


def tape_channel(tape: Any, slot: int) -> Channel:
    """The market-wide tape (`*` on trades): a `fastfeed._core.Tape` in its
    own hub slot, one item (id 0), its entries under the trades key. Its name
    is internal (a session's key for it); requests say `*` on `trades`."""
    return Channel(name=f"{P.TRADES_CHANNEL} {P.TAPE_SYMBOL}", slot=slot, key="trades",
                   item=lambda iid: 0,
                   snapshot=lambda items, since, _upto: tape.snapshot_json() if items else b"")


class Member(Protocol):
    """What the registry needs of a connection (a gateway.session.Session)."""

    cid: int
    ip: str
    peer: str
    nsubs: int  # (symbol, channel) pairs
    transport: Any
    closing: bool

    def close(self, code: int, reason: str, grace_s: float = ...) -> None: ...

    def send_text(self, data: str | bytes) -> None: ...


class Registry:
    """Open sessions by connection id, connections per remote address, the feed status."""

    def __init__(self, limits: Limits, metrics: Any,
                 has_market_data: Callable[[], bool]) -> None:
        self.limits = limits
        self.metrics = metrics
        self.has_market_data = has_market_data
        self.sessions: dict[int, Member] = {}
        self.per_ip: Counter[str] = Counter()
        self.nsubs = 0
        self.feed_up = True
        self.feed_down_since = 0.0

    def __len__(self) -> int:
        return len(self.sessions)

    def attach(self, s: Member) -> None:
        assert s.transport is not None
        peer = s.transport.underlying_transport.get_extra_info("peername") or ("?", 0)
        s.peer = f"{peer[0]}:{peer[1]}"
        ip = str(peer[0])
        self.sessions[s.cid] = s
        self.per_ip[ip] += 1
        s.ip = ip
        self.metrics.connections.inc()
        per_ip = self.limits.max_connections_per_ip
        if self.per_ip[ip] > per_ip:
            s.close(P.CLOSE_POLICY, f"over {per_ip} connections from {ip}")
        elif not self.has_market_data():
            # accepted, because only a close code reaches a browser (a refused
            # upgrade is a bare 1006 there); 1013: come back, or go to a replica
            s.close(P.CLOSE_TRY_AGAIN_LATER, "try again later: no market data here yet "
                                             "(the snapshot from Redis is not loaded)")
        elif not self.feed_up:
            s.send_text(P.FEED_DOWN)

    def detach(self, s: Member) -> None:
        if self.sessions.pop(s.cid, None) is not None:
            self.per_ip[s.ip] -= 1
            if self.per_ip[s.ip] <= 0:
                del self.per_ip[s.ip]
            self.metrics.connections.dec()
            self.subscriptions_changed(-s.nsubs)

    def subscriptions_changed(self, delta: int) -> None:
        self.nsubs += delta
        self.metrics.subscriptions.inc(delta)

    def set_feed(self, up: bool) -> None:
        """The upstream feed went up or down: every client is told."""
        if up == self.feed_up:
            return
        self.feed_up = up
        self.feed_down_since = 0.0 if up else time.monotonic()
        self.metrics.feed_up.set(1 if up else 0)
        log.warning("feed is %s; telling %d clients", "up" if up else "DOWN", len(self.sessions))
        msg = P.FEED_UP if up else P.FEED_DOWN
        for s in list(self.sessions.values()):
            s.send_text(msg)
