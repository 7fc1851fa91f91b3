"""The protocol spoken by a client from another ecosystem: Node.js `ws`.

`tests/node/ws_client.mjs` is a small fastfeed client on `ws` (pinned in
`tests/node/package.json`, installed by the test with `npm ci` into
`tests/node/node_modules`). The test drives it line by line: it subscribes,
reads the snapshot and the updates, sends garbage, stops reading until the
gateway counts it as stalled, reads again and must end with the true latest
state, like every other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from support import http_get, merge, start_gateway, until

from fastfeed._core import FIELDS

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "ws_client.mjs"
WS_VERSION = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["ws"]
SYMS = [f"ND{k:03d}" for k in range(200)]
MAX_MESSAGE = 8192

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned `ws` installed next to the script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed (scripts/test installs them with apt-get: "
                    "nodejs npm)", pytrace=False)
    installed = NODE_DIR / "node_modules" / "ws" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != WS_VERSION:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=NODE_DIR, capture_output=True, text=True, timeout=600,
                              check=False)
        if proc.returncode != 0 or not installed.exists():
            pytest.fail(f"npm ci could not install ws {WS_VERSION} into {NODE_DIR}/node_modules "
                        f"(exit {proc.returncode}); does this machine reach the npm registry?\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}", pytrace=False)
    return node


class NodeClient:
    """The Node process: `cmd` sends a command and waits for it to be done;
    `expect` waits for an event (events are kept in order in `events`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._seen = 0
        self._ids = 0
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    async def expect(self, pred: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 20.0) -> dict[str, Any]:
        """The first event after the last one expected that satisfies `pred`."""
        def found() -> bool:
            while self._seen < len(self.events):
                self._seen += 1
                if pred(self.events[self._seen - 1]):
                    return True
            return False
        try:
            await until(found, timeout, what=what)
        except AssertionError:
            raise AssertionError(f"{what}; the node client said: {self.events[-10:]}") from None
        return self.events[self._seen - 1]

    async def cmd(self, cmd: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self._ids += 1
        n = self._ids
        self.proc.stdin.write((json.dumps({"id": n, "cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        await until(lambda: any(e.get("id") == n and e["ev"] in ("done", "failed")
                                for e in self.events), 20, what=f"node: {cmd} done")
        failed = [e for e in self.events if e.get("id") == n and e["ev"] == "failed"]
        assert not failed, failed

    async def message(self, name: str, type_: str, timeout: float = 20.0) -> dict[str, Any]:
        ev = await self.expect(lambda e: e["ev"] == "message" and e["name"] == name
                               and e["msg"]["type"] == type_, f"a {type_} on {name}", timeout)
        return ev["msg"]

    async def state(self, name: str) -> dict[str, Any]:
        await self.cmd("state", name=name)
        return next(e for e in reversed(self.events) if e["ev"] == "state" and e["name"] == name)


@contextlib.asynccontextmanager
async def node_client(node: str) -> AsyncIterator[NodeClient]:
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


class Feed:
    """Ticks for /ingest with strictly increasing seq per symbol, and the truth."""

    def __init__(self) -> None:
        self.rng = random.Random(7)
        self.seq = dict.fromkeys(SYMS, 0)
        self.ref: dict[str, dict[str, Any]] = {}

    def ticks(self, syms: list[str]) -> list[dict[str, Any]]:
        out = []
        for s in syms:
            self.seq[s] += 1
            t = {"sym": s, "seq": self.seq[s], "ts": time.time_ns()}
            for f in FIELDS[3:]:
                if self.seq[s] == 1 or self.rng.random() < 0.5:
                    t[f] = round(self.rng.uniform(1, 1e4), 2)
            out.append(t)
        merge(self.ref, out)
        return out

    def rows(self) -> dict[str, list[Any]]:
        """The true latest rows, as JavaScript holds them (see `as_js`)."""
        return as_js({s: [s, t["seq"], t["ts"], *[t.get(f, 0.0) for f in FIELDS[3:]]]
                      for s, t in self.ref.items()})


def as_js(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Every number as a double: a JavaScript number holds a nanosecond `ts`
    (past 2^53) only to about 256 ns (docs/fastfeed-js.md, "Caveats")."""
    return {s: [r[0], *map(float, r[1:])] for s, r in rows.items()}


def metric(url: str, name: str) -> float:
    _, body = http_get(url + "/metrics")
    for fam in text_string_to_metric_families(body.decode()):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


async def test_a_node_ws_client_subscribes_survives_garbage_stalls_and_converges(node):
    feed = Feed()
    async with (
        start_gateway("--high-water-bytes", "16384", "--stall-s", "120",
                      "--max-message-bytes", str(MAX_MESSAGE)) as g,
        websockets.connect(g.ingest_url, max_size=None) as pub,
        node_client(node) as js,
    ):
        async def publish(ticks: list[dict[str, Any]]) -> None:
            await pub.send(json.dumps(ticks))

        await publish(feed.ticks(SYMS))
        await js.cmd("open", name="main", url=g.ws_url, protocol="fastfeed.v1.json")
        opened = await js.expect(lambda e: e["ev"] == "open", "the connection opens")
        assert opened["protocol"] == "fastfeed.v1.json"

        # subscribe: one snapshot with every known symbol, the unknown one named
        await js.cmd("send", name="main", text=json.dumps(
            {"op": "subscribe", "id": 1, "symbols": [*SYMS, "NOPE"]}))
        snap = await js.message("main", "snapshot")
        assert snap["id"] == 1 and snap["unknown"] == ["NOPE"]
        assert snap["fields"] == list(FIELDS)
        assert sorted(r[0] for r in snap["rows"]) == SYMS

        # updates follow while it reads
        for _ in range(5):
            await publish(feed.ticks(feed.rng.sample(SYMS, 50)))

        async def converged() -> dict[str, Any]:
            want = feed.rows()
            state: dict[str, Any] = {}

            async def check() -> bool:
                state.update(await js.state("main"))
                return as_js(state["rows"]) == want

            deadline = time.monotonic() + 60
            while not await check():
                assert time.monotonic() < deadline, "the node client did not converge"
                await asyncio.sleep(0.2)
            return state

        assert (await converged())["updates"] >= 1

        # garbage: each gets a clear error, and the connection keeps serving
        await js.cmd("send", name="main", text="{not json")
        assert (await js.message("main", "error"))["code"] == "bad_request"
        await js.cmd("send", name="main", text='{"op":"fly","id":2}')
        err = await js.message("main", "error")
        assert (err["code"], err["id"]) == ("unknown_op", 2)
        await js.cmd("send_binary", name="main", hex="fffe00")
        assert (await js.message("main", "error"))["code"] == "bad_request"
        await js.cmd("send", name="main", text='{"op":"subscribe","id":3,"symbols":["no way!"]}')
        err = await js.message("main", "error")
        assert (err["code"], err["id"]) == ("bad_request", 3)
        await js.cmd("send", name="main", text='{"op":"ping","id":4}')
        assert (await js.message("main", "pong"))["id"] == 4

        # a slow consumer: it stops reading while ticks keep coming, until the
        # gateway holds it above the high-water mark (conflating, not queueing)
        await js.cmd("pause", name="main")
        conflated_before = metric(g.url, "fastfeed_conflated_frames_total")
        deadline = time.monotonic() + 90
        while metric(g.url, "fastfeed_stalled_clients") < 1:
            assert time.monotonic() < deadline, "the paused node client never stalled"
            for _ in range(20):
                await publish(feed.ticks(SYMS))
                await asyncio.sleep(0.005)
        await publish(feed.ticks(SYMS))  # the final state, sent while it is not reading
        await until(lambda: metric(g.url, "fastfeed_conflated_frames_total") > conflated_before,
                    20, step=0.25, what="conflated frames counted")
        assert as_js((await js.state("main"))["rows"]) != feed.rows()

        # it reads again: the latest state, not a backlog
        await js.cmd("resume", name="main")
        await converged()
        await until(lambda: metric(g.url, "fastfeed_stalled_clients") == 0, 20, step=0.25,
                    what="no client stalled any more")

        # a message over the limit closes that connection with 1009, not the others
        await js.cmd("open", name="big", url=g.ws_url)
        await js.expect(lambda e: e["ev"] == "open" and e["name"] == "big", "big opens")
        await js.cmd("send", name="big", text="x", repeat=MAX_MESSAGE + 1)
        closed = await js.expect(lambda e: e["ev"] == "close" and e["name"] == "big",
                                 "big is closed")
        assert closed["code"] == 1009
        await js.cmd("send", name="main", text='{"op":"ping","id":5}')
        assert (await js.message("main", "pong"))["id"] == 5
        assert not [e for e in js.events if e["ev"] == "close" and e["name"] == "main"]
        await js.cmd("close", name="main", code=1000)
        closed = await js.expect(lambda e: e["ev"] == "close" and e["name"] == "main",
                                 "main closes")
        assert closed["code"] == 1000
