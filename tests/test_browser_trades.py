"""The board's running trade and candlestick chart, in Chromium, against a
real `fastfeed serve --simulate` (its simulated trades print at the quoted
best bid or ask).

What the page shows is checked against what the gateway sent it: every
WebSocket frame the page received is captured (Playwright's `framereceived`)
and its `trades` and `bars` entries replayed here the way the contract says.
The tape's rows must be the newest trades of the selected symbol, or of
the whole market when the market-wide tape is chosen, newest on top, green
for a buyer and red for a seller; the chart must have drawn the bars of
the selected symbol and interval, the colour of each candle on the canvas
by its direction. Waits are for conditions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from fixtures import CHROMIUM, CHROMIUM_ARGS
from support import Gateway, start_gateway
from test_browser import async_playwright  # the same Playwright and Chromium, or a skip reason

pytestmark = pytest.mark.asyncio(loop_scope="module")

N = 200
WAIT = 30_000  # ms
SYM = "BBCA"  # the busiest simulated instrument


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    async with start_gateway("--simulate", str(N), "--rate", "400", "--seed", "5",
                             "--trades-per-tick", "0.5") as gw:
        yield gw


class Wire:
    """The trades and bars the gateway sent the page, replayed per the contract."""

    def __init__(self) -> None:
        self.market: list[list] = []  # ["SYM", tseq, ts, price, size, side], arrival order
        self.market_last: dict[str, int] = {}
        self.tape: dict[str, list[list]] = {}  # sym -> [tseq, ts, price, size, side]
        self.bars: dict[tuple[str, str], dict[int, list]] = {}
        self.sent: list[dict] = []

    def on_frame(self, payload: Any) -> None:
        if not isinstance(payload, str) or ('"trades"' not in payload
                                            and '"bars"' not in payload):
            return
        msg = json.loads(payload)
        key = "recent" if msg.get("type") == "snapshot" else "items"
        for e in msg.get("trades") or ():
            for t in e.get(key) or ():
                if e["sym"] == "*":
                    if t[1] > self.market_last.get(t[0], 0):
                        self.market_last[t[0]] = t[1]
                        self.market.append(t)
                else:
                    tape = self.tape.setdefault(e["sym"], [])
                    if not tape or t[0] > tape[-1][0]:
                        tape.append(t)
        for e in msg.get("bars") or ():
            series = self.bars.setdefault((e["sym"], e["interval"]), {})
            for b in e["bars"]:
                series[b[0]] = b

    def series(self, sym: str, interval: str) -> list[list]:
        s = self.bars.get((sym, interval), {})
        return [s[k] for k in sorted(s)]


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser, gateway) -> AsyncIterator[tuple[Any, Wire]]:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 860})
    page = await ctx.new_page()
    wire = Wire()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def on_ws(ws: Any) -> None:
        ws.on("framereceived", wire.on_frame)
        ws.on("framesent", lambda p: wire.sent.append(json.loads(p)) if isinstance(p, str)
              else None)

    page.on("websocket", on_ws)
    await page.goto(f"{gateway.url}/?sym={SYM}&interval=1s")
    yield page, wire
    await ctx.close()
    assert not errors, errors


async def wait(page: Any, js: str, arg: Any = None) -> Any:
    return await page.wait_for_function(js, arg=arg, timeout=WAIT, polling=100)


TAPE_ROWS = """() => [...document.querySelectorAll('#tape .tape-row:not([hidden])')].map(r => ({
  sym: r.dataset.sym, tseq: Number(r.dataset.tseq), side: r.dataset.side, cls: r.className,
  cells: [...r.querySelectorAll('span')].map(s => s.textContent),
  color: getComputedStyle(r.querySelector('.c-price')).color}))"""

GREEN, RED = "rgb(63, 185, 80)", "rgb(248, 81, 73)"


def num(text: str) -> float:
    return float(text.replace(",", ""))


async def shown_tape_matches(page: Any, wire: Wire, market: bool) -> list[dict]:
    """The tape's rows, once what the page shows has arrived here too: they
    are the newest trades the gateway sent, newest first, coloured by side."""
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT / 1000
    while True:
        rows = await page.evaluate(TAPE_ROWS)
        if len(rows) >= 5:
            top = (rows[0]["sym"], rows[0]["tseq"])
            sent = ([(t[0], t[1], t[2:]) for t in wire.market] if market else
                    [(SYM, t[0], t[1:]) for t in wire.tape.get(SYM, [])])
            keys = [(s, q) for s, q, _ in sent]
            if top in keys:
                k = keys.index(top)
                want = list(reversed(sent[max(0, k + 1 - len(rows)) : k + 1]))
                assert len(want) == len(rows), (len(want), len(rows))
                for r, (sym, tseq, (_ts, price, size, side)) in zip(rows, want, strict=True):
                    assert (r["sym"], r["tseq"], r["side"]) == (sym, tseq, side)
                    _time, sym_cell, price_cell, lot_cell = r["cells"]
                    assert sym_cell == sym
                    assert num(price_cell) == price and num(lot_cell) == size / 100
                    assert r["color"] == (GREEN if side == "b" else RED if side == "s"
                                          else r["color"])
                return rows
        assert loop.time() < end, f"the tape never showed what was sent: {rows[:3]}"
        await asyncio.sleep(0.1)


async def test_the_running_trade_shows_the_selected_symbol_or_the_whole_market(page) -> None:
    """The tape shows the selected symbol's trades; the market-wide tape is
    asked for only once it is chosen, then shows every symbol's trades in the
    order the gateway sent them; choosing the symbol again gives it up."""
    page, wire = page
    await wait(page, "() => window.fastfeed && fastfeed.side"
                     " && fastfeed.client.trades.get('BBCA')?.length > 5")
    assert not [m for m in wire.sent if m.get("symbols") == ["*"]], "not asked unless chosen"
    rows = await shown_tape_matches(page, wire, market=False)
    assert {r["sym"] for r in rows} == {SYM}
    assert {r["side"] for r in rows} <= {"b", "s"}
    await page.select_option("[data-testid=tape-scope]", "market")
    await wait(page, "() => fastfeed.side.marketServed && fastfeed.client.wanted.has('*')"
                     " && fastfeed.client.trades.get('*')?.length > 20")
    star = [m for m in wire.sent if m.get("op") == "subscribe" and m.get("symbols") == ["*"]]
    assert [m["channels"] for m in star] == [["trades"]]
    # repainted on the next animation frame: until then the symbol's rows are
    # shown, and they can match a stretch of the market's tape that is all BBCA
    await wait(page, f"() => [...document.querySelectorAll('#tape .tape-row:not([hidden])')]"
                     f".some(r => r.dataset.sym !== '{SYM}')")
    rows = await shown_tape_matches(page, wire, market=True)
    assert len({r["sym"] for r in rows}) > 1, "the market's tape holds more than one symbol"
    await page.select_option("[data-testid=tape-scope]", "symbol")
    await wait(page, "() => !fastfeed.client.wanted.has('*')")
    # the tape is repainted on the next animation frame: until then it shows the market's
    await wait(page, f"() => [...document.querySelectorAll('#tape .tape-row:not([hidden])')]"
                     f".every(r => r.dataset.sym === '{SYM}')")
    rows = await shown_tape_matches(page, wire, market=False)
    assert {r["sym"] for r in rows} == {SYM}
    assert "error" not in (await page.text_content("#note") or "").lower()


CANDLES = """() => { const d = fastfeed.side.drawn; if (!d) return null;
  const g = document.querySelector('#chart').getContext('2d');
  return { sym: d.sym, interval: d.interval, bars: d.bars, forming: d.forming,
    pixels: d.candles.map(c => [...g.getImageData(c.bx + (c.bw >> 1), c.bodyTop + (c.bodyH >> 1),
                                                   1, 1).data].slice(0, 3)),
    up: d.candles.map(c => c.up) }; }"""


async def drawn_matches(page: Any, wire: Wire, interval: str) -> dict:
    """The chart drew the tail of the bars the gateway sent, each candle
    green when it closed at or above its open, red below."""
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT / 1000
    while True:
        d = await page.evaluate(CANDLES)
        if d and d["interval"] == interval and len(d["bars"]) >= 2:
            sent = wire.series(SYM, interval)
            last = d["bars"][-1]
            if sent and sent[-1] == last:
                assert d["sym"] == SYM
                assert d["bars"] == sent[-len(d["bars"]):]
                for (o, c), up, px in zip(((b[1], b[4]) for b in d["bars"]), d["up"],
                                          d["pixels"], strict=True):
                    assert up == (c >= o)
                    green, red = px[1] > px[0], px[0] > px[1]
                    assert green if up else red, (o, c, px)
                return d
        assert loop.time() < end, f"the chart never drew what was sent: {d and d['bars'][-2:]}"
        await asyncio.sleep(0.1)


async def test_the_chart_draws_the_bars_sent_and_follows_the_interval(page) -> None:
    page, wire = page
    await wait(page, "() => window.fastfeed && fastfeed.side?.drawn?.bars.length >= 2")
    # the symbol's trades and its bars of the interval, asked for by name
    chans = [c for m in wire.sent if m.get("op") == "subscribe"
             and m.get("symbols") == [SYM] for c in m.get("channels", ())]
    assert "trades" in chans and "bars:1s" in chans
    d = await drawn_matches(page, wire, "1s")
    assert d["forming"] in (True, False)
    # the forming bar changes live: a later paint shows newer values of the last bar
    first = d["bars"][-1]
    await wait(page, "(b) => { const d = fastfeed.side.drawn; const l = d.bars[d.bars.length - 1];"
                     " return l[0] !== b[0] || l[6] !== b[6]; }", first)
    await page.select_option("[data-testid=chart-interval]", "1m")
    await wait(page, "() => fastfeed.side.drawn?.interval === '1m' && "
                     "fastfeed.side.drawn.bars.length >= 1")
    assert any(m.get("op") == "subscribe" and m.get("channels") == ["bars:1m"]
               for m in wire.sent)
    assert any(m.get("op") == "unsubscribe" and m.get("channels") == ["bars:1s"]
               for m in wire.sent)
    # the 1m bars sent (a young market may hold just one): drawn, the last one live
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT / 1000
    while True:
        d = await page.evaluate(CANDLES)
        sent = wire.series(SYM, "1m")
        if d["bars"] and sent and d["bars"] == sent[-len(d["bars"]):]:
            break
        assert loop.time() < end, f"the 1m chart never drew what was sent: {d['bars'][-2:]}"
        await asyncio.sleep(0.1)


async def test_clicking_a_row_selects_its_symbol_for_the_chart(page) -> None:
    page, _ = page
    await wait(page, "() => document.querySelectorAll('#rows tr[data-sym]:not([hidden])')"
                     ".length > 5")
    other = await page.evaluate("() => [...document.querySelectorAll('#rows tr[data-sym]')]"
                                ".map(t => t.dataset.sym).find(s => s !== 'BBCA')")
    await page.click(f"#rows tr[data-sym='{other}'] td.sym")
    await wait(page, "(s) => document.querySelector('[data-testid=chart-sym]').textContent === s"
                     " && fastfeed.side.drawn?.sym === s", other)
    assert await page.evaluate("(s) => document.querySelector(`#rows tr[data-sym='${s}']`)"
                               ".classList.contains('selected')", other)
