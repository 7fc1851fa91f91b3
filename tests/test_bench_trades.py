"""The bench's trades scenario counts what it says: its compiled load client
finds every gap in a `tseq` sequence (and the gateway's own `lost`), and a
tiny run of the scenario against fastfeed and a peer reports every figure,
with no loss for fastfeed.

Speed is not asserted here (bench/ measures it).
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from wsraw import server_frame

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client():
    """The compiled load client, built as bench/setup.sh builds it."""
    subprocess.run([sys.executable, "-m", "bench.loadgen.build"], cwd=ROOT, check=True,
                   capture_output=True)
    sys.path.insert(0, str(ROOT))
    try:
        from bench.loadgen import _client
        yield _client
    finally:
        sys.path.remove(str(ROOT))


def test_load_client_counts_gaps_and_gateway_lost(client):
    """Snapshot `recent`, then updates as fastfeed writes them (several
    trades per entry, a `lost` before `items[0]`) and as a peer does (one
    trade a message): gaps, stale trades and the unreceived tail counted."""
    n_instr, syms = 6, [1, 4]
    a, b = socket.socketpair()
    stats = client.Stats()
    conn = client.Conn(stats, b.fileno(), n_instr, syms, [])
    conn.use_trades()
    loop = client.Loop()
    loop.add(conn)
    now = time.time_ns()

    def items(*tseqs):
        return [[q, now, 100.5, 3.0, "b"] for q in tseqs]

    msgs = [
        {"type": "snapshot", "id": 1, "rows": [], "unknown": [],
         "trades": [{"sym": "S0001", "recent": items(1, 2)}, {"sym": "S0004", "recent": []}]},
        {"type": "update", "t": 1, "rows": [], "trades": [
            {"sym": "S0001", "items": items(3, 4)}, {"sym": "S0004", "items": items(1)}]},
        # the gateway dropped 5 and 6 from its ring and says so
        {"type": "update", "t": 2, "rows": [], "trades": [
            {"sym": "S0001", "lost": 2, "items": items(7)}]},
        # a peer's one message per trade, with a gap the server did not report
        {"type": "update", "t": 3, "rows": [], "trades": [{"sym": "S0004", "items": items(3)}]},
        {"type": "update", "t": 4, "rows": [], "trades": [{"sym": "S0004", "items": items(3)}]},
    ]
    for m in msgs:
        a.sendall(server_frame(json.dumps(m)))
    deadline = time.monotonic() + 20  # every byte is written: only reading is left
    while stats.updates + stats.stale_rows < 6 and time.monotonic() < deadline:
        loop.run(0.01)
    assert conn.got_snapshot and stats.snapshot_rows == 2
    assert stats.updates == 5 and stats.stale_rows == 1 and stats.unexpected_rows == 0
    assert stats.lost == 3 and conn.lost == 3          # 5, 6 of S0001 and 2 of S0004
    assert stats.gw_lost == 2 and conn.gw_lost == 2
    assert conn.last_tseq(1) == 7 and conn.last_tseq(4) == 3
    assert sum(stats.histogram().values()) == 5
    final = np.zeros(n_instr, np.int64)
    final[1], final[4] = 9, 3
    assert conn.trades_behind(final) == 2
    assert not conn.converged(final)                   # a gap: never complete

    # without a gap, complete once at the source's last tseq
    c2 = client.Conn(client.Stats(), b.fileno(), n_instr, [1], [])
    c2.use_trades()
    c2.feed(server_frame(json.dumps(msgs[0])) + server_frame(json.dumps(msgs[1])))
    final[1] = 4
    assert c2.lost == 0 and c2.converged(final)
    final[1] = 5
    assert not c2.converged(final) and c2.trades_behind(final) == 1
    a.close()
    conn.close()
    b.close()


def test_generated_trades_are_the_contracts(client):
    """The publisher's trades: contract trade objects the gateway accepts,
    `tseq` consecutive per instrument from 1."""
    from fastfeed._trades import check_trade

    table = [k % 7 for k in range(65536)]
    gen = client.TickGen(7, table, 3)
    got = json.loads(gen.trades(500, 123))
    assert all(check_trade(t) is None for t in got)
    by: dict[str, list[int]] = {}
    for t in got:
        by.setdefault(t["sym"], []).append(t["tseq"])
    assert all(q == list(range(1, len(q) + 1)) for q in by.values())
    assert gen.final_tseqs() == [len(by.get(f"S{i:04d}", ())) for i in range(7)]


def test_tiny_trades_scenario_reports_every_figure(client, tmp_path):
    """The scenario end to end, tiny: fastfeed and one peer, two rates."""
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "trades",
         "--servers", "fastfeed,py_websockets", "--json", "--no-pin", "--out", str(tmp_path),
         "--set", "trades.clients=20", "--set", "trades.subs=10",
         "--set", "trades.instruments=50", "--set", "trades.rates=[200,400]",
         "--set", "trades.warmup=0.5", "--set", "trades.measure=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)["scenarios"]["trades"]
    for server in ("fastfeed", "py_websockets"):
        out = res[server]
        assert "error" not in out and "skipped" not in out, (server, out)
        for k in ("trades_per_s", "p99_ms", "complete", "lost", "gw_lost", "behind_trades",
                  "server_us_per_trade", "load_cpu_max", "first_loss_rate", "ladder"):
            assert k in out, (server, k)
        assert out["ingest_errors"] == 0 and out["trades_per_s"] > 0
    ff = res["fastfeed"]
    assert set(ff["ladder"]) == {"200", "400"} and ff["first_loss_rate"] is None
    for x in ff["ladder"].values():
        assert x["lost"] == 0 and x["gw_lost"] == 0 and x["complete"] == x["clients"] == 20
    md = (tmp_path / "results.md").read_text()
    assert "## Trades" in md and "First rate with loss" in md
