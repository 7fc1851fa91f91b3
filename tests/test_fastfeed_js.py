"""fastfeed.js, the module the board ships, run in Node.js on `ws`: order
books kept as the contract says (changes, full entries, CRC-32 checksum from
float64 little-endian bytes, resubscribe on a mismatch, stale/ok), and
`list` across pages; the tape and the bars: trades published through
/ingest all reach its tape, once each and in order, across a connection that
dies (it resumes with `since_trades`), and its bars equal bars computed here
from the published trades; the market-wide tape (`*`) holds every trade once,
in the order the gateway applied them, across the same drop.

Books come from the scripted contract server of test_client_books (the
checksums there are computed with `zlib.crc32` and `struct`); `list`, trades
and bars from a real gateway process. tests/node/fastfeed_js_client.mjs is the
driver.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import Feed, start_gateway, until
from test_client_books import ServerBook, crc, scripted, seeded_book, serve_requests, update
from test_client_trades import FAST, Trades, bars_of
from websockets.asyncio.server import ServerConnection

from fastfeed.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
DRIVER = NODE_DIR / "fastfeed_js_client.mjs"
MODULE = ROOT / "src" / "fastfeed" / "web" / "fastfeed.js"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the `ws` pinned in tests/node/package.json installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed (apt-get install nodejs npm)", pytrace=False)
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=NODE_DIR, capture_output=True, text=True, timeout=600,
                              check=False)
        if proc.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed: {proc.stderr[-2000:]}", pytrace=False)
    return node


class JS:
    """The Node process running fastfeed.js."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.ids = 0
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    async def cmd(self, cmd: str, **kw: Any) -> Any:
        self.ids += 1
        rid = self.ids
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": rid, "cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        ev: dict[str, Any] = {}

        def answered() -> bool:
            nonlocal ev
            for e in self.events:
                if e.get("id") == rid and e["ev"] in ("done", "failed"):
                    ev = e
                    return True
            return False

        await until(answered, timeout=30, what=f"{cmd} answered")
        if ev["ev"] == "failed":
            raise AssertionError(f"{cmd}: {ev}")
        return ev.get("result")

    def saw(self, pred: Callable[[dict[str, Any]], bool]) -> bool:
        return any(pred(e) for e in self.events)


