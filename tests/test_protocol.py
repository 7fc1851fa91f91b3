"""The wire contract (docs/protocol.md), spoken by a third-party client (`websockets`).

Each test starts from what a client does and checks what the contract says it
gets back. The gateway is a real `fastfeed serve` process fed through /ingest.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets
from support import http_get, running_gateway, start_gateway
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect
from wsraw import RawWS

from fastfeed import _core

FIELDS = ["sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume"]


@pytest.fixture(scope="module")
def gw():
    with running_gateway("--max-subscriptions", "20", "--max-watched", "3",
                         "--heartbeat-s", "0.5") as g:
        with sync_connect(g.ingest_url) as pub:
            pub.send(json.dumps([
                {"sym": s, "seq": 10, "ts": 1, "bid": 100.0 + k, "ask": 101.0 + k}
                for k, s in enumerate(["BBCA", "BBRI", "BMRI", "TLKM", "ASII", "GOTO"])
            ]))
            time.sleep(0.2)
        yield g


async def publish(g, ticks):
    async with websockets.connect(g.ingest_url) as pub:
        await pub.send(json.dumps(ticks))
        try:
            return [json.loads(m) for m in [await asyncio.wait_for(pub.recv(), 0.3)]]
        except TimeoutError:
            return []


async def reply(ws, type_, timeout=3.0):
    """Next message of a type, skipping updates and heartbeats in between."""
    async def go():
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == type_:
                return m
    return await asyncio.wait_for(go(), timeout)


async def test_subscribe_answers_with_a_snapshot_of_current_rows_and_unknowns(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 7, "symbols": ["BBCA", "TLKM", "NOPE"]}))
        snap = await reply(ws, "snapshot")
        assert snap["id"] == 7
        assert snap["fields"] == FIELDS
        assert sorted(r[0] for r in snap["rows"]) == ["BBCA", "TLKM"]
        assert snap["unknown"] == ["NOPE"]
        bbca = next(r for r in snap["rows"] if r[0] == "BBCA")
        assert bbca[1] >= 10 and isinstance(bbca[3], float)


async def test_updates_carry_only_subscribed_instruments_conflated_to_latest(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["BMRI"]}))
        await reply(ws, "snapshot")
        await publish(gw, [{"sym": "BMRI", "seq": 100 + k, "last": float(k)} for k in range(50)]
                      + [{"sym": "ASII", "seq": 500, "last": 1.0}])
        last = None
        while last is None or last[1] < 149:
            up = await reply(ws, "update")
            assert {r[0] for r in up["rows"]} == {"BMRI"}
            assert len(up["rows"]) == 1  # one row per instrument per frame
            last = up["rows"][0]
            assert isinstance(up["t"], int)
        assert last[5] == 49.0


async def test_subscribe_with_since_sends_only_what_the_client_missed(gw):
    await publish(gw, [{"sym": "GOTO", "seq": 20, "last": 70.0}])
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["GOTO", "BBRI"],
                                  "since": {"GOTO": 19, "BBRI": 10}}))
        snap = await reply(ws, "snapshot")
        assert [r[0] for r in snap["rows"]] == ["GOTO"]


async def test_unsubscribe_acks_and_stops_updates(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["ASII", "TLKM"]}))
        await reply(ws, "snapshot")
        await ws.send(json.dumps({"op": "unsubscribe", "id": "u", "symbols": ["ASII"]}))
        ack = await reply(ws, "ack")
        assert ack == {"type": "ack", "id": "u", "op": "unsubscribe", "symbols": ["ASII"]}
        await publish(gw, [{"sym": "ASII", "seq": 900, "last": 1.0},
                           {"sym": "TLKM", "seq": 900, "last": 2.0}])
        up = await reply(ws, "update")
        assert [r[0] for r in up["rows"]] == ["TLKM"]
        await ws.send(json.dumps({"op": "unsubscribe", "id": 2, "symbols": ["ASII"]}))
        err = await reply(ws, "error")
        assert err["code"] == "not_subscribed" and err["symbols"] == ["ASII"]


async def test_watch_requires_subscription_and_is_capped(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["BBCA", "BBRI", "BMRI", "TLKM"]}))
        await reply(ws, "snapshot")
        await ws.send(json.dumps({"op": "watch", "id": 1, "symbols": ["BBCA", "GOTO"]}))
        err = await reply(ws, "error")
        assert err["code"] == "not_subscribed" and err["symbols"] == ["GOTO"]
        ack = await reply(ws, "ack")
        assert ack["op"] == "watch" and ack["symbols"] == ["BBCA"]
        await ws.send(json.dumps({"op": "watch", "id": 2, "symbols": ["BBRI", "BMRI", "TLKM"]}))
        err = await reply(ws, "error")
        assert err["code"] == "too_many_watched" and err["id"] == 2
        await ws.send(json.dumps({"op": "unwatch", "id": 3, "symbols": ["BBCA"]}))
        ack = await reply(ws, "ack")
        assert ack["op"] == "unwatch" and ack["symbols"] == ["BBCA"]


async def test_watched_instrument_skips_the_frame_wait(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "configure", "id": 1, "frame_ms": 60000}))
        assert (await reply(ws, "ack"))["frame_ms"] == 60000
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["BBCA", "BBRI"]}))
        await reply(ws, "snapshot")
        await ws.send(json.dumps({"op": "watch", "symbols": ["BBCA"]}))
        await reply(ws, "ack")
        await publish(gw, [{"sym": "BBCA", "seq": 7000, "last": 9.5}])
        # with 60 s frames, only the watch can explain an update now
        up = await reply(ws, "update", timeout=5)
        assert up["rows"][0][:2] == ["BBCA", 7000]


async def test_configure_bounds_the_frame_interval(gw):
    async with websockets.connect(gw.ws_url) as ws:
        for bad in (1, 60001, "16", None):
            await ws.send(json.dumps({"op": "configure", "id": 1, "frame_ms": bad}))
            assert (await reply(ws, "error"))["code"] == "bad_request"


async def test_list_filters_by_glob(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "list", "id": 1, "match": "BB*"}))
        m = await reply(ws, "list")
        assert set(m["symbols"]) == {"BBCA", "BBRI"} and m["id"] == 1
        await ws.send(json.dumps({"op": "list"}))
        assert len((await reply(ws, "list"))["symbols"]) >= 6


async def test_ping_answers_with_server_time(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "ping", "id": [1][0]}))
        m = await reply(ws, "pong")
        assert m["id"] == 1 and abs(m["ts"] - _core.wall_ns()) < 60e9


async def test_heartbeat_when_quiet(gw):
    async with websockets.connect(gw.ws_url) as ws:
        m = await reply(ws, "heartbeat", timeout=5)
        assert isinstance(m["t"], int)


@pytest.mark.parametrize("raw, code", [
    ("not json", "bad_request"),
    ("[1,2]", "bad_request"),
    ('{"op": 5}', "bad_request"),
    ('{"op": "subscribe", "symbols": "BBCA"}', "bad_request"),
    ('{"op": "subscribe", "symbols": ["BB CA"]}', "bad_request"),
    ('{"op": "subscribe", "symbols": ["' + "A" * 33 + '"]}', "bad_request"),
    ('{"op": "subscribe", "symbols": ["BBCA"], "since": {"BBCA": "x"}}', "bad_request"),
    ('{"op": "fly"}', "unknown_op"),
    ('{"op": "ping", "id": {"a": 1}}', "bad_request"),
])
async def test_bad_requests_get_a_clear_error_and_change_nothing(gw, raw, code):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(raw)
        err = await reply(ws, "error")
        assert err["code"] == code and err["message"]
        await ws.send(json.dumps({"op": "ping", "id": 1}))
        assert (await reply(ws, "pong"))["id"] == 1  # the connection still serves


async def test_too_many_subscriptions_refuses_the_whole_request(gw):
    await publish(gw, [{"sym": f"S{k}", "seq": 1} for k in range(30)])
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1,
                                  "symbols": [f"S{k}" for k in range(25)]}))
        assert (await reply(ws, "error"))["code"] == "too_many_subscriptions"
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["S1"]}))
        assert [r[0] for r in (await reply(ws, "snapshot"))["rows"]] == ["S1"]


async def test_binary_subprotocol_frames_decode_with_one_frombuffer(gw):
    async with websockets.connect(gw.ws_url, subprotocols=["fastfeed.v1.bin"]) as ws:
        assert ws.subprotocol == "fastfeed.v1.bin"
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["TLKM", "BMRI"]}))
        await reply(ws, "snapshot")
        await publish(gw, [{"sym": "TLKM", "seq": 5000, "bid": 3.5, "volume": 1e6}])
        while True:
            frame = await asyncio.wait_for(ws.recv(), 3)
            if isinstance(frame, bytes):
                break
        assert frame[:4] == b"FFB1"
        rows = np.frombuffer(frame, _core.ROW_DTYPE, offset=_core.BIN_HEADER_SIZE)
        assert rows["sym"][0] == b"TLKM" and rows["seq"][0] == 5000 and rows["bid"][0] == 3.5


async def test_json_is_the_default_and_unknown_subprotocols_are_refused(gw):
    async with websockets.connect(gw.ws_url, subprotocols=["fastfeed.v1.json"]) as ws:
        assert ws.subprotocol == "fastfeed.v1.json"
    with pytest.raises(InvalidStatus) as e:
        async with websockets.connect(gw.ws_url, subprotocols=["mqtt"]):
            pass
    assert e.value.response.status_code == 400


async def test_http_routes(gw):
    assert http_get(gw.url + "/healthz") == (200, b"ok\n")
    assert http_get(gw.url + "/readyz")[0] == 200
    assert http_get(gw.url + "/nope")[0] == 404
    assert http_get(gw.url + "/ws")[0] == 426
    status, body = http_get(gw.url + "/metrics")
    assert status == 200 and b"fastfeed_ticks_total" in body
    status, body = http_get(gw.url + "/")
    assert status == 200 and b"<html" in body.lower()


async def test_message_over_the_limit_closes_1009(gw):
    async with websockets.connect(gw.ws_url, max_size=None) as ws:
        await ws.send("x" * 70_000)
        with pytest.raises(ConnectionClosed) as e:
            await reply(ws, "never")
        assert e.value.rcvd.code == 1009


async def test_invalid_utf8_closes_1007(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_text(b'{"op":"ping","x":"\xff\xfe"}')
    assert await ws.recv_close() == 1007
    ws.close()


async def test_continuation_without_a_message_closes_1002(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_frame(0, b"stray")
    assert await ws.recv_close() == 1002
    ws.close()


async def test_fragmented_requests_are_reassembled(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_frame(1, b'{"op":"pi', fin=False)
    ws.send_frame(0, b'ng","id"', fin=False)
    ws.send_frame(9, b"interleaved ping")  # control frames may sit between fragments
    ws.send_frame(0, b':42}')
    while True:
        op, data = await ws.recv_frame()
        if op == 1 and b"pong" in data:
            assert json.loads(data)["id"] == 42
            break
    ws.close()


async def test_close_handshake_is_answered(gw):
    ws = await RawWS.connect(gw.port)
    ws.send_frame(8, (1000).to_bytes(2, "big") + b"bye")
    assert await ws.recv_close() == 1000
    ws.close()


async def test_ingest_answers_bad_ticks_by_name_and_applies_the_rest(gw):
    async with websockets.connect(gw.ingest_url) as pub:
        await pub.send(json.dumps([
            {"sym": "ING1", "seq": 1, "last": 5.0},
            {"sym": "ING2", "seq": -1, "last": 5.0},  # NaN is not JSON: test_hardening_input
            {"sym": "ING 3", "seq": 1},
            {"seq": 1},
            {"sym": "ING4", "seq": "one"},
            {"sym": "ING5", "seq": 1, "bid": "cheap"},
        ]))
        errors = [json.loads(await asyncio.wait_for(pub.recv(), 3)) for _ in range(5)]
        assert [e["index"] for e in errors] == [1, 2, 3, 4, 5]
        assert errors[0]["symbols"] == ["ING2"] and "seq" in errors[0]["message"]
        await pub.send("{not json")
        assert json.loads(await pub.recv())["code"] == "bad_request"
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["ING1", "ING2"]}))
        snap = await reply(ws, "snapshot")
        assert [r[0] for r in snap["rows"]] == ["ING1"] and snap["unknown"] == ["ING2"]


async def test_ingest_accepts_binary_batches(gw):
    batches, errors = _core.encode_batch([{"sym": "BIN1", "seq": 3, "ts": 9, "ask": 2.5}])
    assert not errors
    async with websockets.connect(gw.ingest_url) as pub:
        await pub.send(batches[0])
    async with websockets.connect(gw.ws_url) as ws:
        for _ in range(20):
            await ws.send(json.dumps({"op": "subscribe", "symbols": ["BIN1"]}))
            snap = await reply(ws, "snapshot")
            if snap["rows"]:
                break
            await asyncio.sleep(0.05)
        assert snap["rows"][0][:5] == ["BIN1", 3, 9, 0.0, 2.5]


async def test_stale_and_duplicate_ticks_are_dropped(gw):
    await publish(gw, [{"sym": "DUP", "seq": 5, "last": 5.0}, {"sym": "DUP", "seq": 4, "last": 4.0},
                       {"sym": "DUP", "seq": 5, "last": 6.0}])
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": ["DUP"]}))
        row = (await reply(ws, "snapshot"))["rows"][0]
        assert row[1] == 5 and row[5] == 5.0


async def test_request_flood_is_rate_limited_then_closed_1008():
    async with start_gateway("--requests-per-s", "1", "--request-burst", "3",
                             "--abuse-strikes", "5") as g, websockets.connect(g.ws_url) as ws:
        for _ in range(10):
            await ws.send('{"op":"ping"}')
        codes = []
        with pytest.raises(ConnectionClosed) as e:
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                codes.append(m.get("code") or m["type"])
        assert codes[:3] == ["pong"] * 3 and "rate_limited" in codes
        assert e.value.rcvd.code == 1008


async def test_connections_over_the_worker_limit_get_503():
    async with (start_gateway("--max-connections", "2") as g,
                websockets.connect(g.ws_url), websockets.connect(g.ws_url)):
        with pytest.raises(InvalidStatus) as e:
            async with websockets.connect(g.ws_url):
                pass
        assert e.value.response.status_code == 503
