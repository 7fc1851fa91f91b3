"""Clients move between replicas without losing data: a rolling restart, and a
replica that has nothing to serve yet.

On one machine: a real redis-server, gateway processes on their own ports
with ``--redis``, a publisher streaming ticks through Redis, and
`fastfeed.client.Client`s given every replica's URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from redis_server import RedisServer
from support import Feed, http_get, start_gateway, until
from websockets.exceptions import ConnectionClosed as WSClosed

from fastfeed.client import Backoff, Client, Row, TryAgainLater
from fastfeed.feed.publish import RedisPublisher

pytestmark = pytest.mark.timeout(240)

CHANNELS = 8
FAST = Backoff(base=0.05, factor=2.0, cap=0.5, jitter=0.5)
HOT = [f"H{i:02d}" for i in range(40)]  # tick all the time
# Cold instruments tick once after the opening, each group at one stage of the
# hand-over, and never again: only a hand-over without a hole delivers them.
COLD = [[f"C{g}{i:02d}" for i in range(8)] for g in range(4)]
ALL = HOT + [s for group in COLD for s in group]
N_CLIENTS = 12



def serve_args(redis: RedisServer, *extra: str) -> list[str]:
    return ["--redis", redis.url, "--redis-channels", str(CHANNELS), *extra]




class Tapped(Client):
    """A `Client` with a tap on the wire: `wire` holds, in arrival order, every
    snapshot and update as (connection number, url, type, rows)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wire: list[tuple[int, str, str, list[Row]]] = []
        self.connections: list[Any] = []

    def _on_message(self, session: Any, binary: bool, data: bytes) -> None:
        if not binary:
            msg = json.loads(data)
            if msg.get("type") in ("snapshot", "update"):
                if not self.connections or self.connections[-1] is not session:
                    self.connections.append(session)
                self.wire.append((len(self.connections) - 1, session.url, msg["type"],
                                  [Row(*r) for r in msg["rows"]]))
        super()._on_message(session, binary, data)


@contextlib.asynccontextmanager
async def streaming(pub: RedisPublisher, feed: Feed, syms: list[str]) -> AsyncIterator[None]:
    """Ticks for `syms` flow through Redis, about 1,000 a second, until the block ends."""
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            await pub.publish(feed.ticks(feed.rng.sample(syms, 10)))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(stream())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_sigterm_hands_every_client_to_the_other_gateway_with_no_gap(redis):
    """Two gateways on one Redis; every client is on A; A gets SIGTERM while
    ticks flow. A drains and exits 0, every client ends on B with the true
    latest state, and there is no gap, which here means:

    * nothing missed: each client's final rows equal the truth, cold
      instruments included, whose only change came at some stage of the
      hand-over (before A closed the client, while it was between gateways,
      or after it was on B);
    * nothing invented: every row either gateway sent is a state the
      instrument really had at that seq (no torn or mixed rows);
    * never backwards: on each connection, an instrument's seq never goes
      down from one message to the next;
    * only what was missed: B's first message is the resume snapshot (the
      `since` subscribe), and every row in it is newer than anything A had
      sent that client;
    * the gap itself: rows that changed while a client was between the two
      gateways (closed by A, not yet resumed on B) reach it from B.
    """
    feed = Feed()
    async with RedisPublisher(redis.url, channels=CHANNELS) as pub:
        await pub.wait_ready(10)
        await pub.publish(feed.ticks(ALL))
        assert await pub.sync()
        async with (
            start_gateway(*serve_args(redis, "--drain-delay-s", "0.5", "--drain-s", "2")) as a,
            start_gateway(*serve_args(redis)) as b,
        ):
            # a backoff long enough to catch clients between the two gateways
            backoff = Backoff(base=0.3, factor=2.0, cap=1.0, jitter=0.5)
            clients = [Tapped([a.ws_url, b.ws_url], backoff=backoff, stale_after=None)
                       for _ in range(N_CLIENTS)]
            try:
                for c in clients:
                    await c.connect()
                    assert await c.subscribe(ALL) == []
                assert {c.url for c in clients} == {a.ws_url}

                def on(url: str) -> int:
                    return sum(c.connected and c.url == url for c in clients)

                def between() -> int:
                    return sum(not c.connected for c in clients)

                # the stages of the hand-over at which a cold group ticks
                stages = [
                    ("every client on A (A serves through its drain delay)", lambda: True),
                    ("a client between A and B", lambda: between() >= 1),
                    ("clients on A and on B", lambda: on(a.ws_url) >= 1 and on(b.ws_url) >= 1),
                    ("every client on B", lambda: on(b.ws_url) == N_CLIENTS),
                ]
                in_gap: list[Tapped] = []
                async with streaming(pub, feed, HOT):
                    await until(lambda: all(c.frames >= 3 for c in clients), 30,
                                what="updates flowing from A to every client")
                    a.terminate()
                    for group, (stage, reached) in zip(COLD, stages, strict=True):
                        await until(reached, 60, step=0.01, what=stage)
                        if group is COLD[1]:
                            in_gap = [c for c in clients if not c.connected]
                        await pub.publish(feed.ticks(group))
                    assert await a.wait_exit(60) == 0
                assert await pub.sync()

                await until(lambda: all(c.rows == feed.truth() for c in clients), 30,
                            what="every client holding the true latest state")
                for c in clients:
                    assert (c.url, c.connected, c.reconnects) == (b.ws_url, True, 1)
                    assert c.last_close_code == 1012
                    assert_no_gap(c, feed, a.ws_url, b.ws_url)
                # what changed while a client was between the gateways came from B
                assert in_gap
                for c in in_gap:
                    final = {s: feed.seq[s] for s in COLD[1]}
                    got = {(conn, r.sym) for conn, _, _, rows in c.wire for r in rows
                           if r.sym in final and r.seq == final[r.sym]}
                    assert got == {(1, s) for s in COLD[1]}, got
            finally:
                for c in clients:
                    await c.close()


