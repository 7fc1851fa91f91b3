"""What the person on call sees, from the outside: a real `fastfeed serve`
process, its stderr read line by line, its /metrics scraped.

- a bug met on a connection is logged once per kind (with client, path and
  cid), counted, and closes that connection with 1011;
- every close the gateway sends is counted by code on every endpoint,
  including those picows sends by itself;
- a client that resets its TCP connection in the middle of a burst leaves no
  "write() called after connection lost" lines: nothing writes to a lost
  transport;
- a full instrument table (--max-instruments) is logged once, naming the
  setting, and counted.

No request a client can send is known to raise inside the gateway (that is
what the hardening is for), so the exception test injects one: the test's
own launcher wraps `IngestSession.on_message` to raise on one message, then
runs the real command line. Nothing in the gateway knows about it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from fixtures import stop_process, wait_http_ok
from support import free_port, http_get, until
from test_metrics import Scrape, scrape_until
from wsraw import RawWS

pytestmark = pytest.mark.timeout(120)

# The launcher: the real command line, with one fault injected from outside.
LAUNCHER = """
import sys
from fastfeed.feed import ingest
real = ingest.IngestSession.on_message
def on_message(self, t, data):
    if data == b'"raise, please"':
        raise LookupError("injected by the test")
    return real(self, t, data)
