"""The market-wide tape (`*` on `trades`), as a client written from the contract sees it.

Real gateway processes, real WebSocket clients, a real redis-server. A tape
subscriber's trades are checked against the trades in the order the gateway
applied them: each one once, in that order, or counted in `lost` exactly
where it was missed (through a burst longer than the ring, a long frame
interval, and a client that stops reading). Then the entitlement rule, the
requests that name `*` wrongly, the subscription count, and two workers on
one Redis serving the same tape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import jwt
import websockets
from prometheus_client.parser import text_string_to_metric_families
from support import http_get, start_gateway, until
from wsraw import RawWS

S = 1_000_000_000
T0 = 1_772_384_400 * S
SECRET = "test-secret-not-for-production-use-32b+"
TAPE_REQ = {"op": "subscribe", "symbols": ["*"], "channels": ["trades"]}


class Market:
    """Trades over many symbols, and the order they were sent in. Sent on one
    /ingest connection, one message after another, an embedded gateway
    applies them in that order."""

    def __init__(self, nsyms: int = 40, seed: int = 5) -> None:
        self.rng = random.Random(seed)
        self.syms = [f"S{i:02d}" for i in range(nsyms)]
        self.tseq: dict[str, int] = {}
        self.sent: list[list] = []  # [sym, tseq, ts, price, size, side], as on the tape

    def trades(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            s = self.rng.choice(self.syms)
            t = self.tseq[s] = self.tseq.get(s, 0) + 1
            d = {"type": "trade", "sym": s, "tseq": t, "ts": T0 + t * S,
                 "price": 100.0 + self.rng.randrange(50) / 4,
                 "size": float(self.rng.randrange(1, 9)), "side": self.rng.choice(["b", "s", ""])}
            out.append(d)
            self.sent.append([s, t, d["ts"], d["price"], d["size"], d["side"]])
        return out

    def order(self) -> list[tuple[str, int]]:
        return [(t[0], t[1]) for t in self.sent]


def aligned(seq: list, order: list) -> int:
    """Where a reader's tape (`seq`: (sym, tseq), None for each trade counted
    lost) starts in `order`, the trades as applied; fails unless every trade
    is the one at its place: nothing twice, nothing out of order, every gap
    exactly as long as its `lost`."""
    k = next(i for i, x in enumerate(seq) if x is not None)
    start = order.index(seq[k]) - k
    assert start >= 0, "more counted lost than there were trades before"
    assert start + len(seq) <= len(order), "more trades than were applied"
    for i, x in enumerate(seq):
        assert x is None or x == order[start + i], (i, x, order[start + i])
    return start


class TapeReader:
    """A contract-only client subscribed to `*`: the tape as it got it."""

    def __init__(self, url: str, frame_ms: int = 16) -> None:
        self.url = url
        self.frame_ms = frame_ms
        self.seq: list[tuple[str, int] | None] = []
        self.lost = 0
        self.msgs: list[dict] = []
        self.snapshot: dict | None = None
        self.ws = None
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> TapeReader:
        self.ws = await websockets.connect(self.url, max_size=None)
        await self.ws.send(json.dumps({"op": "configure", "frame_ms": self.frame_ms}))
        await self.ws.send(json.dumps(TAPE_REQ))
        self.task = asyncio.create_task(self._read())
        await until(lambda: self.snapshot is not None, what="tape snapshot")
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        with contextlib.suppress(Exception):
            await self.ws.close()

    def _take(self, entries: list[dict], key: str) -> None:
        for e in entries:
            if e["sym"] != "*":
                continue
            n = e.get("lost", 0)
            self.lost += n
            self.seq.extend([None] * n)
            self.seq.extend((t[0], t[1]) for t in e[key])

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                msg = json.loads(raw)
                self.msgs.append(msg)
                if msg["type"] == "snapshot" and self.snapshot is None:
                    self.snapshot = msg
                    self._take(msg["trades"], "recent")
                elif msg["type"] == "update":
                    self._take(msg.get("trades", []), "items")

    def has(self, order: list) -> bool:
        return bool(self.seq) and self.seq[-1] == order[-1]


async def tape_of(url: str) -> list[list]:
    """The tape a new subscriber's snapshot holds."""
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps(TAPE_REQ))
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "snapshot":
                (entry,) = msg["trades"]
                assert entry["sym"] == "*"
                return entry["recent"]


