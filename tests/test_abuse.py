"""Every kind of abuse at once against one gateway, with a canary client watching.

One real `fastfeed serve` process (simulated feed, client tokens, an Origin
allow-list, 100,000 instruments known) and a canary (`websockets`, subscribed
to the simulated instruments for the whole test). In parallel, attackers
send what the hardening issue found breaks or hurts a gateway: malformed
JSON, lone surrogates, deep nesting, `1e400` ids, non-UTF-8 headers,
`Connection: keep-alive, Upgrade`, list floods, clients that never read,
huge declared frames, binary floods, resets, HTTP/1.0 and HEAD health checks.
Every attacker is bounded in count and time.

Asserted: each attack gets the answer docs/protocol.md documents (collected,
then reported together); the gateway stays up (/healthz answers at the end);
the canary converges to the true latest state (a fresh snapshot taken at the
end); the gateway's RSS (VmRSS) never grows more than RSS_BOUND_MIB over its
value before the attack; the gateway never logs a write to a lost transport.
Printed, not asserted: the canary's worst gap between two messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time

import jwt
import pytest
import websockets
from fixtures import rss_kib, strict_json
from support import Gateway, http_get, until
from wsraw import RawWS, client_frame

from fastfeed.feed.simulator import symbols

SECRET = "abuse-test-secret-of-at-least-32-bytes"
ORIGIN = "https://board.example"
N_SIM = 200  # simulated instruments: the canary's
N_KNOWN = 100_000  # instruments known in all, the rest pushed through /ingest
# Budget for the whole attack over the RSS before it, from docs/protocol.md
# ("Bounded memory per client"): a client holds at most about
# --max-queued-bytes (1 MiB) plus one reply (a full list page, under 350 KiB)
# plus the kernel's socket buffers, which are not in the gateway's RSS. At
# most 42 attacker connections are open at once (20 huge declared frames, 10
# resets, 2 never reading, 10 others), so 42 x 1.35 MiB, about 57 MiB, plus
# 7 MiB for the allocator. Unbounded buffering pinned far more (50 to 110 MiB
# per non-reading client; 76 MiB for 20 huge declared frames).
RSS_BOUND_MIB = 64
ATTACK_S = 60.0  # no attacker runs longer than this


def token(sub: str = "canary") -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 600, "syms": ["*"]}, SECRET,
                      algorithm="HS256")


AUTH = {"Authorization": f"Bearer {token()}"}


class Problems(list):
    def check(self, ok: bool, what: str) -> None:
        if not ok and what not in self:  # each distinct failure once
            self.append(what)


async def raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one raw HTTP request; return (status, whole response) once the server is done."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        rest = b""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            rest = await asyncio.wait_for(reader.read(65536), 0.5 if status == 101 else 2.0)
        return status, head + rest
    finally:
        writer.close()


def upgrade(path: str, port: int, extra: bytes = b"",
            connection: bytes = b"Upgrade") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            ).encode() + b"Connection: " + connection + b"\r\n" + extra + b"\r\n"


async def replies(ws: RawWS, n: int, timeout: float = 10.0) -> tuple[list[dict], int | None]:
    """Up to n text replies (strict JSON, or a note of what was not), and the close code if any."""
    out: list[dict] = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        try:
            op, data = await ws.recv_frame(max(0.1, end - time.monotonic()))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return out, None
        if op == 8:
            return out, struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
        if op == 1:
            try:
                out.append(strict_json(data))
            except ValueError as e:
                out.append({"type": "INVALID JSON", "error": str(e), "raw": data[:100]})
    return out, None


async def connect(port: int, **kw) -> RawWS:
    return await RawWS.connect(port, headers=AUTH, **kw)


# ---- the attackers: each returns nothing and records what went against the contract


async def malformed_json(port: int, p: Problems) -> None:
    bad = [b"{", b"nul", b'{"op":}', b'{"op":"ping",}', b"[1,]", b'"\\x"', b"{'op':1}",
           b"\xc3\xa9", b'{"op":"ping"} x', b"01", b'{"op" "ping"}', b"\t"]
    ws = await connect(port)
    for m in bad:
        ws.send_text(m)
    got, code = await replies(ws, len(bad))
    p.check(code is None and len(got) == len(bad), f"malformed JSON: {len(got)} replies "
            f"to {len(bad)} requests, close {code}")
    p.check(all(r.get("code") == "bad_request" for r in got),
            f"malformed JSON: not all bad_request: {got[:3]}")
    ws.close()


async def lone_surrogates(port: int, p: Problems) -> None:
    ws = await connect(port)
    for m in (b'{"op":"subscribe","symbols":["\\ud800"]}', b'{"op":"ping","id":"\\udfff"}',
              b'{"op":"list","match":"\\ud800*"}', b'{"op":"ping","id":7}'):
        ws.send_text(m)
    got, code = await replies(ws, 4)
    p.check(code is None and len(got) == 4,
            f"lone surrogates: {len(got)} of 4 replies, close {code} (1011: an exception)")
    p.check([r.get("code") for r in got[:3]] == ["bad_request"] * 3,
            f"lone surrogates: not bad_request: {got[:3]}")
    p.check(got[-1:] == [] or (got[-1].get("type"), got[-1].get("id")) == ("pong", 7),
            f"lone surrogates: the connection broke after them: {got[-1:]}")
    ws.close()


async def deep_nesting(port: int, p: Problems) -> None:
    ws = await connect(port)
    ws.send_text(b"[" * 60000)
    # 5,000 levels in 30 KB: deeper than orjson's 1,024, within the 64 KiB message limit
    ws.send_text(b'{"op":"ping","id":' + b'{"a":' * 5000 + b"1" + b"}" * 5001)
    ws.send_text(b'{"op":"ping","id":8}')
    got, code = await replies(ws, 3)
    p.check(code is None and [r.get("code") for r in got[:2]] == ["bad_request"] * 2,
            f"deep nesting: {[r.get('code') or r.get('type') for r in got]}, close {code}")
    ws.close()


async def huge_numbers(port: int, p: Problems) -> None:
    ws = await connect(port)
    msgs = [b'{"op":"ping","id":1e400}', b'{"op":"ping","id":-1e400}',
            b'{"op":"ping","id":NaN}', b'{"op":"ping","id":Infinity}',
            b'{"op":"ping","id":' + b"9" * 400 + b"}", b'{"op":"ping","id":9}']
    for m in msgs:
        ws.send_text(m)
    got, code = await replies(ws, len(msgs))
    p.check(code is None and len(got) == len(msgs),
            f"huge numbers: {len(got)} of {len(msgs)} replies, close {code}")
    invalid = [r for r in got if r.get("type") == "INVALID JSON"]
    p.check(not invalid, f"huge numbers: replies that are not JSON: {invalid[:2]}")
    ws.close()


async def bad_ingest(port: int, p: Problems) -> None:
    ws = await RawWS.connect(port, "/ingest")
    msgs = [b'{"sym":"\\ud800","seq":1}', b"[" * 100000,
            b'{"sym":"ABUSE1","seq":1,"bid":' + b"1" * 400 + b"}",
            b'{"sym":"ABUSE2","seq":1,"bid":NaN}', b'{"sym":"ABUSE3","seq":' + b"9" * 400 + b"}"]
    for m in msgs:
        ws.send_text(m)
    got, code = await replies(ws, len(msgs))
    p.check(code is None and len(got) == len(msgs) and all(
        r.get("code") == "bad_request" for r in got),
        f"/ingest bad ticks: {[r.get('code') or r.get('type') for r in got]}, close {code}")
    ws.close()


async def non_utf8_headers(port: int, p: Problems) -> None:
    for _ in range(5):
        st, body = await raw_http(port, upgrade("/ws", port,
                                                b"Authorization: Bearer \xff\xfe.\xc0\r\n"))
        p.check(st == 401, f"non-UTF-8 Authorization: HTTP {st}, not 401")
        p.check(b"Error" not in body and b"codec" not in body,
                f"non-UTF-8 Authorization: exception text in the body: {body[-120:]!r}")
        st, body = await raw_http(port, upgrade(
            "/ws", port, b"Origin: https://\xff\xfe.example\r\n" + AUTH_LINE))
        p.check(st == 403, f"non-UTF-8 Origin: HTTP {st}, not 403")
        p.check(b"Error" not in body and b"codec" not in body,
                f"non-UTF-8 Origin: exception text in the body: {body[-120:]!r}")


AUTH_LINE = f"Authorization: Bearer {token('attacker')}\r\n".encode()


async def keep_alive_upgrade(port: int, p: Problems) -> None:
    for conn in (b"keep-alive, Upgrade", b"Upgrade, keep-alive", b"upgrade"):
        st, body = await raw_http(port, upgrade("/ws", port, AUTH_LINE, conn))
        p.check(st == 101, f"Connection: {conn.decode()}: HTTP {st}, not 101: {body[-80:]!r}")


async def list_flood(port: int, p: Problems) -> None:
    """100 list requests (inside the burst) in one write, read as they come."""
    ws = await connect(port, limit=2**26)
    ws.writer.write(b"".join(client_frame(1, b'{"op":"list"}') for _ in range(100)))
    got, code = await replies(ws, 100, timeout=ATTACK_S / 2)
    p.check(all(r.get("type") in ("list", "error") for r in got) and code in (None, 1008),
            f"list flood: unexpected replies {[r.get('type') for r in got][:5]}, close {code}")
    ws.close()


async def never_reading(port: int, p: Problems, stop: asyncio.Event) -> None:
    """Clients that queue replies (lists, pings, binary frames) and never read one."""
    clients = [await connect(port, rcvbuf=4096) for _ in range(2)]
    burst = (b"".join(client_frame(1, b'{"op":"list"}') for _ in range(90))
             + b"".join(client_frame(1, b"") for _ in range(200))
             + b"".join(client_frame(2, b"") for _ in range(200)))
    for c in clients:
        c.writer.write(burst)
    for _ in range(10):  # a few more bursts, while the gateway lets them in
        await asyncio.sleep(0.5)
        for c in clients:
            if not c.writer.is_closing() and c.writer.transport.get_write_buffer_size() < 2**20:
                c.writer.write(b"".join(client_frame(1, b'{"op":"ping"}') for _ in range(20)))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), ATTACK_S / 2)
    for c in clients:
        c.writer.transport.abort()


async def huge_declared_frames(port: int, p: Problems) -> None:
    """Headers declaring 1 MiB and 4 MB on /ws (limit 64 KiB), then the payload up to
    1,000 bytes short, while reading: the close must come from the header alone."""
    async def one(declared: int) -> int | None:
        c = await connect(port, limit=2**16)
        closed = asyncio.ensure_future(c.recv_close(timeout=ATTACK_S / 3))
        try:
            c.writer.write(client_frame(1, b"", declared=declared))
            left = declared - 1000
            while left > 0 and not closed.done() and not c.writer.is_closing():
                c.writer.write(b"x" * min(left, 2**18))
                left -= 2**18
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(c.writer.drain(), 5)
            return await closed
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            closed.cancel()
            c.writer.transport.abort()
    codes = await asyncio.gather(*(one(4_000_000 if i % 2 else 1 << 20) for i in range(20)))
    p.check(codes.count(1009) == len(codes),
            f"huge declared frames: closes {sorted(map(str, set(codes)))}, {codes.count(1009)} "
            f"of {len(codes)} got 1009 before their payload arrived")


async def binary_flood(port: int, p: Problems) -> None:
    ws = await connect(port)
    ws.writer.write(b"".join(client_frame(2, b"") for _ in range(500)))
    got, code = await replies(ws, 500, timeout=15)
    kinds = {r.get("code") for r in got}
    p.check("rate_limited" in kinds or code == 1008,
            f"binary flood: 500 binary frames, replies {sorted(map(str, kinds))}, close {code}: "
            "the rate limit was never applied")
    ws.close()


async def resets(port: int, p: Problems, subs: list[str]) -> None:
    """Clients subscribed to everything that vanish with a TCP reset mid-stream."""
    req = json.dumps({"op": "subscribe", "symbols": subs}).encode()
    for _ in range(5):
        clients = [await connect(port, rcvbuf=4096) for _ in range(10)]
        for c in clients:
            c.send_text(req)
        await asyncio.sleep(0.3)  # updates under way to them: a reset in mid-write
        for c in clients:
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.writer.transport.abort()


async def health_checks(port: int, p: Problems) -> None:
    for _ in range(10):
        st, body = await raw_http(port, b"GET /healthz HTTP/1.0\r\n\r\n")
        p.check(st == 200, f"GET /healthz HTTP/1.0: HTTP {st}")
        st, body = await raw_http(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        p.check(st == 200, f"HEAD /healthz: HTTP {st}")
        p.check(body.endswith(b"\r\n\r\n"), f"HEAD /healthz: a body came back: {body[-40:]!r}")
        await asyncio.sleep(0.5)


# ---- the canary


class Canary:
    """A subscribed client on its own thread and event loop, so that the gaps it
    sees are the gateway's and not those of the attackers' loop in this process."""

    def __init__(self, url: str, subs: list[str]) -> None:
        self.url, self.subs = url, subs
        self.rows: dict[str, list] = {}
        self.worst_gap = 0.0
        self.messages = 0
        self.closed: str | None = None
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.run(),),
                                       daemon=True)

    def merge(self, rows: list[list]) -> None:
        for r in rows:
            held = self.rows.get(r[0])
            if held is None or r[1] > held[1]:
                self.rows[r[0]] = r

    async def run(self) -> None:
        self.stopping = asyncio.Event()
        try:
            # no client pings: a gateway that stalls shows as a gap, not a dead canary
            async with websockets.connect(self.url, additional_headers=AUTH, max_size=2**24,
                                          ping_interval=None) as ws:
                await ws.send(json.dumps({"op": "subscribe", "symbols": self.subs, "id": 1}))
                reading = asyncio.ensure_future(self.read(ws))
                await self.stopping.wait()
                if reading.done():
                    reading.result()  # raises what ended it
                reading.cancel()
        except Exception as e:  # noted; the test asserts the canary lived
            self.closed = f"{type(e).__name__}: {e}"

    async def read(self, ws) -> None:
        last = None
        async for raw in ws:
            now = time.monotonic()
            if last is not None:
                self.worst_gap = max(self.worst_gap, now - last)
            last = now
            self.messages += 1
            msg = json.loads(raw)
            if msg["type"] in ("snapshot", "update"):
                self.merge(msg["rows"])
                self.ready.set()
        raise ConnectionError("the gateway closed the canary's connection")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(lambda: self.stopping.set())
            self.thread.join(10)


async def snapshot(url: str, subs: list[str]) -> dict[str, list]:
    async with websockets.connect(url, additional_headers=AUTH, max_size=2**24) as ws:
        await ws.send(json.dumps({"op": "subscribe", "symbols": subs, "id": "truth"}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == "snapshot":
                return {r[0]: r for r in msg["rows"]}


async def healthy(g: Gateway, within_s: float = 30.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if (await asyncio.to_thread(http_get, g.url + "/healthz", 2.0))[0] == 200:
                return True
        await asyncio.sleep(0.2)
    return False


async def load_instruments(g: Gateway) -> None:
    """N_KNOWN instruments known in all (the list flood's cost depends on it)."""
    async with websockets.connect(g.ingest_url, max_size=2**24) as ing:
        for start in range(0, N_KNOWN - N_SIM, 10_000):
            ticks = [{"sym": f"LD{i:06d}", "seq": 1, "last": 1.0}
                     for i in range(start, min(start + 10_000, N_KNOWN - N_SIM))]
            await ing.send(json.dumps(ticks))
    last = f"LD{N_KNOWN - N_SIM - 1:06d}"
    async with websockets.connect(g.ws_url, additional_headers=AUTH, max_size=2**26) as ws:
        async def ask(req: dict) -> dict:
            await ws.send(json.dumps(req))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert reply.get("type") == "list", reply
            return reply

        # one publisher connection applies in order: the last symbol known, all are
        for _ in range(100):
            if (await ask({"op": "list", "match": last}))["symbols"]:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"{last}, pushed through /ingest, never showed up")
        # then count them, page by page (a list reply holds at most --max-list-symbols)
        n, after = 0, None
        while True:
            page = await ask({"op": "list", "match": "LD*", **({"after": after} if after else {})})
            n += len(page["symbols"])
            if not page["more"]:
                break
            after = page["next"]
        assert n == N_KNOWN - N_SIM, f"{n} of the {N_KNOWN - N_SIM} instruments pushed are known"


