"""The compiled core produces exactly the frames of the pure-Python reference.

Random sequences of ticks (new, stale, NaN, partial), subscriptions, watches,
pauses and frame clocks go to both; every connection must receive the same
bytes in the same order, and the tables must end equal.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed.reference import RefHub, RefTable

SYMS = ["BBCA", "BBRI", "TLKM", "ASII", "GOTO", "X.1", "A:B/c"]
MS = 1_000_000
WALL0 = 1_700_000_000_000_000_000

price = st.one_of(
    st.floats(min_value=-1e6, max_value=1e9, allow_nan=False, allow_infinity=False),
    st.just(math.nan), st.just(math.inf), st.integers(-5, 10_000),
    # short decimals (the compact binary form's integer tokens), and its edges
    st.builds(lambda m, k: m / 10**k, st.integers(-10**9, 10**12), st.integers(0, 6)),
    st.builds(lambda m, e: float(m * 10**e), st.integers(-10**6, 10**6), st.integers(1, 6)),
    st.sampled_from([-0.0, 2.0**48, 2.0**48 - 1, 281474976710655.5, 1e-15, 5e-324]))
tick = st.fixed_dictionaries(
    {"sym": st.sampled_from([*SYMS, "bad sym", ""]), "seq": st.integers(0, 30)},
    optional={"ts": st.integers(0, 2**62), "bid": price, "ask": price, "last": price,
              "volume": price},
)
op = st.one_of(
    st.tuples(st.just("ticks"), st.lists(tick, min_size=1, max_size=6)),
    # add: interval, binary, compact (both: compact binary, FFC1)
    st.tuples(st.just("add"), st.sampled_from([0, 16 * MS, 3_600_000 * MS]), st.booleans(),
              st.booleans()),
    st.tuples(st.just("subscribe"), st.integers(0, 7), st.sets(st.sampled_from(SYMS))),
    st.tuples(st.just("watch"), st.integers(0, 7), st.sets(st.sampled_from(SYMS)), st.booleans()),
    st.tuples(st.just("pause"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("pump"), st.sampled_from([0, 5 * MS, 20 * MS])),
)


def _split(capture):
    out: dict[int, list[bytes]] = {}
    for cid, data in capture:
        out.setdefault(cid, []).append(data)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=60))
# found by this test: a resumed client with no subscription kept its old
# version, so instruments changed before it subscribed came in its next frame
@example([("add", 0, False), ("add", 0, False), ("pause", 5, True),
          ("ticks", [{"sym": "GOTO", "seq": 0}]), ("add", 0, True), ("add", 0, False),
          ("pause", 5, False), ("pump", 0), ("ticks", [{"sym": "BBCA", "seq": 0}]),
          ("subscribe", 1, {"GOTO", "BBCA"}), ("pump", 0)])
def test_frames_match_reference(ops):
    table, ref = _core.Table(capacity=64), RefTable()
    hub, rhub = _core.Hub(table), RefHub(ref)
    hub.capture = []
    mono = 10_000 * MS
    cids: list[int] = []
    for o in ops:
        kind = o[0]
        if kind == "ticks":
            applied, stale, errors = table.apply_objects(list(o[1]))
            outcomes = [ref.apply(t) for t in o[1]]
            assert (applied, stale, len(errors)) == (
                outcomes.count(0), outcomes.count(1), outcomes.count(2))
        elif kind == "add":
            compact = len(o) > 3 and o[3]
            cid = hub.add(None, o[1], o[2], mono, compact=compact)
            assert cid == rhub.add(o[1], o[2], mono, compact)
            cids.append(cid)
        elif not cids:
            continue
        elif kind == "subscribe":
            cid = cids[o[1] % len(cids)]
            ids = [table.lookup(s) for s in o[2] if table.lookup(s) >= 0]
            assert sorted(ids) == sorted(ref.lookup(s) for s in o[2] if ref.lookup(s) >= 0)
            hub.subscribe_ids(cid, ids)
            rhub.subscribe_ids(cid, ids)
        elif kind == "watch":
            cid = cids[o[1] % len(cids)]
            subs = rhub.conns[cid].subs
            ids = [table.lookup(s) for s in o[2] if table.lookup(s) in subs]
            if o[3]:
                ids = [i for i in ids if i not in rhub.conns[cid].watched]
            else:
                ids = [i for i in ids if i in rhub.conns[cid].watched]
            hub.watch_ids(cid, ids, o[3])
            rhub.watch_ids(cid, ids, o[3])
        elif kind == "pause":
            cid = cids[o[1] % len(cids)]
            (hub.pause if o[2] else hub.resume)(cid)
            (rhub.pause if o[2] else rhub.resume)(cid)
        elif kind == "pump":
            mono += o[1]
            wall = WALL0 + mono
            hub.pump(wall=wall, mono=mono)
            rhub.pump(wall, mono)
            assert _split(hub.capture) == _split(rhub.capture)
    assert table.version == ref.version
    # the frame clock slices shorter while anything is watched (gateway/clock.py)
    assert hub.watches == sum(len(w) for c in rhub.conns.values() for w in c.watched_by)
    for iid in range(len(table)):
        assert table.row(iid) == ref.rows[iid]
        assert table.rows_json([iid]) == ref.row_json(iid)


def test_identical_subscriptions_share_one_encoded_frame():
    table = _core.Table()
    hub = _core.Hub(table)
    hub.capture = []
    for s in SYMS:
        table.apply_tick(s, 1, 1, bid=1.0)
    ids = [table.lookup(s) for s in SYMS[:3]]
    cids = [hub.add(None, 0, False, 1) for _ in range(100)]
    for cid in cids:
        hub.subscribe_ids(cid, ids)
    table.take_stats()
    table.apply_tick("BBCA", 2, 2, bid=2.0)
    hub.pump(wall=5, mono=2)
    stats = table.take_stats()
    assert stats["frames"] == 100
    assert stats["frames_built"] == 1
    assert stats["rows_encoded"] == 1
    assert len({data for _, data in hub.capture}) == 1
    assert hub.group_size(cids[0]) == 100


def test_any_initial_capacity_holds_many_symbols():
    table = _core.Table(capacity=3000)  # not a power of two
    for k in range(10_000):
        assert table.intern_symbol(f"S{k}") == k
    assert table.lookup("S9999") == 9999 and table.lookup("nope") == -1
