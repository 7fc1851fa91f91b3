"""`python -m bench --quick` runs end to end against fastfeed.

A smoke test, as CI runs it: every scenario completes without an error and
writes its table and plots. It asserts nothing about speed; the numbers of
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
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert set(res["scenarios"]) == {"capacity", "throughput", "watched", "ingest", "spike",
                                     "idle", "workers", "book", "trades"}
    for name, by_server in res["scenarios"].items():
        out = by_server["fastfeed"]
        assert "error" not in out and "skipped" not in out, (name, out)
    assert res["scenarios"]["throughput"]["fastfeed"]["converged_share"] == 1.0
    assert res["scenarios"]["ingest"]["fastfeed"]["json_errors"] == 0
    book = res["scenarios"]["book"]["fastfeed"]
    assert book["converged"] == book["clients"] and book["ingest_errors"] == 0
    trades = res["scenarios"]["trades"]["fastfeed"]
    assert trades["complete"] == trades["clients"] and trades["lost"] == 0
    assert (tmp_path / "results.md").read_text().startswith("# bench results")
    assert (tmp_path / "capacity.png").exists() and (tmp_path / "latency_cdf.png").exists()
