"""`python -m bench --quick` runs end to end against fastfeed.

A smoke test, as CI runs it: every scenario completes without an error and
writes its table and plots. The trades scenario has a tiny run of its own, with
a peer and a rate ladder, in tests/test_bench_trades.py, so it is left out here
rather than run twice. It asserts nothing about speed; the numbers of
a shared CI machine mean nothing (see bench/README.md for real runs).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_quick_bench_runs_every_scenario_for_fastfeed(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.loadgen.build"], cwd=ROOT, check=True,
                   capture_output=True)
    sys.path.insert(0, str(ROOT))
    try:
        from bench.__main__ import SCENARIOS
    finally:
        sys.path.remove(str(ROOT))
    assert set(SCENARIOS) == {"capacity", "throughput", "watched", "ingest", "spike",
                              "idle", "workers", "book", "trades"}
    others = [s for s in SCENARIOS if s != "trades"]
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", "--out", str(tmp_path),
                        "--scenarios", ",".join(others)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert list(res["scenarios"]) == others
    for name, by_server in res["scenarios"].items():
        out = by_server["fastfeed"]
        assert "error" not in out and "skipped" not in out, (name, out)
    assert res["scenarios"]["throughput"]["fastfeed"]["converged_share"] == 1.0
    assert res["scenarios"]["ingest"]["fastfeed"]["json_errors"] == 0
    runs = res["scenarios"]["workers"]["fastfeed"]["runs"]
    assert [(r["bus"], r["workers"]) for r in runs] == [("redis", 1), ("redis", 2)]
    assert all(r["converged_share"] == 1.0 for r in runs)
    book = res["scenarios"]["book"]["fastfeed"]
    assert book["converged"] == book["clients"] and book["ingest_errors"] == 0
    assert (tmp_path / "results.md").read_text().startswith("# bench results")
    assert (tmp_path / "capacity.png").exists() and (tmp_path / "latency_cdf.png").exists()


def test_the_workers_scenario_gives_workers_load_and_redis_cores_of_their_own():
    sys.path.insert(0, str(ROOT))
    try:
        from bench.__main__ import workers_layout
    finally:
        sys.path.remove(str(ROOT))
    pins, redis = workers_layout(8, 3, 0.5, list(range(16)))
    assert (pins.server, pins.load, redis) == ("0,1,2,3,4,5,6,7", "8,9,10,11", "12,13,14")
    pins, redis = workers_layout(1, 1, 1, [4, 5, 6])
    assert (pins.server, pins.load, redis) == ("4", "5", "6")
    # too few cores for all three apart: the run shares them (and says so)
    assert workers_layout(2, 1, 1, [0, 1]) is None


def test_compact_bytes_counts_every_subprotocol():
    r = subprocess.run([sys.executable, "-m", "bench.compact_bytes", "--instruments", "20",
                        "--rate", "5000", "--secs", "1", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {line.split()[0]: float(line.split()[1]) for line in r.stdout.splitlines()[1:]}
    assert set(got) == {"fastfeed.v1.json", "fastfeed.v1.bin", "fastfeed.v1.compact",
                        "fastfeed.v1.compact.bin"}
    assert all(v > 0 for v in got.values()), r.stdout
