"""Record and replay: `serve --record FILE`, then `serve --replay FILE --speed 1|10|max`.

Real gateways, real clients: a simulated session with /ingest traffic on top
is recorded, replayed into a fresh gateway, and a client there ends in the
state the recording describes (read back from the file by its documented
format, docs/replay.md).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib

import pytest
import websockets
from support import merge, start_gateway, until

from fastfeed._core import VALUE_FIELDS, decode_batch, encode_batch
from fastfeed.client import Client, Row
from fastfeed.feed import record

INFO = {"FASTFEED_LOG_LEVEL": "info"}


def full_tick(sym: str, seq: int, base: float) -> dict:
    t = {"sym": sym, "seq": seq, "ts": time.time_ns()}
    for k, f in enumerate(VALUE_FIELDS):
        t[f] = base + k
    return t


def recorded_state(path) -> tuple[dict, list[int]]:
    """The state a recording leaves, by the protocol's merge rule, and the kinds it holds."""
    ref: dict = {}
    kinds = []
    names: list[str] = []
    with open(path, "rb") as fh:
        for _, kind, _, payload in record.scan(fh):
            kinds.append(kind)
            if kind == record.JSON:
                msg = json.loads(payload)
                # quote ticks only: the simulator's books and trades are no rows
                merge(ref, [m for m in (msg if isinstance(msg, list) else [msg])
                            if m.get("type", "quote") == "quote"])
            elif kind == record.BATCH:
                merge(ref, decode_batch(payload))
            elif kind == record.SYMBOLS:
                names = json.loads(payload)
            else:
                ids, seqs, ts, vals = record.decode_arrays(payload)
                merge(ref, [{"sym": names[ids[k]], "seq": int(seqs[k]), "ts": int(ts[k]),
                             **{f: float(vals[k, j]) for j, f in enumerate(VALUE_FIELDS)}}
                            for k in range(len(ids))])
    return ref, kinds


def as_rows(ref: dict) -> dict[str, Row]:
    return {s: Row(s, t["seq"], t["ts"], *[float(t[f]) for f in VALUE_FIELDS])
            for s, t in ref.items()}


def write_recording(path, records: list[tuple[int, int, bytes]]) -> None:
    """A recording written by hand from the documented format: (kind, arrival ns, payload)."""
    with open(path, "wb") as fh:
        fh.write(b"FFREC01\n")
        for kind, ns, payload in records:
            fh.write(struct.pack("<IIBq", len(payload), zlib.crc32(payload), kind, ns))
            fh.write(payload)


async def subscribe_all(c: Client, syms) -> None:
    """Subscribe once the gateway knows every symbol (a replay may still be adding them)."""
    async def known() -> bool:
        return await c.subscribe(syms) == []
    deadline = time.monotonic() + 20
    while not await known():
        assert time.monotonic() < deadline, "the replayed symbols never all appeared"


