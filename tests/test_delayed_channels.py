"""Delayed books, trades and bars end to end: a real gateway, publishers on
/ingest, `websockets` clients.

For every symbol a delayed client sees delayed, each channel is served as of
`delay` seconds ago (docs/protocol.md, "Delayed data"), checked on every
message it gets:

- books carry no source ts, so a book state (its `seq`) published at wall time
  T must not reach the client before T + delay; and after applying an entry
  the client holds exactly the book the source had at that `seq`;
- every trade's ts is at most the send time minus the delay; trades are never
  conflated: every tseq arrives once, in order, or is counted in `lost`;
- a bar holds no trade newer than the send time minus the delay: its count
  and volume are at most those of the published trades of its interval that
  old.

A snapshot's send time is bounded by the local receive time. Once the delay
has passed after the feed's last message the delayed client holds the
real-time client's books, trades, bars and rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import websockets
from books_feed import BookFeed
from support import start_gateway, until
from test_books_gateway import BOOK_ARGS, BookState, Publisher, embedded, first_books
from test_delayed import ENV, S, Watcher, feed, token
from test_trades_e2e import TradeFeed

DELAY = 2
GATEWAY_ARGS = ("--max-delay-s", "5", *BOOK_ARGS)
CHANNELS = ["quote", "book", "trades", "bars:1s", "bars:1m"]
BAR_NS = {"1s": S, "1m": 60 * S}


class Market:
    """What the publisher sent: every book state with the wall time it went
    out, every trade; each book's first message is a full book, then changes
    with seq + 1, never crossed."""

    def __init__(self, syms: list[str], seed: int) -> None:
        self.syms = syms
        self.book_feed = BookFeed(seed, syms, faults=False, full_rate=0.0)
        self.truth = embedded()
        self.sent_at: dict[str, dict[int, int]] = {s: {} for s in syms}  # seq -> ns
        self.states: dict[str, dict[int, tuple[list, list]]] = {s: {} for s in syms}
        self.tape = TradeFeed(seed, syms)
        self.trades: dict[str, list[tuple[int, float]]] = {s: [] for s in syms}  # (ts, size)

    def _stamp(self, books: list[dict], trades: list[dict]) -> list[dict]:
        now = time.time_ns()  # taken before the send: the bound can only be looser
        for m in books:
            self.truth.apply_objects([m])
            seq, bids, asks, _ = self.truth.book(self.truth.table.lookup(m["sym"]))
            assert seq == m["seq"], (m, seq)
            self.sent_at[m["sym"]][seq] = now
            self.states[m["sym"]][seq] = (bids, asks)
        for t in trades:
            self.trades[t["sym"]].append((t["ts"], t["size"]))
        return books + [{"type": "trade", **t} for t in trades]

    def start(self) -> list[dict]:
        """A full book and a first trade for every symbol: all of them known."""
        trades: list[dict] = []
        while any(self.tape.tseq[s] == 0 for s in self.syms):
            trades += self.tape.trades(1)
        return self._stamp(first_books(self.book_feed), trades)

    def batch(self, books: int, trades: int) -> list[dict]:
        return self._stamp(self.book_feed.msgs(books) if books else [], self.tape.trades(trades))

    def published(self, sym: str, start: int, end: int, horizon: int) -> tuple[int, float]:
        """The count and volume of `sym`'s published trades with start <= ts < end
        and ts <= horizon."""
        sizes = [z for ts, z in self.trades[sym] if start <= ts < end and ts <= horizon]
        return len(sizes), sum(sizes)

    def last_tseqs(self) -> dict[str, int]:
        return dict(self.tape.tseq)


async def stream(pub: Publisher, market: Market, seconds: float, books: int, trades: int,
                 pause: float = 0.02) -> None:
    """Book changes and trades to /ingest for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await pub.send(market.batch(books, trades))
        await asyncio.sleep(pause)


