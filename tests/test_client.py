"""fastfeed.client: what a desk can rely on.

Three kinds of tests: pure unit tests (backoff, binary decoding), tests
against a small scripted WebSocket server (close codes, heartbeats: behaviour
a real gateway cannot be made to show on demand), and tests against a real
gateway process (`start_gateway`), fed through `fastfeed.publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import uvloop
from support import start_gateway, until
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed as WSClosed

from fastfeed.client import (
    FIELDS,
    Backoff,
    Client,
    ConnectionClosed,
    FastfeedError,
    Row,
    decode_binary_update,
)
from fastfeed.publisher import Publisher


async def test_runs_under_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


# ------------------------------------------------------------------ helpers




async def maybe_await(x: Any) -> None:
    if inspect.isawaitable(x):
        await x


def tick(sym: str, seq: int, **fields: float) -> dict[str, Any]:
    return {"sym": sym, "seq": seq, "ts": 1_700_000_000_000_000_000 + seq, **fields}


async def server_rows(ws_url: str, syms: list[str]) -> dict[str, Row]:
    """The gateway's current rows, as a fresh client's snapshot sees them."""
    async with Client(ws_url, reconnect=False) as probe:
        await probe.subscribe(syms)
        return dict(probe.rows)


FAST = Backoff(base=0.05, factor=2.0, cap=0.5, jitter=0.5)
SYMS = ["BBCA", "BBRI", "TLKM"]


# ------------------------------------------------------------------ backoff


def test_backoff_delay_stays_within_its_jitter_band() -> None:
    b = Backoff(base=0.1, factor=2.0, cap=5.0, jitter=0.4)
    rng = random.Random(7)
    for attempt in range(30):
        ceiling = min(5.0, 0.1 * 2.0**attempt)
        assert b.ceiling(attempt) == pytest.approx(ceiling)
        delays = [b.delay(attempt, rng) for _ in range(500)]
        assert all(ceiling * 0.6 <= d <= ceiling for d in delays)
        # jittered: not all clients wait the same
        assert max(delays) - min(delays) > ceiling * 0.3


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    b = Backoff(base=0.25, factor=2.0, cap=10.0, jitter=0.0)
    assert [b.delay(n) for n in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(10_000) == 10.0  # a long outage does not overflow


def test_backoff_full_jitter_spans_zero_to_ceiling() -> None:
    b = Backoff(base=1.0, factor=2.0, cap=1.0, jitter=1.0)
    rng = random.Random(1)
    delays = [b.delay(3, rng) for _ in range(2000)]
    assert 0.0 <= min(delays) < 0.05 and 0.95 < max(delays) <= 1.0


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    b = Backoff()
    assert [b.delay(n, random.Random(3)) for n in range(5)] == [
        b.delay(n, random.Random(3)) for n in range(5)
    ]


@pytest.mark.parametrize(
    "kw", [{"base": -1}, {"factor": 0.5}, {"jitter": 1.5}, {"jitter": -0.1}, {"cap": -1}]
)
def test_backoff_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kw)


# ------------------------------------------------------------------ binary frames


def core_dtype() -> np.dtype:
    from fastfeed._core import ROW_DTYPE

    return ROW_DTYPE


def binary_frame(dtype: np.dtype, rows: list[tuple], t: int, magic: bytes = b"FFB1") -> bytes:
    recs = np.zeros(len(rows), dtype)
    for i, r in enumerate(rows):
        for name, value in zip(FIELDS, r, strict=True):
            recs[i][name] = value.encode() if name == "sym" else value
    return struct.pack("<4sIq", magic, len(rows), t) + recs.tobytes()


ROWS = [
    ("BBCA", 7, 1_700_000_000_123_456_789, 9100.0, 9125.0, 9110.0, 500.0, 700.0, 100.0, 1e6),
    ("X" * 32, 2**62, 0, -1.5, 0.0, 1e-300, 0.0, 0.0, 0.0, 0.0),
    ("IDX:BB.R/2-A_", 1, 1, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_decode_binary_update_with_the_core_layout(n: int) -> None:
    frame = binary_frame(core_dtype(), ROWS[:n], t=123_456_789_000)
    t, rows = decode_binary_update(frame)
    assert t == 123_456_789_000
    assert rows == [Row(*r) for r in ROWS[:n]]
    assert all(type(r.sym) is str and type(r.seq) is int for r in rows)


def test_decode_binary_update_follows_field_names_not_positions() -> None:
    # a layout with the fields in another order (and padding) decodes the same
    shuffled = np.dtype(
        [("volume", "<f8"), ("seq", "<i8"), ("sym", "S32"), ("pad", "V8")]
        + [(f, "<f8") for f in FIELDS[3:9]]
        + [("ts", "<i8")]
    )
    frame = binary_frame(shuffled, ROWS, t=5)
    assert decode_binary_update(frame, shuffled) == (5, [Row(*r) for r in ROWS])


def test_decode_binary_update_accepts_a_memoryview() -> None:
    frame = binary_frame(core_dtype(), ROWS, t=9)
    assert decode_binary_update(memoryview(frame)) == (9, [Row(*r) for r in ROWS])


def test_decode_binary_update_rejects_a_foreign_frame() -> None:
    with pytest.raises(ValueError, match="magic"):
        decode_binary_update(binary_frame(core_dtype(), ROWS, t=1, magic=b"NOPE"))


def test_fastfeed_error_carries_code_message_and_symbols() -> None:
    e = FastfeedError("forbidden", "not entitled", ["BBCA"])
    assert (e.code, e.message, e.symbols) == ("forbidden", "not entitled", ["BBCA"])
    assert "forbidden" in str(e)


# ------------------------------------------------------------------ scripted server

Handler = Callable[[ServerConnection, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[str, list[list[dict]]]]:
    """A WebSocket server speaking just enough protocol for one test.

    Yields its URL and, per connection, the requests it received."""
    seen: list[list[dict]] = []

    async def run(ws: ServerConnection) -> None:
        seen.append([])
        with contextlib.suppress(WSClosed):
            await handler(ws, len(seen) - 1)

    async with serve(run, "127.0.0.1", 0, select_subprotocol=lambda c, offered: offered[0]) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", seen


async def answer(ws: ServerConnection, seen: list[dict], seq: int = 5) -> dict:
    """Answer the next request as a gateway holding BBCA at `seq` would."""
    req = json.loads(await ws.recv())
    seen.append(req)
    if req["op"] == "subscribe":
        since = (req.get("since") or {}).get("BBCA", -1)
        rows = [["BBCA", seq, 1, 1.0, 2.0, 1.5, 1.0, 1.0, 1.0, 10.0]] if seq > since else []
        await ws.send(
            json.dumps({"type": "snapshot", "id": req["id"], "rows": rows, "unknown": []})
        )
    else:
        await ws.send(json.dumps({"type": "ack", "id": req["id"], "op": req["op"], "symbols": []}))
    return req


@pytest.mark.parametrize("code", [1000, 1011, 1012, 1013, 4000, None])
async def test_reconnects_and_resumes_with_since_after_a_close(code: int | None) -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        await answer(ws, seen[n], seq=5 + n)
        if n == 0:
            await answer(ws, seen[n])  # the watch
            if code is None:
                ws.transport.abort()  # no close frame at all: 1006
            else:
                await ws.close(code)
        else:
            await answer(ws, seen[n])
            await ws.wait_closed()

    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST) as c:
        await c.subscribe(["BBCA"])
        await c.watch(["BBCA"])
        # connected: resumed, the watch included
        await until(lambda: c.connected and c.rows["BBCA"].seq == 6)
        assert c.reconnects == 1 and c.last_close_code == (code or 1006)
    first, second = seen[0][0], seen[1][0]
    assert first == {"op": "subscribe", "symbols": ["BBCA"], "id": first["id"]}
    assert second["since"] == {"BBCA": 5}  # only what was missed, please
    assert seen[1][1]["op"] == "watch" and seen[1][1]["symbols"] == ["BBCA"]


@pytest.mark.parametrize("code", [1008, 1009, 1002, 1007])
async def test_does_not_reconnect_after_a_close_for_its_own_fault(code: int) -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        await answer(ws, seen[n])
        await ws.close(code)

    async with scripted(gateway) as (url, seen):
        c = Client(url, backoff=FAST)
        await c.connect()
        updates = c.updates()
        await c.subscribe(["BBCA"])
        assert await anext(updates) == [c.rows["BBCA"]]
        with pytest.raises(ConnectionClosed) as info:
            await anext(updates)
        assert info.value.close_code == code
        assert c.closed and not c.connected
        await asyncio.sleep(0.3)
        assert len(seen) == 1
        with pytest.raises(ConnectionClosed):
            await c.ping()
        await c.close()


async def test_retries_client_faults_when_told_to() -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        await answer(ws, seen[n], seq=1 + n)
        if n == 0:
            await ws.close(1008)
        await ws.wait_closed()

    async with (
        scripted(gateway) as (url, seen),
        Client(url, backoff=FAST, retry_client_errors=True) as c,
    ):
        await c.subscribe(["BBCA"])
        await until(lambda: c.rows["BBCA"].seq == 2)
        assert c.reconnects == 1


class RecordingBackoff(Backoff):
    """A quick backoff that remembers the attempt number of every wait."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attempts: list[int] = []

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        self.attempts.append(attempt)
        return 0.01


