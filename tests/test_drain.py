"""SIGTERM drains: unready at once, clients closed 1012 in waves, exit 0."""

from __future__ import annotations

import asyncio
import json
import time

import websockets
from support import http_get, start_gateway
from websockets.exceptions import ConnectionClosed


async def test_sigterm_turns_unready_closes_clients_1012_and_exits_0():
    async with start_gateway("--simulate", "20", "--rate", "200",
                             "--drain-delay-s", "0.5", "--drain-s", "1") as g:
        clients = [await websockets.connect(g.ws_url) for _ in range(8)]
        g.terminate()
        await asyncio.sleep(0.2)
        assert http_get(g.url + "/readyz")[0] == 503
        codes, times = [], []
        for ws in clients:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as e:
                codes.append(e.rcvd.code if e.rcvd else None)
                times.append(time.monotonic())
        assert codes == [1012] * 8
        assert await g.wait_exit(15) == 0


async def test_second_signal_exits_at_once():
    async with start_gateway("--drain-delay-s", "30") as g, websockets.connect(g.ws_url) as ws:
        await ws.send(json.dumps({"op": "ping"}))
        await ws.recv()
        g.terminate()
        await asyncio.sleep(0.3)
        g.terminate()
        assert await g.wait_exit(5) != 0
