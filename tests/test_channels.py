"""Version 1.1 channels at the session, spoken by a `websockets` client.

Only `quote` is served yet; these tests hold the request shapes of the
contract ("Channels"): `channels` on subscribe/unsubscribe/watch/unwatch, the
defaults, unknown names refused, and the limit counting (symbol, channel)
pairs. A client that names no channel sees exactly version 1
(tests/test_protocol.py).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from support import running_gateway
from websockets.sync.client import connect as sync_connect

SYMS = ["BBCA", "BBRI", "TLKM"]


async def reply(ws, type_, timeout=5.0):
    async def go():
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == type_:
                return m
    return await asyncio.wait_for(go(), timeout)


@pytest.fixture(scope="module")
def gw():
    with running_gateway("--max-subscriptions", "2", "--max-watched", "1") as g:
        with sync_connect(g.ingest_url) as pub:
            pub.send(json.dumps([{"sym": s, "seq": 5, "bid": 1.0 + k}
                                 for k, s in enumerate(SYMS)]))
            # the ingest socket answers only errors: wait until the rows are served
            for _ in range(200):
                with sync_connect(g.ws_url) as ws:
                    ws.send(json.dumps({"op": "subscribe", "id": 0, "symbols": SYMS[:2]}))
                    if len(json.loads(ws.recv())["rows"]) == 2:
                        break
        with sync_connect(g.ws_url) as ws:
            ws.send(json.dumps({"op": "subscribe", "id": 0, "symbols": ["TLKM"]}))
            assert json.loads(ws.recv())["rows"]
        yield g


async def test_subscribe_with_channels_answers_one_snapshot(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["BBCA", "NOPE"],
                                  "channels": ["quote"]}))
        snap = await reply(ws, "snapshot")
        assert snap["id"] == 1 and snap["unknown"] == ["NOPE"]
        assert [r[:2] for r in snap["rows"]] == [["BBCA", 5]]


async def test_an_unknown_channel_is_a_bad_request_and_changes_nothing(gw):
    async with websockets.connect(gw.ws_url) as ws:
        for chans in (["quote", "nope"], [], "quote", [1]):
            await ws.send(json.dumps({"op": "subscribe", "id": 2, "symbols": ["BBCA"],
                                      "channels": chans}))
            err = await reply(ws, "error")
            assert err["code"] == "bad_request" and err["id"] == 2
        assert "unknown channel" in err["message"] or "channels" in err["message"]
        await ws.send(json.dumps({"op": "subscribe", "id": 3, "symbols": ["BBCA"],
                                  "channels": ["candles"]}))
        err = await reply(ws, "error")
        assert err["message"].startswith("unknown channel 'candles'")
        # nothing was subscribed by the refused requests
        await ws.send(json.dumps({"op": "unsubscribe", "id": 4, "symbols": ["BBCA"]}))
        err = await reply(ws, "error")
        assert err["code"] == "not_subscribed"


async def test_the_limit_counts_symbol_channel_pairs(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": SYMS,
                                  "channels": ["quote"]}))
        err = await reply(ws, "error")
        assert err["code"] == "too_many_subscriptions" and "pairs" in err["message"]
        await ws.send(json.dumps({"op": "subscribe", "id": 2, "symbols": SYMS[:2],
                                  "channels": ["quote", "quote"]}))
        assert len((await reply(ws, "snapshot"))["rows"]) == 2


async def test_unsubscribe_watch_unwatch_with_and_without_channels(gw):
    async with websockets.connect(gw.ws_url) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "symbols": ["BBCA", "BBRI"]}))
        await reply(ws, "snapshot")
        await ws.send(json.dumps({"op": "watch", "id": 2, "symbols": ["BBCA"],
                                  "channels": ["quote"]}))
        ack = await reply(ws, "ack")
        assert ack == {"type": "ack", "id": 2, "op": "watch", "symbols": ["BBCA"],
                       "channels": ["quote"]}
        await ws.send(json.dumps({"op": "watch", "id": 3, "symbols": ["BBRI"]}))
        err = await reply(ws, "error")
        assert err["code"] == "too_many_watched"
        await ws.send(json.dumps({"op": "unwatch", "id": 4, "symbols": ["BBCA"]}))
        assert await reply(ws, "ack") == {"type": "ack", "id": 4, "op": "unwatch",
                                          "symbols": ["BBCA"]}
        await ws.send(json.dumps({"op": "unsubscribe", "id": 5, "symbols": ["BBCA", "TLKM"],
                                  "channels": ["quote"]}))
        err = await reply(ws, "error")
        assert err["code"] == "not_subscribed" and err["symbols"] == ["TLKM"]
        ack = await reply(ws, "ack")
        assert ack["symbols"] == ["BBCA"] and ack["channels"] == ["quote"]
        # every channel by default
        await ws.send(json.dumps({"op": "unsubscribe", "id": 6, "symbols": ["BBRI"]}))
        assert await reply(ws, "ack") == {"type": "ack", "id": 6, "op": "unsubscribe",
                                          "symbols": ["BBRI"]}
        # all gone: a new pair fits the limit of 2 again
        await ws.send(json.dumps({"op": "subscribe", "id": 7, "symbols": ["TLKM", "BBCA"],
                                  "channels": ["quote"]}))
        assert len((await reply(ws, "snapshot"))["rows"]) == 2
