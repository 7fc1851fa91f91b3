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
    book = res["scenarios"]["book"]["fastfeed"]
    assert book["converged"] == book["clients"] and book["ingest_errors"] == 0
    assert (tmp_path / "results.md").read_text().startswith("# bench results")
    assert (tmp_path / "capacity.png").exists() and (tmp_path / "latency_cdf.png").exists()
