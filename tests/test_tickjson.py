"""The JSON fast path applies exactly what the gateway's strict decoder
(orjson, as /ingest's fallback uses it) + apply_objects would.

For any message, either the fast parser takes it and the table ends in the
same state (same rows, same counters) as after the slow path, or it declines
(-1) and the slow path decides. It must never accept what the slow path
would refuse, and must take the shapes publishers really send.
"""

from __future__ import annotations

import json

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed._tickjson import TickParser
from fastfeed.protocol import VALUE_FIELDS

SYMS = ["BBCA", "BBRI", "TLKM", "X.1", "A:B/c", "bad sym", "", "Ä", "a" * 33]

number = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 1e308, 5e-324, 0.1, 123456789.123456789]),
)
value = st.one_of(number, st.none(), st.text(max_size=3), st.booleans(), st.just([1]))
tick = st.fixed_dictionaries(
    {"sym": st.one_of(st.sampled_from(SYMS), st.integers(0, 3)),
     "seq": st.one_of(st.integers(-3, 2**64), st.just(1.0), st.none())},
    optional={"ts": st.one_of(st.integers(-1, 2**63), st.none(), st.just(2.5)),
              **{f: value for f in VALUE_FIELDS}, "venue": st.just("XIDX")},
)
spacing = st.sampled_from([None, 0, 2])
# what a well-behaved publisher sends: the fast path must take all of it
good_tick = st.fixed_dictionaries(
    {"sym": st.sampled_from(SYMS[:5]), "seq": st.integers(0, 2**63 - 2)},
    optional={"ts": st.integers(0, 2**63 - 2),
              **{f: st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                              st.integers(-(10**19) + 1, 10**19 - 1), st.none())
                 for f in VALUE_FIELDS}},
)


def encode(msg, indent) -> bytes:
    seps = (",", ":") if indent is None else (", ", ": ")
    return json.dumps(msg, indent=indent, separators=seps).encode()


def state(t: _core.Table) -> tuple:
    n = t.size
    rows = {k: np.array(a[:n]) for k, a in t.arrays.items()}
    return (n, t.version, {k: v.tobytes() for k, v in rows.items()},
            [t.symbol(i) for i in range(n)])


def both(data: bytes):
    fast, slow = _core.Table(64), _core.Table(64)
    for t in (fast, slow):  # some history, so stale ticks happen
        t.apply_objects([{"sym": "BBCA", "seq": 5, "last": 1.0}])
    p = TickParser()
    n = p.parse(data)
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        msg = None
    return p, n, fast, slow, msg


@settings(max_examples=400, deadline=None)
@given(st.one_of(tick, st.lists(tick, max_size=5)), spacing)
def test_fast_path_agrees_with_the_slow_path(msg, indent):
    data = encode(msg, indent)
    p, n, fast, slow, decoded = both(data)
    ticks = decoded if isinstance(decoded, list) else [decoded]
    s_applied, s_stale, s_errors = slow.apply_objects(ticks)
    if n < 0:
        return  # declined: the gateway takes the slow path
    assert n == len(ticks)
    assert not s_errors, "the fast path took a message the slow path refuses"
    assert p.apply(fast) == (s_applied, s_stale, s_errors)
    assert state(fast) == state(slow)
    assert fast.take_stats()["ticks"] == slow.take_stats()["ticks"]


@settings(max_examples=300, deadline=None)
@given(st.lists(good_tick, max_size=6), spacing)
def test_fast_path_takes_every_well_formed_message(ticks, indent):
    data = encode(ticks, indent)
    p, n, fast, slow, _ = both(data)
    assert n == len(ticks)
    assert p.apply(fast)[:2] == slow.apply_objects(ticks)[:2]
    assert state(fast) == state(slow)


