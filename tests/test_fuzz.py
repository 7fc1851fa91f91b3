"""Coverage-guided fuzzing (atheris) of what clients and publishers send, for a bounded time.

Each target (tests/fuzz/fuzz_*.py) runs as its own process, from its committed
seed corpus, for FUZZ_SECONDS (default 10) each: a finding (an exception
escaping a handler, the two /ingest parsers disagreeing, a reply that is not
strict JSON, a crash) fails the test with the fuzzer's report and the input.
Longer runs by hand: see "Fuzzing" in README.md.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent / "fuzz"
SECONDS = int(os.environ.get("FUZZ_SECONDS", "10"))


@pytest.mark.timeout(SECONDS + 90)
@pytest.mark.parametrize("target", ["requests", "ingest", "framing", "wire"])
def test_fuzz_target_finds_nothing(target, tmp_path):
    seeds = FUZZ / "corpus" / target
    assert len(list(seeds.iterdir())) >= 5, "the seed corpus is missing"
    out = tmp_path / "corpus"  # new inputs go here, not into the committed seeds
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FUZZ_KEEP_GOING"}
    r = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-max_total_time={SECONDS}",
         "-max_len=8192", "-timeout=10", "-rss_limit_mb=1024", f"-dict={FUZZ / 'json.dict'}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(out), str(seeds)],
        capture_output=True, text=True, env=env, timeout=SECONDS + 80)
    log = r.stdout + r.stderr
    lines = [ln for ln in log.splitlines() if not ln.startswith("INFO: Instrumenting")]
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(
        ("crash-", "timeout-", "oom-", "leak-")))
    assert r.returncode == 0 and not found, (
        f"fuzz_{target} found something ({found}):\n" + "\n".join(lines[-60:]))
    assert "Done" in log, "\n".join(lines[-30:])  # it ran to its time limit
