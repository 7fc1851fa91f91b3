"""The board's depth ladder, in a real Chromium.

The page comes from a real gateway (`fastfeed serve`), pointed with `?ws=`
at a WebSocket server that speaks the contract's version 1.1 book messages
(`test_client_books.ServerBook`: levels and seq kept the gateway's way,
checksums from `zlib.crc32` and `struct`), so the test knows the book the
page must show at every moment. Clicking a row subscribes its book; the
ladder must show the server's ten best levels a side (price, volume,
orders), flash the levels that change, scale the volume bars, survive a bad
checksum (resubscribe) and unsubscribe the book when closed.

A screenshot of the ladder is saved to test-artifacts/ladder.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from fixtures import CHROMIUM, CHROMIUM_ARGS
from support import Gateway, start_gateway
from test_client_books import ServerBook, crc, seeded_book, update
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed as WSClosed

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
WAIT = 20_000  # ms: generous, for a loaded 2-core machine
SYMS = ["ASII", "BBCA", "BBRI", "TLKM"]

try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover
    async_playwright = None  # type: ignore[assignment]


def quote(sym: str, seq: int) -> list[Any]:
    return [sym, seq, 1_700_000_000_000_000_000 + seq, 9100.0, 9125.0, 9100.0, 1000.0, 300.0,
            100.0, 1e6 + seq]


def book_requests(s: StandIn) -> list[dict[str, Any]]:
    """The page's requests that name the book channel (the ladder's)."""
    return [r for r in s.requests if "book" in (r.get("channels") or ())]


class StandIn:
    """The contract's side of the socket: quotes for SYMS, the book of
    whichever symbol the page subscribes with the book channel."""

    def __init__(self) -> None:
        self.rng = random.Random(8)
        self.books = {s: seeded_book(s, self.rng) for s in SYMS}
        self.requests: list[dict[str, Any]] = []
        self.book_subs: set[str] = set()
        self.bad_checksum = asyncio.Event()
        self.conns: list[ServerConnection] = []

    async def run(self, ws: ServerConnection) -> None:
        self.conns.append(ws)
        pump = asyncio.ensure_future(self.pump(ws))
        try:
            async for raw in ws:
                await self.answer(ws, json.loads(raw))
        except WSClosed:
            pass
        finally:
            pump.cancel()

    async def answer(self, ws: ServerConnection, req: dict[str, Any]) -> None:
        self.requests.append(req)
        op, rid = req["op"], req.get("id")
        chans = req.get("channels") or ["quote"]
        syms = req.get("symbols") or []
        if op == "list":
            await ws.send(json.dumps({"type": "list", "id": rid, "symbols": SYMS, "more": False}))
        elif op == "ping":
            await ws.send(json.dumps({"type": "pong", "id": rid, "ts": 1}))
        elif op == "subscribe":
            snap: dict[str, Any] = {"type": "snapshot", "id": rid, "unknown": [], "rows": []}
            if "quote" in chans:
                snap["rows"] = [quote(s, 1) for s in syms]
            if "book" in chans:
                self.book_subs.update(syms)
                snap["books"] = [self.books[s].snapshot_entry() for s in syms]
            await ws.send(json.dumps(snap))
        else:
            if op == "unsubscribe" and "book" in (req.get("channels") or ["book"]):
                self.book_subs.difference_update(syms)
            await ws.send(json.dumps({"type": "ack", "id": rid, "op": op, "symbols": syms}))

    async def pump(self, ws: ServerConnection) -> None:
        """Book changes at about 60 a second, most near the top, now and
        then a sweep of three levels; one wrong checksum when asked."""
        with contextlib.suppress(WSClosed):
            while True:
                await asyncio.sleep(0.016)
                entries = []
                for sym in sorted(self.book_subs):
                    b = self.books[sym]
                    key = self.rng.choice(["bids", "asks"])
                    sign = -1 if key == "bids" else 1
                    best = (max if key == "bids" else min)(b.side[key])
                    if self.rng.random() < 0.05:  # a sweep: three levels taken
                        ch = [[best + sign * 25 * k, 0.0, 0] for k in range(3)]
                    else:
                        k = min(int(self.rng.expovariate(0.5)), 14)
                        ch = [[best + sign * 25 * k, 100.0 * self.rng.randint(1, 900),
                               self.rng.randint(1, 30)]]
                    bad = None
                    if self.bad_checksum.is_set():
                        self.bad_checksum.clear()
                        bad = 7
                    entries.append(b.entry({key: ch}, checksum=bad))
                    # keep both sides deep enough
                    for side, s2 in (("bids", -1), ("asks", 1)):
                        while len(b.side[side]) < 14:
                            edge = (min if side == "bids" else max)(b.side[side])
                            b.side[side][edge + s2 * 25] = [edge + s2 * 25, 500.0, 2]
                if entries:
                    await ws.send(update(*entries))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator:
    if async_playwright is None or not Path(CHROMIUM).exists():
        pytest.fail(f"needs Playwright for Python and Chromium at {CHROMIUM} "
                    "(apt-get install chromium)", pytrace=False)
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    async with start_gateway("--simulate", "20", "--rate", "100") as gw:
        yield gw


@pytest_asyncio.fixture(loop_scope="module")
async def standin() -> AsyncIterator[tuple[StandIn, str]]:
    s = StandIn()
    async with serve(s.run, "127.0.0.1", 0,
                     select_subprotocol=lambda c, offered: offered[0]) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield s, f"ws://127.0.0.1:{port}/ws"


# The ladder's rows, read back from the DOM as [price, volume, orders] per side.
LADDER = """() => {
  const num = (td) => td.textContent === '' ? null : Number(td.textContent.replace(/,/g, ''));
  const out = { bids: [], asks: [] };
  for (const tr of document.querySelectorAll('#depth tr')) {
    const c = (f) => tr.querySelector(`[data-f="${f}"]`);
    for (const side of ['bid', 'ask']) {
      const p = num(c(side));
      if (p === null) continue;
      out[side + 's'].push([p, num(c(side + '_volume')), num(c(side + '_orders')) ?? 0]);
    }
  }
  return out;
}"""


def server_view(b: ServerBook) -> dict[str, list[list[Any]]]:
    return {k: [[p, v, o] for p, v, o in b.view(k)] for k in ("bids", "asks")}


async def test_a_click_opens_the_ladder_and_it_shows_the_servers_book(browser, gateway,
                                                                       standin) -> None:
    s, ws_url = standin
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"{gateway.url}/?ws={ws_url}")
    wait = lambda js, arg=None: page.wait_for_function(js, arg=arg, timeout=WAIT, polling=50)  # noqa: E731
    await wait("() => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length === 4")
    assert await page.is_hidden("#ladder")

    await page.click('#rows tr[data-sym="BBCA"] [data-f="last"]')
    await wait("() => !document.querySelector('#ladder').hidden")
    # its size is fixed (ten rows a side, always), whatever the book holds
    height = await page.evaluate("() => document.querySelector('#ladder').offsetHeight")
    assert await page.text_content("#ladder-sym") == "BBCA"
    assert await page.get_attribute('#rows tr[data-sym="BBCA"]', "class") == "selected"
    # (the side panel asks for the clicked symbol's trades and bars beside it)
    sub = [r for r in book_requests(s) if r["op"] == "subscribe"]
    assert sub[-1]["symbols"] == ["BBCA"] and sub[-1]["channels"] == ["book"]

    # live: the changes flash as they come (a cell lit up or down)
    await wait("() => document.querySelector('#depth td.up, #depth td.dn') !== null")
    # and a bad checksum is healed by resubscribing the book
    s.bad_checksum.set()
    await wait("() => fastfeed.client.counters.bookResyncs === 1")
    await wait("() => fastfeed.client.books.get('BBCA') && !fastfeed.client._resyncing.size")
    ops = [(r["op"], r.get("channels")) for r in book_requests(s)[-2:]]
    assert ops == [("unsubscribe", ["book"]), ("subscribe", ["book"])]

    # stop the feed and compare: the ladder shows exactly the server's book
    s.book_subs.clear()
    want = server_view(s.books["BBCA"])
    await wait("(seq) => fastfeed.client.books.get('BBCA')?.seq === seq", s.books["BBCA"].seq)
    await wait("""(want) => {
      const got = (""" + LADDER + """)();
      return JSON.stringify(got) === JSON.stringify(want);
    }""", want)
    got_crc = await page.evaluate("() => fastfeed.client.books.get('BBCA').checksum()")
    assert got_crc == crc(s.books["BBCA"].view("bids"), s.books["BBCA"].view("asks"))
    assert len(want["bids"]) == len(want["asks"]) == 10
    assert await page.evaluate("() => document.querySelector('#ladder').offsetHeight") == height
    # once the last flash is off, a ladder with nothing new is not painted again
    await wait("() => fastfeed.board.ladder.nextOff === 0")
    idle = await page.evaluate("""() => new Promise((done) => {
      const stats = fastfeed.board.ladder.stats;
      const p0 = stats.paints;
      let n = 0;
      const f = () => (++n < 30 ? requestAnimationFrame(f) : done(stats.paints - p0));
      requestAnimationFrame(f);
    })""")
    assert idle == 0
    info = await page.text_content("#ladder-info")
    assert info is not None and f"seq {s.books['BBCA'].seq}" in info

    # the largest volume shown fills its bar; the others are in proportion
    bars = await page.evaluate("""() => [...document.querySelectorAll('#depth .bar')]
        .map((b) => Number(b.style.transform.replace(/[^0-9.]/g, '')))""")
    vols = [lv[1] for k in range(10) for lv in (want["bids"][k], want["asks"][k])]
    assert max(bars) == 1.0
    assert bars == [round(v / max(vols), 3) for v in vols]

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "ladder.png"))

    # Esc closes it and unsubscribes the book, keeping the quote
    await page.keyboard.press("Escape")
    await wait("() => document.querySelector('#ladder').hidden")
    await wait("() => !fastfeed.client.books.has('BBCA')")
    last = book_requests(s)[-1]
    assert (last["op"], last["symbols"], last["channels"]) == ("unsubscribe", ["BBCA"], ["book"])
    assert await page.evaluate("() => fastfeed.client.rows.has('BBCA')")
    await ctx.close()
    assert not errors, errors


async def test_another_row_moves_the_ladder(browser, gateway, standin) -> None:
    s, ws_url = standin
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    await page.goto(f"{gateway.url}/?ws={ws_url}")
    wait = lambda js, arg=None: page.wait_for_function(js, arg=arg, timeout=WAIT, polling=50)  # noqa: E731
    await wait("() => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length === 4")
    await page.click('#rows tr[data-sym="TLKM"] [data-f="sym"]')
    await wait("() => fastfeed.client.books.has('TLKM')")
    await page.click('#rows tr[data-sym="ASII"] [data-f="sym"]')
    await wait("() => fastfeed.client.books.has('ASII') && !fastfeed.client.books.has('TLKM')")
    assert await page.text_content("#ladder-sym") == "ASII"
    assert s.book_subs == {"ASII"}
    await page.click("#ladder-close")
    await wait("() => document.querySelector('#ladder').hidden")
    await ctx.close()


async def test_the_ladder_opens_at_the_subscription_limit_on_a_real_gateway(browser) -> None:
    """As many instruments as the per-connection limit (5000 pairs): the board
    leaves one pair free for the ladder and four for the side panel (the
    market's tape, the selected symbol's trades and bars), so the book of a
    clicked row is still served, by the gateway's own simulated books,
    checksums verified, and the panel's trades with it."""
    async with start_gateway("--simulate", "5000", "--rate", "500") as gw:
        ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{gw.url}/")
        wait = lambda js: page.wait_for_function(js, timeout=WAIT * 3, polling=100)  # noqa: E731
        await wait("() => window.fastfeed && fastfeed.client.subscribed.size === 4995")
        assert await page.text_content("#note") == \
            "showing 4995 of 5000 instruments (subscription limit)"
        await page.click('#rows tr[data-sym="BBCA"] [data-f="last"]')
        await wait("""() => { const b = fastfeed.client.books.get('BBCA');
          return b && b.seq > 0 && b.bids.length === 10 && b.asks.length === 10; }""")
        # the ladder shows the client's book (every entry's checksum checked)
        await wait("""() => {
          const b = fastfeed.client.books.get('BBCA');
          const three = (side) => side.map((l) => l.slice(0, 3));
          const want = { bids: three(b.bids), asks: three(b.asks) };
          return JSON.stringify((""" + LADDER + """)()) === JSON.stringify(want);
        }""")
        assert await page.evaluate("() => fastfeed.client.counters.bookResyncs") == 0
        assert "too_many" not in (await page.text_content("#note") or "")
        # the side panel beside it, on BBCA too (a click selects it for both):
        # its trades and bars
        await wait("() => fastfeed.side.sym === 'BBCA'"
                   " && fastfeed.client.trades.get('BBCA')?.length"
                   " && fastfeed.side.drawn?.bars.length > 0")
        assert not await page.evaluate("() => fastfeed.side.unsupported || false")
        await ctx.close()
        assert not errors, errors