class ChannelWatcher(Watcher):
    """A `Watcher` that also holds books, trades and bars, checking every
    book entry, trade and bar against the delay; `late` collects what broke
    the rule (for a symbol seen delayed), `young` the (channel, symbol) pairs
    that came newer than the delay, `wrong` what broke the contract otherwise."""

    def __init__(self, ws, delay_s: int, market: Market, delayed=lambda sym: True,
                 since_trades: dict[str, int] | None = None) -> None:
        self.market = market
        self.book = BookState()
        self.since = dict(since_trades or {})
        self.last: dict[str, int] = dict(self.since)  # the last tseq held
        self.tseqs: dict[str, list[int]] = {}
        self.lost: dict[str, int] = {}
        self.bars: dict[tuple[str, str, int], list] = {}
        self.young: set[tuple[str, str]] = set()
        self.wrong: list[str] = []
        self.errors: list[dict] = []
        self.lists: list[dict] = []
        super().__init__(ws, delay_s, delayed)

    def _young(self, channel: str, sym: str, what: object, sent_ns: int) -> None:
        self.young.add((channel, sym))
        if self.delayed(sym):
            self.late.append((channel, sym, what, sent_ns))

    def _ours(self, entries: list[dict], key: str, kind: str) -> list[dict]:
        """The entries that name a published symbol; any other is wrong."""
        for e in entries:
            if e["sym"] not in self.market.syms:
                self.wrong.append(f"{kind} {key} entry for symbol {e['sym']!r}: {e}")
        return [e for e in entries if e["sym"] in self.market.syms]

    def take_books(self, entries: list[dict], sent_ns: int, whole: bool) -> None:
        for e in entries:
            sym, seq = e["sym"], e["seq"]
            at = self.market.sent_at[sym].get(seq)
            if at is None:
                self.wrong.append(f"book {sym} seq {seq}: never published")
                continue
            if at > sent_ns - self.delay:
                self._young("book", sym, f"seq {seq} sent {(sent_ns - at) / S:.3f}s after "
                                         f"it was published", sent_ns)
            self.book.apply(e, whole)
            if tuple(self.book.levels(sym)) != self.market.states[sym][seq]:
                self.wrong.append(f"book {sym} at seq {seq}: {self.book.levels(sym)} is not "
                                  f"the published {self.market.states[sym][seq]}")

    def take_trades(self, entries: list[dict], key: str, sent_ns: int) -> None:
        for e in entries:
            sym, lost = e["sym"], e.get("lost", 0)
            self.lost[sym] = self.lost.get(sym, 0) + lost
            have = self.tseqs.setdefault(sym, [])
            expect = self.last.get(sym, 0) + 1 + lost
            for tseq, ts, *_ in e[key]:
                if tseq != expect:
                    self.wrong.append(f"trades {sym}: tseq {tseq} where {expect} was due")
                if ts > sent_ns - self.delay:
                    self._young("trades", sym, f"tseq {tseq} ts {(sent_ns - ts) / S:.3f}s "
                                               f"before the send", sent_ns)
                have.append(tseq)
                self.last[sym], expect = tseq, tseq + 1
            if lost and not e[key]:
                self.last[sym] = self.last.get(sym, 0) + lost

    def take_bars(self, entries: list[dict], sent_ns: int) -> None:
        for e in entries:
            sym, iv = e["sym"], e["interval"]
            for b in e["bars"]:
                start, volume, count = b[0], b[5], b[6]
                n, vol = self.market.published(sym, start, start + BAR_NS[iv],
                                               sent_ns - self.delay)
                if count > n or volume > vol + 1e-6:
                    self._young(f"bars:{iv}", sym, f"bar {b}: {n} trades, volume {vol} "
                                                   f"old enough", sent_ns)
                self.bars[(sym, iv, start)] = b

    async def run(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                m = json.loads(raw)
                kind = m["type"]
                if kind == "status":
                    self.statuses.append(m)
                    self.book.on(m)
                elif kind == "error":
                    self.errors.append(m)
                elif kind == "list":
                    self.lists.append(m)
                if kind not in ("update", "snapshot"):
                    continue
                # a snapshot went out before it came in: the local clock bounds its send time
                sent = m["t"] if kind == "update" else time.time_ns()
                self.take(m["rows"], sent)
                self.take_books(self._ours(m.get("books", []), "books", kind), sent,
                                kind == "snapshot")
                self.take_trades(self._ours(m.get("trades", []), "trades", kind),
                                 "items" if kind == "update" else "recent", sent)
                self.take_bars(self._ours(m.get("bars", []), "bars", kind), sent)
                if kind == "snapshot":
                    self.snapshots.append(m)

    async def subscribe(self, syms, channels=tuple(CHANNELS), **extra) -> dict:
        n = len(self.snapshots)
        await self.ws.send(json.dumps({"op": "subscribe", "symbols": syms,
                                       "channels": list(channels), **extra}))
        await until(lambda: len(self.snapshots) > n, 10, what="a snapshot")
        assert not self.errors, self.errors
        return self.snapshots[-1]

    async def known(self, syms: list[str]) -> None:
        """Until the gateway knows every symbol of `syms` (what was sent to
        /ingest is applied by then)."""
        while True:
            n = len(self.lists)
            await self.ws.send(json.dumps({"op": "list"}))
            await until(lambda n=n: len(self.lists) > n, 10, what="a list")
            if set(syms) <= set(self.lists[-1]["symbols"]):
                return
            await asyncio.sleep(0.02)

    def complete(self, tseqs: dict[str, int]) -> bool:
        """Every trade after `since_trades` up to tseqs[sym] received once
        (in order: checked as they come) or counted in `lost`."""
        return all(self.last.get(s) == n and len(self.tseqs.get(s, ())) + self.lost.get(s, 0)
                   == n - self.since.get(s, 0) for s, n in tseqs.items())


def books_of(w: ChannelWatcher, syms: list[str]) -> dict[str, tuple]:
    return {s: (w.book.books[s][0], *w.book.levels(s)) for s in syms if s in w.book.books}


async def test_delayed_books_trades_and_bars_never_newer_and_end_on_real_time_state():
    """A real-time and a delayed client on every channel while quotes, book
    changes and trades stream for 4 s: nothing the delayed one gets is newer
    than the delay allows, and it ends on the real-time client's state."""
    syms = ["BBCA", "TLKM", "ASII"]
    market = Market(syms, 41)
    async with (start_gateway(*GATEWAY_ARGS, env=ENV) as g,
                Publisher(g.ingest_url) as pub,
                websockets.connect(g.ws_url + f"?token={token()}", max_size=None) as rt_ws,
                websockets.connect(g.ws_url + f"?token={token(DELAY)}", max_size=None) as d_ws):
        rt = ChannelWatcher(rt_ws, DELAY, market, lambda s: False)
        late = ChannelWatcher(d_ws, DELAY, market)
        await pub.send(market.start())
        seqs = await feed(g, syms, 0.3, 100)  # the symbols exist, just now
        await late.known(syms)
        snap = await late.subscribe(syms)
        assert snap["delay"] == DELAY and sorted(snap["delayed"]) == sorted(syms)
        assert snap["unknown"] == []
        await rt.subscribe(syms)
        await asyncio.gather(feed(g, syms, 4, 200, seqs), stream(pub, market, 4, 3, 2))
        await until(lambda: rt.complete(market.last_tseqs())
                    and rt.book.equals(market.truth, syms)
                    and {s: r[1] for s, r in rt.rows.items()} == seqs, 10,
                    what="the real-time client at the last book, trade and tick")
        final = (books_of(rt, syms), dict(rt.last), dict(rt.bars), dict(rt.rows))
        await until(lambda: (books_of(late, syms), late.last, late.bars, late.rows) == final
                    and late.complete(market.last_tseqs()), 15,
                    what="the delayed client at the real-time final state")
        assert not late.late, f"{len(late.late)} messages newer than send time - 2 s: " \
                              f"{late.late[:3]}"
        assert late.wrong == [] == rt.wrong, (late.wrong[:3], rt.wrong[:3])
        assert late.book.mismatches == [] == rt.book.mismatches
        assert pub.errors == [] and late.errors == [] == rt.errors
        assert late.book.entries > 50 and sum(map(len, late.tseqs.values())) > 50, \
            "the delayed client got books and trades as the feed went"
        assert {c for c, _ in rt.young} >= {"book", "trades", "bars:1s"} and rt.fresh, \
            f"the real-time client saw state younger than 2 s: {rt.young}"


async def test_a_mixed_token_gets_rt_books_and_trades_in_real_time():
    """delay 2, rt ["BB*"]: BBCA's books and trades come in real time,
    TLKM's delayed, and both end on the published state."""
    syms = ["BBCA", "TLKM"]
    market = Market(syms, 43)
    async with (start_gateway(*GATEWAY_ARGS, env=ENV) as g,
                Publisher(g.ingest_url) as pub,
                websockets.connect(g.ws_url + f"?token={token(DELAY, ['BB*'])}",
                                   max_size=None) as ws):
        await pub.send(market.start())
        w = ChannelWatcher(ws, DELAY, market, lambda s: not s.startswith("BB"))
        await w.known(syms)
        snap = await w.subscribe(syms, ["book", "trades", "bars:1s"])
        assert snap["delay"] == DELAY and snap["delayed"] == ["TLKM"] and snap["unknown"] == []
        assert "BBCA" in {b["sym"] for b in snap["books"]}  # real time: held now
        more = asyncio.ensure_future(stream(pub, market, 3, 2, 2))
        await until(lambda: {("book", "BBCA"), ("trades", "BBCA")} <= w.young, 10,
                    what="BBCA books and trades younger than the delay (real time)")
        await more
        await until(lambda: w.book.equals(market.truth, syms)
                    and w.complete(market.last_tseqs()), 15,
                    what="every book and trade, TLKM's after the delay")
        assert not w.late, f"TLKM came too new: {w.late[:3]}"
        assert not {s for _, s in w.young} & {"TLKM"}
        assert w.book.mismatches == [] and pub.errors == [] and w.errors == []
        assert w.wrong == [], w.wrong[:3]


async def test_delayed_trades_resume_with_since_trades():
    """A delayed client that reconnects with since_trades gets exactly the
    trades it missed (those past the delay in the snapshot), none too new."""
    syms = ["TLKM", "ASII"]
    market = Market(syms, 47)
    async with (start_gateway(*GATEWAY_ARGS, "--trade-ring", "500", env=ENV) as g,
                Publisher(g.ingest_url) as pub):
        await pub.send(market.start())
        more = asyncio.ensure_future(stream(pub, market, 6, 0, 1, pause=0.05))
        async with websockets.connect(g.ws_url + f"?token={token(DELAY)}", max_size=None) as ws:
            first = ChannelWatcher(ws, DELAY, market)
            await first.known(syms)
            await first.subscribe(syms, ["trades"])
            await until(lambda: all(first.last.get(s, 0) >= 3 for s in syms), 15,
                        what="some delayed trades of every symbol")
        await first.task
        held = dict(first.last)

        def old_enough(margin_s: float) -> dict[str, int]:
            """Per symbol, the last tseq published more than delay + margin ago."""
            horizon = time.time_ns() - int((DELAY + margin_s) * S)
            return {s: sum(1 for ts, _ in market.trades[s] if ts <= horizon) for s in syms}

        # away long enough that some trades it missed are past the delay (with
        # a margin for the line's slots): the resumed snapshot must hold those
        await until(lambda: all(n > held[s] for s, n in old_enough(1.0).items()), 15,
                    what="missed trades older than the delay")
        due = old_enough(1.0)
        async with websockets.connect(g.ws_url + f"?token={token(DELAY)}", max_size=None) as ws:
            again = ChannelWatcher(ws, DELAY, market, since_trades=held)
            snap = await again.subscribe(syms, ["trades"], since_trades=held)
            recent = {e["sym"]: [t[0] for t in e["recent"]] for e in snap["trades"]}
            for s in syms:
                missed = list(range(held[s] + 1, due[s] + 1))
                assert recent.get(s, [])[:len(missed)] == missed, (s, held[s], recent.get(s))
            await more
            await stream(pub, market, 1, 0, 1, pause=0.05)  # and some after the resume
            want = market.last_tseqs()
            await until(lambda: again.complete(want), 15,
                        what="the resumed client at the last trade")
        for s in syms:
            assert first.tseqs[s] + again.tseqs[s] == list(range(1, want[s] + 1)), s
        assert not any(again.lost.values()), again.lost
        assert not first.late and not again.late, (first.late[:3], again.late[:3])
        assert first.wrong == [] == again.wrong, (first.wrong[:3], again.wrong[:3])


class TapeReader:
    """Every market-wide tape item a client gets, with its send time."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.items: list[tuple[int, list]] = []  # (send time, ["SYM", tseq, ts, ...])
        self.lost = 0
        self.other: list[dict] = []  # anything but the tape's snapshot and updates
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                m = json.loads(raw)
                if m["type"] not in ("update", "snapshot"):
                    self.other.append(m)
                    continue
                if m["type"] == "snapshot":
                    self.other.append(m)
                sent = m["t"] if m["type"] == "update" else time.time_ns()
                for e in m.get("trades", []):
                    assert e["sym"] == "*", e
                    self.lost += e.get("lost", 0)
                    self.items += [(sent, it) for it in e.get("items", e.get("recent", []))]

    def order(self) -> list[tuple[str, int]]:
        return [(it[0], it[1]) for _, it in self.items]


async def test_the_market_wide_tape_is_served_delayed_to_a_delayed_token():
    """`*` on trades for a delayed token (even one with rt ["BB*"]: the tape
    mixes every symbol, so it is delayed whole): every item at least the delay
    old when sent, and in the end the same trades in the same order as the
    real-time tape."""
    syms = ["BBCA", "TLKM", "ASII"]
    market = Market(syms, 53)
    req = json.dumps({"op": "subscribe", "symbols": ["*"], "channels": ["trades"]})
    async with (start_gateway(*GATEWAY_ARGS, env=ENV) as g,
                Publisher(g.ingest_url) as pub,
                websockets.connect(g.ws_url + f"?token={token()}", max_size=None) as rt_ws,
                websockets.connect(g.ws_url + f"?token={token(DELAY, ['BB*'])}",
                                   max_size=None) as d_ws):
        rt, late = TapeReader(rt_ws), TapeReader(d_ws)
        for ws in (rt_ws, d_ws):
            await ws.send(req)
        await until(lambda: rt.other and late.other, 10, what="both tapes' snapshots")
        snap = late.other[0]
        assert snap["type"] == "snapshot" and snap["delay"] == DELAY, snap
        assert snap["delayed"] == ["*"], snap
        assert "delayed" not in rt.other[0]
        await stream(pub, market, 3, 0, 2)
        want = sum(market.last_tseqs().values())
        await until(lambda: len(rt.items) == want, 10, what="every trade on the real-time tape")
        await until(lambda: late.order() == rt.order(), 15,
                    what="the delayed tape at the real-time tape's trades, in its order")
        young = [(sent, it) for sent, it in late.items if it[2] > sent - DELAY * S]
        assert not young, f"{len(young)} delayed tape items newer than send time - 2 s: " \
                          f"{young[:3]}"
        assert any(it[2] > sent - DELAY * S for sent, it in rt.items), \
            "the real-time tape had trades younger than the delay"
        assert rt.lost == 0 == late.lost and pub.errors == []
        assert [m for m in late.other[1:] if m["type"] == "error"] == []
