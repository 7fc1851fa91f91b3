"""Order books in the core: the compiled `Books` against the reference, the
contract's checksum computed independently, and the integrity rules.

The differential test drives random full books, price-keyed changes (with
gaps, crossing changes, sweeps, levels falling out of the served depth and
coming back) and clients that read at random moments (so tombstones expire
and they get full books); both must write the same entry bytes, and a client
that applies every entry by the contract's rules must hold the server's book.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed import _core
from fastfeed.reference import (
    BOOK_APPLIED,
    BOOK_CROSSED,
    BOOK_DROPPED,
    BOOK_GAP,
    BOOK_STALE,
    RefBooks,
    RefTable,
)

SYMS = ["BBCA", "TLKM", "GOTO"]
OUTCOME = {name: k for k, name in enumerate(_core.BOOK_OUTCOMES)}


def outcome(books, msg) -> int:
    """Apply one message; which of BOOK_OUTCOMES it had."""
    books.take_stats()
    books.apply_objects([msg])
    (name,) = books.take_stats()["books"]
    return OUTCOME[name]


def crc(bids, asks) -> int:
    """The contract's checksum, from its words: asks then bids, best first,
    price and volume as little-endian IEEE-754 binary64."""
    return zlib.crc32(b"".join(struct.pack("<dd", p, v) for p, v, *_ in [*asks, *bids]))


class Client:
    """A client written from the contract: applies entries, keeps the best depth."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.books: dict[str, tuple[int, dict, dict]] = {}

    def apply(self, entry: dict) -> None:
        sym = entry["sym"]
        fresh = entry.get("full") or sym not in self.books
        sides = ({}, {}) if fresh else self.books[sym][1:]
        for side, name in zip(sides, ("bids", "asks"), strict=True):
            for p, v, o in entry[name]:
                if v == 0:
                    side.pop(p, None)
                else:
                    side[p] = (v, o)
        bids = dict(sorted(sides[0].items(), reverse=True)[:self.depth])
        asks = dict(sorted(sides[1].items())[:self.depth])
        self.books[sym] = (entry["seq"], bids, asks)
        assert crc(self.levels(sym)[0], self.levels(sym)[1]) == entry["checksum"]

    def levels(self, sym: str) -> tuple[list, list]:
        _, bids, asks = self.books[sym]
        return ([[p, v, o] for p, (v, o) in bids.items()],
                [[p, v, o] for p, (v, o) in asks.items()])


PRICES = [float(p) for p in range(95, 106)]
level = st.tuples(st.sampled_from(PRICES), st.sampled_from([0.0, 0.0, 100.0, 200.0, 500.0]),
                  st.integers(0, 3)).map(list)
bad_level = st.sampled_from([[100.0], [100.0, -1.0, 0], [math.nan, 1.0, 0], [100.0, math.inf],
                             [100.0, 1.0, -1], "x", [100.0, "1", 0]])
op = st.one_of(
    st.tuples(st.just("full"), st.sampled_from(SYMS), st.lists(level, max_size=8),
              st.lists(level, max_size=8), st.integers(-1, 3)),
    st.tuples(st.just("change"), st.sampled_from(SYMS), st.lists(level, max_size=4),
              st.lists(level, max_size=4), st.sampled_from([1, 1, 1, 1, 0, 2])),
    st.tuples(st.just("bad"), st.sampled_from(SYMS), bad_level, st.booleans()),
    st.tuples(st.just("read"), st.integers(0, 3)),
)


def split_full(bids, asks):
    """A random full book that is not crossed: bids below 100, asks above."""
    return ([x for x in bids if x[0] < 100], [x for x in asks if x[0] > 100])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([(1, 1), (2, 3), (3, 5), (10, 50)]), st.lists(op, max_size=80))
