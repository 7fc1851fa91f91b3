"""The live board at `/` in a second browser engine: Firefox.

tests/test_browser.py drives the board in Chromium with Playwright; this one
drives it in the system's Firefox (Debian's `firefox-esr`, or $FIREFOX) with
puppeteer-core over WebDriver BiDi. puppeteer-core downloads no browser; it is
pinned in `tests/node/firefox/package.json` and installed by the test with
`npm ci` into `tests/node/firefox/node_modules`. `tests/node/firefox/driver.mjs`
takes one command per line (open, wait for a condition in the page, click,
fill, screenshot) and answers each.

The gateway is a real `fastfeed serve --simulate` process, the checks are the
ones a user of the board relies on (it connects, fills, ticks live, matches
the server, searches, watches a row), the same page-side conditions as the
Chromium test, and every wait is for a condition in the page, never a fixed
time. A screenshot is saved to test-artifacts/board-firefox.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support import Gateway, start_gateway

# the same page-side checks and server view as the Chromium test
from test_browser import DOM_MATCHES_STATE, ON_SCREEN, converge

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
NODE_DIR = Path(__file__).resolve().parent / "node" / "firefox"
DRIVER = NODE_DIR / "driver.mjs"
PUPPETEER = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["puppeteer-core"]
FIREFOX = os.environ.get("FIREFOX") or shutil.which("firefox-esr") or "/usr/bin/firefox-esr"
N = 300  # simulated instruments
WAIT = 20_000  # ms: generous, for a loaded 2-core machine


def firefox_env(home: Path) -> dict[str, str]:
    """Everything Firefox needs to run headless, as root, in a sandbox.

    A HOME of its own (Firefox writes ~/.cache/mozilla and ~/.config/mozilla
    even with a fresh profile), no display, no crash reporter. The profile is
    a fresh directory given to launch(), which also adds puppeteer's
    automation preferences to it.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        MOZ_HEADLESS="1",
        MOZ_CRASHREPORTER_DISABLE="1",
    )
    return env


