"""Bars on the Redis bus, against a real redis-server: a worker up all along,
workers and a gateway process started late (after more trades than the
trade ring holds), and a Redis that lost its state all hold the bars
computed here, in plain Python from the contract's definition, from the
trades that were published."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import websockets
from redis_server import RedisServer
from support import start_gateway, until

from fastfeed._core import Bars, Table, Trades, partition
from fastfeed.bus import BusConfigError, RedisBus
from fastfeed.feed.sink import LocalSink

pytestmark = pytest.mark.timeout(120)

S = 1_000_000_000
TZ = "Asia/Jakarta"  # UTC+7: its midnight is 17:00 UTC
MIDNIGHT = 1_772_384_400 * S  # 2026-03-02 00:00 in Jakarta
INTERVALS = ("1s", "1m", "5m", "15m", "1h", "1d")
RING = 8  # trades kept per instrument: far fewer than are published
HISTORY = 40  # bars kept per interval: fewer 1s bars than the trades make
SYMS = ["BBCA", "TLKM", "ASII", "BMRI"]


def starts(ts: int, zone: ZoneInfo) -> list[int]:
    """The bar of each interval holding `ts`: multiples of the interval since
    the epoch, and for 1d the local midnight."""
    out = [ts - ts % (s * S) for s in (1, 60, 300, 900, 3600)]
    d = datetime.fromtimestamp(ts // S, zone).date()
    out.append(int(datetime(d.year, d.month, d.day, tzinfo=zone).timestamp()) * S)
    return out


def contract_bars(published: list[dict], history: int = HISTORY,
                  tz: str = TZ) -> dict[tuple[str, int], list[list]]:
    """The bars of `published`, in the order published: a trade whose tseq is
    not above its symbol's last is stale; the others, in tseq order, fall in
    the bar holding their ts (open the first, close the last, high/low the
    extremes, volume the sum, count the trades); a trade older than every
    held bar takes none; the newest `history` bars are held."""
    zone = ZoneInfo(tz)
    last: dict[str, int] = {}
    bars: dict[tuple[str, int], list[list]] = {}
    for t in published:
        sym, p, size = t["sym"], t["price"], t["size"]
        if t["tseq"] <= last.get(sym, -1):
            continue
        last[sym] = t["tseq"]
        for k, start in enumerate(starts(t["ts"], zone)):
            held = bars.setdefault((sym, k), [])
            if held and start < held[0][0]:
                continue
            bar = next((b for b in held if b[0] == start), None)
            if bar is None:
                held.append([start, p, p, p, p, size, 1])
                held.sort(key=lambda b: b[0])
                del held[:-history]
            else:
                bar[2], bar[3], bar[4] = max(bar[2], p), min(bar[3], p), p
                bar[5] += size
                bar[6] += 1
    return bars


class Market:
    """Trades moving through time across 1s, 1m and the Jakarta midnight, with
    late ones (an earlier ts), very late ones (older than every held 1s bar),
    duplicates and swapped neighbours (stale)."""

    def __init__(self, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        self.tseq = dict.fromkeys(SYMS, 0)
        self.now = MIDNIGHT - 95 * S
        self.published: list[dict] = []

    def batch(self, n: int) -> list[dict]:
        rng, out = self.rng, []
        for _ in range(n):
            sym = rng.choice(SYMS)
            self.tseq[sym] += 1
            self.now += rng.randrange(50, 700) * 1_000_000
            ts = self.now
            r = rng.random()
            if r < 0.15:
                ts -= rng.randrange(1, 8) * S  # late: an earlier bar still held
            elif r < 0.18:
                ts -= 200 * S  # older than every held 1s bar: its 1m bar still takes it
            out.append({"type": "trade", "sym": sym, "tseq": self.tseq[sym], "ts": ts,
                        "price": round(rng.uniform(9000, 9300), 2),
                        "size": float(rng.randrange(1, 500)), "side": rng.choice("bs")})
            if rng.random() < 0.05:
                out.append(dict(out[-1]))  # a duplicate
        for i in range(0, len(out) - 1, 5):
            if rng.random() < 0.2:
                out[i], out[i + 1] = out[i + 1], out[i]
        return out

    async def publish(self, pub: RedisBus, batches: int, size: int = 40) -> None:
        for _ in range(batches):
            b = self.batch(size)
            assert await pub.publish_trades(b) == []
            self.published += b


def worker(tz: str = TZ, history: int = HISTORY):
    table = Table()
    bars = Bars(table, history=history, tz=tz)
    trades = Trades(table, ring=RING, backlog=RING * 4, bars=bars)
    return LocalSink(table, lambda: None, trades=trades), trades, bars


def bus(redis: RedisServer, prefix: str, w, **kw) -> RedisBus:
    return RedisBus(redis.url, channels=3, prefix=prefix, sink=w[0], trade_ring=RING, **kw)


def held(w) -> dict[tuple[str, int], list[list]]:
    t, bars = w[1].table, w[2]
    return {(t.symbol(i), k): bars.bars_of(i * 6 + k) for i in range(len(t)) for k in range(6)}


def ring_only(published: list[dict]) -> dict[tuple[str, int], list[list]]:
    """What a worker rebuilding its bars from the last RING trades would hold."""
    last: dict[str, list[dict]] = {}
    for t in published:
        got = last.setdefault(t["sym"], [])
        if not got or t["tseq"] > got[-1]["tseq"]:
            got.append(t)
    return contract_bars([t for got in last.values() for t in got[-RING:]])


async def snapshot_bars(url: str) -> dict[tuple[str, int], list[list]]:
    """A contract client's snapshot of every symbol on every bars channel."""
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": SYMS,
                                  "channels": [f"bars:{iv}" for iv in INTERVALS]}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if msg["type"] == "snapshot":
                return {(e["sym"], INTERVALS.index(e["interval"])): e["bars"]
                        for e in msg["bars"]}