def test_books_match_reference_and_clients_converge(shape, ops):
    depth, levels = shape
    table, ref = _core.Table(), RefTable()
    books, rbooks = _core.Books(table, depth, levels), RefBooks(ref, depth, levels)
    clients = [(Client(depth), [0]) for _ in range(4)]
    for o in ops:
        if o[0] in ("full", "change", "bad"):
            sym = o[1]
            iid = table.lookup(sym)
            held = books.seq_of(iid) if iid >= 0 else 0
            if o[0] == "full":
                bids, asks = split_full(o[2], o[3])
                msg = {"type": "book", "sym": sym, "seq": held + o[4], "full": True,
                       "bids": bids, "asks": asks}
            elif o[0] == "change":
                msg = {"sym": sym, "seq": held + o[4], "bids": o[2], "asks": o[3]}
            else:
                msg = {"sym": sym, "seq": held + 1, "full": o[3], "bids": [o[2]], "asks": []}
            got = outcome(books, msg)
            assert got == rbooks.apply(msg), msg
            assert books.take_events() == rbooks.events
            rbooks.events = []
        else:
            client, since = clients[o[1]]
            ids = sorted(rbooks.books)
            n, data = books._encode_section_py(ids, since[0])
            assert (n, data) == rbooks.section(ids, since[0])
            for entry in json.loads(b"[" + data + b"]"):
                client.apply(entry)
            since[0] = books.version
            for sym in client.books:
                seq, bids, asks, _ = books.book(table.lookup(sym))
                assert client.books[sym][0] == seq
                assert client.levels(sym) == (bids, asks)
        assert books.version == rbooks.version
    books._check_invariants()
    for iid, b in rbooks.books.items():
        want = rbooks.snapshot(iid) if b.seq or b.stale else b""
        assert books.snapshot_json([iid]) == want
        assert books.checksum(iid) == rbooks.checksum(iid)


def test_checksum_is_the_contracts():
    table = _core.Table()
    books = _core.Books(table, depth=3)
    bids = [[9125.0, 1200.0, 8], [9100.0, 300.0, 2], [9075.0, 5.5, 1], [9050.0, 1.0, 1]]
    asks = [[9150.0, 700.0, 3], [9175.0, 0.1, 1]]
    books.apply_objects([{"type": "book", "sym": "BBCA", "seq": 77, "full": True,
                          "bids": bids, "asks": asks}])
    want = zlib.crc32(
        struct.pack("<dd", 9150.0, 700.0) + struct.pack("<dd", 9175.0, 0.1)
        + struct.pack("<dd", 9125.0, 1200.0) + struct.pack("<dd", 9100.0, 300.0)
        + struct.pack("<dd", 9075.0, 5.5))
    snap = json.loads(books.snapshot_json([0]))
    assert snap["checksum"] == want == books.checksum(0)
    assert snap["bids"] == bids[:3] and snap["asks"] == asks
    # an empty book: CRC-32 of no bytes
    books.apply_objects([full("EMPTY", 1, [], [])])
    assert json.loads(books.snapshot_json([1]))["checksum"] == zlib.crc32(b"") == 0


def full(sym, seq, bids, asks):
    return {"type": "book", "sym": sym, "seq": seq, "full": True, "bids": bids, "asks": asks}


