"""Trades on the Redis bus against a real redis-server: every worker applies
the same trades, holds the same rings and the same bars; a late worker loads
the rings from Redis; a Redis that lost them gets them back."""

from __future__ import annotations

import json
import random

from redis_server import RedisServer
from support import until

from fastfeed._core import Bars, Table, Trades
from fastfeed.bus import RedisBus
from fastfeed.feed.sink import LocalSink
from fastfeed.reference import RefBars, RefTrades

S = 1_000_000_000
T0 = 1_772_384_400 * S




def worker(ring: int = 20, tz: str = "Asia/Jakarta"):
    table = Table()
    bars = Bars(table, history=50, tz=tz)
    trades = Trades(table, ring=ring, backlog=ring * 4, bars=bars)
    return LocalSink(table, lambda: None, trades=trades), trades, bars


def state(trades: Trades, bars: Bars) -> tuple[dict, dict]:
    t = trades.table
    rec = {t.symbol(i): trades.recent(i) for i in range(len(t))}
    bar = {(t.symbol(i), k): bars.bars_of(i * 6 + k) for i in range(len(t)) for k in range(6)}
    return rec, bar


def random_trades(rng: random.Random, syms: list[str], n: int, tseqs: dict[str, int]):
    out = []
    for _ in range(n):
        s = rng.choice(syms)
        tseqs[s] = tseqs.get(s, 0) + 1
        out.append({"type": "trade", "sym": s, "tseq": tseqs[s],
                    "ts": T0 + tseqs[s] * 7 * S + rng.randrange(-30 * S, 30 * S),
                    "price": round(rng.uniform(100, 200), 1), "size": float(rng.randrange(1, 9)),
                    "side": rng.choice("bs")})
        if rng.random() < 0.1:
            out.append(dict(out[-1]))  # a duplicate: stale
    # neighbours swapped, as a feed with two paths would: the lower tseq is stale
    for i in range(0, len(out) - 1, 4):
        if rng.random() < 0.3:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


async def test_every_worker_holds_the_same_trades_and_bars(redis, prefix):
    rng = random.Random(7)
    syms = [f"S{i}" for i in range(12)]
    tseqs: dict[str, int] = {}
    workers = [worker() for _ in range(2)]
    buses = [RedisBus(redis.url, channels=3, prefix=prefix, sink=w[0], trade_ring=20)
             for w in workers]
    for b in buses:
        await b.start()
        await b.wait_ready(5)
    ids: dict[str, int] = {}
    rbars = RefBars(ids, history=50, tz="Asia/Jakarta")
    ref = RefTrades(ids, ring=20, backlog=80, bars=rbars)
    async with RedisBus(redis.url, None, channels=3, prefix=prefix, subscribe=False,
                        trade_ring=20) as pub:
        await pub.wait_ready(5)
        for _ in range(10):
            batch = random_trades(rng, syms, 60, tseqs)
            assert await pub.publish_trades(batch) == []
            for t in batch:
                ref.apply(t)
        published = ref.version
        await until(lambda: all(w[1].version == published for w in workers))
        first = state(workers[0][1], workers[0][2])
        assert state(workers[1][1], workers[1][2]) == first
        # the trades are the reference's (one partition per symbol keeps their order)
        for sym, held in first[0].items():
            assert [json.loads(x) for x in held] == \
                [json.loads(e[2]) for e in ref.log[ids[sym]][-20:]], sym
        # a late worker loads the rings; its trades are the others'
        late = worker()
        async with RedisBus(redis.url, channels=3, prefix=prefix, sink=late[0],
                            trade_ring=20) as lb:
            await lb.wait_ready(5)
            assert state(late[1], late[2])[0] == first[0]
            assert lb.loaded_trades == sum(len(v) for v in first[0].values())
            # resuming from before its ring says how many it cannot give
            sym = syms[0]
            iid = late[1].table.lookup(sym)
            snap = json.loads(late[1].snapshot_json([iid], {iid: 1}))
            assert snap["lost"] == snap["recent"][0][0] - 2
    for b in buses:
        await b.close()


async def test_bad_trades_are_refused_before_redis(redis, prefix):
    async with RedisBus(redis.url, None, channels=2, prefix=prefix, subscribe=False) as pub:
        await pub.wait_ready(5)
        errs = await pub.publish_trades([
            {"sym": "A", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0},
            {"sym": "B", "tseq": 1, "ts": 1, "price": 1.0, "size": -1.0},
            {"sym": "C", "tseq": 1, "ts": 1, "price": float("nan"), "size": 1.0}])
        assert [(i, s) for i, s, _ in errs] == [(1, "B"), (2, "C")]


async def test_rings_come_back_after_redis_loses_them(prefix):
    with RedisServer() as r:
        w = worker()
        sub = RedisBus(r.url, channels=2, prefix=prefix, sink=w[0], trade_ring=20,
                       ping_interval=0.1, backoff_base=0.02, backoff_cap=0.1)
        await sub.start()
        await sub.wait_ready(5)
        await sub.publish_trades([{"sym": "K1", "tseq": 5, "ts": T0, "price": 1.0,
                                   "size": 2.0, "side": "b"}])
        await until(lambda: w[1].last_tseq(0) == 5)
        r.stop()
        r.start()  # no persistence: the rings are gone
        await until(lambda: sub.ready and sub.reseeded_trades == 1)
        late = worker()
        async with RedisBus(r.url, channels=2, prefix=prefix, sink=late[0],
                            trade_ring=20) as lb:
            await lb.wait_ready(5)
            assert late[1].recent(0) == w[1].recent(0)
        await sub.close()