@pytest.mark.parametrize("code, attempts", [(1013, [0, 1, 2]), (1012, [0, 0, 0])])
async def test_try_again_later_backs_off_further_each_time(code: int, attempts: list[int]) -> None:
    # Each connection is closed right after the upgrade. 1013 means "come back
    # later": the waits grow. After any other close of a connection that was
    # up, the backoff starts afresh.
    async def gateway(ws: ServerConnection, n: int) -> None:
        if n < 3:
            await ws.close(code)
        else:
            await ws.wait_closed()

    backoff = RecordingBackoff()
    async with scripted(gateway) as (url, seen), Client(url, backoff=backoff) as c:
        await until(lambda: len(seen) == 4 and c.connected)
        assert c.reconnects == 3 and not c.closed
    assert backoff.attempts[:3] == attempts


async def test_connect_waits_through_closes_right_after_the_upgrade() -> None:
    # connect() returns only with a connection that is up, however briefly the
    # ones before it lived
    async def gateway(ws: ServerConnection, n: int) -> None:
        if n < 5:
            await ws.close(1013, "try again later")
        else:
            await answer(ws, seen[n])
            await ws.wait_closed()

    async with scripted(gateway) as (url, seen), Client(url, backoff=FAST) as c:
        await c.subscribe(["BBCA"])
        assert c.connected and len(seen) == 6 and c.rows["BBCA"].seq == 5