def test_integrity_rules():
    table = _core.Table()
    books = _core.Books(table, depth=2, levels=4)
    base = full("BBCA", 10, [[100.0, 1.0, 1], [99.0, 2.0, 1]], [[101.0, 1.0, 1]])
    assert outcome(books, base) == BOOK_APPLIED
    v = books.version
    # bad input: refused by name, nothing applied, seq unchanged
    for bad, why in [
        (full("BBCA", 11, [[101.0, 1.0, 0]], [[100.0, 1.0, 0]]), "crossed full book"),
        ({"sym": "BBCA", "seq": 11, "bids": [[100.0, -1.0, 0]]}, "negative volume at bids[0]"),
        ({"sym": "BBCA", "seq": 11, "asks": [[math.nan, 1.0, 0]]}, "NaN or infinite at asks[0]"),
        ({"sym": "BBCA", "seq": 11, "bids": [[100.0]]}, "bad level bids[0]"),
        ({"sym": "BBCA", "seq": 11, "full": 1, "bids": []}, "full must be true or false"),
        (full("BBCA", 11, [[99.0, 1.0, 0], [99.0, 2.0, 0]], []), "twice in bids"),
    ]:
        _, _, errors = books.apply_objects([bad])
        assert len(errors) == 1 and why in errors[0][2], (bad, errors)
    assert books.version == v and books.seq_of(0) == 10
    # not above the held seq: dropped as stale
    assert outcome(books, full("BBCA", 10, [[50.0, 1.0, 0]], [])) == BOOK_STALE
    assert outcome(books, {"sym": "BBCA", "seq": 9, "bids": []}) == BOOK_STALE
    assert books.take_events() == []
    # an incremental that would cross: stale, nothing applied
    assert outcome(books, {"sym": "BBCA", "seq": 11, "bids": [[101.5, 1.0, 0]]}) == BOOK_CROSSED
    assert books.take_events() == [(0, b'{"type":"status","sym":"BBCA","book":"stale"}')]
    assert books.book(0)[:3] == (10, [[100.0, 1.0, 1], [99.0, 2.0, 1]], [[101.0, 1.0, 1]])
    # a client that subscribes now is told in its snapshot
    assert json.loads(books.snapshot_json([0]))["stale"] is True
    # while stale, changes are dropped; a full book heals, and clients get it whole
    assert outcome(books, {"sym": "BBCA", "seq": 11, "bids": [[98.0, 1.0, 0]]}) == BOOK_DROPPED
    assert books.version == v
    assert outcome(books, full("BBCA", 20, [[90.0, 1.0, 0]], [[91.0, 1.0, 0]])) == BOOK_APPLIED
    assert books.take_events() == [(0, b'{"type":"status","sym":"BBCA","book":"ok"}')]
    healed = json.loads(books._encode_section_py([0], v)[1])
    assert healed["full"] is True and "stale" not in healed
    # a gap: stale again
    assert outcome(books, {"sym": "BBCA", "seq": 22, "bids": []}) == BOOK_GAP
    assert books.is_stale(0)
    assert books.take_events() == [(0, b'{"type":"status","sym":"BBCA","book":"stale"}')]


def test_level_falling_out_of_depth_and_coming_back():
    table = _core.Table()
    books = _core.Books(table, depth=2, levels=3)
    books.apply_objects([full("X", 1, [[10.0, 1.0, 1], [9.0, 1.0, 1], [8.0, 1.0, 1]],
                              [[11.0, 1.0, 1]])])
    v = books.version
    # a better bid pushes 9.0 out of the best two: it goes as [9.0,0,0]
    books.apply_objects([{"sym": "X", "seq": 2, "bids": [[10.5, 2.0, 1]]}])
    e = json.loads(books._encode_section_py([0], v)[1])
    assert e["bids"] == [[10.5, 2.0, 1], [9.0, 0, 0]] and e["asks"] == []
    v = books.version
    # removing the best brings 9.0 back into view as a change
    books.apply_objects([{"sym": "X", "seq": 3, "bids": [[10.5, 0, 0]]}])
    e = json.loads(books._encode_section_py([0], v)[1])
    assert e["bids"] == [[9.0, 1.0, 1], [10.5, 0, 0]]
    # at most `levels` kept: a fourth bid drops the worst kept one (8.0)
    books.apply_objects([{"sym": "X", "seq": 4, "bids": [[9.5, 1.0, 1]]}])
    assert books.kept(0)[0] == [[10.0, 1.0, 1], [9.5, 1.0, 1], [9.0, 1.0, 1]]


def test_a_client_too_far_behind_gets_the_full_book():
    table = _core.Table()
    books = _core.Books(table, depth=1)  # two tombstones a side
    books.apply_objects([full("X", 1, [[10.0, 1.0, 0]], [[20.0, 1.0, 0]])])
    since = books.version
    for k in range(3):  # three best bids replaced: three tombstones, one forgotten
        books.apply_objects([{"sym": "X", "seq": 2 + 2 * k, "bids": [[11.0 + k, 1.0, 0]]},
                             {"sym": "X", "seq": 3 + 2 * k, "bids": [[10.0 + k, 0, 0]]}])
    entry = json.loads(books._encode_section_py([0], since)[1])
    assert entry["full"] is True and entry["bids"] == [[13.0, 1.0, 0]]
    # the last two versions: 13.0 came in and pushed 12.0 out, then 12.0 went
    # (out of view: no change but the seq)
    late = json.loads(books._encode_section_py([0], books.version - 2)[1])
    assert "full" not in late and late["bids"] == [[13.0, 1.0, 0], [12.0, 0, 0]]
    assert json.loads(books._encode_section_py([0], books.version - 1)[1])["bids"] == []


