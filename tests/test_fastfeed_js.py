"""fastfeed.js (the board's client) in Node.js on `ws`, against a real gateway.

`tests/node/fastfeed_js.mjs` runs the module the gateway serves at
/fastfeed.js with the pinned `ws` as its WebSocket. Trades published
through /ingest must all reach its tape, once each and in order, across a
connection that dies (it resumes with `since_trades`); its bars must equal
bars computed here from the published trades; the market-wide tape holds
every trade.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import start_gateway
from test_client_trades import FAST, Trades, bars_of
from test_node_client import NODE_DIR, NodeClient, node  # noqa: F401 (a fixture)

from fastfeed.publisher import Publisher

SCRIPT = NODE_DIR / "fastfeed_js.mjs"

pytestmark = pytest.mark.timeout(240)


@contextlib.asynccontextmanager
async def fastfeed_js(node: str) -> AsyncIterator[NodeClient]:  # noqa: F811
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), cwd=NODE_DIR, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    client = NodeClient(proc)
    try:
        yield client
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        client._reader.cancel()


async def state_until(js: NodeClient, ok: Any, what: str, timeout: float = 30.0) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        await js.cmd("state")
        st = next(e for e in reversed(js.events) if e["ev"] == "state")
        if ok(st):
            return st
        assert loop.time() < end, f"{what}: not within {timeout}s; last state {st}"
        await asyncio.sleep(0.2)


async def test_fastfeed_js_keeps_the_tape_and_bars_across_a_dropped_connection(
        node: str) -> None:  # noqa: F811
    syms = ["BBCA", "BBRI", "TLKM"]
    feed = Trades(syms)
    async with (
        start_gateway() as gw,
        Publisher(gw.ingest_url, backoff=FAST) as pub,
        fastfeed_js(node) as js,
    ):
        await pub.publish([{"sym": s, "seq": 1, "bid": 1.0, "ask": 2.0} for s in syms])
        await pub.publish_trades(feed.make(30))
        assert await pub.sync(10)
        await js.cmd("connect", url=gw.ws_url)
        await js.expect(lambda e: e["ev"] == "open", "fastfeed.js opens")
        await js.cmd("subscribe", symbols=syms, channels=["trades", "bars:1s"])
        sub = await js.expect(lambda e: e["ev"] == "subscribed", "the snapshot")
        assert sub == {"ev": "subscribed", "unknown": [], "forbidden": [], "errors": []}
        await js.cmd("subscribe", symbols=["*"], channels=["trades"])  # the market's tape
        sub = await js.expect(lambda e: e["ev"] == "subscribed", "the tape's snapshot")
        assert sub == {"ev": "subscribed", "unknown": [], "forbidden": [], "errors": []}

        def complete(st: dict) -> bool:
            return all(st["trades"].get(s) == list(range(1, feed.tseq[s] + 1)) for s in syms)

        await state_until(js, complete, "the snapshot's trades")
        for _ in range(4):
            await pub.publish_trades(feed.make(40))
        await js.cmd("drop")  # no close frame: 1006, and fastfeed.js reconnects
        await pub.publish_trades(feed.make(40))
        assert await pub.sync(10)
        st = await state_until(js, lambda st: st["connects"] >= 2 and complete(st),
                               "every trade once, in order, after the resume")
        assert st["lost"] == {}
        # the market-wide tape: every trade of the three, per symbol in tseq order
        market = st["trades"]["*"]
        for s in syms:
            assert [q for sym, q in market if sym == s] == list(range(1, feed.tseq[s] + 1))

        def bars_match(st: dict) -> bool:
            return all(st["bars"].get(f"1s {s}") ==
                       [list(b) for b in bars_of(feed.sent[s], 1_000_000_000)] for s in syms)

        await state_until(js, bars_match, "bars equal to those of the published trades")
