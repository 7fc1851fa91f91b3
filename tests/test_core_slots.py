"""A hub fans out several kinds (slots) in one update frame per connection.

Slot 0 is the quote table; the tests add a second `Table` with key "rows" (as
a delayed copy of quotes would be) and a third with another key, standing in
for a second kind of state (books, trades, bars: their own `Kind`s). The
compiled hub must produce exactly the frames of the pure-Python reference,
share one encoded frame among connections in the same state, and keep each
slot's watch and conflation apart.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed.reference import RefHub, RefTable

SYMS = ["BBCA", "BBRI", "TLKM", "ASII", "GOTO"]
MS = 1_000_000
WALL0 = 1_700_000_000_000_000_000
KEYS = ["rows", "rows", "test"]  # slot -> key

tick = st.fixed_dictionaries(
    {"sym": st.sampled_from(SYMS), "seq": st.integers(0, 30)},
    optional={"bid": st.floats(-1e6, 1e9, allow_nan=False), "volume": st.integers(0, 99)})
slot = st.integers(0, 2)
op = st.one_of(
    st.tuples(st.just("ticks"), slot, st.lists(tick, min_size=1, max_size=5)),
    st.tuples(st.just("add"), st.sampled_from([0, 16 * MS]), st.booleans()),
    st.tuples(st.just("subscribe"), st.integers(0, 5), slot, st.sets(st.sampled_from(SYMS))),
    st.tuples(st.just("watch"), st.integers(0, 5), slot, st.sets(st.sampled_from(SYMS)),
              st.booleans()),
    st.tuples(st.just("pause"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("pump"), st.sampled_from([0, 5 * MS, 20 * MS])),
)


def _split(capture):
    out: dict[int, list[bytes]] = {}
    for cid, data in capture:
        out.setdefault(cid, []).append(data)
    return out


def three_slots():
    tables = [_core.Table(capacity=64, key=k) for k in KEYS]
    refs = [RefTable(key=k) for k in KEYS]
    hub, rhub = _core.Hub(tables[0]), RefHub(refs[0])
    for t, r in zip(tables[1:], refs[1:], strict=True):
        assert hub.add_kind(t) == rhub.add_kind(r)
    hub.capture = []
    return tables, refs, hub, rhub


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=60))
def test_multi_slot_frames_match_reference(ops):
    tables, refs, hub, rhub = three_slots()
    mono = 10_000 * MS
    cids: list[int] = []
    for o in ops:
        kind = o[0]
        if kind == "ticks":
            tables[o[1]].apply_objects(list(o[2]))
            for t in o[2]:
                refs[o[1]].apply(t)
        elif kind == "add":
            cid = hub.add(None, o[1], o[2], mono)
            assert cid == rhub.add(o[1], o[2], mono)
            cids.append(cid)
        elif not cids:
            continue
        elif kind == "subscribe":
            cid, s = cids[o[1] % len(cids)], o[2]
            ids = [tables[s].lookup(x) for x in o[3] if tables[s].lookup(x) >= 0]
            hub.subscribe_ids(cid, ids, s)
            rhub.subscribe_ids(cid, ids, s)
            assert hub.subscribed_ids(cid, s) == sorted(ids)
        elif kind == "watch":
            cid, s = cids[o[1] % len(cids)], o[2]
            c = rhub.conns[cid]
            ids = [tables[s].lookup(x) for x in o[3] if tables[s].lookup(x) in c.subs_by[s]]
            w = c.watched_by[s]
            ids = [i for i in ids if (i not in w) == o[4]]
            hub.watch_ids(cid, ids, o[4], s)
            rhub.watch_ids(cid, ids, o[4], s)
        elif kind == "pause":
            cid = cids[o[1] % len(cids)]
            (hub.pause if o[2] else hub.resume)(cid)
            (rhub.pause if o[2] else rhub.resume)(cid)
        elif kind == "pump":
            mono += o[1]
            hub.pump(wall=WALL0 + mono, mono=mono)
            rhub.pump(WALL0 + mono, mono)
            assert _split(hub.capture) == _split(rhub.capture)
    hub._check_invariants()


def _fill(tables):
    for k, t in enumerate(tables):
        for s in SYMS:
            t.apply_tick(s, 1, 1, bid=float(k))


def test_one_frame_holds_every_slot_and_is_shared():
    tables, _, hub, _ = three_slots()
    _fill(tables)
    cids = [hub.add(None, 0, False, 1) for _ in range(10)]
    for cid in cids:
        for s in range(3):
            hub.subscribe_ids(cid, [tables[s].lookup("BBCA")], s)
    assert hub.group_size(cids[0]) == 10
    tables[0].take_stats()
    for s in range(3):
        tables[s].apply_tick("BBCA", 2, 2, bid=10.0 + s)
    hub.pump(wall=5, mono=2)
    frames = {data for _, data in hub.capture}
    assert len(hub.capture) == 10 and len(frames) == 1
    stats = tables[0].take_stats()
    assert stats["frames_built"] == 1 and stats["frames"] == 10
    msg = json.loads(frames.pop())
    # slots sharing a key share one array; a second key gets its own
    assert list(msg) == ["type", "t", "rows", "test"]
    assert [r[3] for r in msg["rows"]] == [10.0, 11.0]
    assert [r[3] for r in msg["test"]] == [12.0]


def test_rows_always_present_other_keys_only_when_non_empty():
    tables, _, hub, _ = three_slots()
    _fill(tables)
    cid = hub.add(None, 0, False, 1)
    hub.subscribe_ids(cid, [0], 0)
    hub.subscribe_ids(cid, [0], 2)
    tables[2].apply_tick("BBCA", 3, bid=3.0)
    hub.pump(wall=7, mono=2)
    (_, data), = hub.capture
    assert data.startswith(b'{"type":"update","t":7,"rows":[],"test":[["BBCA",3,')
    hub.capture.clear()
    tables[0].apply_tick("BBCA", 3, bid=3.0)
    hub.pump(wall=8, mono=3)
    (_, data), = hub.capture
    assert data.startswith(b'{"type":"update","t":8,"rows":[["BBCA",3,') and b"test" not in data


def test_sent_version_is_kept_per_slot():
    # a connection behind on one slot gets only that slot's missed items,
    # conflated: the latest state once
    tables, _, hub, _ = three_slots()
    _fill(tables)
    a = hub.add(None, 0, False, 1)
    b = hub.add(None, 0, False, 1)
    for cid in (a, b):
        hub.subscribe_ids(cid, [0, 1], 0)
        hub.subscribe_ids(cid, [0, 1], 2)
    hub.pause(b)
    for seq in range(2, 6):
        tables[2].apply_tick("BBCA", seq, bid=float(seq))
        hub.pump(wall=seq, mono=seq)
    assert [cid for cid, _ in hub.capture] == [a] * 4
    hub.capture.clear()
    tables[0].apply_tick("BBRI", 9, bid=9.0)
    hub.resume(b)
    hub.pump(wall=10, mono=10)
    got = _split(hub.capture)
    assert json.loads(got[a][0])["rows"][0][:2] == ["BBRI", 9] and "test" not in json.loads(
        got[a][0])
    mb = json.loads(got[b][0])
    assert [r[:2] for r in mb["rows"]] == [["BBRI", 9]]
    assert [r[:2] for r in mb["test"]] == [["BBCA", 5]]
    # a and b now differ in state: two frames were built, not one shared
    assert got[a][0] != got[b][0]


def test_watch_is_per_slot():
    tables, _, hub, _ = three_slots()
    _fill(tables)
    cid = hub.add(None, 3_600_000 * MS, False, 1)
    for s in range(3):
        hub.subscribe_ids(cid, [0], s)
    hub.watch_ids(cid, [0], True, 2)
    tables[0].apply_tick("BBCA", 2, bid=1.0)  # not watched in slot 0: waits its interval
    hub.pump(wall=2, mono=2)
    assert hub.capture == []
    tables[2].apply_tick("BBCA", 2, bid=1.0)  # watched in slot 2: at once, with slot 0's
    hub.pump(wall=3, mono=3)
    (_, data), = hub.capture
    msg = json.loads(data)
    assert msg["rows"][0][:2] == ["BBCA", 2] and msg["test"][0][:2] == ["BBCA", 2]
    hub.watch_ids(cid, [0], False, 2)
    hub._check_invariants()
    with pytest.raises(ValueError):
        hub.watch_ids(cid, [99], True, 2)


def test_binary_connections_get_ffb1_and_json_for_the_other_kinds():
    tables, _, hub, _ = three_slots()
    _fill(tables)
    cid = hub.add(None, 0, True, 1)
    for s in range(3):
        hub.subscribe_ids(cid, [0], s)
    for s in range(3):
        tables[s].apply_tick("BBCA", 2, bid=20.0 + s)
    hub.pump(wall=11, mono=2)
    (c1, binf), (c2, text) = hub.capture
    assert c1 == c2 == cid
    assert binf[:4] == b"FFB1" and struct.unpack_from("<Iq", binf, 4) == (2, 11)
    rows = _core.ROW_DTYPE and [struct.unpack_from("<d", binf, 16 + 104 * k + 48)[0]
                                for k in range(2)]
    assert rows == [20.0, 21.0]
    assert json.loads(text) == {"type": "update", "t": 11, "rows": [],
                                "test": [json.loads(tables[2].rows_json([0]))]}
    # only quote rows pending: the FFB1 frame alone
    hub.capture.clear()
    tables[1].apply_tick("BBCA", 3, bid=1.0)
    hub.pump(wall=12, mono=3)
    (_, data), = hub.capture
    assert data[:4] == b"FFB1"


def test_subscribers_and_bad_ids():
    tables, _, hub, _ = three_slots()
    _fill(tables)
    a, b = hub.add(None, 0, False, 1), hub.add(None, 0, False, 1)
    hub.subscribe_ids(a, [1], 2)
    hub.subscribe_ids(b, [1, 2], 2)
    hub.subscribe_ids(b, [1], 0)
    assert sorted(hub.subscribers(2, 1)) == [a, b]
    assert hub.subscribers(0, 1) == [b] and hub.subscribers(2, 4) == []
    assert hub.subscribers(7, 1) == [] and hub.subscribers(2, 10**6) == []
    with pytest.raises(ValueError):
        hub.subscribe_ids(a, [-1])
    with pytest.raises(ValueError):
        hub.subscribe_ids(a, [1], 3)
    hub.subscribe_ids(b, [], 2)
    assert hub.subscribers(2, 2) == [] and hub.subscribed_ids(b, 0) == [1]


def test_an_id_past_the_table_does_not_crash_the_hub():
    # it used to write past the (still empty) reverse index
    table = _core.Table()
    table.apply_tick("A", 1)
    hub = _core.Hub(table)
    hub.capture = []
    cid = hub.add(None, 0, False, 1)
    try:
        hub.subscribe_ids(cid, [100_000])
    except AssertionError as e:  # the debug build checks at once
        assert _core.DEBUG and "unknown item 100000" in str(e)
    else:
        table.apply_tick("A", 2)
        hub.pump(wall=1, mono=1)
        assert hub.capture == []
    with pytest.raises(AssertionError, match="unknown item 100000"):
        hub._check_invariants()
    hub.subscribe_ids(cid, [])
    hub._check_invariants()


def test_a_kind_key_must_be_a_plain_name():
    hub = _core.Hub(_core.Table())
    with pytest.raises(ValueError):
        hub.add_kind(_core.Table(key='x"'))
    with pytest.raises(ValueError):
        hub.add_kind(hub.table)