def npm_ci() -> None:
    """The pinned puppeteer-core, installed next to the driver (once)."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.fail("node and npm are needed (scripts/test installs them with apt-get: "
                    "nodejs npm)", pytrace=False)
    installed = NODE_DIR / "node_modules" / "puppeteer-core" / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == PUPPETEER:
        return
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0 or not installed.exists():
        pytest.fail(f"npm ci could not install puppeteer-core {PUPPETEER} into "
                    f"{NODE_DIR}/node_modules (exit {proc.returncode}); does this machine reach "
                    f"the npm registry?\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                    pytrace=False)


class Firefox:
    """The driver process and the Firefox it launched."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = 0
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            msg = json.loads(line)
            fut = self._replies.pop(msg["id"], None) if "id" in msg else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif "ev" in msg:
                self.events.append(msg)
        for fut in self._replies.values():  # the driver is gone
            if not fut.done():
                fut.set_exception(AssertionError(
                    f"the Firefox driver exited ({self.proc.returncode}); "
                    f"last events: {self.events[-5:]}"))

    async def cmd(self, cmd: str, timeout: float = 60.0, **kw: Any) -> Any:
        assert self.proc.stdin is not None
        if self._reader.done():
            raise AssertionError(f"the Firefox driver has exited ({self.proc.returncode})")
        self._ids += 1
        n = self._ids
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._replies[n] = fut
        self.proc.stdin.write((json.dumps({"id": n, "cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AssertionError(f"the Firefox driver did not answer {cmd} in {timeout}s") from None
        if not reply["ok"]:
            raise AssertionError(f"{cmd} failed in Firefox: {reply['error']}")
        return reply["value"]


class Board:
    """A Firefox tab on the board; `errors` is what the page reported."""

    def __init__(self, ff: Firefox, name: str) -> None:
        self.ff = ff
        self.name = name

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.ff.events if e.get("page") == self.name
                and (e["ev"] == "pageerror" or e.get("type") == "error")]

    async def call(self, cmd: str, **kw: Any) -> Any:
        return await self.ff.cmd(cmd, page=self.name, **kw)

    async def wait(self, js: str, arg: Any = None, timeout: int = WAIT) -> Any:
        try:
            return await self.ff.cmd("wait", timeout=timeout / 1000 + 30, page=self.name,
                                     js=js, arg=arg, timeout_ms=timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\nwhile waiting for {js} ({arg!r})") from None

    async def eval(self, js: str, arg: Any = None) -> Any:
        return await self.call("eval", js=js, arg=arg)

    async def filled(self, n: int) -> None:
        await self.wait("n => window.fastfeed && fastfeed.client.rows.size >= n", n)
        await self.wait(
            "() => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length > 5"
        )

    async def visible_syms(self) -> list[str]:
        return await self.eval(f"() => ({ON_SCREEN})().map(t => t.dataset.sym)")

    async def dom_matches_state(self) -> None:
        """Every visible row shows exactly what the client holds."""
        await self.wait(DOM_MATCHES_STATE)

    async def sent(self, op: str, sym: str | None = None) -> dict:
        """The first message the page sent with this op (and symbol)."""
        return await self.wait(
            "([op, sym]) => __wsrec.sent.find(m => m.op === op"
            " && (sym === null || (m.symbols || []).includes(sym)))",
            [op, sym],
        )

    async def acked(self, op: str) -> dict:
        return await self.wait(
            "op => __wsrec.received.find(m => m.type === 'ack' && m.op === op)", op
        )


# ---- fixtures -----------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def firefox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Firefox]:
    if not Path(FIREFOX).exists():
        pytest.fail(f"needs Firefox at {FIREFOX} (apt-get install firefox-esr; scripts/test "
                    "installs it)", pytrace=False)
    await asyncio.to_thread(npm_ci)
    home = tmp_path_factory.mktemp("firefox-home")
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", str(DRIVER), cwd=NODE_DIR, env=firefox_env(home),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    ff = Firefox(proc)
    try:
        version = await ff.cmd("launch", executable=FIREFOX, profile=str(home / "profile"))
        assert version.startswith("firefox/"), version
        yield ff
    finally:
        with contextlib.suppress(AssertionError, ConnectionError):
            await ff.cmd("exit", timeout=30)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        ff._reader.cancel()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    async with start_gateway("--simulate", str(N), "--rate", "400", "--seed", "11") as gw:
        yield gw


_tabs = itertools.count(1)


@pytest_asyncio.fixture(loop_scope="module")
async def board(firefox: Firefox, gateway: Gateway) -> AsyncIterator[Board]:
    b = Board(firefox, f"tab{next(_tabs)}")
    await b.call("open", url=gateway.url + "/", width=1280, height=800)
    yield b
    await b.eval("() => null")  # every event the page sent so far is in
    await b.call("close")
    assert not b.errors, b.errors


# ---- tests --------------------------------------------------------------------


async def test_the_board_connects_fills_and_ticks_in_firefox(
    board: Board, gateway: Gateway
) -> None:
    await board.wait("() => document.querySelector('#status').dataset.state === 'open'")
    assert await board.eval("() => __wsrec.opened") == ["fastfeed.v1.json"]
    await board.filled(N)
    count = await board.eval("() => document.querySelector('#count').textContent")
    assert count.startswith(f"{N} instruments"), count
    # it asked for everything in chunks, then subscribed to all of it
    # (the side panel's trades and bars subscriptions name their channels)
    subs = [m for m in await board.eval("() => __wsrec.sent")
            if m.get("op") == "subscribe" and "channels" not in m]
    assert sum(len(m["symbols"]) for m in subs) == N
    assert all(len(m["symbols"]) <= 500 for m in subs)
    assert await board.eval("() => document.querySelector('#feed').dataset.feed") == "up"

    # cells move: the busiest name on the board ticks many times a second
    sym = (await board.visible_syms())[0]
    cell = f'#rows tr[data-sym="{sym}"] [data-f="time"]'
    before = await board.eval("sel => document.querySelector(sel).textContent", cell)
    await board.wait("([sel, before]) => document.querySelector(sel)?.textContent !== before",
                     [cell, before])
    await board.dom_matches_state()
    await board.wait(
        "() => Number(document.querySelector('#rate').textContent.replace(/,/g, '')) > 0"
    )
    await board.wait("() => /ms/.test(document.querySelector('#latency').textContent)")
    # and what the page holds is what the gateway holds
    await converge(board.eval, gateway.ws_url)
    await board.dom_matches_state()
    assert not any(m.get("type") == "error" for m in await board.eval("() => __wsrec.received"))

    ARTIFACTS.mkdir(exist_ok=True)
    await board.call("screenshot", path=str(ARTIFACTS / "board-firefox.png"))


async def test_search_filters_the_board_in_firefox(board: Board) -> None:
    await board.filled(N)
    symbols = await board.eval("() => fastfeed.board.all")
    expect = sorted(s for s in symbols if "BB" in s.upper())
    assert expect, "the simulated market has BB* names"
    await board.call("fill", selector="#search", text="bb")
    await board.wait(
        "n => document.querySelectorAll('#rows tr[data-sym]:not([hidden])').length === n",
        min(len(expect), 40),
    )
    shown = await board.visible_syms()
    assert shown == expect[: len(shown)]
    await board.wait("t => document.querySelector('#count').textContent === t",
                     f"{len(expect)} of {N}")
    await board.call("fill", selector="#search", text="")
    await board.wait("n => fastfeed.board.view.length === n", N)


async def test_a_star_watches_and_pins_the_row_in_firefox(board: Board) -> None:
    await board.filled(N)
    sym = (await board.visible_syms())[7]
    await board.call("click", selector=f'#rows tr[data-sym="{sym}"] .star')
    watch = await board.sent("watch", sym)
    assert watch["symbols"] == [sym]
    # pinned on top, marked, and the server agreed
    await board.wait(
        "s => { const tr = document.querySelector('#rows tr:first-child');"
        " return tr.dataset.sym === s && tr.classList.contains('pinned')"
        " && tr.querySelector('.star').getAttribute('aria-pressed') === 'true' }",
        sym,
    )
    await board.wait("s => fastfeed.client.watched.has(s)", sym)
    await board.acked("watch")
    await board.wait("() => document.querySelector('#count').textContent.endsWith('1 watched')")
    await board.dom_matches_state()

    # unstar: unwatch, and the row goes back to its place
    await board.call("click", selector="#rows tr:first-child .star")
    await board.sent("unwatch", sym)
    await board.wait("s => document.querySelector('#rows tr:first-child').dataset.sym !== s", sym)
    await board.wait("s => !fastfeed.client.watched.has(s)", sym)
    assert not any(m.get("type") == "error" for m in await board.eval("() => __wsrec.received"))


async def test_the_frame_rate_selector_configures_the_connection_in_firefox(board: Board) -> None:
    await board.filled(N)
    await board.call("select", selector="#frame-ms", value="250")
    m = await board.sent("configure")
    assert m["frame_ms"] == 250
    await board.acked("configure")


async def test_the_board_comes_back_after_a_gateway_restart_in_firefox(firefox: Firefox) -> None:
    # A gateway of its own: it gets killed, and a new process takes its port.
    # (Firefox delays reconnects to a host whose WebSocket connects failed;
    # the board must come back all the same.)
    async with start_gateway("--simulate", str(N), "--rate", "100") as gw:
        b = Board(firefox, "restart")
        await b.call("open", url=gw.url + "/", width=1280, height=800)
        try:
            await b.filled(N)
            sym = (await b.visible_syms())[3]
            await b.call("click", selector=f'#rows tr[data-sym="{sym}"] .star')
            await b.acked("watch")

            gw.kill()
            await b.wait("() => document.querySelector('#status').dataset.state === 'reconnecting'")
            await b.eval("() => { __wsrec.sent.length = 0; __wsrec.received.length = 0; }")
            gw.start()
            await gw.wait_ready()
            await b.wait("() => document.querySelector('#status').dataset.state === 'open'",
                         timeout=40_000)
            await converge(b.eval, gw.ws_url)
            await b.dom_matches_state()
            # the watch came back too, and the star is still pinned on top
            await b.sent("watch", sym)
            await b.acked("watch")
            assert await b.eval(
                "() => document.querySelector('#rows tr:first-child').dataset.sym") == sym
            assert len(await b.eval("() => __wsrec.opened")) == 2
        finally:
            await b.eval("() => null")
            await b.call("close")
        # Firefox reports each refused connect as an error of the page (Chromium
        # logs one to the console), and, in some runs, the socket the kill cut
        # short as "interrupted while the page was loading": both expected while
        # the gateway is down, and nothing else is
        refused = re.compile(r"(can.t establish a connection to the server at "
                             + re.escape(gw.ws_url) + r"|connection to "
                             + re.escape(gw.ws_url) + r"\S* was interrupted while the page"
                             r" was loading)\.$")
        errors = [e for e in b.errors if not refused.search(e.get("message", ""))]
        assert not errors, errors
