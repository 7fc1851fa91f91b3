"""Fuzz both /ingest JSON parsers, which must agree, and the /ingest handler.

1. The C fast path (`TickParser`, one per process as in the gateway) against
   the fallback (`orjson.loads`, as /ingest decodes, + `Table.apply_objects`),
   on tables that already hold rows (so stale ticks happen), one of them
   nearly full: when the fast path takes a message it must take what the
   fallback takes and refuse what it refuses, leaving the same rows and
   counters; it may only decline (-1).
2. `IngestSession.on_message` on a real Gateway's /ingest source: no exception escapes,
   every reply is strict JSON, and a message that is not strict JSON (NaN and
   infinities included, docs/protocol.md "Ingest") is refused whole: one
   `bad_request` "not JSON", the table unchanged.

The input is the message itself (the framing has checked its UTF-8).

    python tests/fuzz/fuzz_ingest.py -max_total_time=600 fuzz-out/ingest tests/fuzz/corpus/ingest
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import orjson
from common import (
    FakeTransport,
    WSMsgType,
    _core,
    check_reply,
    feature,
    gateway,
    main,
    strict_json,
)

from fastfeed._tickjson import TickParser
from fastfeed.feed.sink import LocalSink

PARSER = TickParser()
# every run takes a new table (below): no delay line, which keeps the first one's kinds
GW = gateway(max_delay_s=0)
HISTORY = [{"sym": "BBCA", "seq": 5, "last": 1.0}, {"sym": "TLKM", "seq": 7, "bid": 2.0}]


def state(t: _core.Table) -> tuple:
    n = t.size
    return (n, t.version, {k: np.array(a[:n]).tobytes() for k, a in t.arrays.items()},
            [t.symbol(i) for i in range(n)], t.take_stats()["ticks"])


def table(cap: int) -> _core.Table:
    t = _core.Table(64, max_instruments=cap)
    t.apply_objects([dict(x) for x in HISTORY])
    return t


def differential(data: bytes) -> None:
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        msg = None  # the fallback refuses it whole
        feature("refused", str(e).split(":")[0][:40])
    for cap in (1_000_000, 3):
        n = PARSER.parse(data)
        feature("parse", cap, min(n, 4), type(msg).__name__)
        if n < 0:
            continue  # declined: the fallback decides
        assert msg is not None, "the fast path took what the fallback refuses as JSON"
        assert strict_json(data), "the fast path took what is not JSON by RFC 8259"
        ticks = msg if isinstance(msg, list) else [msg]
        assert n == len(ticks), (n, len(ticks))
        fast, slow = table(cap), table(cap)
        got, want = PARSER.apply(fast, 0), slow.apply_objects(ticks, 0)
        assert got == want, (got, want)
        feature("applied", cap, min(want[0], 3), min(want[1], 3), sorted({w for *_, w in want[2]}))
        assert all(why == "instrument table is full" for _, _, why in want[2]), (
            "the fast path took a tick the fallback refuses", want[2])
        assert state(fast) == state(slow), "the two paths left different tables"


def handler(data: bytes) -> None:
    GW.table = table(1_000_000)
    before = state(GW.table)
    GW.table_sink = LocalSink(GW.table, GW.after_ticks)
    GW.wire_feed()  # the sink, and the /ingest source writing to it
    assert GW.ingest is not None
    s = GW.ingest.session(trusted=False)
    tr = FakeTransport(s)
    s.on_ws_connected(tr)
    assert not s.closing
    s.on_message(WSMsgType.TEXT, data)
    tr.check()
    replies = [check_reply(*r) for r in tr.sent]
    for reply in replies:
        feature("reply", reply.get("code"), reply.get("message", "")[:12])
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        assert [(r["code"], r["message"][:9]) for r in replies] == [("bad_request", "not JSON:")], (
            "a message that is not JSON was not refused whole", replies)
        assert state(GW.table)[:4] == before[:4], "a message that is not JSON changed the table"
    s.on_ws_disconnected(tr)


def test_one(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return  # framing closes 1007 before a parser sees it
    differential(data)
    handler(data)


if __name__ == "__main__":
    main(test_one)
