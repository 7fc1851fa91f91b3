"""The limits of docs/protocol.md ("Defaults of the limits"), each reached by a
real client against a gateway started with small limits.

Covered elsewhere: the request token bucket (`rate_limited`, then 1008) and
the subscription, watched and connections-per-worker caps in
test_protocol.py; the stall limit in test_flow_control.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import websockets
from support import http_get, running_gateway, start_gateway
from websockets.exceptions import ConnectionClosed
from wsraw import RawWS

from fastfeed import _core

MAX_MESSAGE = 1024
INGEST_RATE = 100


@pytest.fixture(scope="module")
def gw():
    with running_gateway("--max-message-bytes", str(MAX_MESSAGE),
                         "--ingest-rate", str(INGEST_RATE),
                         "--handshake-timeout-s", "2", "--idle-timeout-s", "2") as g:
        yield g


def closes(g, code: int) -> float:
    """fastfeed_closes_total for one close code."""
    for line in http_get(g.url + "/metrics")[1].decode().splitlines():
        if line.startswith(f'fastfeed_closes_total{{code="{code}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no fastfeed_closes_total for {code}")


def ping_of_size(n: int) -> bytes:
    """A valid ping request of exactly n bytes."""
    head = b'{"op":"ping","id":"'
    return head + b"x" * (n - len(head) - 2) + b'"}'


# ---- message size


async def test_a_message_of_exactly_the_limit_is_served(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_text(ping_of_size(MAX_MESSAGE))
    op, data = await ws.recv_frame()
    assert op == 1 and json.loads(data)["type"] == "pong"
    ws.close()


async def test_one_byte_over_the_limit_closes_1009(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_text(ping_of_size(MAX_MESSAGE + 1))
    assert await ws.recv_close() == 1009
    ws.close()


async def test_fragments_adding_up_to_over_the_limit_close_1009(gw):
    ws = await RawWS.connect(gw.port)
    msg = ping_of_size(MAX_MESSAGE + 1)
    third = len(msg) // 3
    ws.send_frame(1, msg[:third], fin=False)
    ws.send_frame(0, msg[third:2 * third], fin=False)
    ws.send_frame(0, msg[2 * third:])
    assert await ws.recv_close() == 1009
    ws.close()


async def test_fragments_adding_up_to_the_limit_are_served(gw):
    ws = await RawWS.connect(gw.port)
    msg = ping_of_size(MAX_MESSAGE)
    ws.send_frame(1, msg[:500], fin=False)
    ws.send_frame(0, msg[500:])
    op, data = await ws.recv_frame()
    assert op == 1 and json.loads(data)["type"] == "pong"
    ws.close()


# ---- handshake and idle timeouts


async def test_an_upgrade_not_completed_in_time_is_dropped(gw):
    # a client that opens the connection and never finishes its request
    # (slowloris) holds nothing for long: the gateway hangs up
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert await asyncio.wait_for(reader.read(), 20) == b""
    writer.close()


async def test_a_client_that_never_answers_pings_is_closed_1001(gw):
    before = closes(gw, 1001)
    ws = await RawWS.connect(gw.port)  # reads, but never answers a ping
    opcodes = []
    while True:
        op, data = await ws.recv_frame(timeout=20)
        opcodes.append(op)
        if op == 8:
            break
    assert 9 in opcodes, "a protocol ping comes first"
    assert int.from_bytes(data[:2], "big") == 1001
    ws.close()
    deadline = time.monotonic() + 10
    while closes(gw, 1001) <= before:
        assert time.monotonic() < deadline, "the 1001 close was not counted"
        await asyncio.sleep(0.1)


async def test_a_client_that_answers_pings_stays_connected(gw):
    async with websockets.connect(gw.ws_url) as ws:  # answers pings by itself
        await asyncio.sleep(5)  # two and a half idle timeouts, quiet from our side
        await ws.send(json.dumps({"op": "ping", "id": 1}))
        while (msg := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "pong":
            assert msg["type"] == "heartbeat"
        assert msg["id"] == 1


# ---- /ingest rate per publisher


async def test_ingest_over_its_tick_rate_is_refused_whole_and_not_applied(gw):
    syms = [f"RATE{k}" for k in range(INGEST_RATE + 50)]
    json_batch = [{"sym": s, "seq": 1, "last": 1.0} for s in syms]
    binary_batch = _core.encode_batch([{"sym": s, "seq": 2, "last": 2.0} for s in syms])[0][0]
    async with websockets.connect(gw.ingest_url) as pub:
        # more ticks in one message than one second's allowance: never applied
        await pub.send(json.dumps(json_batch))
        err = json.loads(await asyncio.wait_for(pub.recv(), 10))
        assert err["code"] == "rate_limited" and "NOT applied" in err["message"]
        await pub.send(binary_batch)
        err = json.loads(await asyncio.wait_for(pub.recv(), 10))
        assert err["code"] == "rate_limited" and "NOT applied" in err["message"]
        # within the allowance: applied
        await pub.send(json.dumps(json_batch[:INGEST_RATE // 2]))
    async with websockets.connect(gw.ws_url) as ws:
        for _ in range(100):
            await ws.send(json.dumps({"op": "list", "match": "RATE*"}))
            known = json.loads(await ws.recv())["symbols"]
            if known:
                break
            await asyncio.sleep(0.1)
        assert sorted(known) == sorted(syms[:INGEST_RATE // 2])
        await ws.send(json.dumps({"op": "subscribe", "symbols": known}))
        assert {r[1] for r in json.loads(await ws.recv())["rows"]} == {1}


# ---- connections per remote address


async def test_connections_from_one_address_over_the_cap_are_closed_1008():
    async with (
        start_gateway("--max-connections-per-ip", "2") as g,
        websockets.connect(g.ws_url) as first,
        websockets.connect(g.ws_url),
    ):
        third = await websockets.connect(g.ws_url)  # upgraded, then closed at once
        with pytest.raises(ConnectionClosed) as e:
            await asyncio.wait_for(third.recv(), 10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1008
        assert "over 2 connections from 127.0.0.1" in e.value.rcvd.reason
        # the two within the cap are served, and a place that frees up is taken again
        await first.send(json.dumps({"op": "ping", "id": 1}))
        assert json.loads(await first.recv())["type"] == "pong"
        await first.close()
        deadline = time.monotonic() + 10
        while True:
            again = await websockets.connect(g.ws_url)
            await again.send(json.dumps({"op": "ping", "id": 2}))
            try:
                assert json.loads(await asyncio.wait_for(again.recv(), 10))["id"] == 2
                break
            except ConnectionClosed:  # the server had not seen the close yet
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        await again.close()


def test_a_plain_http_request_to_ws_is_426_and_counted(gw):
    def refused_426() -> float:
        for line in http_get(gw.url + "/metrics")[1].decode().splitlines():
            if line.startswith('fastfeed_rejected_upgrades_total{status="426"}'):
                return float(line.split()[-1])
        return 0.0

    before = refused_426()
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 426")
    assert refused_426() == before + 1