@pytest.fixture
async def js(node: str) -> AsyncIterator[JS]:
    proc = await asyncio.create_subprocess_exec(
        node, str(DRIVER), MODULE.as_uri(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=NODE_DIR)
    client = JS(proc)
    try:
        yield client
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        client.reader.cancel()


async def test_crc32_and_the_book_checksum_are_zlibs(js: JS) -> None:
    rng = random.Random(9)
    for n in (0, 1, 15, 16, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert await js.cmd("crc32", hex=data.hex()) == zlib.crc32(data)
    for _ in range(5):
        bids = [[rng.uniform(1, 1e5), float(rng.randrange(1, 10**9)), 1] for _ in range(12)]
        asks = [[rng.uniform(1, 1e5), rng.random() * 1e6, 0] for _ in range(rng.randrange(13))]
        bids.sort(key=lambda lv: -lv[0])
        asks.sort(key=lambda lv: lv[0])
        want = zlib.crc32(b"".join(struct.pack("<dd", p, v) for p, v, _ in asks[:10] + bids[:10]))
        assert await js.cmd("checksum", bids=bids, asks=asks) == want


def held(state: dict[str, Any], sym: str) -> dict[str, Any]:
    return state["books"][sym]


def same(b: dict[str, Any], server: ServerBook) -> bool:
    return (b["seq"] == server.seq and b["bids"] == server.view("bids")
            and b["asks"] == server.view("asks")
            and b["checksum"] == crc(server.view("bids"), server.view("asks")))


async def test_a_book_snapshot_then_changes(js: JS) -> None:
    rng = random.Random(5)
    book = seeded_book("BBCA", rng)
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        for _ in range(300):
            key = rng.choice(["bids", "asks"])
            base, step = (9100.0, -25) if key == "bids" else (9125.0, 25)
            k = min(int(rng.expovariate(0.4)), 18)
            vol = 0.0 if rng.random() < 0.3 else 100.0 * rng.randint(1, 500)
            await ws.send(update(book.entry({key: [[base + step * k, vol, rng.randint(0, 9)]]})))
        await ws.send(update(book.entry({"bids": [[9000.0, 1.0, 1]]}, full=True)))
        await server

    async with scripted(gateway) as (url, seen):
        await js.cmd("connect", url=url)
        await js.cmd("subscribe", symbols=["BBCA"], channels=["book"])
        assert seen[0]["channels"] == ["book"]
        assert same(held(await js.cmd("state"), "BBCA"), book)
        go.set()
        state: dict[str, Any] = {}

        async def caught_up() -> bool:
            nonlocal state
            state = await js.cmd("state")
            return held(state, "BBCA")["seq"] == 401

        for _ in range(200):
            if await caught_up():
                break
            await asyncio.sleep(0.05)
        assert same(held(state, "BBCA"), book)
        assert state["counters"]["bookResyncs"] == 0
        assert state["counters"]["bookEntries"] == 302
        assert "BBCA" not in state["rows"]


async def test_a_checksum_mismatch_resubscribes_the_book(js: JS) -> None:
    book = seeded_book("BBRI", random.Random(2))
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        await ws.send(update(book.entry({"bids": [[9100.0, 4200.0, 7]]})))
        await ws.send(update(book.entry({"asks": [[9125.0, 300.0, 1]]}, checksum=12345)))
        await ws.send(update(book.entry({"asks": [[9150.0, 0.0, 0]]})))
        await server

    async with scripted(gateway) as (url, seen):
        await js.cmd("connect", url=url)
        await js.cmd("subscribe", symbols=["BBRI"], channels=["book"])
        go.set()
        await until(lambda: len(seen) >= 3 and js.saw(lambda e: e["ev"] == "bookresync"))
        unsub, resub = seen[1], seen[2]
        assert (unsub["op"], unsub["symbols"], unsub["channels"]) == ("unsubscribe", ["BBRI"],
                                                                      ["book"])
        assert (resub["op"], resub["channels"]) == ("subscribe", ["book"])
        for _ in range(200):
            state = await js.cmd("state")
            if held(state, "BBRI")["seq"] == 103:
                break
            await asyncio.sleep(0.05)
        assert same(held(state, "BBRI"), book)
        assert state["counters"]["bookResyncs"] == 1


async def test_stale_then_ok_then_a_full_book(js: JS) -> None:
    book = seeded_book("ASII", random.Random(3))
    go = asyncio.Event()

    async def gateway(ws: ServerConnection, seen: list[dict]) -> None:
        server = asyncio.ensure_future(serve_requests(ws, seen, book))
        await go.wait()
        await ws.send(json.dumps({"type": "status", "sym": "ASII", "book": "stale"}))
        await ws.send(json.dumps({"type": "status", "sym": "ASII", "book": "ok"}))
        book.side["asks"].pop(9125.0)
        await ws.send(update(book.entry(full=True)))
        await server

    async with scripted(gateway) as (url, _):
        await js.cmd("connect", url=url)
        await js.cmd("subscribe", symbols=["ASII"], channels=["quote", "book"])
        go.set()
        await until(lambda: js.saw(lambda e: e["ev"] == "bookstatus" and e["ok"]))
        stale = [e["ok"] for e in js.events if e["ev"] == "bookstatus"]
        assert stale == [False, True]
        for _ in range(200):
            state = await js.cmd("state")
            if held(state, "ASII")["seq"] == 101:
                break
            await asyncio.sleep(0.05)
        assert same(held(state, "ASII"), book) and not held(state, "ASII")["stale"]


async def test_list_follows_every_page(js: JS) -> None:
    syms = [f"PG{k:02d}" for k in range(11)] + ["BBCA", "BBRI"]
    async with start_gateway("--max-list-symbols", "4") as gw:
        async with Publisher(gw.ingest_url) as p:
            await p.publish([{"sym": s, "seq": 1, "bid": 1.0} for s in syms])
            assert await p.sync(10)
        await js.cmd("connect", url=gw.ws_url)
        assert await js.cmd("list") == sorted(syms)
        assert await js.cmd("list", match="PG*") == sorted(s for s in syms if s[:2] == "PG")


async def state_until(js: JS, ok: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 30.0) -> dict[str, Any]:
    """The driver's state, asked again until `ok` says yes."""
    st: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal st
        st = await js.cmd("state")
        return ok(st)

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        assert loop.time() < end, f"{what}: not within {timeout}s; last state {st}"
        await asyncio.sleep(0.2)
    return st


async def test_the_tape_and_bars_hold_every_trade_once_across_a_dropped_connection(
        js: JS) -> None:
    syms = ["BBCA", "BBRI", "TLKM"]
    feed = Trades(syms)
    async with (
        start_gateway() as gw,
        Publisher(gw.ingest_url, backoff=FAST) as pub,
    ):
        await pub.publish([{"sym": s, "seq": 1, "bid": 1.0, "ask": 2.0} for s in syms])
        await pub.publish_trades(feed.make(30))
        assert await pub.sync(10)
        await js.cmd("connect", url=gw.ws_url)
        sub = await js.cmd("subscribe", symbols=syms, channels=["trades", "bars:1s"])
        assert sub == {"unknown": [], "forbidden": [], "errors": []}
        sub = await js.cmd("subscribe", symbols=["*"], channels=["trades"])
        assert sub == {"unknown": [], "forbidden": [], "errors": []}
        order: list[list[Any]] = []  # [sym, tseq] in publish order: one publisher, one worker

        def complete(st: dict[str, Any]) -> bool:
            order[:] = [[t["sym"], t["tseq"]] for t in feed.order]
            return (all(st["trades"].get(s) == list(range(1, feed.tseq[s] + 1)) for s in syms)
                    and st["trades"].get("*") == order)

        await state_until(js, complete, "the snapshot's trades")
        for _ in range(4):
            await pub.publish_trades(feed.make(40))
        await js.cmd("drop")  # no close frame: 1006, and fastfeed.js reconnects
        await pub.publish_trades(feed.make(40))
        assert await pub.sync(10)
        st = await state_until(js, lambda st: st["connects"] >= 2 and complete(st),
                               "every trade once, in order, after the resume")
        assert st["lost"] == {}
        assert sorted(st["wanted"]) == ["*", *syms]

        def bars_match(st: dict[str, Any]) -> bool:
            return all(st["bars"].get(f"1s {s}") ==
                       [list(b) for b in bars_of(feed.sent[s], 1_000_000_000)] for s in syms)

        await state_until(js, bars_match, "bars equal to those of the published trades")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "bin"])
