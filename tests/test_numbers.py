"""Numbers in and out of the core without CPython's float formatter and parser.

The core writes a short decimal price (m / 10**k) with integer arithmetic and
reads one with a single IEEE division (Clinger's fast path); everything else
takes CPython's exact path. Both fast paths must be invisible: for every
finite double the JSON row holds exactly repr(v), which parses back to v, and
for every JSON number text the parser stores exactly float(text).
"""

from __future__ import annotations

import json
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed._tickjson import TickParser
from fastfeed.compact import decode_compact_bin
from fastfeed.reference import _value_token

finite = st.floats(allow_nan=False, allow_infinity=False)
# what markets send: few digits, few decimals, both signs, whole numbers too
short = st.builds(lambda m, k, neg: (-1 if neg else 1) * m / 10**k,
                  st.integers(0, 10**16), st.integers(0, 18), st.booleans())
edges = st.sampled_from([
    0.0, -0.0, 1e-4, 9.999999999999999e-05, 0.0001000000000000001, 1e15, 999999999999999.9,
    1e15 - 1, 1e16, 2.0**53, 2.0**50, 0.1, 0.2, 0.3, 0.29, 1.1, 2.675, 1234.5678, 5e-324,
    1.7976931348623157e308, 123456789012345.6, 0.000123, 100.25, 9.95, 0.07,
])
double = st.one_of(finite, short, edges,
                   finite.map(lambda v: float(f"{v:.6g}")),  # round to 6 digits
                   st.integers(-(2**53), 2**53).map(float))


def bits(v: float) -> bytes:
    return struct.pack("<d", v)


def row_texts(values: list[float]) -> list[str]:
    """Each value through a tick into a real table and out as its JSON row."""
    table = _core.Table()
    n = (len(values) + 6) // 7
    vals = np.zeros((n, 7))
    vals.flat[:len(values)] = values
    ids = np.array([table.intern_symbol(f"N{i}") for i in range(n)], np.int32)
    table.apply_arrays(ids, np.ones(n, np.int64), np.zeros(n, np.int64), vals)
    rows = json.loads(b"[" + table.rows_json(ids.tolist()) + b"]")
    assert [bits(x) for r in rows for x in r[3:]][:len(values)] == [bits(v) for v in values]
    texts = table.rows_json(ids.tolist()).decode().replace("],[", ",")[1:-1].split(",")
    return [t for k, t in enumerate(texts) if k % 10 >= 3][:len(values)]


def check_formatted(values: list[float]) -> None:
    for v, text in zip(values, row_texts(values), strict=True):
        assert text == repr(v), (v, text)
        assert bits(float(text)) == bits(v)


@settings(max_examples=300, deadline=None)
@given(st.lists(double, min_size=1, max_size=200))
def test_formatted_text_is_repr_and_parses_back(values):
    check_formatted(values)


def compact_bin_values(values: list[float]) -> list[float]:
    """Each value through a tick into a real table, out in a compact binary
    (FFC1) frame, and back through the Python decoder (the differential test
    holds the core's bytes to the reference's)."""
    table = _core.Table()
    hub = _core.Hub(table)
    hub.capture = []
    cid = hub.add(None, 0, True, 1, compact=True)
    n = (len(values) + 6) // 7
    vals = np.zeros((n, 7))
    vals.flat[:len(values)] = values
    ids = np.array([table.intern_symbol(f"N{i}") for i in range(n)], np.int32)
    hub.subscribe_ids(cid, ids.tolist())
    table.apply_arrays(ids, np.ones(n, np.int64), np.zeros(n, np.int64), vals)
    hub.pump(wall=5, mono=2)
    ((_, frame),) = hub.capture
    _, rows = decode_compact_bin(frame)
    out = []
    for r in rows:  # [sym, seq, mask, t - ts, values of the set bits]
        mask, got = r[2], iter(r[4:] if r[2] & 1 else r[3:])
        out += [next(got) if mask & (2 << k) else 0.0 for k in range(7)]
    return out[:len(values)]


@settings(max_examples=300, deadline=None)
@given(st.lists(double, min_size=1, max_size=200))
def test_compact_binary_values_decode_to_the_same_double(values):
    for v, got in zip(values, compact_bin_values(values), strict=True):
        assert bits(got) == bits(v), (v, got)


def leb128(u: int) -> bytes:
    out = []
    while True:
        out.append(u & 0x7F | (0x80 if u >= 0x80 else 0))
        if u < 0x80:
            return bytes(out)
        u >>= 7


