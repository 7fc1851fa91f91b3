"""The live board at `/`, driven in a real browser.

Playwright for Python drives the system's Chromium (Debian's `chromium`
package, /usr/bin/chromium, or $CHROMIUM); no browser is downloaded. The
gateway is a real `fastfeed serve --simulate` process. Every wait is for a
condition, never a fixed time, so the tests hold on a slow, noisy machine.

A screenshot of the board is saved to test-artifacts/board.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import websockets
from fixtures import CHROMIUM, CHROMIUM_ARGS
from support import Gateway, start_gateway
from websockets.typing import Subprotocol

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
N = 300  # simulated instruments
WAIT = 20_000  # ms: generous, for a loaded 2-core machine

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover
    async_playwright = None  # type: ignore[assignment]

if async_playwright is None or not Path(CHROMIUM).exists():
    reason = f"needs Playwright for Python and Chromium at {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI"):
        raise RuntimeError(reason)  # CI installs both: a skip there would hide a failure
    pytest.skip(reason, allow_module_level=True)


# ---- fixtures -----------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator:
    async with async_playwright() as p:
        # launch() gives every browser a fresh, temporary user-data-dir.
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    async with start_gateway("--simulate", str(N), "--rate", "400", "--seed", "11") as gw:
        yield gw


class Board:
    """A page on the board, plus what it sent and what it was told."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.sent: list[dict] = []
        self.received: list[dict] = []
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("websocket", self._ws)

    def _ws(self, ws) -> None:
        ws.on("framesent", lambda payload: self._keep(self.sent, payload))
        ws.on("framereceived", lambda payload: self._keep(self.received, payload, control=True))

    @staticmethod
    def _keep(into: list[dict], payload, control: bool = False) -> None:
        if not isinstance(payload, str):
            return
        if control and payload.startswith('{"type":"update"'):
            return  # keep the control replies only
        with contextlib.suppress(ValueError):
            into.append(json.loads(payload))

    async def wait(self, js: str, arg=None, timeout: int = WAIT):
        return await self.page.wait_for_function(js, arg=arg, timeout=timeout, polling=100)

    async def filled(self, n: int) -> None:
        await self.wait("n => window.fastfeed && fastfeed.client.rows.size >= n", n)
        await self.wait(
            "() => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length > 5"
        )

    async def visible_syms(self) -> list[str]:
        return await self.page.evaluate(f"() => ({ON_SCREEN})().map(t => t.dataset.sym)")

    async def dom_matches_state(self) -> None:
        """Every visible row shows exactly what the client holds."""
        await self.wait(DOM_MATCHES_STATE)

    async def sent_op(self, op: str, sym: str | None = None) -> dict:
        for _ in range(200):
            for m in self.sent:
                if m.get("op") == op and (sym is None or sym in m.get("symbols", [])):
                    return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"the page never sent {op} {sym or ''}: {self.sent[-5:]}")


# Rows on screen (the pool also holds a few off-screen rows for fast scrolls,
# which are only brought up to date as they scroll in).
ON_SCREEN = """(() => {
  const view = document.querySelector('#board').getBoundingClientRect();
  return [...document.querySelectorAll('#rows tr[data-sym]:not([hidden])')].filter((tr) => {
    const r = tr.getBoundingClientRect();
    return r.bottom > view.top + 1 && r.top < view.bottom - 1;
  });
})"""

# The numbers in the cells, parsed back, against the rows in the client.
DOM_MATCHES_STATE = (
    """() => {
  const rows = ("""
    + ON_SCREEN
    + """)();
  if (!rows.length) return false;
  const num = (tr, f) => Number(tr.querySelector(`[data-f="${f}"]`).textContent.replace(/,/g, ''));
  for (const tr of rows) {
    const r = fastfeed.client.rows.get(tr.dataset.sym);
    if (!r) return false;
    if (!(r[2] > 0)) {  // never traded: shown as a dash
      if (tr.querySelector('[data-f="last"]').textContent !== '\\u2013') return false;
      continue;
    }
    if (num(tr, 'bid') !== r[3] || num(tr, 'ask') !== r[4]
        || num(tr, 'last') !== r[5]) return false;
    if (num(tr, 'volume') !== r[9]) return false;
    if (Math.abs(num(tr, 'spread') - (r[4] - r[3])) > 1e-6) return false;
  }
  return true;
}"""
)


