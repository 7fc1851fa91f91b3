"""Where an idle /ws connection's memory goes: RSS and tracemalloc, per connection.

    python -m bench.idle_memory 2000               # RSS and the top allocation sites
    FASTFEED_BENCH_TRACE=0 python -m bench.idle_memory 5000    # RSS only (no tracing overhead)
    FASTFEED_BENCH_DEPTH=6 python -m bench.idle_memory 1000    # with call stacks

Runs a gateway in this process and opens N connections that subscribe to
nothing from a load-client process (bench.loadgen). tracemalloc inflates
RSS (it keeps a trace per block): compare RSS with tracing off.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tracemalloc

from bench.runner import Child


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def run(n: int, top: int) -> None:
    from fastfeed import config
    from fastfeed.gateway.app import Gateway

    p = argparse.ArgumentParser()
    config.add_arguments(p)
    cfg = config.from_sources(p.parse_args([
        "--host", "127.0.0.1", "--port", "0", "--simulate", "0", "--max-connections", "100000",
        "--max-connections-per-ip", "100000", "--log-level", "warning"]))
    gw = Gateway(cfg, asyncio.get_running_loop())
    await gw.start()
    await asyncio.sleep(0.5)
    gc.collect()
    r0 = rss()
    s0 = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    w = Child(["-m", "bench.loadgen.worker", json.dumps({
        "url": f"ws://127.0.0.1:{gw.port}/ws", "instruments": 1, "first": 0, "count": n,
        "subs": 0, "read_buffer": 1024})], None)
    ready = await asyncio.get_running_loop().run_in_executor(None, w.expect, "ready", 300)
    await asyncio.sleep(2)
    gc.collect()
    got = ready["connected"]
    print(f"{got} idle connections: RSS {(rss() - r0) / got:,.0f} B per connection")
    if s0 is not None:
        s1 = tracemalloc.take_snapshot()
        key = "traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno"
        for st in s1.compare_to(s0, key)[:top]:
            if st.size_diff > 0:
                print(f"{st.size_diff / got:8,.0f} B {st.count_diff / got:6.2f} blocks")
                for line in st.traceback.format():
                    print("        " + line.strip())
    w.close()
    await gw.stop()


def main() -> None:
    import uvloop

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    if os.environ.get("FASTFEED_BENCH_TRACE", "1") != "0":
        tracemalloc.start(int(os.environ.get("FASTFEED_BENCH_DEPTH", "1")))
    uvloop.run(run(n, 25))


if __name__ == "__main__":
    main()
