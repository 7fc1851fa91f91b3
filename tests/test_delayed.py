"""Delayed data end to end: real gateways, a publisher on /ingest, `websockets` clients.

A delayed client never holds a row whose source ts is newer than the send
time minus its delay (every row checked); once the delay has passed after
the last tick it holds the real-time clients' final state; a mixed token
sees its `rt` symbols in real time; memory stays within docs/delay.md's
formula under a 10k ticks/s feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time

import jwt
import pytest
import websockets
from support import http_get, start_gateway, until

SECRET = "test-secret-not-for-production-use-32b+"
FIELDS = ["sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume"]
S = 1_000_000_000
ENV = {"FASTFEED_JWT_SECRET": SECRET}


def token(delay=0, rt=None):
    claims = {"sub": "t", "exp": int(time.time() + 600)}
    if delay:
        claims["delay"] = delay
    if rt:
        claims["rt"] = rt
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Watcher:
    """A client that holds every row it was sent and checks each against its delay."""

    def __init__(self, ws, delay_s: int, delayed=lambda sym: True) -> None:
        self.ws = ws
        self.delay = delay_s * S
        self.delayed = delayed
        self.rows: dict[str, list] = {}
        self.seen = 0
        self.fresh: set[str] = set()  # symbols that came newer than the delay allows
        self.late: list[tuple] = []  # rows that broke the rule
        self.snapshots: list[dict] = []
        self.statuses: list[dict] = []
        self.task = asyncio.ensure_future(self.run())

    def take(self, rows, sent_ns: int) -> None:
        for r in rows:
            self.seen += 1
            if r[2] > sent_ns - self.delay:
                self.fresh.add(r[0])
                if self.delayed(r[0]):
                    self.late.append((r, sent_ns))
            self.rows[r[0]] = r

    async def run(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                m = json.loads(raw)
                if m["type"] == "update":
                    self.take(m["rows"], m["t"])
                elif m["type"] == "snapshot":
                    # sent before it was received: the local clock bounds the send time
                    self.snapshots.append(m)
                    self.take(m["rows"], time.time_ns())
                elif m["type"] == "status":
                    self.statuses.append(m)

    async def subscribe(self, syms) -> dict:
        n = len(self.snapshots)
        await self.ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
        await until(lambda: len(self.snapshots) > n, 10, what="a snapshot")
        return self.snapshots[-1]


async def feed(g, syms, seconds: float, rate: float, seqs: dict[str, int] | None = None
               ) -> dict[str, int]:
    """Ticks stamped with the wall clock, `rate` per second, to /ingest, numbered
    on from `seqs` (updated). Returns the last seq of each symbol."""
    seqs = {} if seqs is None else seqs
    for s in syms:
        seqs.setdefault(s, 0)
    async with websockets.connect(g.ingest_url) as pub:
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            batch = []
            for _ in range(max(1, int(rate / 50))):
                s = syms[k % len(syms)]
                k += 1
                seqs[s] += 1
                batch.append({"sym": s, "seq": seqs[s], "ts": time.time_ns(),
                              "bid": 100.0 + seqs[s], "ask": 101.0 + seqs[s], "last": float(k)})
            await pub.send(json.dumps(batch))
            await asyncio.sleep(0.02)
    return seqs


async def test_delayed_clients_never_see_newer_rows_and_end_on_the_real_time_state():
    syms = ["BBCA", "BBRI", "TLKM", "ASII", "GOTO"]
    async with (start_gateway("--max-delay-s", "5", env=ENV) as g,
                websockets.connect(g.ws_url + f"?token={token()}") as rt_ws,
                websockets.connect(g.ws_url + f"?token={token(2)}") as d_ws):
        rt, late = Watcher(rt_ws, 2, lambda s: False), Watcher(d_ws, 2)
        seqs = await feed(g, syms, 0.3, 100)  # the symbols exist, just now
        snap = await late.subscribe(syms)
        assert snap["delay"] == 2 and sorted(snap["delayed"]) == sorted(syms)
        assert snap["unknown"] == []  # known without delayed state: subscribed
        await rt.subscribe(syms)
        await feed(g, syms, 4, 500, seqs)
        await until(lambda: {s: r[1] for s, r in rt.rows.items()} == seqs, 10,
                    what="the real-time client at the last tick")
        final = dict(rt.rows)
        await until(lambda: late.rows == final, 15,
                    what="the delayed client at the real-time final state")
        assert late.seen > 50, "the delayed client got rows as the feed went"
        assert not late.late, f"{len(late.late)} rows newer than send time - 2 s: " \
                              f"{late.late[:3]}"
        assert rt.fresh, "the real-time client saw rows younger than 2 s"


async def test_a_mixed_token_gets_its_rt_symbols_real_time_and_the_rest_delayed():
    syms = ["BBCA", "BBNI", "TLKM", "ASII"]
    async with start_gateway("--max-delay-s", "5", env=ENV) as g:
        seqs = await feed(g, syms, 0.3, 100)
        async with websockets.connect(g.ws_url + f"?token={token(2, ['BB*'])}") as ws:
            w = Watcher(ws, 2, lambda s: not s.startswith("BB"))
            snap = await w.subscribe(syms)
            assert sorted(snap["delayed"]) == ["ASII", "TLKM"] and snap["delay"] == 2
            assert {r[0] for r in snap["rows"]} >= {"BBCA", "BBNI"}  # real time: held now
            more = asyncio.ensure_future(feed(g, syms, 3, 200, seqs))
            await until(lambda: {"BBCA", "BBNI"} <= w.fresh, 10,
                        what="BB* rows younger than the delay (real time)")
            await more
            await until(lambda: {"ASII", "TLKM"} <= set(w.rows), 10, what="delayed rows")
            assert not w.late, f"delayed symbols came too new: {w.late[:3]}"
            assert "TLKM" not in w.fresh and "ASII" not in w.fresh


async def test_watch_and_resume_work_for_delayed_symbols():
    syms = ["TLKM", "ASII"]
    async with start_gateway("--max-delay-s", "5", env=ENV) as g:
        await feed(g, syms, 0.3, 100)
        async with websockets.connect(g.ws_url + f"?token={token(1)}") as ws:
            w = Watcher(ws, 1)
            await w.subscribe(syms)
            await ws.send(json.dumps({"op": "watch", "symbols": ["TLKM"]}))
            await until(lambda: set(w.rows) == set(syms), 10, what="delayed rows")
            held = {s: r[1] for s, r in w.rows.items()}
        await asyncio.sleep(0)
        async with websockets.connect(g.ws_url + f"?token={token(1)}") as ws:
            w = Watcher(ws, 1)
            await ws.send(json.dumps({"op": "subscribe", "symbols": syms, "since": held}))
            await until(lambda: w.snapshots, 10, what="the resumed snapshot")
            assert w.snapshots[0]["rows"] == []  # nothing newer than what it holds
            assert not w.late


async def test_a_late_worker_says_its_line_is_filling_and_readyz_waits_when_asked():
    async with start_gateway("--max-delay-s", "8", "--delay-gates-ready", env=ENV,
                             ready=False) as g:
        await until(lambda: _status(g) is not None, 20, what="/readyz answering")
        status, body = _status(g)
        assert status == 503 and b"delay line filling" in body, body
        await until(lambda: _status(g) == (200, b"ready\n"), 30, what="/readyz 200 once full")
    async with start_gateway("--max-delay-s", "600", env=ENV) as g:
        await feed(g, ["TLKM"], 0.2, 50)
        async with websockets.connect(g.ws_url + f"?token={token(600)}") as ws:
            w = Watcher(ws, 600)
            snap = await w.subscribe(["TLKM"])
            assert snap["rows"] == [] and snap["unknown"] == [] and snap["delayed"] == ["TLKM"]
            await until(lambda: w.statuses, 10, what="a filling status")
            st = w.statuses[0]
            assert st["delay_line"] == "filling" and st["delay"] == 600 and st["past_s"] < 600


async def test_a_delay_past_the_ones_a_worker_can_serve_is_refused_at_upgrade():
    """Each delay served is one more set of hub slots: a worker serves five
    delays at once; a token for a sixth gets 403 naming the five, at upgrade,
    and one for a delay already served still connects."""
    from websockets.exceptions import InvalidStatus

    async with start_gateway("--max-delay-s", "900", env=ENV) as g:
        await feed(g, ["TLKM"], 0.2, 50)
        for d in (900, 600, 300, 120, 60):
            async with websockets.connect(g.ws_url + f"?token={token(d)}") as ws:
                snap = await Watcher(ws, d).subscribe(["TLKM"])
                assert snap["delay"] == d and snap["delayed"] == ["TLKM"]
        try:
            async with websockets.connect(g.ws_url + f"?token={token(30)}"):
                raise AssertionError("a sixth delay was served")
        except InvalidStatus as e:
            assert e.response.status_code == 403
            body = e.response.body.decode()
            assert "30s delay" in body and "900, 600, 300, 120, 60 s" in body, body
        async with websockets.connect(g.ws_url + f"?token={token(600)}") as ws:
            assert (await Watcher(ws, 600).subscribe(["TLKM"]))["delay"] == 600
        assert g.proc.poll() is None


def _status(g):
    try:
        return http_get(g.url + "/readyz", 1.0)
    except OSError:
        return None


def _metric(g, name: str) -> float:
    _, body = http_get(g.url + "/metrics", 2.0)
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def formula(instruments, ticks_per_s, max_delay_s, slot_s, book_msgs_per_s=0, trades_per_s=0,
            depth=10):
    """docs/delay.md's bound on the line's bytes."""
    slots = max_delay_s / slot_s + 2
    quotes = min(instruments, ticks_per_s * slot_s)
    books = min(instruments, book_msgs_per_s * slot_s)
    floor = 1024 * (80 + 32 + 64 * depth + 40)  # each buffer's first allocation
    return (2 * (80 * quotes + (32 + 64 * depth) * books) * slots
            + 2 * 40 * trades_per_s * (max_delay_s + 2 * slot_s)
            + 2 * 64 * slots + 2 * 21 * max(instruments, 1024) + floor)


async def test_memory_stays_within_the_formula_under_10k_ticks_per_second():
    n, rate, delay = 2000, 10_000, 10
    async with (start_gateway("--simulate", str(n), "--rate", str(rate), "--max-delay-s",
                              str(delay), env=ENV) as g,
                websockets.connect(g.ws_url + f"?token={token(5)}") as ws):
        w = Watcher(ws, 5)
        await w.subscribe(["BBCA", "BBRI", "TLKM", "ASII", "GOTO", "BMRI"])
        peak, end = 0.0, time.monotonic() + 30
        while time.monotonic() < end:
            peak = max(peak, _metric(g, "fastfeed_delay_line_bytes"))
            await asyncio.sleep(1.0)
        # the simulator sends a book message with every quote tick, and 0.25 trades
        bound = formula(n, rate, delay, 0.1, rate, rate / 4)
        print(f"delay line peak {peak / 2**20:.1f} MiB, formula {bound / 2**20:.1f} MiB")
        assert 0 < peak <= bound, peak
        assert w.seen and not w.late


async def test_over_its_budget_the_line_coarsens_says_so_and_stays_bounded(tmp_path):
    """A 1 MiB budget under 10k ticks/s (and a book message each, and trades):
    the line merges its slots, logs it with what to do, shows the slot length
    in metrics, stays within the formula at that slot length, and its delayed
    client still gets nothing newer than the delay."""
    n, rate, delay = 2000, 10_000, 4
    log = tmp_path / "gateway.log"
    async with (start_gateway("--simulate", str(n), "--rate", str(rate), "--max-delay-s",
                              str(delay), "--delay-budget-mb", "1", env=ENV, log=log) as g,
                websockets.connect(g.ws_url + f"?token={token(2)}") as ws):
        w = Watcher(ws, 2)
        await w.subscribe(["BBCA", "BBRI", "TLKM", "ASII"])
        await until(lambda: _metric(g, "fastfeed_delay_slot_seconds") >= 0.4, 30,
                    what="the slots coarsened (fastfeed_delay_slot_seconds)")
        peak, end = 0.0, time.monotonic() + delay + 2
        while time.monotonic() < end:  # past the delay: the line holds all it will
            peak = max(peak, _metric(g, "fastfeed_delay_line_bytes"))
            await asyncio.sleep(0.5)
        slot_s = _metric(g, "fastfeed_delay_slot_seconds")
        text = log.read_text()
        assert "delay line over its budget of 1 MiB (--delay-budget-mb): slots coarsened " \
               "from 100 to " in text, text[-2000:]
        assert "Raise the budget, or lower --max-delay-s" in text
        # no coarser than half the delay (1.6 s here), and it says it can go no further
        assert slot_s == 1.6, slot_s
        assert "at its coarsest slots (1600 ms, half of --max-delay-s)" in text, text[-2000:]
        assert 0 < peak <= formula(n, rate, delay, slot_s, rate, rate / 4), (peak, slot_s)
        assert w.seen and not w.late, w.late[:3]
        assert g.proc.poll() is None


async def test_binary_frames_for_delayed_symbols_hold_no_newer_row():
    import numpy as np

    from fastfeed import _core

    syms = ["TLKM", "ASII", "BBCA"]
    async with start_gateway("--max-delay-s", "5", env=ENV) as g:
        seqs = await feed(g, syms, 0.3, 100)
        async with websockets.connect(g.ws_url + f"?token={token(1, ['BB*'])}",
                                      subprotocols=["fastfeed.v1.bin"]) as ws:
            await ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
            more = asyncio.ensure_future(feed(g, syms, 2.5, 200, seqs))
            held: dict[str, int] = {}
            fresh_bb, deadline = False, time.monotonic() + 20
            while time.monotonic() < deadline and not (fresh_bb and held == seqs and more.done()):
                m = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(m, str):
                    continue  # the snapshot
                t = int.from_bytes(m[8:16], "little", signed=True)
                for r in np.frombuffer(m, _core.ROW_DTYPE, offset=16):
                    sym = r["sym"].decode()
                    if sym.startswith("BB"):
                        fresh_bb = fresh_bb or int(r["ts"]) > t - S
                    else:
                        assert int(r["ts"]) <= t - S, f"{sym} row newer than t - 1 s"
                    held[sym] = int(r["seq"])
            await more
            assert fresh_bb and held == seqs, (fresh_bb, held, seqs)


@pytest.mark.parametrize("subprotocol", ["fastfeed.v1.compact", "fastfeed.v1.compact.bin"])
async def test_compact_frames_for_delayed_symbols_hold_no_newer_row_and_end_equal(subprotocol):
    """A mixed token (delay 1 s, rt BB*) on a compact subprotocol: every row the
    client rebuilds from its compact frames is old enough for TLKM and ASII,
    BBCA comes in real time, and it ends on the real-time client's rows."""
    from fastfeed.compact import CompactState

    syms = ["TLKM", "ASII", "BBCA"]
    async with start_gateway("--max-delay-s", "5", env=ENV) as g:
        seqs = await feed(g, syms, 0.3, 100)
        async with (websockets.connect(g.ws_url + f"?token={token()}") as rt_ws,
                    websockets.connect(g.ws_url + f"?token={token(1, ['BB*'])}",
                                       subprotocols=[subprotocol]) as ws):
            assert ws.subprotocol == subprotocol
            rt = Watcher(rt_ws, 1, lambda s: False)
            await rt.subscribe(syms)
            state, late, fresh_bb = CompactState(), [], []

            async def read() -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for m in ws:
                        if isinstance(m, bytes):
                            t, rows = state.update_binary(m)
                        else:
                            msg = json.loads(m)
                            if msg["type"] == "snapshot":
                                state.snapshot(msg["rows"])
                                t, rows = time.time_ns(), msg["rows"]
                            elif msg["type"] == "update":
                                t, rows = msg["t"], state.update(msg)
                            else:
                                continue
                        for r in rows:
                            if r[0].startswith("BB"):
                                fresh_bb.append(r[2] > t - S)
                            elif r[2] > t - S:
                                late.append((list(r), t))

            reader = asyncio.ensure_future(read())
            await ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
            await feed(g, syms, 2.5, 200, seqs)
            await until(lambda: {s: r[1] for s, r in rt.rows.items()} == seqs, 10,
                        what="the real-time client at the last tick")
            final = {s: list(r) for s, r in rt.rows.items()}
            await until(lambda: state.rows == final, 10,
                        what="the compact delayed client at the real-time rows")
            reader.cancel()
            assert not late, f"{len(late)} delayed rows newer than t - 1 s: {late[:3]}"
            assert any(fresh_bb), "BBCA came in real time"