async def until_last(gw, m: Market) -> None:
    """Wait until the gateway's tape ends with the last trade sent."""
    end = time.monotonic() + 20
    while (await tape_of(gw.ws_url))[-1:] != m.sent[-1:]:
        assert time.monotonic() < end, "the last trade sent never reached the tape"
        await asyncio.sleep(0.05)


async def test_every_trade_once_in_the_order_applied_or_counted_exactly():
    ring = 50
    m = Market()
    async with start_gateway("--tape-ring", str(ring)) as gw, \
            websockets.connect(gw.ingest_url, max_size=None) as pub:
        # QX is known before the first trades are on the tape (one connection: in order)
        await pub.send(json.dumps([{"sym": "QX", "seq": 1, "last": 1.0}]))
        await pub.send(json.dumps(m.trades(80)))
        await until_last(gw, m)
        async with TapeReader(gw.ws_url) as fast, TapeReader(gw.ws_url, frame_ms=250) as slow:
            for r in (fast, slow):
                # the snapshot is the ring: the last 50 trades, as published
                assert r.snapshot["trades"] == [{"sym": "*", "recent": m.sent[-ring:]}]
            for k in range(40):
                await pub.send(json.dumps(m.trades(1 + k % 9)))
            # one message of more trades than the ring: applied at once, no
            # frame can be built inside it, so every subscriber loses some
            await pub.send(json.dumps(m.trades(3 * ring)))
            for k in range(10):
                await pub.send(json.dumps(m.trades(1 + k % 4)))
            order = m.order()
            await until(lambda: fast.has(order) and slow.has(order), timeout=30,
                        what="both readers hold the last trade")
            for r in (fast, slow):
                start = aligned(r.seq, order)
                assert start + len(r.seq) == len(order)
                assert start == 80 - ring
                assert r.lost >= 2 * ring, r.lost
            assert await tape_of(gw.ws_url) == m.sent[-ring:]

            # unsubscribe: the ack names `*`; a second one is not_subscribed
            ws = fast.ws
            await ws.send(json.dumps({"op": "unsubscribe", "id": "u1", "symbols": ["*"]}))
            await ws.send(json.dumps({"op": "unsubscribe", "id": "u2", "symbols": ["*"],
                                      "channels": ["trades"]}))
            await until(lambda: any(x.get("id") == "u2" and x["type"] == "ack"
                                    for x in fast.msgs), what="the second unsubscribe's ack")
            replies = [x for x in fast.msgs if x.get("id") in ("u1", "u2")]
            assert [(x["type"], x.get("symbols")) for x in replies] == [
                ("ack", ["*"]), ("error", ["*"]), ("ack", [])]
            assert replies[1]["code"] == "not_subscribed"
            await ws.send(json.dumps({"op": "subscribe", "id": "q", "symbols": ["QX"]}))
            await until(lambda: any(x.get("id") == "q" for x in fast.msgs), what="QX snapshot")
            snap = next(x for x in fast.msgs if x.get("id") == "q")
            assert [r[0] for r in snap["rows"]] == ["QX"]
            after = len(fast.msgs)
            # trades, then a quote: the frame with the quote was built after the
            # trades, so a tape still subscribed would have shown them by then
            await pub.send(json.dumps(m.trades(20)))
            await pub.send(json.dumps([{"sym": "QX", "seq": 2, "last": 2.0}]))
            await until(lambda: any(row[:2] == ["QX", 2] for x in fast.msgs[after:]
                                    for row in x.get("rows", [])), what="QX seq 2")
            assert not any(e["sym"] == "*" for x in fast.msgs[after:]
                           for e in x.get("trades", []))

            # subscribed again, after trades it got no frame for: the snapshot
            # holds them, and the updates go on after it, nothing twice
            await pub.send(json.dumps(m.trades(30)))
            await until_last(gw, m)
            await ws.send(json.dumps({**TAPE_REQ, "id": "again"}))
            await until(lambda: any(x.get("id") == "again" for x in fast.msgs), what="snapshot")
            at = next(i for i, x in enumerate(fast.msgs) if x.get("id") == "again")
            await pub.send(json.dumps(m.trades(10)))
            order = m.order()

            def again() -> list:
                seq: list = [tuple(t[:2]) for t in fast.msgs[at]["trades"][0]["recent"]]
                for x in fast.msgs[at + 1:]:
                    for e in x.get("trades", []):
                        seq += [None] * e.get("lost", 0) + [tuple(t[:2]) for t in e["items"]]
                return seq

            await until(lambda: again()[-1:] == order[-1:], what="the tape again")
            assert aligned(again(), order) == len(order) - 10 - ring


