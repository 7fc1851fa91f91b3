"""One load-client process: `python -m bench.loadgen.worker '<json config>'`.

Opens `count` connections (global client indexes `first`..), each subscribing
to `subs` instruments of the universe (and watching `watch` of them when its
global index is below `watch_clients`), then takes line commands on stdin and
answers JSON lines on stdout:

    stats            counters and latency histograms of the window since the
                     last `stats` (then resets them), with this process's CPU time
    final [seqs...]  share of clients whose every subscribed instrument reached
                     the publisher's last seq (a JSON list, one per instrument)
    quit             close every connection and exit

The first line it prints is {"event": "ready", ...} once every client has its
snapshot (or the connect timeout passed).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time

import numpy as np
from picows import ws_connect

from bench.loadgen._client import Client, Stats


def choose(seed: int, gi: int, n_instr: int, subs: int, watch: int) -> tuple[list, list]:
    rnd = random.Random(seed * 1_000_003 + gi)
    picked = rnd.sample(range(n_instr), min(subs, n_instr))
    return picked, picked[:watch]


def sym(i: int) -> str:
    return f"S{i:04d}"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def run(cfg: dict) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    stats = Stats()
    n_instr = cfg["instruments"]
    clients: list[Client] = []
    failures: list[str] = []
    sem = asyncio.Semaphore(cfg.get("connect_concurrency", 100))
    url = cfg["url"]

    def factory_for(gi: int):
        subs, watch = choose(cfg.get("seed", 1), gi, n_instr, cfg.get("subs", 0), 0)
        if gi < cfg.get("watch_clients", 0):
            watch = subs[: cfg.get("watch", 0)]
        hello = []
        if subs:
            hello.append(json.dumps({"op": "subscribe", "id": 1,
                                     "symbols": [sym(i) for i in subs]}).encode())
        if watch:
            hello.append(json.dumps({"op": "watch", "id": 2,
                                     "symbols": [sym(i) for i in watch]}).encode())
        if cfg.get("configure"):
            hello.append(json.dumps({"op": "configure", "id": 3, **cfg["configure"]}).encode())
        return lambda: Client(stats, n_instr, subs, watch, hello)

    async def connect(gi: int) -> None:
        async with sem:
            last = None
            for _attempt in range(3):
                try:
                    _tr, cl = await ws_connect(factory_for(gi), url,
                                               read_buffer_init_size=cfg.get("read_buffer", 16384),
                                               websocket_handshake_timeout=20)
                    clients.append(cl)
                    return
                except Exception as exc:
                    last = exc
                    await asyncio.sleep(0.2)
            failures.append(repr(last))

    t0 = time.monotonic()
    first = cfg.get("first", 0)
    await asyncio.gather(*(connect(first + k) for k in range(cfg["count"])))
    deadline = time.monotonic() + cfg.get("snapshot_timeout", 20)
    while time.monotonic() < deadline and not all(c.got_snapshot for c in clients):
        await asyncio.sleep(0.05)
    emit({"event": "ready", "connected": len(clients), "failed": len(failures),
          "errors": failures[:3], "snapshots": sum(1 for c in clients if c.got_snapshot),
          "seconds": round(time.monotonic() - t0, 3)})

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stats.reset()
    w0, (u0, s0) = time.monotonic(), cpu()
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        cmd, _, arg = line.partition(" ")
        if cmd == "stats":
            w1, (u1, s1) = time.monotonic(), cpu()
            emit({"event": "stats", "wall": w1 - w0, "cpu_user": u1 - u0, "cpu_sys": s1 - s0,
                  "updates": stats.updates, "frames": stats.frames, "bytes": stats.bytes,
                  "watched_updates": stats.watched_updates, "stale_rows": stats.stale_rows,
                  "unexpected_rows": stats.unexpected_rows, "errors": stats.errors,
                  "bad_frames": stats.bad_frames, "max_lat_ms": stats.max_lat_ns / 1e6,
                  "connected": stats.connected, "disconnected": stats.disconnected,
                  "closed_by_server": stats.closed_by_server,
                  "close_codes": {str(k): v for k, v in stats.close_codes.items()},
                  "hist": stats.histogram(False), "whist": stats.histogram(True)})
            stats.reset()
            w0, u0, s0 = w1, u1, s1
        elif cmd == "final":
            final = np.asarray(json.loads(arg), dtype=np.int64)
            conv = sum(1 for c in clients if c.converged(final))
            behind = sum(c.behind(final) for c in clients)
            emit({"event": "final", "clients": cfg["count"], "converged": conv,
                  "behind_rows": int(behind), "disconnected": stats.disconnected})
        else:
            emit({"event": "error", "message": f"unknown command {cmd!r}"})
    for c in clients:
        c.close()
    await asyncio.sleep(0.2)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(cfg))
    else:
        uvloop.run(run(cfg))


if __name__ == "__main__":
    main()
