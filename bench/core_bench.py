"""Core micro-benchmark: ticks applied per second and frames built per second.

    python bench/core_bench.py            # human-readable
    python bench/core_bench.py --json     # for tooling
    python bench/core_bench.py --repeats 5

Every figure is the median of the repeats. Frames are built into the hub's
capture list (no sockets), so this measures the core alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fastfeed import _core
from fastfeed._tickjson import TickParser
from fastfeed.feed.simulator import Simulator


def ticks_json_objects(n_inst: int, n: int) -> list[dict]:
    sim = Simulator(n_inst, n * 100.0, seed=1)
    return sim.ticks(0.01)[:n]


def bench_apply_objects(ticks: list[dict]) -> float:
    t = _core.Table()
    for k, tk in enumerate(ticks):
        tk["seq"] = k + 1
    t0 = time.perf_counter()
    t.apply_objects(ticks)
    return len(ticks) / (time.perf_counter() - t0)


def bench_json_decode_and_apply(payload: bytes, count: int) -> float:
    t = _core.Table()
    t0 = time.perf_counter()
    t.apply_objects(json.loads(payload))
    return count / (time.perf_counter() - t0)


def bench_json_fast_path(payload: bytes, count: int) -> float:
    """What /ingest does with JSON: the C tick parser, then apply."""
    t, p = _core.Table(), TickParser()
    t0 = time.perf_counter()
    assert p.parse(payload) == count
    p.apply(t)
    return count / (time.perf_counter() - t0)


def bench_batch(batch: bytes, count: int) -> float:
    t = _core.Table()
    t0 = time.perf_counter()
    t.apply_batch(batch)
    return count / (time.perf_counter() - t0)


def bench_frames(clients: int, per_client: int, n_inst: int, share: bool) -> dict:
    """Frames built per second for `clients` clients x `per_client` instruments."""
    table = _core.Table()
    hub = _core.Hub(table)
    hub.capture = []
    rng = np.random.default_rng(7)
    for i in range(n_inst):
        table.apply_tick(f"S{i}", 1, 1, bid=1.0, ask=2.0)
    for _ in range(clients):
        cid = hub.add(None, 0, False, 1)
        ids = range(per_client) if share else rng.choice(n_inst, per_client, replace=False)
        hub.subscribe_ids(cid, ids)
    seq = 2
    built = sent = 0
    elapsed = 0.0
    for cycle in range(20):
        for i in range(n_inst):  # every instrument changes every cycle: the worst case
            table.apply_tick(f"S{i}", seq, seq, bid=1.0 + seq, ask=2.0 + seq)
        seq += 1
        hub.capture.clear()
        table.take_stats()
        t0 = time.perf_counter()
        hub.pump(wall=seq, mono=10 + cycle)
        elapsed += time.perf_counter() - t0
        s = table.take_stats()
        built += s["frames_built"]
        sent += s["frames"]
    return {"frames_per_s": sent / elapsed, "distinct_frames_per_s": built / elapsed,
            "rows_per_s": sent * per_client / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    n = 200_000
    ticks = ticks_json_objects(500, n)
    payload = json.dumps(ticks).encode()
    batch = _core.encode_batch(ticks)[0][0]
    runs: dict[str, list[float]] = {}
    for _ in range(a.repeats):
        for name, val in (
            ("ticks_per_s.apply_objects", bench_apply_objects([dict(t) for t in ticks])),
            ("ticks_per_s.json_decode_and_apply", bench_json_decode_and_apply(payload, n)),
            ("ticks_per_s.json_fast_path", bench_json_fast_path(payload, n)),
            ("ticks_per_s.binary_batch", bench_batch(batch, n)),
        ):
            runs.setdefault(name, []).append(val)
        for share in (False, True):
            r = bench_frames(1000, 50, 500, share)
            key = "shared" if share else "distinct"
            for k, v in r.items():
                runs.setdefault(f"frames_1000x50_{key}.{k}", []).append(v)
    out = {k: statistics.median(v) for k, v in runs.items()}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:55s} {v:>14,.0f}")


if __name__ == "__main__":
    main()