async def test_a_refused_upgrade_fails_connect_at_once() -> None:
    async def reject(connection: Any, request: Any) -> Any:
        return connection.respond(401, "bad token\n")

    async with serve(lambda ws: None, "127.0.0.1", 0, process_request=reject) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            async with Client(f"ws://127.0.0.1:{port}/ws", token="nope"):
                pass
        assert info.value.close_code == 401
        assert time.monotonic() - started < 2


async def test_connect_gives_up_after_connect_timeout() -> None:
    with pytest.raises(TimeoutError):
        async with Client("ws://127.0.0.1:9/ws", backoff=FAST, connect_timeout=0.5):
            pass


async def test_a_silent_connection_is_replaced() -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        await answer(ws, seen[n])
        await ws.wait_closed()  # and never says anything again

    async with (
        scripted(gateway) as (url, seen),
        Client(url, backoff=FAST, stale_after=0.3) as c,
    ):
        await c.subscribe(["BBCA"])
        await until(lambda: c.reconnects >= 1, timeout=3)


async def test_heartbeats_keep_a_quiet_connection_alive() -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        while True:
            await ws.send(json.dumps({"type": "heartbeat", "t": time.time_ns()}))
            await asyncio.sleep(0.05)

    async with scripted(gateway) as (url, _), Client(url, stale_after=0.3) as c:
        await asyncio.sleep(1.0)
        assert c.reconnects == 0 and c.connected
        assert time.monotonic() - c.last_message_at < 0.3
        assert c.last_server_time is not None


