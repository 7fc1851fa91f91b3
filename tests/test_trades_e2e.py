"""Trades end to end, against real processes: a third-party client written
only from the contract (`websockets` and `json`; nothing of fastfeed) sees
every published trade exactly once, in order, or an exact `lost` count,
through slow reading, a reconnect resuming with `since_trades`, a worker
killed with SIGKILL and a Redis restart.

A real redis-server and a pod of two workers (``fastfeed serve --workers 2
--redis``) with a small trade ring (`RING`) and a backlog that covers every
trade a paused client falls behind by (`lost` stays exact). Trades come from
two `fastfeed.publisher.Publisher`s, one onto the bus (symbols E..), one
into the pod's ``/ingest`` (symbols I..), each symbol's `tseq` consecutive
from 1, so the test knows every published trade: symbol S's trades are
exactly 1 .. `published[S]`.

What "exactly once, in order, or an exact `lost`" means, as checked for
every client and symbol, over all its connections (each reconnection
resubscribes with ``since_trades`` = the last `tseq` it holds, the first
subscribe with 0, so every client accounts for every trade from 1):

- every `trades` entry (a snapshot's `recent`, an update's `items`) with its
  `lost` N (0 when absent) continues exactly where the client is: its first
  trade's `tseq` is the last held + 1 + N, and each further trade's is the
  one before + 1. So no trade comes twice, none out of order, and every one
  not received is in exactly one `lost` count: received + lost = the last
  `tseq` held.
- once the publishers have stopped and the pod has everything, each
  client's last `tseq` is the last published one: with the above, received
  + lost = published, every trade either seen once or counted.

The clients that stop reading must see `lost` (the ring overflowed for
them); the others only whatever their frame interval could not carry. After
the Redis restart the publishers resend what Redis refused meanwhile, and a
worker that subscribes again after that loads rings that moved past what it
held: those trades must come as `lost` too (docs/protocol.md, "Ingest of
trades").
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from typing import Any

import pytest
from contract_client import ContractConnection
from fixtures import children, http_get, owner_pid
from support import start_gateway, until

from fastfeed.backoff import Backoff
from fastfeed.publisher import Publisher

pytestmark = pytest.mark.timeout(180)

RING = 40  # trades a worker holds per instrument: a paused client overflows it
BACKLOG = 20_000  # stamps per instrument: more than any client falls behind, so lost is exact
SYMS = [f"E{i:02d}" for i in range(6)]  # onto the bus
ISYMS = [f"I{i:02d}" for i in range(4)]  # into the pod's /ingest
FAST = {"backoff_base": 0.05, "backoff_cap": 0.3, "ping_interval": 0.2, "ping_timeout": 1.0}


# ---- the contract client: websockets + json, from the contract alone ---------------


class ContractClient(ContractConnection):
    """Subscribes to the `trades` channel of `syms` and checks every entry
    against the last `tseq` it holds (see the module's docstring). When its
    connection ends it reconnects and resubscribes with ``since_trades``.
    `pause()` stops reading the socket (a small receive buffer makes the
    server see it at once); `bounce()` closes the connection from this side."""

    def __init__(self, port: int, syms: list[str], rcvbuf: int = 0) -> None:
        super().__init__(port, syms, rcvbuf)
        self.last = dict.fromkeys(syms, 0)  # the last tseq held, per symbol
        self.received = dict.fromkeys(syms, 0)
        self.lost = dict.fromkeys(syms, 0)
        # per connection and symbol, what came: tseqs, and ("lost", N) before them
        self.log: list[dict[str, list]] = []
        self.violations: list[str] = []
        self.subscribed: set[str] = set()  # on the current connection

    @property
    def ready(self) -> bool:
        """Every symbol subscribed on the current connection."""
        return self._ws is not None and self.subscribed >= set(self.syms)

    async def _opened(self, ws: Any) -> None:
        self.subscribed = set()
        self.log.append({s: [] for s in self.syms})
        await self._subscribe(ws, self.syms)

    async def _subscribe(self, ws: Any, syms: list[str]) -> None:
        # resume each symbol after the last trade held: only later trades
        # come, with `lost` for those the gateway no longer holds
        await ws.send(json.dumps({"op": "subscribe", "symbols": syms, "channels": ["trades"],
                                  "since_trades": {s: self.last[s] for s in syms}}))

    async def _on(self, ws: Any, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t == "snapshot":
            for e in msg.get("trades", []):
                self._entry(e, e.get("recent", []), "snapshot")
                self.subscribed.add(e["sym"])
            if msg.get("unknown"):
                # that worker has not loaded them from Redis yet: ask again
                await asyncio.sleep(0.05)
                await self._subscribe(ws, msg["unknown"])
        elif t == "update":
            for e in msg.get("trades", []):
                self._entry(e, e.get("items", []), "update")
        elif t == "status" and "feed" in msg:
            self.feed.append(msg["feed"])
        elif t == "error":
            self.errors.append(msg)

    def _entry(self, e: dict[str, Any], items: list[list], where: str) -> None:
        """A trade is `[tseq, ts, price, size, side]`; `lost` counts the trades
        right before the first one that this connection will never get."""
        sym = e["sym"]
        if sym not in self.last:
            self.violations.append(f"{where}: trades of {sym}, not subscribed")
            return
        lost = e.get("lost", 0)
        log = self.log[-1][sym]
        if lost:
            log.append(("lost", lost))
            self.lost[sym] += lost
        expect = self.last[sym] + 1 + lost
        for k, item in enumerate(items):
            tseq, ts, price, size, side = item
            if tseq != expect:
                # tseq <= held: sent twice (e.g. a resume on a worker behind the
                # since_trades it was given); above: a gap no `lost` covers
                self.violations.append(
                    f"{where} {sym}: tseq {tseq} where {expect} was due (held {self.last[sym]}, "
                    f"lost {lost if k == 0 else 0}, item {k} of {[i[0] for i in items][:6]}, "
                    f"connection {self.connections})")
            if (not isinstance(ts, int) or not isinstance(price, float)
                    or not isinstance(size, float) or side not in ("b", "s", "")):
                self.violations.append(f"{where} {sym}: bad trade {item}")
            log.append(tseq)
            if tseq > self.last[sym]:
                self.last[sym] = tseq
                self.received[sym] += 1
            expect = tseq + 1
        if lost and not items:
            self.last[sym] += lost


# ---- the trades, and the publishers that stream them -------------------------------


class TradeFeed:
    """Trades of `syms`, each symbol's tseq consecutive from 1."""

    def __init__(self, seed: int, syms: list[str]) -> None:
        self.rng = random.Random(seed)
        self.syms = syms
        self.tseq = dict.fromkeys(syms, 0)

    def trades(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            s = self.rng.choice(self.syms)
            self.tseq[s] += 1
            out.append({"sym": s, "tseq": self.tseq[s], "ts": time.time_ns(),
                        "price": float(self.rng.randrange(900, 1100) * 5),
                        "size": 100.0 * self.rng.randrange(1, 50),
                        "side": self.rng.choice(("b", "s", ""))})
        return out


class Stream:
    """Publishes the feed's trades in batches until stopped."""

    def __init__(self, pub: Publisher, feed: TradeFeed) -> None:
        self.pub, self.feed = pub, feed
        self.published = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def batch(self, n: int) -> None:
        await self.pub.publish_trades(self.feed.trades(n))
        self.published += n

    async def _run(self, size: int, pause: float) -> None:
        while not self._stop.is_set():
            await self.batch(size)
            await asyncio.sleep(pause)

    def start(self, size: int, pause: float) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(size, pause))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def until(self, n: int) -> None:
        """Until `n` more trades went out."""
        goal = self.published + n
        await until(lambda: self.published >= goal, 30, what=f"{n} more trades")


def metric(port: int, name: str) -> float:
    """A pod metric (every worker's, summed)."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    m = re.search(rb"^" + re.escape(name.encode()) + rb" ([0-9.e+-]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def behind(clients: list[ContractClient], published: dict[str, int]) -> str:
    out = [f"client {k} {s}: at {c.last[s]}, published {published[s]}"
           for k, c in enumerate(clients) for s in c.syms if c.last[s] != published[s]]
    return "; ".join(out[:6]) or "none"


# ---- the test --------------------------------------------------------------------


async def test_contract_clients_see_every_trade_once_or_counted_through_every_fault(
        redis, tmp_path):
    t0 = time.monotonic()
    args = ["--workers", "2", "--redis", redis.url, "--redis-channels", "4",
            "--trade-ring", str(RING), "--trade-backlog", str(BACKLOG),
            "--high-water-bytes", "65536", "--stall-s", "120", "--feed-grace-s", "0.5"]
    feed, ifeed = TradeFeed(17, SYMS), TradeFeed(23, ISYMS)
    backoff = Backoff(base=0.05, factor=2.0, cap=0.3, jitter=0.5)
    async with start_gateway(*args, log=tmp_path / "pod.log") as pod, \
            Publisher(redis.url, channels=4, trade_ring=RING, flush_ms=5, backoff=backoff,
                      **FAST) as pub, \
            Publisher(pod.ingest_url, flush_ms=5, backoff=backoff) as ipub:
        await pub.wait_connected(10)
        await ipub.wait_connected(10)
        bus, ingest = Stream(pub, feed), Stream(ipub, ifeed)
        streams = (bus, ingest)
        # every symbol known to the pod before the clients subscribe
        while any(feed.tseq[s] == 0 for s in SYMS):
            await bus.batch(10)
        while any(ifeed.tseq[s] == 0 for s in ISYMS):
            await ingest.batch(10)
        assert await pub.sync(20) and await ipub.sync(20)

        sup = pod.proc.pid
        await until(lambda: len(children(sup)) == 2, what="two workers")
        # two slow readers (small receive buffers), two that keep reading
        clients = [ContractClient(pod.port, SYMS + ISYMS, rcvbuf=4096),
                   ContractClient(pod.port, SYMS),
                   ContractClient(pod.port, SYMS[:3] + ISYMS[:2], rcvbuf=4096),
                   ContractClient(pod.port, SYMS[3:] + ISYMS)]
        for c in clients:
            c.start()

        def published() -> dict[str, int]:
            return {**feed.tseq, **ifeed.tseq}

        def start(size: int = 30, pause: float = 0.01) -> None:
            bus.start(size, pause)
            ingest.start(max(4, size // 2), pause)

        phases: dict[str, int] = {}  # lost counted by every client, per phase

        async def settle(what: str) -> None:
            for st in streams:
                await st.stop()
                assert await st.pub.sync(30), what
            want = published()
            try:
                await until(lambda: all(c.last[s] == want[s] for c in clients for s in c.syms),
                            30, what=what)
            except AssertionError:
                raise AssertionError(f"{what}: {behind(clients, want)}") from None
            assert all(c.violations == [] for c in clients), \
                (what, [c.violations[:4] for c in clients])
            phases[what] = sum(sum(c.lost.values()) for c in clients) - sum(phases.values())

        try:
            await until(lambda: all(c.ready for c in clients), 20, what="clients subscribed")

            # 1. normal reading
            start()
            await bus.until(2000)
            await settle("normal reading")

            # 2. slow reading: two clients stop reading while trades stream;
            # once they read again they get what the ring still holds, and
            # the count of what it no longer does
            slow = [clients[0], clients[2]]
            lost_before = [sum(c.lost.values()) for c in slow]
            for c in slow:
                c.pause()
            start(size=60, pause=0.005)
            await until(lambda: metric(pod.port, "fastfeed_stalled_clients") >= 2, 30,
                        step=0.1, what="both slow readers above the high-water mark")
            await bus.until(RING * len(SYMS) * 4)  # ... while every ring turns over
            for c in slow:
                c.resume()
            await settle("slow reading")
            assert all(sum(c.lost.values()) > n
                       for c, n in zip(slow, lost_before, strict=True)), [c.lost for c in slow]
            assert all(c.reconnects == 0 for c in clients)

            # 3. every client closes its connection, reconnects and resumes
            # with since_trades while the trades go on
            start()
            for c in clients:
                before = c.connections
                await c.bounce()
                await until(lambda c=c, before=before: c.connections > before and c.ready,
                            20, what="resubscribed after a reconnect")
                await bus.until(100)
            await settle("reconnect with since_trades")
            assert all(c.reconnects == 1 for c in clients)

            # 4. SIGKILL of the worker client 0 is on: its clients reconnect
            # (to either worker), the supervisor starts a new one
            workers = children(sup)
            victim = owner_pid(workers, pod.port, clients[0].local_port)
            assert victim is not None, "no worker holds client 0's connection"
            on_victim = [c for c in clients
                         if owner_pid(workers, pod.port, c.local_port) == victim]
            before = {id(c): c.connections for c in clients}
            start()
            await bus.until(200)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: all(c.connections > before[id(c)] and c.ready
                                    for c in on_victim), 30,
                        what="the killed worker's clients back and resubscribed")
            await until(lambda: len(children(sup)) == 2 and victim not in children(sup),
                        30, what="the worker restarted")
            await bus.until(500)
            await settle("worker kill")

            # 5. Redis stops and starts again empty on the same port while
            # the publishers keep publishing
            start()
            await bus.until(200)
            await asyncio.to_thread(redis.stop)
            await until(lambda: all(c.feed[-1:] == ["down"] for c in clients), 20,
                        what="feed down on every client")
            await bus.until(300)  # published while Redis is away: held
            await asyncio.to_thread(redis.start)
            await until(lambda: all(c.feed[-1:] == ["up"] for c in clients), 30,
                        what="feed up on every client")
            await until(lambda: pub.connected and ipub.connected, 20,
                        what="the publishers back")
            await bus.until(1000)
            await settle("redis restart")

            want = published()
            received = sum(c.received[s] for c in clients for s in c.syms)
            lost = sum(c.lost[s] for c in clients for s in c.syms)
            print(f"\ntrades e2e: {bus.published} trades onto the bus, {ingest.published} "
                  f"into /ingest (the publishers reconnected {pub.reconnects} and "
                  f"{ipub.reconnects} times), {received} trades received and {lost} "
                  f"counted lost by the clients ({[sum(c.lost.values()) for c in clients]}), "
                  f"{sum(want[s] for c in clients for s in c.syms)} checked, "
                  f"{sum(c.reconnects for c in clients)} reconnects "
                  f"({[c.reconnects for c in clients]}), {len(on_victim)} clients on the "
                  f"killed worker, lost per phase {phases}, {time.monotonic() - t0:.1f}s")
            for c in clients:
                for s in c.syms:
                    assert c.received[s] + c.lost[s] == want[s], (s, c.received[s], c.lost[s])
            assert all(c.errors == [] for c in clients), [c.errors[:3] for c in clients]
        finally:
            for c in clients:
                await c.stop()