@pytest_asyncio.fixture(loop_scope="module")
async def board(browser, gateway) -> AsyncIterator[Board]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await ctx.new_page()
    b = Board(page)
    await page.goto(gateway.url + "/")
    yield b
    await ctx.close()
    assert not b.errors, b.errors


def http_get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


async def server_rows(ws_url: str) -> dict[str, list]:
    """The gateway's current row of every instrument, from a separate client."""
    async with websockets.connect(ws_url, subprotocols=[Subprotocol("fastfeed.v1.json")]) as ws:
        await ws.send(json.dumps({"op": "list", "id": 1}))
        syms = json.loads(await ws.recv())["symbols"]
        out: dict[str, list] = {}
        for i in range(0, len(syms), 500):
            await ws.send(
                json.dumps({"op": "subscribe", "id": 2 + i, "symbols": syms[i : i + 500]})
            )
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "snapshot":
                    out.update({r[0]: r for r in m["rows"]})
                    break
        return out


def same_row(a: list | None, b: list) -> bool:
    # ts is in ns, past 2**53: a JavaScript number holds it to within 256 ns
    return a is not None and a[:2] == b[:2] and abs(a[2] - b[2]) <= 1024 and a[3:] == b[3:]


async def converge(evaluate: Callable[[str], Awaitable[Any]], ws_url: str,
                   timeout: float = 30.0) -> None:
    """Wait until every instrument on the page has matched the server's row.

    `evaluate` runs a script in the page (Chromium's ``page.evaluate``,
    Firefox's ``Board.eval``). Rows keep moving, so each symbol only has to
    match the server at some poll (same seq, same values); one that never
    does is stuck or wrong.
    """
    pending: set[str] | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        server = await server_rows(ws_url)
        page = await evaluate("() => Object.fromEntries(fastfeed.client.rows)")
        if pending is None:
            pending = set(server)
        pending -= {s for s in pending if same_row(page.get(s), server[s])}
        if not pending:
            return
        if loop.time() > deadline:
            sample = sorted(pending)[:3]
            raise AssertionError(
                f"{len(pending)} rows never matched the server, e.g. "
                + "; ".join(f"{s}: page {page.get(s)} server {server[s]}" for s in sample)
            )
        await asyncio.sleep(0.2)


# ---- tests --------------------------------------------------------------------


