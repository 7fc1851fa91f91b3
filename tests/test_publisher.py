"""fastfeed.publisher: what a feed handler can rely on.

Batching, validation and reconnection are specified against an in-memory
`Transport`; the WebSocket transport against a real gateway process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvloop
from support import start_gateway, until

from fastfeed.client import Backoff, Client, ConnectionClosed, FastfeedError
from fastfeed.publisher import Publisher, validate_tick


async def test_runs_under_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)




FAST = Backoff(base=0.02, factor=2.0, cap=0.2, jitter=0.5)


class MemoryTransport:
    """A `Transport` that records batches and can be made to fail."""

    def __init__(self) -> None:
        self.on_error: Callable[[FastfeedError], None] | None = None
        self.batches: list[list[dict[str, Any]]] = []
        self.connects = 0
        self.refuse = 0  # refuse this many connection attempts
        self._done: asyncio.Future[int] | None = None

    async def connect(self) -> None:
        self.connects += 1
        if self.refuse:
            self.refuse -= 1
            raise ConnectionRefusedError("refused")
        self._done = asyncio.get_running_loop().create_future()

    async def send(self, ticks: list[dict[str, Any]]) -> None:
        if self._done is None or self._done.done():
            raise ConnectionError("gone")
        self.batches.append(ticks)

    async def closed(self) -> int:
        assert self._done is not None
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(1000)

    def drop(self, code: int = 1006) -> None:
        assert self._done is not None
        self._done.set_result(code)

    @property
    def ticks(self) -> list[dict[str, Any]]:
        return [t for b in self.batches for t in b]


@pytest.fixture
async def mem() -> MemoryTransport:
    return MemoryTransport()


# ------------------------------------------------------------------ validation

GOOD = {"sym": "BBCA", "seq": 1, "ts": 1, "bid": 1.0, "ask": 2, "volume": 0.0}


def test_validate_accepts_a_partial_tick() -> None:
    validate_tick(GOOD)
    validate_tick({"sym": "IDX:BB.R/2-A_", "seq": 0})


@pytest.mark.parametrize(
    "bad",
    [
        {"seq": 1},
        {"sym": "BBCA"},
        {"sym": "", "seq": 1},
        {"sym": "X" * 33, "seq": 1},
        {"sym": "BB CA", "seq": 1},
        {"sym": "BBCA", "seq": 1.5},
        {"sym": "BBCA", "seq": True},
        {"sym": "BBCA", "seq": 1, "bid": float("nan")},
        {"sym": "BBCA", "seq": 1, "ask": float("inf")},
        {"sym": "BBCA", "seq": 1, "last": "9100"},
        {"sym": "BBCA", "seq": 1, "price": 1.0},
        ["BBCA", 1],
    ],
)
def test_validate_refuses_what_the_gateway_would(bad: Any) -> None:
    with pytest.raises(ValueError):
        validate_tick(bad)


async def test_a_list_with_one_bad_tick_queues_nothing(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem) as p:
        with pytest.raises(ValueError):
            await p.publish([GOOD, {"sym": "TLKM", "seq": 1, "bid": float("nan")}])
        assert p.published == 0 and not p.state


# ------------------------------------------------------------------ batching


async def test_ticks_go_out_in_batches_of_at_most_max_batch(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem, max_batch=1000, flush_ms=50) as p:
        await p.wait_connected(1)
        await p.publish([{"sym": f"S{i}", "seq": 1} for i in range(2500)])
        await p.flush(5)
        assert [len(b) for b in mem.batches] == [1000, 1000, 500]
        assert (p.published, p.sent, p.batches) == (2500, 2500, 3)


async def test_a_lone_tick_waits_at_most_flush_ms(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem, flush_ms=20) as p:
        await p.wait_connected(1)
        started = time.monotonic()
        await p.publish(GOOD)
        await until(lambda: bool(mem.batches))
        assert time.monotonic() - started < 1.0
        assert mem.ticks == [GOOD]


async def test_ticks_published_together_share_a_message(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem, flush_ms=50) as p:
        await p.wait_connected(1)
        for seq in range(1, 11):
            await p.publish({"sym": "BBCA", "seq": seq, "bid": float(seq)})
        await p.flush(5)
        assert len(mem.batches) == 1 and [t["seq"] for t in mem.ticks] == list(range(1, 11))


async def test_stale_ticks_are_dropped_before_the_wire(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem, flush_ms=0) as p:
        await p.wait_connected(1)
        await p.publish([{"sym": "BBCA", "seq": 5}, {"sym": "BBCA", "seq": 5, "bid": 9.0}])
        await p.publish({"sym": "BBCA", "seq": 4})
        await p.flush(5)
        assert mem.ticks == [{"sym": "BBCA", "seq": 5}]


# ------------------------------------------------------------------ reconnection


class CountingBackoff(Backoff):
    """A backoff that waits nothing and records the attempt of every wait."""

    def __init__(self) -> None:
        super().__init__(base=0.0, cap=0.0)
        self.asked: list[int] = []

    def delay(self, attempt: int, rng: Any = None) -> float:
        self.asked.append(attempt)
        return 0.0


async def test_the_backoff_keeps_growing_while_the_gateway_says_try_again_later(
        mem: MemoryTransport) -> None:
    backoff = CountingBackoff()
    async with Publisher(transport=mem, backoff=backoff, flush_ms=0) as p:
        for code in (1013, 1013, 1013, 1000):
            await p.wait_connected(5)
            n = mem.connects
            mem.drop(code)
            await until(lambda n=n: mem.connects > n)  # it connected again
        await p.wait_connected(5)
    # a 1013 right after the upgrade is no served connection; the 1000 was one
    assert backoff.asked == [0, 1, 2, 0]


async def test_reconnects_and_resends_the_merged_state(mem: MemoryTransport) -> None:
    async with Publisher(transport=mem, backoff=FAST, flush_ms=0) as p:
        await p.wait_connected(1)
        await p.publish({"sym": "BBCA", "seq": 1, "bid": 1.0, "ask": 2.0})
        await p.flush(5)
        mem.drop()
        mem.refuse = 2  # the gateway stays away for a while
        await until(lambda: not p.connected)
        for seq in range(2, 1000):  # ticks while down fold into one per symbol
            await p.publish({"sym": "BBCA", "seq": seq, "bid": float(seq)})
        await p.publish({"sym": "TLKM", "seq": 3, "last": 7.0})
        mem.batches.clear()
        await p.flush(5)
        assert p.connected and p.reconnects == 3 and mem.connects == 4
        assert mem.ticks == [
            {"sym": "BBCA", "seq": 999, "bid": 999.0, "ask": 2.0},
            {"sym": "TLKM", "seq": 3, "last": 7.0},
        ]


async def test_gateway_errors_reach_the_callback(mem: MemoryTransport) -> None:
    errors: list[FastfeedError] = []
    async with Publisher(transport=mem, on_error=errors.append) as p:
        await p.wait_connected(1)
        assert mem.on_error is not None
        mem.on_error(FastfeedError("bad_request", "seq is not an integer", ["BBCA"]))
        assert p.errors == 1 and p.last_error is errors[0] and errors[0].symbols == ["BBCA"]


async def test_publish_after_close_raises(mem: MemoryTransport) -> None:
    p = Publisher(transport=mem)
    await p.start()
    await p.close()
    with pytest.raises(ConnectionClosed):
        await p.publish(GOOD)


# ------------------------------------------------------------------ against the gateway


@pytest.fixture
async def gateway() -> AsyncIterator[Any]:
    async with start_gateway() as gw:
        yield gw


async def rows_of(gw: Any, syms: list[str], until: Callable[[dict], bool]) -> dict[str, Any]:
    """The gateway's rows, once `until(rows)` holds (ingest is asynchronous)."""
    deadline = time.monotonic() + 10
    while True:
        async with Client(gw.ws_url, reconnect=False) as c:
            await c.subscribe(syms)
            rows = {s: r._asdict() for s, r in c.rows.items()}
        if until(rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_published_ticks_reach_clients(gateway: Any) -> None:
    async with Publisher(gateway.ingest_url) as p:
        await p.publish({"sym": "BBCA", "seq": 1, "ts": 10, "bid": 9100.0, "ask": 9125.0})
        await p.publish({"sym": "BBCA", "seq": 2, "last": 9110.0, "volume": 500.0})
        await p.flush(10)
        rows = await rows_of(gateway, ["BBCA"], lambda r: r.get("BBCA", {}).get("seq") == 2)
        row = rows["BBCA"]
        assert row["seq"] == 2 and row["ts"] == 10
        assert (row["bid"], row["ask"], row["last"], row["volume"]) == (9100, 9125, 9110, 500)


async def test_a_refused_tick_is_reported_and_the_rest_applied(gateway: Any) -> None:
    errors: list[FastfeedError] = []
    async with Publisher(gateway.ingest_url, validate=False, on_error=errors.append) as p:
        await p.publish([{"sym": "BBCA", "seq": 1, "bid": 1.0}, {"sym": "TLKM", "seq": "x"}])
        await p.flush(10)
        await until(lambda: p.errors == 1)
        assert errors[0].code == "bad_request" and errors[0].symbols == ["TLKM"]
        rows = await rows_of(gateway, ["BBCA"], lambda r: "BBCA" in r)
        assert rows["BBCA"]["bid"] == 1.0


async def test_a_restarted_gateway_gets_the_state_back(gateway: Any) -> None:
    async with Publisher(gateway.ingest_url, backoff=FAST) as p:
        await p.publish([{"sym": s, "seq": 1, "bid": 1.0, "ask": 2.0} for s in ("BBCA", "TLKM")])
        await p.flush(10)
        kill = gateway.kill()
        if asyncio.iscoroutine(kill):
            await kill
        await until(lambda: not p.connected)
        await p.publish({"sym": "BBCA", "seq": 2, "bid": 3.0})
        restart = gateway.restart()
        if asyncio.iscoroutine(restart):
            await restart
        await until(lambda: p.connected, timeout=20)
        await p.flush(10)
        rows = await rows_of(
            gateway, ["BBCA", "TLKM"], lambda r: len(r) == 2 and r["BBCA"]["seq"] == 2
        )
        assert rows["BBCA"]["seq"] == 2 and rows["BBCA"]["bid"] == 3.0
        assert rows["BBCA"]["ask"] == 2.0 and rows["TLKM"]["seq"] == 1
        assert p.reconnects >= 1


async def test_a_wrong_publisher_token_stops_the_publisher() -> None:
    async with start_gateway(env={"FASTFEED_PUBLISHER_TOKEN": "s3cret"}) as gw:
        p = Publisher(gw.ingest_url, token="wrong", backoff=FAST)
        await p.start()
        await until(lambda: p.error is not None)
        assert isinstance(p.error, ConnectionClosed) and p.error.close_code == 401
        with pytest.raises(ConnectionClosed):
            await p.publish(GOOD)
        await p.close()


# ------------------------------------------------------------------ one engine, two transports


async def test_the_same_engine_publishes_onto_redis(tmp_path: Any) -> None:
    from redis_server import RedisServer

    from fastfeed._core import Table
    from fastfeed.bus import RedisBus
    from fastfeed.publisher import RedisTransport

    errors: list[FastfeedError] = []
    with RedisServer() as r:
        table = Table()
        async with RedisBus(r.url, table, channels=4, prefix="one") as sub:
            await sub.wait_ready(5)
            async with Publisher(r.url, channels=4, prefix="one", validate=False,
                                 on_error=errors.append, max_batch=100) as p:
                assert isinstance(p.transport, RedisTransport)
                await p.wait_connected(5)
                await p.publish([{"sym": f"R{i}", "seq": 1, "bid": float(i)} for i in range(250)]
                                + [{"sym": "bad sym", "seq": 1}])
                assert await p.sync(10)
                assert (p.published, p.sent, p.batches, p.errors) == (250, 250, 3, 1)
                assert errors[0].code == "bad_request" and errors[0].symbols == ["bad sym"]
            await until(lambda: len(table) == 250)


def test_a_url_names_its_transport() -> None:
    from fastfeed.publisher import RedisTransport, WebSocketTransport, transport_for

    assert isinstance(transport_for("ws://h:1/ingest"), WebSocketTransport)
    for url in ("redis://h:1/0", "redis+cluster://a:1,b:2", "redis+sentinel://s:1/m"):
        assert isinstance(transport_for(url), RedisTransport)
    with pytest.raises(ValueError, match="ws://"):
        transport_for("http://h:1/ingest")
    with pytest.raises(ValueError, match="token"):
        transport_for("redis://h:1", token="t")


async def test_sync_is_answered_by_the_gateway(gateway: Any) -> None:
    async with Publisher(gateway.ingest_url) as p:
        await p.publish({"sym": "SYNC", "seq": 1, "bid": 1.0})
        assert await p.sync(10)
        assert p.sent == 1


async def test_publish_command_into_one_gateway(gateway: Any, tmp_path: Any) -> None:
    import json
    import sys

    path = tmp_path / "ticks.ndjson"
    path.write_text("".join(json.dumps({"sym": f"W{i}", "seq": 1, "last": float(i)}) + "\n"
                            for i in range(30)) + '{"sym": "bad sym", "seq": 1}\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastfeed", "publish", "--url", gateway.ingest_url,
        "--file", str(path), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1, err  # one tick refused
    assert b"published 30 ticks" in err and b"refused 1" in err and b"bad sym" in err
    rows = await rows_of(gateway, ["W0", "W29"], lambda r: len(r) == 2)
    assert rows["W29"]["last"] == 29.0