def log_has(path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


async def test_a_replay_at_max_speed_ends_in_the_recorded_state(tmp_path):
    rec = tmp_path / "session.ffrec"
    ing = [f"ING{i}" for i in range(5)]
    async with start_gateway("--simulate", "40", "--rate", "3000", "--seed", "5",
                             "--record", str(rec)) as gw:
        async with websockets.connect(gw.ingest_url) as pub:
            # every way /ingest applies: a JSON array, one JSON object, a binary batch
            await pub.send(json.dumps([full_tick(s, 1, 10.0) for s in ing]))
            await pub.send(json.dumps(full_tick(ing[0], 2, 20.0)))
            parts, errors = encode_batch([full_tick(s, 3, 30.0) for s in ing[1:]])
            assert errors == []
            await pub.send(parts[0])
        c = Client(gw.ws_url, stale_after=None)
        await c.connect()
        try:
            await subscribe_all(c, ing)
            await until(lambda: all(c.rows.get(s) and c.rows[s].seq >= 2 for s in ing),
                        what="the ingested ticks applied")
        finally:
            await c.close()
    # the gateway has drained and closed the file
    ref, kinds = recorded_state(rec)
    assert set(kinds) == {record.JSON, record.BATCH, record.SYMBOLS, record.ARRAYS}
    assert len(ref) == 45 and ref["ING0"]["seq"] == 2 and ref["ING1"]["seq"] == 3
    want = as_rows(ref)

    log = tmp_path / "replay.log"
    async with start_gateway("--replay", str(rec), "--speed", "max", env=INFO, log=log) as gw:
        await until(lambda: log_has(log, "done:"), what="the replay finished")
        c = Client(gw.ws_url, stale_after=None)
        await c.connect()
        try:
            assert await c.subscribe(list(want)) == []
            await until(lambda: c.rows == want, what="the client in the recorded state")
        finally:
            await c.close()
    assert "incomplete" not in log.read_text()


async def test_speed_1_keeps_the_order_and_the_gaps_of_the_recording(tmp_path):
    rec = tmp_path / "paced.ffrec"
    gap = 400_000_000  # ns between recorded arrivals
    base = time.time_ns()
    write_recording(rec, [(record.JSON, base + k * gap,
                           json.dumps(full_tick("PACE", k + 1, 100.0 + k)).encode())
                          for k in range(5)])
    seen: list[tuple[float, int]] = []

    def on_update(rows: list[Row]) -> None:
        seen.extend((time.monotonic(), r.seq) for r in rows if r.sym == "PACE")

    t_start = time.monotonic()
    async with start_gateway("--replay", str(rec), "--speed", "1") as gw:
        c = Client(gw.ws_url, stale_after=None, on_update=on_update)
        await c.connect()
        try:
            await subscribe_all(c, ["PACE"])
            await until(lambda: c.rows["PACE"].seq == 5, what="the last recorded tick")
        finally:
            await c.close()
    seqs = [s for _, s in seen]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 5, seqs
    # loose: the last tick cannot arrive before the recorded span has passed
    assert seen[-1][0] - t_start >= 4 * gap / 1e9


async def test_a_truncated_recording_replays_up_to_its_last_whole_record(tmp_path):
    rec = tmp_path / "cut.ffrec"
    r = record.Recorder(str(rec))
    for seq in (1, 2, 3):
        r.json(json.dumps(full_tick("CUT", seq, float(seq))).encode())
    r.close()
    whole = rec.stat().st_size
    with open(rec, "ab") as fh:  # a crash in the middle of the fourth record
        fh.write(struct.pack("<IIBq", 200, 0, record.JSON, time.time_ns()) + b'{"sym":"CUT"')
    log = tmp_path / "replay.log"
    async with start_gateway("--replay", str(rec), "--speed", "max", env=INFO, log=log) as gw:
        await until(lambda: log_has(log, "done:"), what="the replay finished")
        c = Client(gw.ws_url, stale_after=None)
        await c.connect()
        try:
            assert await c.subscribe(["CUT"]) == []
            await until(lambda: "CUT" in c.rows, what="the row")
            assert c.rows["CUT"].seq == 3
        finally:
            await c.close()
    text = log.read_text()
    assert f"incomplete or damaged record at byte {whole}" in text, text
    assert "replayed the 3 whole records" in text


def test_recording_again_cuts_a_crashed_tail_and_appends(tmp_path, caplog):
    rec = tmp_path / "again.ffrec"
    r = record.Recorder(str(rec))
    r.json(b'{"sym":"A","seq":1}')
    r.batch(encode_batch([full_tick("B", 1, 1.0)])[0][0])
    r.close()
    whole = rec.stat().st_size
    with open(rec, "ab") as fh:
        fh.write(b"\x10\x00\x00")  # half a header
    with caplog.at_level("WARNING", "fastfeed.record"):
        r = record.Recorder(str(rec))
    assert f"left incomplete at byte {whole}" in caplog.text
    r.json(b'{"sym":"A","seq":2}')
    r.close()
    with open(rec, "rb") as fh:
        got = [(kind, payload[:19]) for _, kind, _, payload in record.scan(fh)]
        assert fh.read() == b""
    assert [k for k, _ in got] == [record.JSON, record.BATCH, record.JSON]
    assert got[2][1] == b'{"sym":"A","seq":2}'


def test_a_file_that_is_not_a_recording_is_refused_at_start(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "fastfeed", "serve", "--port", "0",
                        "--record", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"--record {bad}: not a fastfeed recording" in r.stderr


@pytest.mark.parametrize("speed", ["0", "fast", "-1"])
def test_a_bad_speed_is_refused(speed):
    r = subprocess.run([sys.executable, "-m", "fastfeed", "serve", "--replay", "x.ffrec",
                        "--speed", speed], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "replay-speed must be a positive number or max" in r.stderr


async def test_in_redis_mode_the_bus_is_recorded_and_a_replay_goes_onto_the_bus(tmp_path):
    from redis_server import RedisServer

    rec = tmp_path / "bus.ffrec"
    syms = [f"BUS{i}" for i in range(8)]
    with RedisServer() as red:
        async with start_gateway("--redis", red.url, "--record", str(rec)) as gw:
            async with websockets.connect(gw.ingest_url) as pub:
                await pub.send(json.dumps([full_tick(s, 1, 1.0) for s in syms]))
                await pub.send(json.dumps([full_tick(s, 2, 2.0) for s in syms[:4]]))
            c = Client(gw.ws_url, stale_after=None)
            await c.connect()
            try:
                await subscribe_all(c, syms)
                await until(lambda: all(c.rows[s].seq == 2 for s in syms[:4]),
                            what="the published ticks back from the bus")
            finally:
                await c.close()
    ref, kinds = recorded_state(rec)
    # what the worker applied came back from Redis as binary batches
    assert set(kinds) == {record.BATCH} and set(ref) == set(syms)
    want = as_rows(ref)
    with RedisServer() as red:  # a fresh, empty Redis
        async with start_gateway("--redis", red.url, "--replay", str(rec),
                                 "--speed", "max") as player, \
                start_gateway("--redis", red.url) as other:
            for gw in (player, other):  # the replay reached every gateway on the bus
                c = Client(gw.ws_url, stale_after=None)
                await c.connect()
                try:
                    await subscribe_all(c, syms)
                    await until(lambda c=c: c.rows == want, what="the recorded state via Redis")
                finally:
                    await c.close()