def assert_no_gap(c: Tapped, feed: Feed, a_url: str, b_url: str) -> None:
    assert [conn.url for conn in c.connections] == [a_url, b_url]
    held: list[dict[str, int]] = [{}, {}]  # per connection: the last seq sent of each symbol
    for conn, _url, _kind, rows in c.wire:
        for row in rows:
            assert row == feed.history[row.sym][row.seq], f"{row} is not a state it had"
            assert row.seq >= held[conn].get(row.sym, -1), f"{row.sym} went backwards"
            held[conn][row.sym] = row.seq
    first_on_b = next(i for i, w in enumerate(c.wire) if w[0] == 1)
    _, _, kind, resume = c.wire[first_on_b]
    assert kind == "snapshot"
    since = held[0]
    assert all(row.seq > since[row.sym] for row in resume), "B resent rows A had sent"


async def until_known(ws_url: str, syms: list[str]) -> None:
    """Wait until the gateway knows every symbol of `syms`."""
    async with websockets.connect(ws_url) as ws:
        async def known() -> bool:
            await ws.send(json.dumps({"op": "list"}))
            while (msg := json.loads(await ws.recv()))["type"] != "list":
                pass
            return set(syms) <= set(msg["symbols"])

        deadline = time.monotonic() + 20
        while not await known():
            assert time.monotonic() < deadline, "the gateway never got the ticks"
            await asyncio.sleep(0.05)


async def test_a_gateway_without_market_data_says_try_again_later():
    """A gateway that started while Redis was unreachable holds no data: it
    accepts clients and closes them at once with 1013 and a reason. A Python
    client's connect() raises TryAgainLater once `try_again_attempts` attempts
    were answered so, and the client keeps coming back in the background
    until the gateway has loaded the snapshot; then connect() returns. From
    then on the gateway serves, also through a later Redis outage (with the
    last known rows and feed status down)."""
    redis = RedisServer()  # not started: the gateway comes up without it
    feed = Feed()
    syms = HOT[:10]
    try:
        async with start_gateway(*serve_args(redis, "--feed-grace-s", "0.5"), ready=False) as g:
            await g.wait_ready(path="/healthz")
            status, body = http_get(g.url + "/readyz")
            assert status == 503 and b"snapshot" in body

            # on the wire: the upgrade succeeds, the close follows without a request
            with pytest.raises(WSClosed) as closed:
                async with websockets.connect(g.ws_url) as ws:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert closed.value.rcvd.reason.startswith("try again later: no market data")
            assert b'fastfeed_closes_total{code="1013"}' in http_get(g.url + "/metrics")[1]

            # `async with` gives up as connect() does, and closes the client.
            # connect_timeout=None: only the count of 1013s decides, never a clock
            quick = Client(g.ws_url, backoff=FAST, connect_timeout=None, try_again_attempts=1)
            with pytest.raises(TryAgainLater) as told:
                async with quick:
                    pass
            assert told.value.attempts == 1 and quick.closed

            c = Client(g.ws_url, backoff=FAST, stale_after=None, connect_timeout=None,
                       request_timeout=30)
            try:
                with pytest.raises(TryAgainLater) as told:
                    await c.connect()
                err = told.value
                assert isinstance(err, TimeoutError)  # code written for connect_timeout catches it
                assert err.close_code == 1013 and err.url == g.ws_url
                assert err.attempts == c.try_again_attempts
                assert err.reason.startswith("try again later: no market data")
                assert g.ws_url in str(err) and "no market data" in str(err)
                # not stopped: it keeps coming back, never served
                await until(lambda: c.reconnects >= err.attempts + 2,
                            what="the client coming back after connect() gave up")
                assert not c.closed and not c.connected and c.last_close_code == 1013

                redis.start()
                async with RedisPublisher(redis.url, channels=CHANNELS) as pub:
                    await pub.wait_ready(10)
                    await pub.publish(feed.ticks(syms))
                    assert await pub.sync()
                await g.wait_ready(30)
                await until_known(g.ws_url, syms)
                await c.connect()  # served now
                assert await c.subscribe(syms) == []
                assert c.rows == feed.truth()

                # Redis goes away again: the gateway has data now and keeps serving
                redis.stop()
                await until(lambda: http_get(g.url + "/readyz")[0] == 503, 30,
                            what="feed down long enough to be unready")
                async with websockets.connect(g.ws_url) as ws:
                    assert json.loads(await ws.recv()) == {"type": "status", "feed": "down"}
                    await ws.send(json.dumps({"op": "subscribe", "symbols": syms}))
                    snap = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert {r[0]: Row(*r) for r in snap["rows"]} == feed.truth()
                assert c.connected and c.last_close_code == 1013
            finally:
                await c.close()
    finally:
        redis.close()