def test_entries_are_encoded_once_per_change_and_since_class():
    table = _core.Table()
    books = _core.Books(table)
    for k, sym in enumerate(SYMS):
        books.apply_objects([full(sym, 1, [[100.0 + k, 1.0, 0]], [[200.0, 1.0, 0]])])
    v = books.version
    books.apply_objects([{"sym": "BBCA", "seq": 2, "bids": [[99.0, 3.0, 1]]}])
    books.take_stats()
    first = books._encode_section_py([0, 1, 2], v)
    # another since of the same class (no stamp between them): the same bytes, from cache
    assert books._encode_section_py([0, 1, 2], v) == first == (1, first[1])
    assert books.take_stats()["entries_encoded"] == 1


def test_records_round_trip_and_apply_alike():
    msgs = [full("BBCA", 5, [[9125.0, 1200.0, 8], [9150.0, 3.0, 1]], [[9175.0, 2.0, 0]]),
            {"type": "book", "sym": "BBCA", "seq": 6, "bids": [[9150.0, 0, 0]]},
            {"sym": "TLKM", "seq": 1, "bids": [[1.0, -1.0, 0]]}]
    parts, errors = _core.encode_books(msgs, parts=4)
    assert [(i, s) for i, s, _ in errors] == [(2, "TLKM")]
    assert sum(1 for p in parts if p) == 1  # one symbol, one partition
    (batch,) = [p for p in parts if p]
    assert parts.index(batch) == _core.partition("BBCA", 4)
    decoded = _core.decode_books(batch)
    assert decoded[0]["bids"] == [[9150.0, 3.0, 1], [9125.0, 1200.0, 8]]  # sorted best first
    a, b = _core.Books(_core.Table()), _core.Books(_core.Table())
    a.apply_objects(msgs[:2])
    assert b.apply_records(batch) == (2, 0, 0, 0, 0, 0)
    assert a.snapshot_json([0]) == b.snapshot_json([0])
    # the state as records: a fresh worker loads the same book
    c = _core.Books(_core.Table())
    c.apply_records(a.state_records(), snapshot=True)
    assert c.snapshot_json([0]) == a.snapshot_json([0])


def test_snapshot_record_of_a_stale_book_makes_a_worker_stale():
    a = _core.Books(_core.Table())
    a.apply_objects([full("X", 1, [[1.0, 1.0, 0]], [[2.0, 1.0, 0]]),
                     {"sym": "X", "seq": 3, "bids": []}])  # a gap
    assert a.is_stale(0)
    state = a.state_records()
    b = _core.Books(_core.Table())
    b.apply_objects([full("X", 1, [[1.0, 1.0, 0]], [[2.0, 1.0, 0]])])
    b.take_events()
    b.apply_records(state, snapshot=True)
    assert b.is_stale(0)
    assert b.take_events() == [(0, b'{"type":"status","sym":"X","book":"stale"}')]


def test_a_book_interns_its_symbol_in_the_quote_table():
    table = _core.Table()
    table.apply_tick("TLKM", 1, bid=1.0)
    books = _core.Books(table)
    books.apply_objects([full("BBCA", 1, [], [[5.0, 1.0, 0]])])
    assert table.lookup("BBCA") == 1 and books.seq_of(1) == 1 and table.seq_of(1) == -1
    assert books.book(0) == (0, [], [], False)
    assert books._encode_section_py([0, 1, 99], 0)[0] == 1
    # a book that holds nothing yet is left out of snapshots (it comes as an update)
    assert books.snapshot_json([0, 1]) == books.snapshot_json([1]) != b""
    assert books.item(5000) == 5000 and books.size == 5001