def stalled(gw) -> bool:
    """The gateway holds a client's frames back (it is above the high-water mark)."""
    _, body = http_get(gw.url + "/metrics")
    return any(x.name == "fastfeed_stalled_clients" and x.value >= 1
               for fam in text_string_to_metric_families(body.decode()) for x in fam.samples)


async def test_a_client_that_stops_reading_gets_exactly_what_it_missed_as_lost():
    ring = 1000
    m = Market(seed=9)
    args = ["--tape-ring", str(ring), "--high-water-bytes", "16384", "--stall-s", "120"]
    async with start_gateway(*args) as gw, \
            websockets.connect(gw.ingest_url, max_size=None) as pub:
        slow = await RawWS.connect(gw.port, limit=2**16, rcvbuf=4096)
        slow.send_text(json.dumps(TAPE_REQ))
        _, data = await slow.recv_frame()
        snap = json.loads(data)
        assert snap["type"] == "snapshot" and snap["trades"] == [{"sym": "*", "recent": []}]
        # it reads nothing now: the kernel's buffers fill, then the gateway
        # holds its frames back (conflated) and says so in its metrics
        end = time.monotonic() + 40
        while not stalled(gw):
            assert time.monotonic() < end, "the reader was never held back"
            await pub.send(json.dumps(m.trades(500)))
            await asyncio.sleep(0.02)
        # more than the ring while it is held back: it must be told how many
        for _ in range(3):
            await pub.send(json.dumps(m.trades(ring)))
        order = m.order()
        seq: list[tuple[str, int] | None] = []
        lost = 0
        while not seq or seq[-1] != order[-1]:
            op, data = await slow.recv_frame(timeout=20)
            if op != 1:
                assert op in (9, 10), f"frame opcode {op}"
                continue
            msg = json.loads(data)
            for e in msg.get("trades", []):
                n = e.get("lost", 0)
                lost += n
                seq.extend([None] * n)
                seq.extend((t[0], t[1]) for t in e["items"])
        assert aligned(seq, order) == 0 and len(seq) == len(order)
        assert lost >= 2 * ring, lost
        slow.writer.close()


def token(**claims) -> str:
    return jwt.encode({"sub": "board-1", "exp": int(time.time() + 60), **claims}, SECRET,
                      algorithm="HS256")


async def replies(ws, n: int) -> list[dict]:
    """The next `n` messages that are not update frames or heartbeats."""
    out = []
    while len(out) < n:
        msg = json.loads(await ws.recv())
        if msg["type"] not in ("update", "heartbeat"):
            out.append(msg)
    return out


