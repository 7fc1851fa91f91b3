"""Sources and sinks (docs/sources.md): a source does not know which sink it has.

The same writes go to a `LocalSink` (a table) and to a `BusSink` (a real
redis-server, and back into a second table through the bus's subscriber,
writing through that table's own `LocalSink`): both tables end the same,
and both sinks answer a bad tick, bad JSON and a bad batch in the same words.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support import until

from fastfeed import protocol as P
from fastfeed._core import Table, encode_batch
from fastfeed.bus import RedisBus
from fastfeed.feed.simulator import SimulatorSource
from fastfeed.feed.sink import BUS, INGEST, SIMULATOR, BusSink, LocalSink

pytestmark = pytest.mark.timeout(60)


class Answers:
    """A source's `Reply` that keeps what it was told."""

    def __init__(self, admit: bool = True) -> None:
        self.allow = admit
        self.asked: list[int] = []
        self.told: list[tuple] = []

    def admit(self, n: int) -> bool:
        self.asked.append(n)
        return self.allow

    def refused(self, errors: list) -> None:
        self.told.extend(("refused", i, s, why) for i, s, why in errors)

    def error(self, code: str, message: str) -> None:
        self.told.append(("error", code, message))


def rows(table: Table) -> dict[str, list]:
    return {s: table.row(table.lookup(s)) for s in table.symbols()
            if table.seq_of(table.lookup(s)) >= 0}



def writes() -> list[tuple[str, bytes]]:
    batch, errors = encode_batch([{"sym": "B1", "seq": 3, "bid": 7.0},
                                  {"sym": "B2", "seq": 4, "ask": 8.0}])
    assert errors == []
    return [
        ("json", json.dumps({"sym": "J1", "seq": 1, "bid": 1.5}).encode()),
        ("json", json.dumps([{"sym": "J2", "seq": 2, "last": 2.5},
                             {"sym": "J3", "seq": 2, "bid": 3.5, "odd": 1}]).encode()),
        ("json", b'[{"sym": "J1", "seq": 5, "ask": 9.5}, {"seq": 1}]'),
        ("batch", batch[0]),
    ]


async def test_the_same_writes_end_the_same_through_either_sink(redis):
    local_table, bus_table = Table(), Table()
    local = LocalSink(local_table, lambda: None)
    kicked = []
    back = LocalSink(bus_table, lambda: kicked.append(1))
    async with RedisBus(redis.url, channels=4, prefix="srcs", sink=back, name="gw") as bus:
        await bus.wait_ready(10)
        sink = BusSink(bus, lambda *a: None)
        await sink.wait_ready()
        for kind, data in writes():
            for s in (local, sink):
                getattr(s, kind)(data, INGEST, Answers())
        # a simulator step, as numpy arrays in its own numbering
        names = ["S0", "S1"]
        ids = np.array([1, 0, 1], np.int32)
        seqs = np.array([10, 11, 12], np.int64)
        ts = np.array([5, 5, 6], np.int64)
        vals = np.arange(21, dtype=np.float64).reshape(3, 7)
        for s in (local, sink):
            s.arrays(s.symbols(names), ids, seqs, ts, vals, SIMULATOR)
        await sink.drain()
        want = rows(local_table)
        assert set(want) == {"J1", "J2", "J3", "B1", "B2", "S0", "S1"}
        await until(lambda: rows(bus_table) == want, what="the bus's ticks in the second table")
        assert kicked, "the subscriber kicks the frame clock through its sink"
        assert local.ticks_in == sink.ticks_in


async def test_both_sinks_answer_bad_input_alike(redis):
    async with RedisBus(redis.url, channels=2, prefix="srcs2", name="pub") as bus:
        await bus.wait_ready(10)
        local, remote = LocalSink(Table(), lambda: None), BusSink(bus, lambda *a: None)
        for data in (b'[{"sym": "A", "seq": 1}, {"sym": "B"}]', b"{nope", b"[]"):
            answers = [Answers(), Answers()]
            local.json(data, INGEST, answers[0])
            remote.json(data, INGEST, answers[1])
            await remote.drain()
            assert answers[0].told == answers[1].told, data
            assert answers[0].asked == answers[1].asked, data
        a = Answers()
        local.json(b"{nope", INGEST, a)
        assert a.told[0][:2] == ("error", P.BAD_REQUEST) and "not JSON" in a.told[0][2]
        # not admitted: nothing is taken, and nothing is said (the source said why)
        for s in (local, remote):
            no = Answers(admit=False)
            s.json(b'{"sym": "Z", "seq": 1}', INGEST, no)
            s.batch(encode_batch([{"sym": "Z", "seq": 1}])[0][0], BUS, no)
            assert no.asked == [1, 1] and no.told == []
        await remote.drain()
        assert local.table.lookup("Z") < 0 or local.table.seq_of(local.table.lookup("Z")) < 0


async def test_one_simulator_loop_writes_to_any_sink():
    table = Table()
    sink = LocalSink(table, lambda: None)
    src = SimulatorSource(sink, 20, 2000.0, seed=3, duration=0.05, step=0.005)
    sent = await src.run()
    assert sent >= 20 and sink.ticks_in == sent  # the opening quotes every instrument
    assert len(rows(table)) == 20
