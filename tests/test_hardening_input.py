"""Whatever a client sends, the gateway answers as documented and stays up.

From the client's side only: raw HTTP over sockets, raw frames (wsraw) and
the `websockets` library. Each test is one class of bad (or merely unusual)
input: the upgrade's Connection header, JSON the gateway cannot represent,
replies that must be valid JSON, header bytes that are not text, and the
HTTP forms load balancers check with.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import jwt
import pytest
import websockets
from fixtures import strict_json
from support import running_gateway
from wsraw import RawWS

SECRET = "hardening-test-secret-of-at-least-32-bytes"
PUB = "hardening-publisher-token"
ORIGIN = "https://board.example"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.fixture(scope="module")
def gw():
    with running_gateway("--max-message-bytes", "65536") as g:
        yield g


@pytest.fixture(scope="module")
def locked():
    """A gateway with tokens for clients and publishers and an Origin allow-list."""
    env = {"FASTFEED_JWT_SECRET": SECRET, "FASTFEED_PUBLISHER_TOKEN": PUB}
    with running_gateway("--allowed-origins", ORIGIN, env=env) as g:
        yield g


def token() -> str:
    return jwt.encode({"sub": "t", "exp": int(time.time() + 600)}, SECRET, algorithm="HS256")


def http(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One raw request; the whole answer up to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            if out.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in out:
                break
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def upgrade_request(path: str, connection: list[str], extra: str = "") -> bytes:
    conn = "".join(f"Connection: {c}\r\n" for c in connection)
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}Upgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n").encode()


async def raw_upgrade(port: int, request: bytes) -> RawWS:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"Sec-WebSocket-Accept: " + ACCEPT in head
    return RawWS(reader, writer)


async def request(ws: RawWS, msg: bytes):
    """Send one text frame; the next text reply, checked to be strict JSON."""
    ws.send_text(msg)
    while True:
        op, data = await ws.recv_frame()
        assert op == 1, (op, data)
        reply = strict_json(data)
        if reply.get("type") not in ("update", "heartbeat", "status"):
            return reply


async def still_serves(ws: RawWS, rid: int = 42) -> None:
    pong = await request(ws, json.dumps({"op": "ping", "id": rid}).encode())
    assert pong["type"] == "pong" and pong["id"] == rid


# ---- 1. Connection: keep-alive, Upgrade


@pytest.mark.parametrize("connection", [
    ["keep-alive, Upgrade"],             # older Firefox, some proxies and libraries
    ["Upgrade, keep-alive"],
    ["keep-alive", "upgrade"],           # the same token list over two header lines
    ["UPGRADE"],
], ids=["keep-alive-first", "upgrade-first", "two-lines", "upper-case"])
async def test_an_upgrade_whose_connection_header_lists_more_tokens_is_accepted(gw, connection):
    ws = await raw_upgrade(gw.port, upgrade_request("/ws", connection))
    await still_serves(ws)
    sub = await request(ws, b'{"op":"subscribe","id":"s","symbols":["NOSUCH"]}')
    assert sub["type"] == "snapshot" and sub["unknown"] == ["NOSUCH"]
    ws.close()
    pub = await raw_upgrade(gw.port, upgrade_request("/ingest", connection))
    pub.send_text(b'{"sym":"KEEPALIVE","seq":1,"last":1.5}')
    ws = await raw_upgrade(gw.port, upgrade_request("/ws", connection))
    for _ in range(200):  # the tick is applied asynchronously to this client's view
        snap = await request(ws, b'{"op":"subscribe","symbols":["KEEPALIVE"]}')
        if snap["rows"]:
            break
        await asyncio.sleep(0.02)
    assert [r[0] for r in snap["rows"]] == ["KEEPALIVE"]
    ws.close()
    pub.close()


async def test_frames_in_the_same_write_as_the_upgrade_request_are_served(gw):
    """The first bytes pass through the HTTP front door before picows: a
    request of several KiB and the frames behind it reach picows intact."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    raw = RawWS(reader, writer)
    padding = f"X-Padding: {'p' * 6000}\r\n"
    writer.write(upgrade_request("/ws", ["keep-alive, Upgrade"], padding))
    for rid in range(3):
        raw.send_text(json.dumps({"op": "ping", "id": rid}).encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    for rid in range(3):
        op, data = await raw.recv_frame()
        assert op == 1 and strict_json(data)["id"] == rid
    raw.close()


def test_an_upgrade_without_the_upgrade_token_is_refused_by_name(gw):
    status, _, body = http(gw.port, upgrade_request("/ws", ["keep-alive"]))
    assert status == 400 and b"Connection" in body


# ---- 2. client input the JSON decoder must refuse, not raise on


WS_BAD = [
    b'{"op":"subscribe","symbols":["\\ud800"]}',
    b'{"op":"ping","id":"\\udfff"}',
    b'{"op":"subscribe","symbols":["A\\udc00B"]}',
    b"[" * 60000,                       # deep, yet under the 64 KiB message limit
    b'{"op":"ping","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"op":"ping","id":1' + b"0" * 400 + b"}",   # beyond a double
    b'{"op":"ping","id":1}' + b" x",
]


@pytest.mark.parametrize("msg", WS_BAD, ids=["surrogate-symbol", "surrogate-id",
                                             "surrogate-inside", "60000-deep", "2000-deep",
                                             "400-digits", "trailing-garbage"])
async def test_json_the_gateway_cannot_represent_is_a_bad_request_and_costs_nothing(gw, msg):
    ws = await RawWS.connect(gw.port)
    err = await request(ws, msg)
    assert err["type"] == "error" and err["code"] == "bad_request", err
    assert err["message"].startswith("not JSON: "), err
    assert err["id"] is None
    await still_serves(ws)   # every later reply is fine too
    ws.close()


INGEST_BAD = [
    b'{"sym":"\\ud800","seq":1}',
    b'[{"sym":"OK1","seq":1},{"sym":"X\\udfffY","seq":1}]',
    b"[" * 100000,
    b'{"sym":"BIG","seq":1,"bid":1' + b"0" * 400 + b"}",
    b'{"sym":"BIG","seq":1' + b"0" * 400 + b"}",
    b'{"sym":"NAN","seq":1,"bid":NaN}',
    b'{"sym":"INF","seq":1,"ask":-Infinity}',
    b'{"sym":"INF","seq":1,"ask":1e400}',
]


async def test_ingest_refuses_what_is_not_json_whole_by_name_and_keeps_serving(gw):
    async with websockets.connect(gw.ingest_url, max_size=None) as pub:
        for msg in INGEST_BAD:
            await pub.send(msg.decode("utf-8"))
            err = strict_json((await asyncio.wait_for(pub.recv(), 5)).encode())
            assert err["code"] == "bad_request", (msg[:60], err)
            assert err["message"].startswith("not JSON: "), (msg[:60], err)
        # nothing of those messages applied, and the publisher is still served
        await pub.send(json.dumps({"sym": "AFTERBAD", "seq": 1, "last": 2.0}))
    ws = await RawWS.connect(gw.port)
    for _ in range(200):
        snap = await request(ws, b'{"op":"subscribe","symbols":["AFTERBAD","OK1","NAN","BIG"]}')
        if snap["rows"]:
            break
        await asyncio.sleep(0.02)
    assert [r[0] for r in snap["rows"]] == ["AFTERBAD"]
    assert set(snap["unknown"]) == {"OK1", "NAN", "BIG"}
    ws.close()


async def test_a_number_of_hundreds_of_digits_that_a_double_holds_is_taken(gw):
    async with websockets.connect(gw.ingest_url) as pub:
        await pub.send('{"sym":"HUGE","seq":1,"volume":1' + "0" * 300 + "}")
        await pub.send('{"sym":"HUGE","seq":1' + "0" * 300 + "}")
        err = strict_json((await asyncio.wait_for(pub.recv(), 5)).encode())
        assert err["code"] == "bad_request" and "seq" in err["message"]
    ws = await RawWS.connect(gw.port)
    for _ in range(200):
        snap = await request(ws, b'{"op":"subscribe","symbols":["HUGE"]}')
        if snap["rows"]:
            break
        await asyncio.sleep(0.02)
    assert snap["rows"][0][9] == 1e300
    ws.close()


# ---- 3. every message the gateway sends is valid JSON


@pytest.mark.parametrize("rid", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity"])
async def test_ids_json_cannot_hold_are_refused_never_echoed(gw, rid):
    ws = await RawWS.connect(gw.port)
    err = await request(ws, b'{"op":"ping","id":' + rid + b"}")   # request() checks strictness
    assert err["code"] == "bad_request" and err["id"] is None
    await still_serves(ws)
    ws.close()


@pytest.mark.parametrize("rid, echoed", [
    (b"18446744073709551615", 18446744073709551615),     # the largest 64-bit integer: exact
    (b"-9223372036854775808", -9223372036854775808),
    (b"18446744073709551616", 18446744073709551616.0),   # beyond 64 bits: the nearest double
    (b"-9223372036854775809", -9223372036854775809.0),
    (b"1" + b"0" * 300, 1e300),
    (b"1e-400", 0.0),
    (b'"\\ud83d\\ude00 \\u0000"', "\U0001f600 \x00"),    # a surrogate pair is one character
])
async def test_every_id_is_echoed_as_valid_json(gw, rid, echoed):
    ws = await RawWS.connect(gw.port)
    for op in (b"ping", b"list", b"nope", b"configure"):
        reply = await request(ws, b'{"op":"' + op + b'","id":' + rid + b"}")
        assert reply["id"] == echoed and type(reply["id"]) is type(echoed), (op, reply)
    snap = await request(ws, b'{"op":"subscribe","symbols":[],"id":' + rid + b"}")
    assert snap["type"] == "snapshot" and snap["id"] == echoed
    ws.close()


# ---- 4. header bytes that are not text


AUTH_BAD = [b"Bearer \xff\xfe", b"Bearer ey\xc3\xa9.x.y", b"Bearer \x80"]


@pytest.mark.parametrize("value", AUTH_BAD, ids=["ff-fe", "utf-8-e-acute", "bare-80"])
def test_a_token_that_is_not_ascii_is_401_on_ws_and_ingest(locked, value):
    for path in ("/ws", "/ingest"):
        req = upgrade_request(path, ["Upgrade"])[:-2] + b"Authorization: " + value + b"\r\n\r\n"
        status, _, body = http(locked.port, req)
        assert status == 401, (path, status, body)
        assert b"Error" not in body and b"Traceback" not in body and b"codec" not in body


@pytest.mark.parametrize("value", [b"https://board.example\xff", b"\xc3\xa9", b"https://b\x80"])
def test_an_origin_that_is_not_ascii_is_403(locked, value):
    req = upgrade_request("/ws", ["Upgrade"], f"Authorization: Bearer {token()}\r\n")
    req = req[:-2] + b"Origin: " + value + b"\r\n\r\n"
    status, _, body = http(locked.port, req)
    assert status == 403, (status, body)
    assert b"Error" not in body and b"codec" not in body
    assert body.startswith(b"origin ") and body.endswith(b" is not allowed\n")


@pytest.mark.parametrize("name", ["Sec-WebSocket-Version", "Sec-WebSocket-Key",
                                  "Sec-WebSocket-Protocol"])
def test_handshake_headers_that_are_not_ascii_are_400_without_exception_text(gw, name):
    req = upgrade_request("/ws", ["Upgrade"]).replace(b"\r\n\r\n", b"\r\n")
    lines = [ln for ln in req.split(b"\r\n") if not ln.lower().startswith(name.lower().encode())]
    req = b"\r\n".join(lines) + name.encode() + b": 13\xff\r\n\r\n"
    status, _, body = http(gw.port, req)
    assert status == 400 and b"Error" not in body and b"codec" not in body, (status, body)


def test_the_locked_gateway_still_takes_a_good_client(locked):
    req = upgrade_request("/ws", ["keep-alive, Upgrade"],
                          f"Authorization: Bearer {token()}\r\nOrigin: {ORIGIN}\r\n")
    status, headers, _ = http(locked.port, req)
    assert status == 101 and headers["upgrade"] == "websocket"


# ---- 10. the HTTP forms load balancers check with


@pytest.mark.parametrize("req", [
    b"GET /healthz HTTP/1.0\r\n\r\n",                    # HAProxy: option httpchk GET /healthz
    b"GET /healthz HTTP/1.0\r\nUser-Agent: check\r\n\r\n",
    b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"HEAD /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
], ids=["get-1.0", "get-1.0-headers", "head-1.1", "head-1.0", "get-1.1"])
def test_health_checks_in_every_form_load_balancers_send(gw, req):
    status, headers, body = http(gw.port, req)
    assert status == 200 and headers["connection"] == "close"
    assert headers["content-length"] == "3"
    assert body == (b"" if req.startswith(b"HEAD") else b"ok\n")


def test_readyz_metrics_and_404_over_http_1_0_and_head(gw):
    for path, want in ((b"/readyz", 200), (b"/metrics", 200), (b"/nope", 404)):
        status, _, body = http(gw.port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
        assert status == want and body
        status, headers, body = http(gw.port, b"HEAD " + path + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status == want and body == b"" and int(headers["content-length"]) > 0


def test_options_names_the_methods(gw):
    status, headers, body = http(gw.port, b"OPTIONS / HTTP/1.0\r\n\r\n")  # HAProxy's default
    assert status == 200 and headers["allow"] == "GET, HEAD, OPTIONS" and body == b""


def test_a_websocket_upgrade_over_head_or_http_1_0_is_refused(gw):
    for line in (b"HEAD /ws HTTP/1.1", b"GET /ws HTTP/1.0"):
        req = upgrade_request("/ws", ["Upgrade"]).replace(b"GET /ws HTTP/1.1", line)
        status, _, _body = http(gw.port, req)
        assert status == 400


def test_other_methods_are_still_refused_and_the_gateway_serves_on(gw):
    status, _, _ = http(gw.port, b"POST /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 400
    status, _, body = http(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (status, body) == (200, b"ok\n")


async def test_a_slow_request_line_is_still_cut_at_the_handshake_timeout():
    with running_gateway("--handshake-timeout-s", "1") as g:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
        writer.write(b"HEAD /heal")      # never finished
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


# ---- the factory: any unexpected error is a plain 500, logged


async def test_an_unexpected_error_answering_a_request_is_a_plain_500_and_logged(caplog):
    from fastfeed.config import Config
    from fastfeed.server import Gateway

    gateway = Gateway(Config(host="127.0.0.1", port=0), asyncio.get_running_loop())
    await gateway.start()

    def broken(req):
        raise RuntimeError("internal detail \udcff that must not reach a client")

    gateway._route = broken  # type: ignore[method-assign]
    try:
        for req in (upgrade_request("/ws", ["Upgrade"]), b"GET /healthz HTTP/1.1\r\n\r\n",
                    b"HEAD /healthz HTTP/1.0\r\n\r\n"):
            status, _, body = await asyncio.to_thread(http, gateway.port, req)
            assert status == 500, (req, status, body)
            assert b"internal detail" not in body and b"RuntimeError" not in body
        logged = [r for r in caplog.records if r.name == "fastfeed.server"
                  and "unexpected RuntimeError" in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None  # once per kind
        # and the gateway answers the next request normally
        del gateway._route
        status, _, body = await asyncio.to_thread(
            http, gateway.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"ok\n")
    finally:
        await gateway.stop()