async def test_the_page_and_its_modules_are_served(gateway: Gateway) -> None:
    status, ctype, body = await asyncio.to_thread(http_get, gateway.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b'src="board.js"' in body
    for name, kind in [
        ("board.js", "javascript"),
        ("fastfeed.js", "javascript"),
        ("style.css", "css"),
    ]:
        status, ctype, _ = await asyncio.to_thread(http_get, f"{gateway.url}/{name}")
        assert status == 200 and kind in ctype, (name, ctype)


async def test_rows_fill_and_update(board: Board, gateway: Gateway) -> None:
    await board.wait("() => document.querySelector('#status').dataset.state === 'open'")
    await board.filled(N)
    count = await board.page.text_content("#count")
    assert count is not None and count.startswith(f"{N} instruments")
    # it asked for everything in chunks, then subscribed to all of it
    # (the side panel's trades and bars subscriptions name their channels)
    subs = [m for m in board.sent if m.get("op") == "subscribe" and "channels" not in m]
    assert sum(len(m["symbols"]) for m in subs) == N
    assert all(len(m["symbols"]) <= 500 for m in subs)
    assert await board.page.get_attribute("#feed", "data-feed") == "up"

    # cells move: the busiest name on the board ticks many times a second
    sym = (await board.visible_syms())[0]
    cell = f'#rows tr[data-sym="{sym}"] [data-f="time"]'
    before = await board.page.text_content(cell)
    await board.page.wait_for_function(
        "([sel, before]) => document.querySelector(sel)?.textContent !== before",
        arg=[cell, before],
        timeout=WAIT,
        polling=100,
    )
    await board.dom_matches_state()
    await board.wait(
        "() => Number(document.querySelector('#rate').textContent.replace(/,/g, '')) > 0"
    )
    await board.wait("() => /ms/.test(document.querySelector('#latency').textContent)")

    ARTIFACTS.mkdir(exist_ok=True)
    await board.page.screenshot(path=str(ARTIFACTS / "board.png"))


async def test_virtual_scrolling_keeps_the_dom_small(board: Board) -> None:
    await board.filled(N)
    n_tr = await board.page.eval_on_selector_all("#rows tr", "trs => trs.length")
    assert n_tr < 100, "only the rows on screen (plus a margin) are in the DOM"
    # scroll to the end: the last instrument is drawn, and its cells are right
    last = await board.page.evaluate("() => fastfeed.board.view.at(-1)")
    await board.page.eval_on_selector("#board", "el => el.scrollTop = el.scrollHeight")
    await board.page.wait_for_selector(f'#rows tr[data-sym="{last}"]', timeout=WAIT)
    await board.dom_matches_state()


async def test_search_filters_the_board(board: Board) -> None:
    await board.filled(N)
    symbols = await board.page.evaluate("() => fastfeed.board.all")
    expect = sorted(s for s in symbols if "BB" in s.upper())
    assert expect, "the simulated market has BB* names"
    await board.page.fill("#search", "bb")
    await board.wait(
        "n => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length === n",
        len(expect) if len(expect) < 40 else 40,
    )
    shown = await board.visible_syms()
    assert shown == expect[: len(shown)]
    assert await board.page.text_content("#count") == f"{len(expect)} of {N}"
    await board.page.fill("#search", "no-such-name")
    await board.page.wait_for_selector("#empty:not([hidden])", timeout=WAIT)
    await board.page.fill("#search", "")
    await board.wait("n => fastfeed.board.view.length === n", N)
    await board.page.wait_for_selector("#empty", state="hidden", timeout=WAIT)


async def test_a_star_watches_and_pins_the_row(board: Board) -> None:
    await board.filled(N)
    sym = (await board.visible_syms())[7]
    await board.page.click(f'#rows tr[data-sym="{sym}"] .star')
    watch = await board.sent_op("watch", sym)
    assert watch["symbols"] == [sym]
    # pinned on top at once, marked, and the server agreed
    first = "#rows tr:first-child"
    await board.wait(
        "s => { const tr = document.querySelector('#rows tr:first-child');"
        " return tr.dataset.sym === s && tr.classList.contains('pinned') }",
        sym,
    )
    assert await board.page.get_attribute(f"{first} .star", "aria-pressed") == "true"
    await board.wait("s => fastfeed.client.watched.has(s)", sym)
    for _ in range(100):
        if any(m.get("type") == "ack" and m.get("op") == "watch" for m in board.received):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no ack for watch: {board.received[-5:]}")
    assert not any(m.get("type") == "error" for m in board.received), board.received
    assert (await board.page.text_content("#count") or "").endswith("1 watched")
    await board.dom_matches_state()

    # unstar: unwatch, and the row goes back to its place
    await board.page.click(f"{first} .star")
    await board.sent_op("unwatch", sym)
    await board.wait("s => document.querySelector('#rows tr:first-child').dataset.sym !== s", sym)
    await board.wait("s => !fastfeed.client.watched.has(s)", sym)


async def test_the_frame_rate_selector_configures_the_connection(board: Board) -> None:
    await board.filled(N)
    await board.page.select_option("#frame-ms", "250")
    m = await board.sent_op("configure")
    assert m["frame_ms"] == 250
    for _ in range(100):
        if any(r.get("type") == "ack" and r.get("op") == "configure" for r in board.received):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no ack for configure: {board.received[-5:]}")


async def test_the_board_survives_a_stall_and_a_gateway_restart(browser) -> None:
    # A gateway of its own (it gets stopped and killed), heartbeats every 0.5 s
    # so the page calls the feed stale after a second of silence.
    args = ("--simulate", str(N), "--rate", "100", "--heartbeat-s", "0.5")
    async with start_gateway(*args) as gw:
        ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            b = Board(await ctx.new_page())
            await b.page.goto(gw.url + "/?heartbeat_ms=500")
            await b.filled(N)
            sym = (await b.visible_syms())[3]
            await b.page.click(f'#rows tr[data-sym="{sym}"] .star')
            await b.sent_op("watch", sym)

            # 1. the process freezes: no close, just silence -> stale marker
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGSTOP)
            try:
                await b.page.wait_for_selector('#feed[data-stale="true"]', timeout=WAIT)
                assert re.match(r"stale", await b.page.text_content("#feed") or "")
            finally:
                gw.proc.send_signal(signal.SIGCONT)
            await b.page.wait_for_selector('#status[data-state="open"]', timeout=WAIT)
            await b.page.wait_for_selector('#feed[data-stale="false"]', timeout=WAIT)

            # 2. the process dies: the page says so, and keeps trying
            b.sent.clear()
            gw.kill()
            await b.page.wait_for_selector('#status[data-state="reconnecting"]', timeout=WAIT)

            # 3. a new process on the same port, with a market of its own
            #    (the simulator starts over): the board comes back right
            gw.start()
            await gw.wait_ready()
            await b.page.wait_for_selector('#status[data-state="open"]', timeout=WAIT)
            await converge(b.page.evaluate, gw.ws_url)
            await b.dom_matches_state()
            # the watch came back too, and the star is still pinned on top
            await b.sent_op("watch", sym)
            assert await b.page.get_attribute("#rows tr:first-child", "data-sym") == sym
            assert not b.errors, b.errors
        finally:
            await ctx.close()