ingest.IngestSession.on_message = on_message
from fastfeed.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Proc:
    """A gateway process whose stderr goes to a file the test reads."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp / f"gateway-{self.port}.stderr"
        env = {**os.environ, "FASTFEED_LOG_LEVEL": "info", "FASTFEED_DRAIN_DELAY_S": "0",
               "FASTFEED_DRAIN_S": "0.2"}
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), *args], env=env, stderr=err,
                stdout=subprocess.DEVNULL)

    def lines(self, needle: str) -> list[str]:
        text = self.err_path.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if needle in line]

    def wait_ready(self) -> None:
        wait_http_ok(self.url + "/readyz", 20, self.proc, log=self.err_path)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, timeout=10)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = Proc(tmp_path_factory.mktemp("obs"), "--max-instruments", "5", "--conformance-echo")
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


def closes(s: Scrape, code: int) -> float:
    return s("fastfeed_closes_total", code=str(code))


async def test_a_bug_on_ingest_is_logged_once_per_kind_counted_and_closed_1011(gw: Proc) -> None:
    wait = scrape_until(gw.url)
    before = Scrape(gw.url)
    peers = []
    for _ in range(5):
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ingest") as ws:
            host, port = ws.local_address[:2]
            peers.append(f"{host}:{port}")
            await ws.send('"raise, please"')
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1011
            assert "injected" not in (ws.close_reason or ""), "no exception text to clients"
    s = await wait(lambda s: closes(s, 1011) - closes(before, 1011) >= 5, "five 1011 closes")
    assert closes(s, 1011) - closes(before, 1011) == 5
    assert (s("fastfeed_internal_errors_total") - before("fastfeed_internal_errors_total")) == 5
    # one line for five occurrences of one kind; it says where and to whom
    logged = gw.lines("unexpected LookupError")
    assert len(logged) == 1, logged
    assert "path=/ingest" in logged[0] and f"client={peers[0]}" in logged[0], logged[0]
    assert "cid=" in logged[0] and "feed/ingest.py" not in logged[0]
    assert gw.lines("Traceback"), "the first of a kind carries its traceback"
    assert not gw.lines(" picows"), "picows' own lines stay out of the log"
    # the gateway serves on
    assert http_get(gw.url + "/healthz")[0] == 200


async def test_closes_picows_sends_itself_are_counted_on_every_endpoint(gw: Proc) -> None:
    wait = scrape_until(gw.url)
    before = Scrape(gw.url)
    for path in ("/ws", "/ingest", "/echo"):
        ws = await RawWS.connect(gw.port, path)
        ws.send_frame(1, b"{}", mask=False)  # unmasked from a client: picows refuses it
        assert await ws.recv_close() == 1002
        ws.close()
    s = await wait(lambda s: closes(s, 1002) - closes(before, 1002) >= 3, "three 1002 closes")
    assert closes(s, 1002) - closes(before, 1002) == 3
    # and the gateway's own closes, on every endpoint: a message over the limit
    for path, size in (("/ws", 65536 + 1), ("/echo", 16 * 1024 * 1024 + 1)):
        ws = await RawWS.connect(gw.port, path)
        ws.send_frame(1, b"x" * 10, fin=False)
        ws.send_frame(0, b"x" * size)
        assert await ws.recv_close(timeout=20) == 1009
        ws.close()
    s = await wait(lambda s: closes(s, 1009) - closes(before, 1009) >= 2, "two 1009 closes")
    assert closes(s, 1009) - closes(before, 1009) == 2


async def test_a_full_table_is_logged_once_naming_the_setting_and_counted(gw: Proc) -> None:
    wait = scrape_until(gw.url)
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ingest") as ws:
        await ws.send(json.dumps([{"sym": f"CAP{k}", "seq": 1, "bid": 1.0} for k in range(5)]))
        await ws.send(json.dumps([{"sym": f"NEW{k}", "seq": 1, "bid": 1.0} for k in range(7)]))
        errors = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(7)]
        assert all("instrument table is full" in e["message"] for e in errors), errors
        await ws.send(json.dumps({"sym": "LATEST", "seq": 1, "bid": 1.0}))
        assert "full" in json.loads(await asyncio.wait_for(ws.recv(), 10))["message"]
    s = await wait(lambda s: s("fastfeed_instruments_refused_total") >= 8, "8 refusals counted")
    assert s("fastfeed_instruments_refused_total") == 8
    assert s("fastfeed_instruments") == 5
    await until(lambda: gw.lines("instrument table is full"), what="the refusal logged")
    logged = gw.lines("instrument table is full")
    assert len(logged) == 1, logged  # at most one line a minute
    assert "--max-instruments" in logged[0] and "FASTFEED_MAX_INSTRUMENTS" in logged[0]
    assert "at 5 instruments" in logged[0]


def _burst_and_reset(port: int, syms: list[str]) -> None:
    """Subscribe, send a burst that asks for thousands of answers (pongs, error
    replies) in one read, and reset the connection (SO_LINGER 0: an RST, as a
    crashed client or a middlebox sends) while the gateway answers it."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    req = json.dumps({"op": "subscribe", "symbols": syms}).encode()
    sock.sendall(struct.pack("!BBH", 0x81, 0xFE, len(req)) + _mask(req))
    assert sock.recv(1)  # the snapshot has started: it is subscribed
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.send((_frame(9, b"p") + _frame(2, b"")) * 20000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_reset_client_in_a_burst_leaves_no_flood_of_lines(tmp_path: Path) -> None:
    p = Proc(tmp_path, "--simulate", "2000", "--rate", "100000")
    try:
        await asyncio.to_thread(p.wait_ready)
        wait = scrape_until(p.url)
        async with websockets.connect(f"ws://127.0.0.1:{p.port}/ws") as canary:
            await canary.send(json.dumps({"op": "list"}))
            syms = json.loads(await asyncio.wait_for(canary.recv(), 10))["symbols"]
            await canary.send(json.dumps({"op": "subscribe", "symbols": syms[:50]}))
            for _ in range(10):
                await asyncio.to_thread(_burst_and_reset, p.port, syms[:500])
            await wait(lambda s: s("fastfeed_connections") == 1, "the reset clients gone")
            # the canary still gets updates
            while json.loads(await asyncio.wait_for(canary.recv(), 10))["type"] != "update":
                pass
        assert p.lines("connection lost") == [], p.lines("connection lost")[:3]
        assert p.lines("unexpected") == []
    finally:
        p.stop()


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    return key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _frame(opcode: int, payload: bytes) -> bytes:
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + _mask(payload)