async def test_only_a_token_that_sees_every_symbol_gets_the_tape_and_only_on_trades():
    env = {"FASTFEED_JWT_SECRET": SECRET}
    async with start_gateway("--max-subscriptions", "2", env=env) as gw:
        async with websockets.connect(gw.ingest_url) as pub:
            await pub.send(json.dumps([{"type": "trade", "sym": "BBCA", "tseq": 1, "ts": T0,
                                        "price": 9100.0, "size": 5.0, "side": "b"}]))
        end = time.monotonic() + 20
        while True:  # BBCA is known once a full token's tape shows its trade
            async with websockets.connect(gw.ws_url + f"?token={token()}") as ws:
                await ws.send(json.dumps(TAPE_REQ))
                (snap,) = await replies(ws, 1)
                if snap["trades"][0]["recent"]:
                    assert snap["trades"] == [{"sym": "*", "recent": [
                        ["BBCA", 1, T0, 9100.0, 5.0, "b"]]}]
                    break
            assert time.monotonic() < end, "the trade never reached the tape"
            await asyncio.sleep(0.05)

        # a token limited to BB*: `*` is forbidden, the rest of the request applies
        async with websockets.connect(gw.ws_url + f"?token={token(syms=['BB*'])}") as ws:
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["*", "BBCA"],
                                      "channels": ["trades"]}))
            err, snap = await replies(ws, 2)
            assert (err["type"], err["code"], err["symbols"]) == ("error", "forbidden", ["*"])
            assert snap["type"] == "snapshot" and [e["sym"] for e in snap["trades"]] == ["BBCA"]
        # a delayed token gets the delayed tape (here still empty: the trade is
        # not 900 s old), even with rt BB*; rt * is real time
        for claims, now in (({"syms": ["*"]}, True), ({"delay": 900}, False),
                            ({"delay": 900, "rt": ["BB*"]}, False),
                            ({"delay": 900, "rt": ["*"]}, True)):
            async with websockets.connect(gw.ws_url + f"?token={token(**claims)}") as ws:
                await ws.send(json.dumps(TAPE_REQ))
                (snap,) = await replies(ws, 1)
                assert snap["type"] == "snapshot" and [e["sym"] for e in snap["trades"]] == ["*"]
                assert len(snap["trades"][0]["recent"]) == (1 if now else 0), claims
                assert snap.get("delayed", []) == ([] if now else ["*"]), claims

        async with websockets.connect(gw.ws_url + f"?token={token()}") as ws:
            # `*` anywhere but on trades alone: refused whole, nothing subscribed
            for req in ({"symbols": ["*"]}, {"symbols": ["*"], "channels": ["quote"]},
                        {"symbols": ["*", "BBCA"], "channels": ["trades", "book"]},
                        {"symbols": ["*"], "channels": ["bars:1m"]}):
                await ws.send(json.dumps({"op": "subscribe", **req}))
                (err,) = await replies(ws, 1)
                assert (err["code"], err["symbols"]) == ("bad_request", ["*"]), req
                assert "trades channel only" in err["message"]
            await ws.send(json.dumps({"op": "subscribe", "symbols": ["**"],
                                      "channels": ["trades"]}))
            (err,) = await replies(ws, 1)
            assert (err["code"], err["symbols"]) == ("bad_request", ["**"])
            # the tape is one subscription of the two allowed
            await ws.send(json.dumps({"op": "subscribe", "symbols": ["*", "BBCA"],
                                      "channels": ["trades"]}))
            (snap,) = await replies(ws, 1)
            assert sorted(e["sym"] for e in snap["trades"]) == ["*", "BBCA"]
            await ws.send(json.dumps({"op": "subscribe", "symbols": ["BBCA"]}))
            (err,) = await replies(ws, 1)
            assert err["code"] == "too_many_subscriptions"
            # subscribed already: not repeated
            await ws.send(json.dumps(TAPE_REQ))
            (snap,) = await replies(ws, 1)
            assert snap["type"] == "snapshot" and snap["trades"] == []
            # it keeps to the frame interval: it cannot be watched
            await ws.send(json.dumps({"op": "watch", "symbols": ["*"], "channels": ["trades"]}))
            (err,) = await replies(ws, 1)
            assert (err["code"], err["symbols"]) == ("bad_request", ["*"])
            assert "cannot be watched" in err["message"]
            await ws.send(json.dumps({"op": "unwatch", "symbols": ["*"]}))
            (ack,) = await replies(ws, 1)
            assert (ack["type"], ack["symbols"]) == ("ack", [])
            # unsubscribing it frees its place
            await ws.send(json.dumps({"op": "unsubscribe", "symbols": ["*"],
                                      "channels": ["trades"]}))
            (ack,) = await replies(ws, 1)
            assert (ack["type"], ack["symbols"], ack["channels"]) == ("ack", ["*"], ["trades"])
            await ws.send(json.dumps({"op": "subscribe", "symbols": ["BBCA"]}))
            (snap,) = await replies(ws, 1)
            # BBCA has traded but never been quoted: subscribed, no row yet
            assert snap["type"] == "snapshot" and snap["rows"] == [] and snap["unknown"] == []


async def test_two_workers_on_one_redis_serve_the_same_tape(redis):
    # each gateway process is one worker of the bus, as a pod's workers are
    args = ["--redis", redis.url, "--redis-prefix", "tape", "--redis-channels", "4"]
    m = Market(nsyms=30, seed=11)
    async with start_gateway(*args) as a, start_gateway(*args) as b, \
            TapeReader(a.ws_url) as ra, TapeReader(b.ws_url, frame_ms=100) as rb, \
            websockets.connect(b.ingest_url, max_size=None) as pub:
        for k in range(30):
            await pub.send(json.dumps(m.trades(5 + k % 20)))
        total = len(m.sent)
        assert total < 1000  # the default ring holds them all: nothing is lost
        await until(lambda: len(ra.seq) == total and len(rb.seq) == total, timeout=30,
                    what="both readers hold every trade")
        tape_a, tape_b = await tape_of(a.ws_url), await tape_of(b.ws_url)
        assert tape_a == tape_b
        assert ra.seq == rb.seq == [(t[0], t[1]) for t in tape_a]
        assert ra.lost == rb.lost == 0
        # every trade published, once; each symbol's in tseq order
        assert sorted(tape_a) == sorted(m.sent)
        for s in m.syms:
            mine = [t[1] for t in tape_a if t[0] == s]
            assert mine == sorted(mine)