async def test_status_messages_set_feed_up() -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        await ws.send(json.dumps({"type": "status", "feed": "down"}))
        await asyncio.sleep(0.2)
        await ws.send(json.dumps({"type": "status", "feed": "up"}))
        await ws.wait_closed()

    changes: list[bool] = []
    async with scripted(gateway) as (url, _), Client(url, on_status=changes.append) as c:
        await until(lambda: changes == [False, True])
        assert c.feed_up


async def test_a_partly_forbidden_subscribe_applies_the_rest_and_raises() -> None:
    async def gateway(ws: ServerConnection, n: int) -> None:
        req = json.loads(await ws.recv())
        err = {"type": "error", "id": req["id"], "code": "forbidden", "symbols": ["TLKM"]}
        await ws.send(json.dumps({**err, "message": "not entitled"}))
        row = ["BBCA", 1, 1, 1.0, 2.0, 1.5, 1.0, 1.0, 1.0, 10.0]
        snap = {"type": "snapshot", "id": req["id"], "rows": [row], "unknown": []}
        await ws.send(json.dumps(snap))
        await ws.wait_closed()

    async with scripted(gateway) as (url, _), Client(url) as c:
        with pytest.raises(FastfeedError) as info:
            await c.subscribe(["BBCA", "TLKM"])
        assert info.value.code == "forbidden" and info.value.symbols == ["TLKM"]
        assert c.subscribed == {"BBCA"} and set(c.rows) == {"BBCA"}


# ------------------------------------------------------------------ against the gateway


@pytest.fixture
async def gateway() -> AsyncIterator[Any]:
    async with start_gateway() as gw:
        yield gw


@pytest.fixture
async def publisher(gateway: Any) -> AsyncIterator[Publisher]:
    async with Publisher(gateway.ingest_url, backoff=FAST) as p:
        await p.wait_connected(10)
        yield p


async def publish(p: Publisher, ticks: list[dict[str, Any]]) -> None:
    await p.publish(ticks)
    await p.flush(10)


async def test_subscribe_returns_unknown_symbols_after_the_snapshot(
    gateway: Any, publisher: Publisher
) -> None:
    await publish(publisher, [tick(s, 1, bid=100.0 + i, ask=101.0 + i) for i, s in enumerate(SYMS)])
    async with Client(gateway.ws_url) as c:
        assert await c.subscribe(["BBCA", "TLKM", "NOPE"]) == ["NOPE"]
        assert set(c.rows) == {"BBCA", "TLKM"} and c.subscribed == {"BBCA", "TLKM"}
        row = c.rows["TLKM"]
        assert row == Row("TLKM", 1, tick("TLKM", 1)["ts"], 102.0, 103.0, *row[5:])
        assert row._fields == FIELDS