def test_compact_binary_value_tokens():
    # +-m / 10**c (c <= 11) or +-m * 10**(c-11) (c 12..15) as the varint
    # m*32 + c*2 + sign; 31 and the double otherwise
    assert _value_token(0.0) == b"\x00" and _value_token(-0.0) == b"\x01"
    assert _value_token(100.0) == leb128(1 * 32 + 13 * 2)  # 1 * 10**2
    assert _value_token(1_200_000.0) == leb128(120 * 32 + 15 * 2)  # 120 * 10**4
    assert _value_token(-10.0) == leb128(1 * 32 + 12 * 2 + 1)
    assert _value_token(7.0) == leb128(7 * 32)
    assert _value_token(1.5e-12) == b"\x1f" + struct.pack("<d", 1.5e-12)  # past 11 decimals
    assert _value_token(1.0) == bytes([32]) and _value_token(-2.5) == leb128(25 * 32 + 2 + 1)
    assert _value_token(6500.25) == leb128(650025 * 32 + 2 * 2)
    assert _value_token(0.1 + 0.2) == b"\x1f" + struct.pack("<d", 0.1 + 0.2)
    assert _value_token(2.0**48) == b"\x1f" + struct.pack("<d", 2.0**48)  # m past 2**48
    assert len(_value_token(2.0**48 - 1)) == 8


def test_formatted_text_sweep():
    rng = np.random.default_rng(14)
    raw = rng.integers(0, 2**64, 100_000, dtype=np.uint64).view(np.float64)
    m = rng.integers(0, 10**15, 100_000)
    k = rng.integers(0, 16, 100_000)
    sweep = [float(v) for v in raw if np.isfinite(v)]
    sweep += [float(x) / 10.0**int(e) for x, e in zip(m, k, strict=True)]
    sweep += [-v for v in sweep[-1000:]]
    sweep += [float(np.nextafter(v, np.inf)) for v in sweep[-20000:]]
    check_formatted(sweep)


# JSON number texts: integers, fractions, exponents, leading-zero fractions, long digit runs
digits = st.text("0123456789", min_size=1, max_size=25)
json_number = st.builds(
    lambda neg, whole, frac, ex: ("-" if neg else "") + whole + frac + ex,
    st.booleans(),
    st.one_of(st.just("0"), st.builds(lambda a, b: a + b, st.sampled_from("123456789"),
                                      st.text("0123456789", max_size=17))),
    st.one_of(st.just(""), digits.map(lambda d: "." + d)),
    st.one_of(st.just(""), st.builds(lambda e, s, d: e + s + d, st.sampled_from("eE"),
                                     st.sampled_from(["", "+", "-"]),
                                     st.text("0123456789", min_size=1, max_size=3))),
)


def parse_values(texts: list[str]) -> list[float | None]:
    """Each text as a price of its own tick, one message through the C parser;
    None for a text the parser declines (the json.loads path decides those)."""
    out: list[float | None] = []
    parser, table = TickParser(), _core.Table()
    for k, text in enumerate(texts):
        msg = f'{{"sym":"P{k}","seq":1,"bid":{text}}}'.encode()
        if parser.parse(msg) < 0:
            out.append(None)
            continue
        assert parser.apply(table) == (1, 0, [])
        out.append(table.row(table.lookup(f"P{k}"))[3])
    return out


def check_parsed(texts: list[str]) -> None:
    for text, got in zip(texts, parse_values(texts), strict=True):
        want = float(json.loads(text))  # "-0" is the integer 0 to JSON, so +0.0
        if want - want != 0:  # inf: the slow path refuses it by name
            assert got is None, text
            continue
        # the fast path takes every plain number but a long text or a huge integer
        assert got is not None or len(text) >= 40 or not set(text) & set(".eE"), text
        if got is not None:
            assert bits(got) == bits(want), (text, got, want)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(json_number, double.map(repr)), min_size=1, max_size=100))
def test_parser_gives_float_of_the_text(texts):
    check_parsed(texts)


def test_parser_sweep():
    rng = np.random.default_rng(41)
    m = rng.integers(0, 10**17, 30_000)
    k = rng.integers(0, 20, 30_000)
    pairs = zip(m.tolist(), k.tolist(), strict=True)
    texts = [f"{x // 10**e}.{x % 10**e:0{e}d}" if e else f"{x}.0" for x, e in pairs]
    texts += [f"{x}e-{e}" for x, e in zip(m[:5000].tolist(), k[:5000].tolist(), strict=True)]
    raw = rng.integers(0, 2**64, 30_000, dtype=np.uint64).view(np.float64)
    texts += [repr(float(v)) for v in raw if np.isfinite(v)]
    check_parsed(texts)


def test_parser_examples():
    check_parsed(["0.1", "-0.0", "-0", "0.29", "1e22", "1e23", "9007199254740993.0",
                  "1.7976931348623157e308", "5e-324", "2.2250738585072014e-308",
                  "123456.78901234567890", "0.000000000000000000001", "1E5", "-12.5e-3",
                  "100.25", "1e400", "-1e400", "9007199254740992.5", "0.30000000000000004"])