def test_takes_what_publishers_send():
    ticks = [{"sym": "BBCA", "seq": 6, "ts": 1_700_000_000_000_000_000, "bid": 9100.5,
              "ask": 9101, "last": 9100.75, "last_size": 300, "volume": 1.5e7},
             {"sym": "TLKM", "seq": 1, "bid": None, "last": -0.0}]
    for data in (json.dumps(ticks).encode(), encode(ticks, 2), json.dumps(ticks[0]).encode(),
                 b"[]", b' \n[ {"seq":1 , "sym" :"GOTO"} ]\n'):
        p, n, fast, slow, msg = both(data)
        assert n == (len(msg) if isinstance(msg, list) else 1), data
        slow.apply_objects(msg if isinstance(msg, list) else [msg])
        p.apply(fast)
        assert state(fast) == state(slow)


def test_declines_what_needs_exact_errors():
    for data in [b"", b"{", b"[", b"[1]", b"nul", b'{"sym":"BBCA"}', b'{"seq":1}',
                 b'{"sym":"BB\\u0043A","seq":1}', b'{"sym":"BBCA","seq":1,"bid":NaN}',
                 b'{"sym":"BBCA","seq":1,"bid":1e999}', b'{"sym":"BBCA","seq":1.5}',
                 b'{"sym":"BBCA","seq":-1}', b'{"sym":"BBCA","seq":01}',
                 b'{"sym":"BBCA","seq":1,"bid":.5}', b'{"sym":"BBCA","seq":1,"bid":+1}',
                 b'{"sym":"BBCA","seq":1,"seq":2}', b'{"sym":"BBCA","seq":1,"x":{}}',
                 b'{"sym":"BBCA","seq":1} x', b'[{"sym":"BBCA","seq":1},]',
                 b'{"sym":"bad sym","seq":1}', b'{"sym":"BBCA","seq":1,"bid":"1"}',
                 b'{"sym":"BBCA","seq":1,"bid":true}',
                 b'{"sym":"BBCA","seq":99999999999999999999}']:
        _p, n, *_ = both(data)
        assert n == -1, data


def test_declines_what_the_strict_decoder_refuses():
    """Not JSON (RFC 8259) to orjson: the fast path must not take it either."""
    big = b"1" + b"0" * 400
    deep = b"[" * 2000 + b"]" * 2000
    for data in [b'{"sym":"\\ud800","seq":1}', b'{"sym":"BBCA","seq":1,"bid":' + big + b"}",
                 b'{"sym":"BBCA","seq":1,"bid":1e400}', b'{"sym":"BBCA","seq":1,"ask":-1e400}',
                 b'{"sym":"BBCA","seq":1,"bid":Infinity}', b'{"sym":"BBCA","seq":' + big + b"}",
                 b"[" * 2000, b'[{"sym":"BBCA","seq":1},' + deep + b"]"]:
        _p, n, *_, msg = both(data)
        assert n == -1 and msg is None, data[:60]


def test_numbers_round_like_python():
    for text in ["0.1", "1e-7", "123456789.123456789", "2.2250738585072014e-308", "1E5",
                 "-0", "4.35", "9007199254740993", "1e-400", "-1e-400", "4.9e-324",
                 "1.7976931348623157e308", "123456789012345678.5"]:
        data = f'{{"sym":"N","seq":1,"bid":{text}}}'.encode()
        p, n, fast, slow, msg = both(data)
        assert n == 1
        p.apply(fast)
        slow.apply_objects([msg])
        assert state(fast) == state(slow), text  # bit for bit, the sign of zero too


def test_a_full_table_refuses_new_symbols_by_name_on_both_paths():
    data = b'[{"sym":"AAA","seq":1},{"sym":"BBB","seq":1},{"sym":"AAA","seq":2}]'
    fast, slow = _core.Table(64, max_instruments=1), _core.Table(64, max_instruments=1)
    p = TickParser()
    assert p.parse(data) == 3
    assert p.apply(fast) == slow.apply_objects(orjson.loads(data)) == (
        2, 0, [(1, "BBB", "instrument table is full")])
    assert state(fast) == state(slow)