async def test_updates_are_applied_to_rows_and_yielded(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick(s, 1, bid=1.0, ask=2.0, volume=0.0) for s in SYMS])
    seen: list[list[Row]] = []
    async with Client(gateway.ws_url, on_update=seen.append) as c:
        await c.subscribe(SYMS)
        updates = c.updates()
        for seq in range(2, 40):
            # partial ticks: fields left out keep their value
            await publisher.publish(tick(SYMS[seq % 3], seq, bid=float(seq), volume=seq * 10.0))
        await publisher.flush(10)
        got: dict[str, Row] = {}
        async for rows in updates:
            for r in rows:
                assert c.rows[r.sym].seq >= r.seq  # yielded after being applied
                got[r.sym] = r
            if "BBCA" in got and got["BBCA"].seq == 39:
                break
        await until(lambda: [c.rows[s].seq for s in SYMS] == [39, 37, 38])
        assert c.rows["BBCA"].bid == 39.0 and c.rows["BBCA"].ask == 2.0
        assert c.rows == await server_rows(gateway.ws_url, SYMS)
        assert c.frames >= 1 and c.last_latency is not None and c.last_latency < 5
        assert seen and all(isinstance(r, Row) for rows in seen for r in rows)


async def test_binary_subprotocol_gives_the_same_rows(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick(s, 1, bid=1.0) for s in SYMS])
    async with (
        Client(gateway.ws_url, binary=True) as cb,
        Client(gateway.ws_url) as cj,
    ):
        await cb.subscribe(SYMS)
        await cj.subscribe(SYMS)
        await publish(publisher, [tick(s, 2, ask=3.25, last_size=7.0) for s in SYMS])
        await until(lambda: all(cb.rows[s].seq == 2 and cj.rows[s].seq == 2 for s in SYMS))
        assert cb.rows == cj.rows
        assert cb.frames >= 1


async def test_watched_symbols_do_not_wait_for_the_frame(
    gateway: Any, publisher: Publisher
) -> None:
    await publish(publisher, [tick(s, 1, bid=1.0) for s in SYMS])
    async with Client(gateway.ws_url, frame_ms=60_000) as c:
        await c.subscribe(SYMS)
        await c.watch(["BBCA"])
        assert c.watched == {"BBCA"}
        started = time.monotonic()
        await publish(publisher, [tick("BBCA", 2, bid=2.0)])
        await until(lambda: c.rows["BBCA"].seq == 2, timeout=5)
        assert time.monotonic() - started < 5  # not the 60 s frame


async def test_watch_needs_a_subscription(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick("BBCA", 1)])
    async with Client(gateway.ws_url) as c:
        with pytest.raises(FastfeedError) as info:
            await c.watch(["BBCA"])
        assert info.value.code == "not_subscribed" and info.value.symbols == ["BBCA"]


async def test_error_replies_raise_and_change_nothing(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick("BBCA", 1)])
    async with Client(gateway.ws_url) as c:
        await c.subscribe(["BBCA"])
        with pytest.raises(FastfeedError) as info:
            await c.subscribe(["TLKM", "not a symbol!"])
        assert info.value.code == "bad_request"
        assert c.subscribed == {"BBCA"}
        assert c.connected  # an error is not a disconnection


async def test_ping_and_list(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick(s, 1) for s in SYMS])
    async with Client(gateway.ws_url) as c:
        ts = await c.ping()
        assert abs(ts - time.time_ns()) < 5e9
        assert sorted(await c.list("BB*")) == ["BBCA", "BBRI"]
        assert set(SYMS) <= set(await c.list())


async def test_resume_sends_only_what_was_missed(gateway: Any, publisher: Publisher) -> None:
    await publish(publisher, [tick(s, 1, bid=1.0) for s in SYMS])
    changed: list[str] = []
    async with Client(gateway.ws_url, backoff=FAST) as c:
        await c.subscribe(SYMS)
        c.on_update = lambda rows: changed.extend(r.sym for r in rows)
        c.disconnect()
        await publish(publisher, [tick("TLKM", 2, bid=2.0)])
        await until(lambda: c.reconnects == 1 and c.connected and c.rows["TLKM"].seq == 2)
        await asyncio.sleep(0.2)
        assert changed == ["TLKM"]  # BBCA and BBRI were not sent again