async def test_every_worker_and_a_late_pod_build_the_delayed_state_from_the_bus():
    from redis_server import RedisServer

    syms = ["TLKM", "ASII", "UNVR"]
    bus = ["--redis-prefix", "delayed", "--max-delay-s", "5"]
    with RedisServer() as r:
        async with start_gateway("--workers", "2", "--redis", r.url, *bus, env=ENV) as g:
            seqs = await feed(g, syms, 0.3, 100)
            async with contextlib.AsyncExitStack() as stack:
                ws = [await stack.enter_async_context(
                    websockets.connect(g.ws_url + f"?token={token(2)}")) for _ in range(6)]
                clients = [Watcher(w, 2) for w in ws]  # spread over both workers
                for c in clients:
                    await c.subscribe(syms)
                await feed(g, syms, 2, 200, seqs)
                for c in clients:
                    await until(lambda c=c: {s: r[1] for s, r in c.rows.items()} == seqs, 15,
                                what="every delayed client at the last tick")
                    assert not c.late, c.late[:3]
            # a pod started now has no past, but what is older than the delay it has
            await asyncio.sleep(2.5)
            async with (start_gateway("--redis", r.url, *bus, env=ENV) as late_pod,
                        websockets.connect(late_pod.ws_url + f"?token={token(2)}") as w):
                c = Watcher(w, 2)
                snap = await c.subscribe(syms)
                assert {row[0]: row[1] for row in snap["rows"]} == seqs
                assert not c.late