@pytest.mark.timeout(300)
async def test_the_gateway_survives_every_abuse_at_once(tmp_path):
    g = Gateway(["--simulate", str(N_SIM), "--rate", "2000", "--jwt-secret", SECRET,
                 "--allowed-origins", ORIGIN, "--stall-s", "10"], None, None)
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        g.proc = subprocess.Popen([sys.executable, "-m", "fastfeed", "serve", "--host",
                                   "127.0.0.1", "--port", str(g.port), *g.args], env=g.env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        await attack(g, log_path)
    finally:
        g.stop()


async def attack(g: Gateway, log_path) -> None:
    canary = None
    try:
        await g.wait_ready()
        pid = g.proc.pid
        subs = symbols(N_SIM)
        await load_instruments(g)

        canary = Canary(g.ws_url, subs)
        canary.start()
        assert await asyncio.to_thread(canary.ready.wait, 20), "the canary got no snapshot"
        base = rss_kib(pid)
        peak = base
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling and g.proc.poll() is None:
                peak = max(peak, rss_kib(pid))
                await asyncio.sleep(0.05)
        sampler = asyncio.create_task(sample())

        p = Problems()
        stop = asyncio.Event()
        attacks = [malformed_json(g.port, p), lone_surrogates(g.port, p), deep_nesting(g.port, p),
                   huge_numbers(g.port, p), bad_ingest(g.port, p), non_utf8_headers(g.port, p),
                   keep_alive_upgrade(g.port, p), list_flood(g.port, p),
                   huge_declared_frames(g.port, p), binary_flood(g.port, p),
                   resets(g.port, p, subs), health_checks(g.port, p)]

        async def bounded(coro) -> None:
            name = coro.__name__
            try:
                await asyncio.wait_for(coro, ATTACK_S)
            except TimeoutError:
                p.append(f"{name}: not done within {ATTACK_S:g} s: the gateway stopped answering")
            except Exception as e:
                p.append(f"{name}: {type(e).__name__}: {e}")

        reader = asyncio.create_task(bounded(never_reading(g.port, p, stop)))
        await asyncio.gather(*(bounded(a) for a in attacks))
        stop.set()
        await reader

        # the gateway is up, and the canary holds what a fresh client is told
        assert g.proc.poll() is None, "the gateway died"
        assert await healthy(g), "/healthz did not answer 200 within 30 s of the attack"
        truth = await snapshot(g.ws_url, subs)
        assert len(truth) == N_SIM

        def converged() -> bool:
            return all(s in canary.rows and (canary.rows[s][1] > t[1] or canary.rows[s] == t)
                       for s, t in truth.items())
        await until(lambda: converged() or canary.closed is not None, 30,
                    what="canary converged to the fresh snapshot")
        sampling = False
        await sampler
        print(f"\ncanary: {canary.messages} messages, worst gap between two "
              f"{canary.worst_gap * 1000:.0f} ms; gateway RSS {base // 1024} MiB before the "
              f"attack, peak {peak // 1024} MiB (+{(peak - base) // 1024} MiB)")
        assert canary.closed is None, f"the canary lost its connection: {canary.closed}"
        assert converged()
        p.check((peak - base) // 1024 <= RSS_BOUND_MIB,
                f"RSS grew {(peak - base) // 1024} MiB under attack, bound {RSS_BOUND_MIB} MiB")
        lost = log_path.read_bytes().count(b"write() called after connection lost")
        p.check(lost == 0, f"{lost} log lines of writes to a lost transport")
        assert not p, "against the contract:\n  " + "\n  ".join(p)
    finally:
        if canary is not None:
            canary.stop()