async def test_survives_a_gateway_restart_and_converges(gateway: Any) -> None:
    async with (
        Publisher(gateway.ingest_url, backoff=FAST) as p,
        Client(gateway.ws_url, backoff=FAST) as c,
    ):
        await publish(p, [tick(s, 1, bid=1.0, ask=2.0) for s in SYMS])
        await c.subscribe(SYMS)
        await c.watch(["BBCA"])
        await maybe_await(gateway.kill())
        await until(lambda: not c.connected)
        for seq in range(2, 20):  # the feed goes on while the gateway is down
            await p.publish(tick(SYMS[seq % 3], seq, bid=float(seq)))
        await maybe_await(gateway.restart())
        await p.flush(20)
        await until(lambda: c.connected and c.rows["BBCA"].seq == 18, timeout=20)
        await until(lambda: c.rows["BBRI"].seq == 19 and c.rows["TLKM"].seq == 17)
        assert c.rows == await server_rows(gateway.ws_url, SYMS)
        assert c.reconnects >= 1 and c.watched == {"BBCA"} and not c.lost


async def test_fails_over_to_the_next_url() -> None:
    async with start_gateway() as a, start_gateway() as b:
        pubs = [Publisher(gw.ingest_url, backoff=FAST) for gw in (a, b)]
        for p in pubs:
            await publish(p, [tick(s, 1, bid=1.0) for s in SYMS])
        async with Client([a.ws_url, b.ws_url], backoff=FAST) as c:
            await c.subscribe(SYMS)
            assert c.url == a.ws_url
            await maybe_await(a.kill())
            await publish(pubs[1], [tick("BBCA", 2, bid=2.0)])
            await until(lambda: c.url == b.ws_url and c.rows["BBCA"].seq == 2)
            assert c.rows == await server_rows(b.ws_url, SYMS)
        for p in pubs:
            await p.close(timeout=0.5)


async def test_a_dead_first_url_is_skipped() -> None:
    async with (
        start_gateway() as b,
        Client(["ws://127.0.0.1:9/ws", b.ws_url], backoff=FAST) as c,
    ):
        assert c.url == b.ws_url and c.connected


async def test_an_oversized_request_is_final(gateway: Any) -> None:
    c = Client(gateway.ws_url, backoff=FAST)
    await c.connect()
    with pytest.raises(ConnectionClosed) as info:
        await c.subscribe([f"SYM{i:05d}.JK" for i in range(8000)])  # > 64 KiB
    assert info.value.close_code == 1009
    assert c.closed and c.reconnects == 0
    await c.close()


async def test_close_ends_updates_and_stops_reconnecting(gateway: Any) -> None:
    c = Client(gateway.ws_url, backoff=FAST)
    await c.connect()
    updates = c.updates()
    await c.close()
    with pytest.raises(StopAsyncIteration):
        await anext(updates)
    assert c.closed and not c.connected
    await asyncio.sleep(0.3)
    assert c.reconnects == 0


async def test_a_draining_gateway_hands_its_clients_to_a_replica() -> None:
    drain_fast = {"FASTFEED_DRAIN_DELAY_S": "0", "FASTFEED_DRAIN_S": "0.2"}
    async with start_gateway(env=drain_fast) as a, start_gateway() as b:
        pubs = [Publisher(gw.ingest_url, backoff=FAST) for gw in (a, b)]
        for p in pubs:
            await publish(p, [tick(s, 1, bid=1.0) for s in SYMS])
        async with Client([a.ws_url, b.ws_url], backoff=FAST) as c:
            await c.subscribe(SYMS)
            a.terminate()  # SIGTERM: a deploy; clients are closed with 1012
            await until(lambda: c.url == b.ws_url and c.connected)
            assert c.reconnects == 1 and c.last_close_code == 1012 and not c.closed
            await publish(pubs[1], [tick("TLKM", 2, bid=2.0)])
            await until(lambda: c.rows["TLKM"].seq == 2)
        for p in pubs:
            await p.close(timeout=0.5)