async def test_a_delayed_token_shows_its_badges(browser) -> None:
    """A token delayed 60 s except BB*: the bar's badge says so, and so does every
    delayed symbol's row, its depth ladder and its chart, and the market-wide
    running trade; BB* rows carry none."""
    from test_delayed import ENV, token

    async with start_gateway("--simulate", "12", "--rate", "200", "--max-delay-s", "120",
                             env=ENV) as gw:
        ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            b = Board(await ctx.new_page())
            await b.page.goto(gw.url + f"/?token={token(60, rt=['BB*'])}")
            await b.page.wait_for_selector("#delay:not([hidden])", timeout=WAIT)
            assert await b.page.text_content("#delay") == "delayed 1 min (some real time)"
            assert await b.page.get_attribute("body", "data-delay-mix") == "true"
            await b.wait("() => document.querySelector('#rows tr[data-sym=\"TLKM\"]')")
            late = await b.page.evaluate("""() =>
                [...document.querySelectorAll('#rows tr[data-sym]')].map((tr) => [
                    tr.dataset.sym, tr.classList.contains('delayed'),
                    tr.querySelector('td.sym').dataset.delay])""")
            assert late and all(
                (d, text) == ((False, "") if sym.startswith("BB") else (True, "delayed 1 min"))
                for sym, d, text in late), late
            # the ladder and the chart of a delayed symbol say it too
            await b.page.click('#rows tr[data-sym="TLKM"] td.sym')
            await b.wait("() => document.querySelector('#ladder-sym').textContent === 'TLKM'")
            assert await b.page.get_attribute("#ladder-sym", "data-delay") == "delayed 1 min"
            await b.wait("() => document.querySelector('#chart-sym').textContent === 'TLKM'")
            assert await b.page.get_attribute("#chart-sym", "data-delay") == "delayed 1 min"
            await b.page.click('#rows tr[data-sym="BBCA"] td.sym')
            await b.wait("() => document.querySelector('#ladder-sym').textContent === 'BBCA'")
            assert await b.page.get_attribute("#ladder-sym", "data-delay") == ""
            assert await b.page.get_attribute("#chart-sym", "data-delay") == ""
            # the market-wide running trade: served, delayed whole (it mixes every symbol)
            await b.page.select_option("#tape-scope", "market")
            await b.wait("() => document.querySelector('#tape-title').dataset.delay"
                         " === 'delayed 1 min'")
            assert await b.page.text_content('#tape-scope option[value="market"]') == "market"
            await b.page.select_option("#tape-scope", "symbol")
            await b.wait("() => document.querySelector('#tape-title').dataset.delay === ''")
            assert not b.errors, b.errors
        finally:
            await ctx.close()