async def test_compact_rows_are_whole_rows_across_a_dropped_connection(js: JS,
                                                                       binary: bool) -> None:
    """fastfeed.js with compact: true gets fastfeed.v1.compact (with binary:
    true, fastfeed.v1.compact.bin), and every row it hands its listeners is the
    source's whole row at that seq, before and after a connection that dies
    (the resume's snapshot leaves out what it holds)."""
    feed = Feed(9)
    syms = [f"J{k:02d}" for k in range(10)]
    rng = random.Random(9)
    async with start_gateway() as gw, Publisher(gw.ingest_url) as p:
        await p.publish(feed.ticks(syms))
        assert await p.sync(10)
        await js.cmd("connect", url=gw.ws_url, compact=True, binary=binary)
        await js.cmd("subscribe", symbols=syms)
        for k in range(40):
            await p.publish(feed.ticks(rng.sample(syms, 3)))
            if k == 15:
                await js.cmd("drop")
            await asyncio.sleep(0.02)
        assert await p.sync(10)
        truth = feed.truth()

        def same(r: list, want: Any) -> bool:
            # ts (ns) is a double in JavaScript: equal to within its rounding
            return r[0] == want[0] and r[1] == want[1] and abs(r[2] - want[2]) < 2048 \
                and [float(v) for v in r[3:]] == list(want[3:])

        st = await state_until(js, lambda st: all(
            s in st["rows"] and same(st["rows"][s], truth[s]) for s in syms),
            "the source's final rows")
        assert st["protocol"] == ("fastfeed.v1.compact.bin" if binary else
                                  "fastfeed.v1.compact") and st["connects"] == 2
    rows = [r for e in js.events if e["ev"] == "rows" for r in e["rows"]]
    assert len(rows) > 20
    bad = [r for r in rows if not same(r, feed.history[r[0]][r[1]])]
    assert not bad, bad[:3]
