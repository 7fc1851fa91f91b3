"""The Redis bus: how many ticks/s one Redis takes, how many reach one worker,
and fan-out capacity with 1 vs 2 workers, in one run.

    python -m bench.bench_bus                 # starts its own redis-server
    python -m bench.bench_bus --redis redis://127.0.0.1:6379/0 --json

1. store+publish: ticks/s that `RedisPublisher` pushes through the
   only-if-newer script (EVALSHA per partition batch) with nobody listening,
   and Redis's own CPU seconds per million ticks (INFO cpu), which gives the
   ceiling of one Redis core: 1e6 / (CPU s per 1e6 ticks).
2. into one worker: the same flood with one subscribed `RedisBus` + `Table`
   in another process; ticks/s applied there.
3. fan-out: `fastfeed serve --workers 1` and `--workers 2` on the same Redis,
   the same load clients (bench.loadgen) and the same tick stream; rows and
   frames delivered per second, and the ratio 2/1.
4. trades: trades/s through the trade script (`fastfeed.bus.trades`), with
   the bars kept in Redis and, in the same run, with rings only (the script
   before bars were kept there), and Redis CPU per million trades of each.
   ``--trades-only`` runs just this part.

    python -m bench.bench_bus --trades-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

from tests.fixtures import Gateway, RedisServer, stop_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_ticks(n_syms: int, count: int, start_seq: int, prefix: str = "S") -> list[dict]:
    out = []
    for k in range(count):
        i = k % n_syms
        seq = start_seq + k // n_syms
        out.append({"sym": f"{prefix}{i:04d}", "seq": seq, "ts": time.time_ns(),
                    "bid": 100.0 + k % 7, "ask": 101.0 + k % 5, "last": 100.5,
                    "last_size": 100.0, "volume": float(k)})
    return out


async def redis_cpu(bus) -> float:
    info = (await bus.link.meta_conn().call("INFO", "cpu")).decode()
    vals = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(vals["used_cpu_user"]) + float(vals["used_cpu_sys"])


async def flood(url: str, prefix: str, seconds: float, batch: int, n_syms: int,
                channels: int) -> dict:
    from fastfeed.feed.publish import RedisPublisher

    pub = RedisPublisher(url, prefix=prefix, channels=channels, max_batch=batch)
    await pub.start()
    await pub.wait_ready(10)
    ticks = make_ticks(n_syms, batch, 1)
    per = batch // n_syms + 1  # seq advance per batch: every tick stays newer than the last
    c0 = await redis_cpu(pub.bus)
    t0 = time.perf_counter()
    sent = 0
    base = 1
    while time.perf_counter() - t0 < seconds:
        base += per
        for k, t in enumerate(ticks):
            t["seq"] = base + k // n_syms
        await pub.publish([dict(t) for t in ticks])
        sent += len(ticks)
    await pub.sync(60)
    dt = time.perf_counter() - t0
    cpu = await redis_cpu(pub.bus) - c0
    await pub.close()
    stale = pub.bus.publish_stale
    return {"ticks": sent, "seconds": dt, "ticks_per_s": sent / dt, "stale_at_store": stale,
            "redis_cpu_s": cpu, "redis_cpu_s_per_million": cpu / sent * 1e6,
            "redis_ceiling_ticks_per_s": sent / cpu if cpu else None}


async def trade_flood(url: str, prefix: str, seconds: float, batch: int, n_syms: int,
                      channels: int, keep_bars: bool) -> dict:
    """Trades through the trade script, nobody listening: each symbol trades
    every 0.5 s of market time, so its 1s bar closes every second trade (the
    dear case: the closed bar joins the stored older bars)."""
    from fastfeed.bus import RedisBus

    async with RedisBus(url, None, prefix=prefix, channels=channels) as pub:
        await pub.wait_ready(10)
        pub.trade_store.keep_bars = keep_bars
        t_base = 1_772_384_400 * 10**9
        tseq = 0
        c0 = await redis_cpu(pub)
        t0 = time.perf_counter()
        sent = 0
        while time.perf_counter() - t0 < seconds:
            trades = []
            for k in range(batch):
                if k % n_syms == 0:
                    tseq += 1
                trades.append({"sym": f"T{k % n_syms:04d}", "tseq": tseq,
                               "ts": t_base + tseq * 500_000_000 + k,
                               "price": 100.0 + (tseq + k) % 13, "size": 1.0 + k % 5,
                               "side": "b"})
            await pub.publish_trades(trades)
            sent += batch
        dt = time.perf_counter() - t0
        cpu = await redis_cpu(pub) - c0
    return {"trades": sent, "seconds": dt, "trades_per_s": sent / dt, "redis_cpu_s": cpu,
            "redis_cpu_s_per_million": cpu / sent * 1e6, "bars": keep_bars}


def trades_compare(url: str, prefix: str, seconds: float, batch: int, n_syms: int,
                   channels: int, rounds: int = 3) -> dict:
    """Rings only and rings with bars, alternating, each on a fresh prefix; the best round."""
    import uvloop

    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, keep in (("rings_only", False), ("with_bars", True)):
            got = uvloop.run(trade_flood(url, f"{prefix}{name}{r}", seconds, batch, n_syms,
                                         channels, keep))
            if name not in best or got["trades_per_s"] > best[name]["trades_per_s"]:
                best[name] = got
    best["cost"] = 1 - best["with_bars"]["trades_per_s"] / best["rings_only"]["trades_per_s"]
    return best


def _subscriber(url: str, prefix: str, channels: int, seconds: float, q) -> None:
    import uvloop

    from fastfeed._core import Table
    from fastfeed.bus import RedisBus

    async def main() -> None:
        table = Table()
        bus = RedisBus(url, table, prefix=prefix, channels=channels)
        await bus.start()
        await bus.wait_ready(10)
        q.put("ready")
        first = None
        last_n = 0
        t_last = time.perf_counter()
        end = time.perf_counter() + seconds + 30
        while time.perf_counter() < end:
            await asyncio.sleep(0.05)
            n = bus.ticks_applied + bus.ticks_stale
            if n and first is None:
                first = (time.perf_counter(), 0)
            if n != last_n:
                last_n, t_last = n, time.perf_counter()
            elif first is not None and time.perf_counter() - t_last > 1.0:
                break
        dt = t_last - first[0] if first else 0.0
        q.put({"ticks": last_n, "seconds": dt, "ticks_per_s": last_n / dt if dt else 0.0,
               "messages": bus.messages, "cpu_s": time.process_time()})
        await bus.close()

    uvloop.run(main())


def into_one_worker(url: str, prefix: str, seconds: float, batch: int, n_syms: int,
                    channels: int) -> dict:
    import uvloop

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_subscriber, args=(url, prefix, channels, seconds, q))
    p.start()
    assert q.get(timeout=20) == "ready"
    pub = uvloop.run(flood(url, prefix, seconds, batch, n_syms, channels))
    sub = q.get(timeout=120)
    p.join(10)
    return {"publisher": pub, "worker": sub}


def fanout(url: str, workers: int, clients: int, subs: int, n_syms: int, rate: float,
           seconds: float, channels: int, prefix: str) -> dict:
    import uvloop

    from fastfeed.feed.publish import RedisPublisher

    gw = Gateway(["--workers", str(workers), "--redis", url, "--redis-prefix", prefix,
                  "--redis-channels", str(channels)],
                 {"FASTFEED_LOG_LEVEL": "warning", "FASTFEED_DRAIN_S": "0.5"}, None)
    gw.start()
    lg = None
    try:
        gw.wait_ready_sync(30)
        time.sleep(1.0)  # every worker up

        async def seed() -> None:
            # the clients subscribe to known symbols only
            async with RedisPublisher(url, prefix=prefix, channels=channels) as pub:
                await pub.publish(make_ticks(n_syms, n_syms, 1))
                await pub.sync()

        uvloop.run(seed())
        time.sleep(0.5)
        cfg = {"url": gw.ws_url, "instruments": n_syms, "count": clients,
               "subs": subs, "seed": 7}
        lg = subprocess.Popen([sys.executable, "-m", "bench.loadgen.worker", json.dumps(cfg)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(lg.stdout.readline())

        async def publish() -> int:
            pub = RedisPublisher(url, prefix=prefix, channels=channels, max_batch=1000)
            await pub.start()
            await pub.wait_ready(10)
            sent = 0
            seq = 10
            t0 = time.perf_counter()
            step = 0.01
            while time.perf_counter() - t0 < seconds:
                want = int((time.perf_counter() - t0) * rate) - sent
                if want > 0:
                    seq += 1
                    ticks = make_ticks(n_syms, want, seq)
                    for k, t in enumerate(ticks):
                        t["seq"] = seq * 1000 + k // n_syms
                    seq += want // n_syms + 1
                    await pub.publish(ticks)
                    sent += want
                await asyncio.sleep(step)
            await pub.close()
            return sent

        lg.stdin.write("stats\n")
        lg.stdin.flush()
        json.loads(lg.stdout.readline())
        sent = uvloop.run(publish())
        time.sleep(0.5)
        lg.stdin.write("stats\n")
        lg.stdin.flush()
        st = json.loads(lg.stdout.readline())
        wall = st["wall"]
        return {"workers": workers, "clients": ready["connected"], "subs": subs,
                "ticks_sent": sent, "offered_ticks_per_s": rate,
                "rows_per_s": st["updates"] / wall, "frames_per_s": st["frames"] / wall,
                "max_latency_ms": st["max_lat_ms"], "disconnected": st["disconnected"],
                "loadgen_cpu_s": st["cpu_user"] + st["cpu_sys"]}
    finally:
        if lg is not None and lg.poll() is None:
            lg.stdin.write("quit\n")
            lg.stdin.flush()
            stop_process(lg, 0, timeout=10)  # signal 0: wait for it to quit, then SIGKILL
        stop_process(gw.proc, timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", default="", help="use this Redis (default: start one)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--symbols", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--clients", type=int, default=400)
    ap.add_argument("--subs", type=int, default=50)
    ap.add_argument("--rate", type=float, default=20000.0, help="fan-out tick rate")
    ap.add_argument("--trades-only", action="store_true",
                    help="only the trade script, with and without bars (part 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    server = None
    url = args.redis
    if not url:
        server = RedisServer()
        server.start()
        url = server.url
    run = f"bench{os.getpid()}"
    try:
        out: dict = {"cpus": len(os.sched_getaffinity(0)), "batch": args.batch,
                     "symbols": args.symbols, "channels": args.channels}
        out["trades"] = trades_compare(url, run + "t", min(args.seconds, 3.0), args.batch,
                                       args.symbols, args.channels)
        if args.trades_only:
            return _report_trades(out, args.json)
        out["store_publish"] = __import__("uvloop").run(
            flood(url, run + "a", args.seconds, args.batch, args.symbols, args.channels))
        out["into_one_worker"] = into_one_worker(url, run + "b", args.seconds, args.batch,
                                                 args.symbols, args.channels)
        f1 = fanout(url, 1, args.clients, args.subs, args.symbols, args.rate, args.seconds,
                    args.channels, run + "c")
        f2 = fanout(url, 2, args.clients, args.subs, args.symbols, args.rate, args.seconds,
                    args.channels, run + "d")
        out["fanout"] = {"1": f1, "2": f2,
                         "ratio_rows": f2["rows_per_s"] / f1["rows_per_s"]
                         if f1["rows_per_s"] else None}
    finally:
        if server is not None:
            server.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _report_trades(out, False)
    sp = out["store_publish"]
    ow = out["into_one_worker"]
    print(f"store+publish (no subscriber): {sp['ticks_per_s']:,.0f} ticks/s, batch {args.batch}; "
          f"Redis CPU {sp['redis_cpu_s_per_million']:.2f} s per million ticks "
          f"-> one Redis core tops out near {sp['redis_ceiling_ticks_per_s'] or 0:,.0f} ticks/s")
    print(f"into one worker: published {ow['publisher']['ticks_per_s']:,.0f} ticks/s, "
          f"applied {ow['worker']['ticks_per_s']:,.0f} ticks/s "
          f"({ow['worker']['messages']} messages)")
    for k in ("1", "2"):
        f = out["fanout"][k]
        print(f"fan-out, {k} worker(s): {f['clients']} clients x {f['subs']} symbols at "
              f"{f['offered_ticks_per_s']:,.0f} ticks/s: {f['rows_per_s']:,.0f} rows/s, "
              f"{f['frames_per_s']:,.0f} frames/s, max latency {f['max_latency_ms']:.1f} ms")
    if out["fanout"]["ratio_rows"]:
        print(f"fan-out ratio 2 workers / 1 worker: {out['fanout']['ratio_rows']:.2f}x")
    return 0


def _report_trades(out: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    t = out["trades"]
    for name in ("rings_only", "with_bars"):
        x = t[name]
        print(f"trades, {name.replace('_', ' ')}: {x['trades_per_s']:,.0f} trades/s, batch "
              f"{out['batch']} over {out['symbols']} symbols; Redis CPU "
              f"{x['redis_cpu_s_per_million']:.2f} s per million trades")
    print(f"keeping the bars in Redis costs {t['cost']:.0%} of the trade publish rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