async def snapshot_until(url: str, want: dict, tries: int = 100) -> dict:
    """A fresh client's snapshot, retaken until it is `want` (the gateway
    applies what is published a moment after the workers here): the last one."""
    for _ in range(tries):
        got = await snapshot_bars(url)
        if got == want:
            break
    return got


async def test_late_workers_and_a_late_gateway_hold_the_contracts_bars(redis, prefix):
    market = Market()
    early = worker()
    buses = [bus(redis, prefix, early)]
    await buses[0].start()
    await buses[0].wait_ready(10)
    async with RedisBus(redis.url, None, channels=3, prefix=prefix, subscribe=False,
                        trade_ring=RING) as pub:
        await pub.wait_ready(10)
        await market.publish(pub, 10)
        # a second worker starts while trades keep coming: batches that arrive
        # during its load wait, and only trades newer than the loaded bars count
        mid = worker()
        buses.append(bus(redis, prefix, mid))
        await asyncio.gather(market.publish(pub, 10), buses[1].start())
        await buses[1].wait_ready(10)
        await market.publish(pub, 10)
        published = market.published
        want = contract_bars(published)
        assert any(t["ts"] < MIDNIGHT for t in published) and published[-1]["ts"] > MIDNIGHT
        assert {len(want[(s, 5)]) for s in SYMS} == {2}  # both sides of the day boundary
        assert len(want[(SYMS[0], 0)]) == HISTORY  # the 1s bars outgrew the history
        # the ring alone would rebuild other bars: the store's bars are what matter
        assert ring_only(published) != want
        await until(lambda: held(early) == want and held(mid) == want,
                    what="the early and the mid-stream worker hold the contract's bars")
        # a worker started after everything: the bars from Redis, not from the ring
        late = worker()
        async with bus(redis, prefix, late) as lb:
            await lb.wait_ready(10)
            assert held(late) == want
            assert lb.loaded_bars == len(SYMS)
            late[2]._check()
        # and a gateway process started after everything: its clients' snapshot
        async with start_gateway("--redis", redis.url, "--redis-prefix", prefix,
                                 "--redis-channels", "3", "--trade-ring", str(RING),
                                 "--bars-history", str(HISTORY), "--bars-tz", TZ) as gw:
            assert await snapshot_until(gw.ws_url, want) == want
            # it stays equal as trades keep coming, as every worker does
            await market.publish(pub, 3)
            want = contract_bars(market.published)
            await until(lambda: held(early) == want and held(mid) == want,
                        what="workers follow the new trades")
            assert await snapshot_until(gw.ws_url, want) == want
    for b in buses:
        await b.close()
    early[2]._check()
    mid[2]._check()


