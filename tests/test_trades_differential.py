"""The compiled trade and bar kinds produce exactly the bytes of the reference.

Random trades (new, stale, late, malformed, across bar and day boundaries)
go to `fastfeed._core.Trades`/`Bars` and to `fastfeed.reference`'s models;
after every step the update sections for every past `since` (what a
connection whose last frame was then would get), the tape and the snapshots
(with and without `since_trades`) must be byte-identical. Small rings and
backlogs make the overflow into `lost`, and past the backlog, common.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed.reference import RefBars, RefTrades

SYMS = ["BBCA", "TLKM", "GOTO"]
S = 1_000_000_000
# midnight of 2026-03-02 in Asia/Jakarta (UTC+7), i.e. 17:00 UTC the day before
JKT_MIDNIGHT = 1_772_384_400 * S
OFFSETS = [0, 1, S - 1, S, 59 * S, 60 * S - 1, 60 * S, 300 * S, 899 * S, 900 * S,
           3599 * S, 3600 * S, 7 * 3600 * S, 17 * 3600 * S, 86_399 * S, 86_400 * S,
           86_400 * S + 1, 3 * 86_400 * S]

trade = st.fixed_dictionaries({
    "sym": st.sampled_from([*SYMS, "bad sym"]),
    "tseq": st.integers(0, 40),
    "ts": st.builds(lambda o, sign: JKT_MIDNIGHT + sign * o, st.sampled_from(OFFSETS),
                    st.sampled_from([1, -1])),
    "price": st.one_of(st.floats(1, 1e5, allow_nan=False), st.integers(1, 9999),
                       st.just(math.nan), st.just(math.inf)),
    "size": st.one_of(st.floats(0, 1e6, allow_nan=False), st.just(-1.0), st.integers(0, 500)),
    "side": st.sampled_from(["b", "s", "", "x"]),
})
config = st.tuples(st.integers(1, 4), st.integers(0, 6), st.integers(1, 5), st.integers(1, 4),
                   st.sampled_from(["UTC", "Asia/Jakarta", "America/New_York"]))


def _build(ring, extra, tape_ring, history, tz):
    table = _core.Table(capacity=64)
    bars = _core.Bars(table, history=history, tz=tz)
    trades = _core.Trades(table, ring=ring, backlog=ring + extra, tape_ring=tape_ring, bars=bars)
    ids: dict[str, int] = {}
    rbars = RefBars(ids, history=history, tz=tz)
    rtrades = RefTrades(ids, ring=ring, backlog=ring + extra, tape_ring=tape_ring, bars=rbars)
    return table, trades, bars, rtrades, rbars


def _compare(table, trades, bars, rtrades, rbars):
    ids = list(range(len(table)))
    items = [i * 6 + k for i in ids for k in range(6)]
    assert trades.version == rtrades.version
    assert bars.version == rbars.version
    trades._check()
    bars._check()
    for since in range(trades.version + 1):
        assert trades._encode_section_py(ids, since) == rtrades.section(ids, since), since
        assert trades.tape._encode_section_py([0], since) == rtrades.tape_section(since), since
    for since in range(bars.version + 1):
        assert bars._encode_section_py(items, since) == rbars.section(items, since), since
    assert trades.snapshot_json(ids) == rtrades.snapshot(ids)
    for upto in range(trades.version + 1):
        assert trades.snapshot_json(ids, None, upto) == rtrades.snapshot(ids, None, upto), upto
    for since in range(-1, 42, 3):
        st_ = {i: since for i in ids}
        assert trades.snapshot_json(ids, st_) == rtrades.snapshot(ids, st_), since
    assert bars.snapshot_json(items) == rbars.snapshot(items)
    # what goes out is JSON a client can read
    if ids:
        json.loads(b"[" + trades._encode_section_py(ids, 0) + b"]")
        json.loads(b"[" + bars.snapshot_json(items) + b"]")
        json.loads(b"[" + trades.tape.snapshot_json() + b"]")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config, st.lists(st.lists(trade, min_size=1, max_size=8), min_size=1, max_size=12))
# a ring of 1 and a backlog of 1: every pending trade but the newest is lost, counted
@example((1, 0, 1, 1, "UTC"), [[{"sym": "BBCA", "tseq": t, "ts": JKT_MIDNIGHT + t * S,
                                 "price": 1.0, "size": 1.0, "side": "b"}
                                for t in range(5)]])
def test_trades_and_bars_match_reference(cfg, batches):
    table, trades, bars, rtrades, rbars = _build(*cfg)
    for batch in batches:
        applied, stale, errors = trades.apply_objects(batch)
        outcomes = [rtrades.apply(t) for t in batch]
        assert (applied, stale, len(errors)) == (outcomes.count(0), outcomes.count(1),
                                                 outcomes.count(2))
        _compare(table, trades, bars, rtrades, rbars)


def test_binary_batch_applies_like_json():
    rows = [{"sym": "BBCA", "tseq": 1, "ts": JKT_MIDNIGHT, "price": 9125.0, "size": 500.0,
             "side": "b"},
            {"sym": "BBCA", "tseq": 1, "ts": JKT_MIDNIGHT, "price": 9125.0, "size": 5.0},
            {"sym": "TLKM", "tseq": 7, "ts": JKT_MIDNIGHT + S, "price": 3000, "size": 1,
             "side": "s"},
            {"sym": "TLKM", "tseq": 8, "ts": 1, "price": 1.0, "size": -1.0}]
    data, errors = _core.encode_trade_batch(rows)
    assert [e[0] for e in errors] == [3]
    assert data[:4] == _core.TRADE_BATCH_MAGIC
    a, b = _build(100, 900, 100, 200, "UTC"), _build(100, 900, 100, 200, "UTC")
    assert a[1].apply_batch(data) == (2, 1, 0)
    assert b[1].apply_objects(rows[:3]) == (2, 1, [])
    assert a[1].snapshot_json([0, 1]) == b[1].snapshot_json([0, 1])
    assert a[2].snapshot_json(range(12)) == b[2].snapshot_json(range(12))
    assert _core.decode_trade_batch(data)[2] == {"type": "trade", **rows[2], "price": 3000.0,
                                                 "size": 1.0}
    for bad in (b"", b"FTR1", data[:-1], b"FFT1" + data[4:]):
        try:
            a[1].apply_batch(bad)
        except ValueError as e:
            assert "trade batch" in str(e)
        else:
            raise AssertionError(f"{bad!r} was taken as a trade batch")


def test_refusals_name_the_problem():
    _, trades, *_ = _build(100, 900, 100, 200, "UTC")
    base = {"sym": "BBCA", "tseq": 1, "ts": 1, "price": 1.0, "size": 1.0, "side": "b"}
    bad = [dict(base, size=-5.0), dict(base, price=math.nan), dict(base, size=math.inf),
           dict(base, side="buy"), dict(base, tseq=-1), dict(base, sym="no spaces"),
           {k: v for k, v in base.items() if k != "ts"}, [1, 2]]
    applied, stale, errors = trades.apply_objects([*bad, base])
    assert (applied, stale) == (1, 0)
    assert [e[0] for e in errors] == list(range(len(bad)))
    assert "negative" in errors[0][2] and "NaN" in errors[1][2] and "side" in errors[3][2]
    assert trades.apply_objects([base]) == (0, 1, [])  # not above the held tseq: stale
    assert trades.take_stats()["trades"] == {("ingest", "applied"): 1, ("ingest", "stale"): 1,
                                             ("ingest", "rejected"): len(bad)}


def test_daily_bars_start_at_midnight_in_the_zone():
    table = _core.Table()
    utc, jkt = _core.Bars(table, tz="UTC"), _core.Bars(table, tz="Asia/Jakarta")
    iid = table.intern_symbol("BBCA")
    for b in (utc, jkt):
        b.add_trade(iid, JKT_MIDNIGHT - 1, 10.0, 1.0)  # 23:59:59.999999999 in Jakarta
        b.add_trade(iid, JKT_MIDNIGHT, 11.0, 2.0)
    assert [x[0] for x in jkt.bars_of(iid * 6 + 5)] == [JKT_MIDNIGHT - 86_400 * S, JKT_MIDNIGHT]
    assert [x[0] for x in utc.bars_of(iid * 6 + 5)] == [JKT_MIDNIGHT - 17 * 3600 * S]
    assert utc.bars_of(iid * 6 + 5)[0][1:] == [10.0, 11.0, 10.0, 11.0, 3.0, 2]


def test_seeded_ring_resumes_with_lost():
    table = _core.Table()
    trades = _core.Trades(table, ring=3, backlog=3)
    assert trades.seed("BBCA", [[10, 1, 1.0, 1.0, "b"], [11, 2, 1.0, 1.0, "s"]]) == 2
    snap = json.loads(trades.snapshot_json([0], {0: 5}))
    assert snap == {"sym": "BBCA", "lost": 4, "recent": [[10, 1, 1.0, 1.0, "b"],
                                                         [11, 2, 1.0, 1.0, "s"]]}
    assert json.loads(trades.snapshot_json([0], {0: 10}))["recent"] == [[11, 2, 1.0, 1.0, "s"]]


def test_a_symbol_added_to_a_connection_s_trades_gets_each_trade_once():
    """A connection already on BBCA's trades adds TLKM while TLKM's trades
    wait for its next frame: the snapshot, cut where that frame starts
    (`Hub.sent_version`), and the frame together hold each trade once."""
    table = _core.Table(capacity=64)
    trades = _core.Trades(table, ring=50, backlog=100)
    hub = _core.Hub(table)
    slot = hub.add_kind(trades)
    hub.capture = []
    cid = hub.add(None, 0, False, 1)
    for sym in ("BBCA", "TLKM"):
        trades.apply_trade(sym, 1, 1, 100.0, 1.0)
    bbca, tlkm = table.lookup("BBCA"), table.lookup("TLKM")
    hub.subscribe_ids(cid, [bbca], slot)
    hub.pump(wall=1, mono=2)
    for tseq in range(2, 6):
        trades.apply_trade("TLKM", tseq, tseq, 100.0, 1.0)
    trades.apply_trade("BBCA", 2, 2, 100.0, 1.0)
    hub.subscribe_ids(cid, [bbca, tlkm], slot)
    snap = json.loads(b"[" + trades.snapshot_json([tlkm], {}, hub.sent_version(cid, slot)) + b"]")
    hub.capture.clear()
    hub.pump(wall=2, mono=30_000_000)
    got = [t[0] for t in snap[0]["recent"]]
    for _, data in hub.capture:
        for e in json.loads(data).get("trades", []):
            if e["sym"] == "TLKM":
                got += [t[0] for t in e["items"]]
    assert got == [1, 2, 3, 4, 5]


def test_a_loaded_ring_past_a_gap_counts_the_missing_trades_as_lost():
    """A worker that reconnects to a store whose ring moved past what it
    holds (trades published before it subscribed again) loads trades with a
    jump in `tseq`: a connection that has not had the ones between gets them
    in its update's `lost`, not a silent jump inside `items`."""
    table = _core.Table()
    trades = _core.Trades(table, ring=4, backlog=16)

    def batch(tseqs: range) -> bytes:
        return _core.encode_trade_batch([{"sym": "BBCA", "tseq": t, "ts": t, "price": 1.0,
                                          "size": 1.0, "side": "b"} for t in tseqs])[0]

    trades.apply_batch(batch(range(1, 4)))
    had_2, had_3 = trades.version - 1, trades.version  # two connections' last frames
    trades.apply_batch(batch(range(8, 11)), seed=True)  # 4..7 never came here
    trades._check()

    def update(since: int) -> dict:
        return json.loads(trades._encode_section_py([0], since))

    items = [[t, t, 1.0, 1.0, "b"] for t in range(8, 11)]
    assert update(had_3) == {"sym": "BBCA", "lost": 4, "items": items}
    # trade 3 is held but the entry cannot skip 4..7 inside its items: it is lost too
    assert update(had_2) == {"sym": "BBCA", "lost": 5, "items": items}
    assert [json.loads(t)[0] for t in trades.recent(0)] == [8, 9, 10]
    assert json.loads(trades.snapshot_json([0], {0: 3})) == {"sym": "BBCA", "lost": 4,
                                                             "recent": items}
    trades.apply_batch(batch(range(11, 13)))
    assert [json.loads(t)[0] for t in trades.recent(0)] == [9, 10, 11, 12]
    trades._check()
