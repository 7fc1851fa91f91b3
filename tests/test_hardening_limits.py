"""No client can stall the others or make the gateway hold unbounded memory.

Each test is a misbehaving client from the outside (raw frames, `websockets`)
against a real `fastfeed serve`: requests are charged by the work they cost
(`list` by the symbols it examines), every message counts against the rate
limit, what a client leaves unread is bounded, and a frame over an
endpoint's limit is refused from its header.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import random
import struct
import time

import pytest
import websockets
from fixtures import rss_kib, settled_rss_kib
from support import http_get, start_gateway, until
from wsraw import RawWS, client_frame

from fastfeed import _core
from fastfeed.auth import EVERYTHING, Entitlements
from fastfeed.gateway.session import SymbolIndex, list_page


def metric(g, name: str, label: str = "") -> float:
    for line in http_get(g.url + "/metrics", 10)[1].decode().splitlines():
        if line.startswith(name + (label and "{" + label + "}") + " "):
            return float(line.split()[-1])
    return 0.0


# ---- item: list pages, and costs what it examines


def test_list_page_agrees_with_a_plain_glob_filter():
    syms = sorted(f"{a}{b}{n}" for a in "ABX" for b in "AB.Z" for n in range(30))
    for match in (None, "*", "A*", "AB*", "A?1*", "*1", "X.*", "[AB]A2", "B.29", "NOPE",
                  "Z*", "A[!B]*", "*"):
        want = [s for s in syms if fnmatch.fnmatchcase(s, match or "*")]
        for cap in (1, 7, 1000):
            got: list[str] = []
            after = None
            while True:
                page, nxt, examined = list_page(syms, match, after, cap)
                assert len(page) <= cap and len(page) <= examined <= 2 * cap
                got += page
                if nxt is None:
                    break
                assert after is None or nxt > after, "each page makes progress"
                after = nxt
            assert got == want, (match, cap)


def test_the_symbol_index_keeps_each_entitlements_view_as_the_table_grows():
    table = _core.Table(capacity=4096)
    index = SymbolIndex(table)
    ents = [EVERYTHING, Entitlements("a", ("B*", "X?A*")), Entitlements("b", ("*.1",)),
            Entitlements("c", ())]
    rng = random.Random(7)
    for step in range(6):
        for _ in range(rng.choice([1, 5, 300])):
            table.intern_symbol(rng.choice("BXYZ") + "".join(
                rng.choice("AB.1") for _ in range(rng.randint(1, 5))))
        every = sorted(table.symbol(i) for i in range(len(table)))
        for ent in ents:
            assert index.visible(ent) == [s for s in every if ent.allows(s)], (step, ent)


async def test_list_is_paged_with_more_and_after():
    async with start_gateway("--simulate", "500", "--rate", "10",
                             "--max-list-symbols", "40") as g, websockets.connect(g.ws_url) as ws:
        got: list[str] = []
        after = None
        while True:
            req = {"op": "list", "match": "X*", "id": len(got)}
            if after:
                req["after"] = after
            await ws.send(json.dumps(req))
            while (m := json.loads(await ws.recv()))["type"] != "list":
                pass
            assert len(m["symbols"]) <= 40
            got += m["symbols"]
            if not m["more"]:
                assert "next" not in m
                break
            after = m["next"]
        assert got == sorted(got) and len(got) == len(set(got)) > 40
        assert all(s.startswith("X") for s in got)
        await ws.send(json.dumps({"op": "list", "after": 5}))
        while (m := json.loads(await ws.recv()))["type"] != "error":
            pass
        assert m["code"] == "bad_request" and "after" in m["message"]
        await ws.send(json.dumps({"op": "list", "match": "*" * 129}))
        while (m := json.loads(await ws.recv()))["type"] != "error":
            pass
        assert m["code"] == "bad_request" and "128" in m["message"]


async def test_a_list_flood_over_a_large_table_does_not_stall_other_clients():
    """100 `list` in one write with 100,000 instruments: the flooder is charged
    by the symbols each list examines, so it is rate limited and closed 1008
    while a canary keeps its updates and /healthz keeps answering."""
    async with (start_gateway("--simulate", "100000", "--rate", "20000") as g,
                websockets.connect(g.ws_url) as canary):
        await canary.send(json.dumps({"op": "list", "match": "X*"}))
        while (m := json.loads(await canary.recv()))["type"] != "list":
            pass
        await canary.send(json.dumps({"op": "subscribe", "symbols": m["symbols"][:2000]}))
        gaps: list[float] = []
        stop = asyncio.Event()

        async def watch() -> int:
            n, last = 0, time.monotonic()
            while not stop.is_set():
                m = json.loads(await asyncio.wait_for(canary.recv(), 10))
                if m["type"] == "update":
                    now = time.monotonic()
                    gaps.append(now - last)
                    last, n = now, n + 1
            return n

        watcher = asyncio.ensure_future(watch())
        await until(lambda: len(gaps) >= 5)
        before = len(gaps)
        flooder = await RawWS.connect(g.port)
        flooder.send_text('{"op":"list"}')  # one alone: a full page
        first = json.loads((await flooder.recv_frame(10))[1])
        assert first["type"] == "list" and first["more"] is True
        assert len(first["symbols"]) == 10000
        # 200 in one write: twice the 100 of the report, so no refill mid-way saves it
        flooder.writer.write(client_frame(1, b'{"op":"list"}') * 200)
        seen = []
        while (frame := await flooder.recv_frame(10))[0] != 8:
            m = json.loads(frame[1])
            seen.append(m.get("code") or m["type"])
        flooder.close()
        assert struct.unpack("!H", frame[1][:2])[0] == 1008
        assert "rate_limited" in seen and seen.count("list") < 30, seen[:30]
        assert (await asyncio.to_thread(http_get, g.url + "/healthz", 5))[0] == 200
        # the canary still gets its updates after the flood
        await until(lambda: len(gaps) >= before + 20)
        stop.set()
        await watcher
        print(f"canary's worst gap between updates: {max(gaps) * 1000:.0f} ms "
              f"over {len(gaps)} updates")


# ---- item: every message counts against the rate limit


async def test_binary_frames_and_pings_count_against_the_rate_limit():
    async with start_gateway() as g:
        ws = await RawWS.connect(g.port)
        ws.writer.write(b"".join(client_frame(2) for _ in range(500)))
        seen = []
        while True:
            op, data = await ws.recv_frame(10)
            if op == 8:
                code = struct.unpack("!H", data[:2])[0]
                break
            seen.append(json.loads(data)["code"])
        ws.close()
        assert code == 1008
        assert seen[0] == "bad_request" and "rate_limited" in seen
        assert len(seen) < 200, "the limiter let most of the 500 through"

        ws = await RawWS.connect(g.port)
        ws.writer.write(b"".join(client_frame(9) for _ in range(500)))
        pongs = 0
        while True:
            op, data = await ws.recv_frame(10)
            if op == 8:
                code = struct.unpack("!H", data[:2])[0]
                break
            pongs += op == 10
        ws.close()
        assert code == 1008 and 0 < pongs < 200


# ---- item: what a client leaves unread is bounded


@pytest.mark.parametrize("limiter", ["default", "off"])
async def test_a_client_that_never_reads_its_replies_is_bounded_then_closed_1008(limiter):
    """Five clients flood requests and read nothing. With the default rate
    limit, lists, pings and empty binary frames alike end in 1008. With the
    limit off (a huge bucket) five list flooders ask for ~5 MB of replies
    each: the gateway stops reading each above the high-water mark and
    closes it 1008 past --max-queued-bytes. Either way its memory grows by
    less than 16 MiB for the five (before: +50 to +110 MiB for one)."""
    off = ["--requests-per-s", "1000000", "--request-burst", "1000000"]
    async with start_gateway("--simulate", "3000", "--rate", "100",
                             *(off if limiter == "off" else [])) as g:
        base = await settled_rss_kib(g.proc.pid)
        closed0 = metric(g, "fastfeed_closes_total", 'code="1008"')
        list_frame = client_frame(1, b'{"op":"list"}')
        mixes = [list_frame * 200, list_frame * 200, client_frame(2) * 2000,
                 client_frame(9) * 2000, list_frame * 200]
        if limiter == "off":  # pongs and errors are tiny: the limiter is what bounds them
            mixes = [list_frame * 200] * 5
        flooders = [await RawWS.connect(g.port, rcvbuf=4096) for _ in range(5)]
        peak = base

        async def flood(ws: RawWS, k: int) -> None:
            mix = mixes[k]
            for _ in range(200):
                ws.writer.write(mix)
                try:
                    await asyncio.wait_for(ws.writer.drain(), 0.2)
                except (TimeoutError, ConnectionError):
                    return  # the gateway stopped reading us, or cut us off

        tasks = [asyncio.ensure_future(flood(ws, k)) for k, ws in enumerate(flooders)]
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_kib(g.proc.pid))
            await asyncio.sleep(0.05)
        await until(lambda: metric(g, "fastfeed_closes_total", 'code="1008"') >= closed0 + 5)
        peak = max(peak, rss_kib(g.proc.pid))
        for ws in flooders:
            ws.close()
        print(f"gateway RSS grew by {(peak - base) / 1024:.1f} MiB ({limiter} rate limit)")
        assert peak - base < 16 * 1024, (base, peak)
        assert (await asyncio.to_thread(http_get, g.url + "/healthz", 5))[0] == 200


# ---- item: the /ws message limit applies from the frame header


async def test_a_frame_header_over_the_ws_limit_is_refused_at_once():
    async with start_gateway("--idle-timeout-s", "600") as g:
        for opcode, size in ((1, 1 << 20), (2, 65537), (1, 4 * 1024 * 1024 - 1000)):
            ws = await RawWS.connect(g.port)
            ws.writer.write(client_frame(opcode, declared=size))  # and then nothing
            assert await ws.recv_close(10) == 1009
            ws.close()
        # a continuation that takes a fragmented message over the limit
        ws = await RawWS.connect(g.port)
        ws.send_frame(1, b"x" * 60000, fin=False)
        ws.writer.write(client_frame(0, declared=10000))
        assert await ws.recv_close(10) == 1009
        ws.close()
        # within the limit, a message in many reads still goes through
        async with websockets.connect(g.ws_url) as ok:
            await ok.send(json.dumps({"op": "ping", "id": "x" * 60000}))
            while (m := json.loads(await ok.recv()))["type"] != "pong":
                pass
            assert len(m["id"]) == 60000


async def test_twenty_clients_sending_huge_frames_do_not_pin_memory():
    """20 clients each declare a frame 1,000 bytes short of 4 MB and push its
    payload: each is closed 1009 from its header and the gateway stops
    reading it; the gateway's memory grows by less than 16 MiB in all
    (before: +76 MiB)."""
    async with start_gateway("--idle-timeout-s", "600") as g:
        base = await settled_rss_kib(g.proc.pid)
        size = 4_000_000 - 1000
        clients = [await RawWS.connect(g.port) for _ in range(20)]
        for ws in clients:
            ws.writer.write(client_frame(2, declared=size) + bytes(size - 1000))
        codes = await asyncio.gather(*(ws.recv_close(10) for ws in clients))
        peak = rss_kib(g.proc.pid)
        print(f"gateway RSS grew by {(peak - base) / 1024:.1f} MiB for 20 huge frames")
        for ws in clients:
            ws.close()
        assert codes == [1009] * 20
        assert peak - base < 16 * 1024, (base, peak)
        assert (await asyncio.to_thread(http_get, g.url + "/healthz", 5))[0] == 200


@pytest.mark.parametrize("partial", [False, True])
async def test_frames_sent_with_the_upgrade_request_are_still_checked(partial):
    """A client that sends frames right behind its upgrade request (RFC 6455
    forbids it, some do anyway): they reach picows before the guard, and what
    follows is still held to the limit."""
    async with start_gateway("--idle-timeout-s", "600") as g:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
        ping = client_frame(1, b'{"op":"ping","id":1}')
        tail = ping + client_frame(1, declared=30)[:2] if partial else ping
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n" + tail)
        await reader.readuntil(b"\r\n\r\n")
        ws = RawWS(reader, writer)
        _, data = await ws.recv_frame(10)
        assert json.loads(data)["type"] == "pong"
        if not partial:
            ws.writer.write(client_frame(1, declared=1 << 20))
        else:  # the rest of a 30-byte text frame, then a good request, then a huge one
            ws.writer.write(bytes(4) + bytes(30))  # mask 0: the payload is 30 NULs
            await asyncio.sleep(0)
            ws.writer.write(ping + client_frame(1, declared=1 << 20) + bytes(100_000))
        assert await ws.recv_close(10) == 1009
        ws.close()
