"""Under load, every client's frame interval stretches alike, up to a budget.

The gateway raises one floor under all update intervals when its worker is
busier than it should be (gateway.clock.FrameClock.pace); the core applies it.
"""

from __future__ import annotations

import asyncio

from support import http_get, start_gateway

from fastfeed import _core

MS = 1_000_000


def one_client(interval_ms: int):
    table = _core.Table()
    hub = _core.Hub(table)
    hub.capture = []
    table.apply_tick("BBCA", 1, 1, bid=1.0)
    table.apply_tick("TLKM", 1, 1, bid=1.0)
    cid = hub.add(None, interval_ms * MS, False, 1000 * MS)
    hub.subscribe_ids(cid, [table.lookup("BBCA")])
    return table, hub, cid


def frames_at(hub, table, mono_ms: int, seq: int) -> int:
    table.apply_tick("BBCA", seq, seq, bid=float(seq))
    before = len(hub.capture)
    hub.pump(wall=mono_ms * MS, mono=mono_ms * MS)
    return len(hub.capture) - before


def test_a_floor_delays_every_update_frame_until_it_has_passed():
    table, hub, _ = one_client(16)
    hub.set_floor(40 * MS)
    assert frames_at(hub, table, 1020, 2) == 0      # 16 ms passed, not 40
    assert frames_at(hub, table, 1041, 3) == 1      # one frame, with the latest row
    assert b'"BBCA",3,' in hub.capture[-1][1]


def test_a_floor_never_shortens_a_slower_clients_interval():
    table, hub, _ = one_client(100)
    hub.set_floor(40 * MS)
    assert frames_at(hub, table, 1050, 2) == 0
    assert frames_at(hub, table, 1101, 3) == 1


def test_no_floor_keeps_the_clients_own_interval():
    table, hub, _ = one_client(16)
    hub.set_floor(40 * MS)
    hub.set_floor(0)
    assert frames_at(hub, table, 1017, 2) == 1


def test_watched_instruments_ignore_the_floor():
    table, hub, cid = one_client(16)
    hub.watch_ids(cid, [table.lookup("BBCA")], True)
    hub.set_floor(40 * MS)
    assert frames_at(hub, table, 1001, 2) == 1


async def test_an_idle_gateway_does_not_stretch_frames():
    async with start_gateway("--simulate", "50", "--rate", "100") as g:
        await asyncio.sleep(0.6)
        status, body = http_get(g.url + "/metrics")
        assert status == 200
        line = next(x for x in body.decode().splitlines()
                    if x.startswith("fastfeed_frame_floor_seconds"))
        assert float(line.split()[-1]) == 0.0