async def test_trades_that_arrive_while_a_worker_loads_wait_for_the_load(redis, prefix):
    """The window a late worker must close: trades published after its read of
    the store, delivered before it has applied what it read. They are newer
    than the bars it loads, so they must go onto those bars, not before them."""
    market = Market(3)
    async with RedisBus(redis.url, None, channels=3, prefix=prefix, subscribe=False,
                        trade_ring=RING, bars_tz=TZ, bars_history=HISTORY) as pub:
        await pub.wait_ready(10)
        await market.publish(pub, 8)
        w = worker()
        b = bus(redis, prefix, w)
        real = b.link.key_conn
        forced: list[int] = []

        class AfterRead:
            """A command connection that, once the store has been read, publishes
            a batch and lets the worker receive it before it sees the reply."""

            def __init__(self, conn) -> None:
                self.conn = conn

            async def call(self, *args, **kw):
                reply = await self.conn.call(*args, **kw)
                if args[0] == "EVAL" and not forced:
                    seen = b.messages
                    batch = market.batch(40)
                    assert await pub.publish_trades(batch) == []
                    market.published += batch
                    parts = {partition(t["sym"], 3) for t in batch}
                    forced.append(len(parts))
                    await until(lambda: b.messages >= seen + len(parts),
                                what="the batch delivered during the load")
                return reply

        b.link.key_conn = lambda n: AfterRead(real(n))
        await b.start()
        await b.wait_ready(10)
        assert forced
        want = contract_bars(market.published)
        await until(lambda: held(w) == want, what="the late worker holds the contract's bars")
        await b.close()


async def test_bars_come_back_after_redis_loses_them(prefix):
    market = Market(5)
    with RedisServer() as r:
        w = worker()
        sub = bus(r, prefix, w, ping_interval=0.1, backoff_base=0.02, backoff_cap=0.1)
        await sub.start()
        await sub.wait_ready(10)
        await market.publish(sub, 8)
        want = contract_bars(market.published)
        await until(lambda: held(w) == want, what="the worker holds the bars")
        r.stop()
        r.start()  # no persistence: rings, bars and meta are gone
        await until(lambda: sub.ready and sub.reseeded_trades > 0, what="the rings written back")
        late = worker()
        async with bus(r, prefix, late) as lb:
            await lb.wait_ready(10)
            assert held(late) == want
        await sub.close()


async def test_every_process_on_a_prefix_keeps_the_same_bars(redis, prefix):
    a = worker()
    async with bus(redis, prefix, a) as ab:
        await ab.wait_ready(10)
        # a publisher adopts the prefix's zone: the day starts at Jakarta's midnight
        async with RedisBus(redis.url, None, channels=3, prefix=prefix, subscribe=False) as pub:
            await pub.wait_ready(10)
            assert pub.trade_store.clock.tz == TZ
    # one that publishes trades before any gateway connected sets the defaults
    async with RedisBus(redis.url, None, channels=3, prefix=prefix + "x",
                        subscribe=False) as first:
        await first.wait_ready(10)
        assert first.trade_store.clock is None
        assert await first.publish_trades(Market().batch(3)) == []
        assert first.trade_store.clock.tz == "UTC"
        # a worker of another zone or history would make other bars: refused
        for other, flag in ((worker(tz="UTC"), "--bars-tz UTC"),
                            (worker(history=HISTORY + 1), f"--bars-history {HISTORY + 1}")):
            b = bus(redis, prefix, other, backoff_base=0.05, backoff_cap=0.1)
            await b.start()
            await until(lambda b=b: "keeps bars" in b.link.last_error, timeout=10,
                        what="the refusal")
            assert flag in b.link.last_error
            with pytest.raises(asyncio.TimeoutError):
                await b.wait_ready(0.3)
            await b.close()
    assert BusConfigError  # what the link met (it retries, and says why)
