"""/metrics after real traffic: every series of docs/operations.md ("Metrics")
is there, and its value is the one the traffic implies.

Counts made in the core are flushed about once a second, so each check waits
for the value it expects (`until`), then compares exactly where the traffic
fixes the number.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer
from support import http_get, start_gateway, until
from websockets.exceptions import InvalidStatus
from wsraw import RawWS

from fastfeed import _core, metrics

pytestmark = pytest.mark.timeout(180)

SYMS = [f"M{k:02d}" for k in range(30)]
FLOOD = [f"FL{k:03d}" for k in range(200)]

# name -> type, as exposed (counters with _total)
FAMILIES = {
    "fastfeed_connections": "gauge",
    "fastfeed_subscriptions": "gauge",
    "fastfeed_instruments": "gauge",
    "fastfeed_ticks_total": "counter",
    "fastfeed_frames_total": "counter",
    "fastfeed_frames_built_total": "counter",
    "fastfeed_bytes_sent_total": "counter",
    "fastfeed_conflated_frames_total": "counter",
    "fastfeed_watched_pushes_total": "counter",
    "fastfeed_heartbeats_total": "counter",
    "fastfeed_frame_overruns_total": "counter",
    "fastfeed_stalled_clients": "gauge",
    "fastfeed_stall_closes_total": "counter",
    "fastfeed_errors_total": "counter",
    "fastfeed_closes_total": "counter",
    "fastfeed_rejected_upgrades_total": "counter",
    "fastfeed_tick_to_send_seconds": "histogram",
    "fastfeed_frame_build_seconds": "histogram",
    "fastfeed_feed_up": "gauge",
    "fastfeed_redis_breaker_state": "gauge",
    "fastfeed_draining": "gauge",
    "fastfeed_ready": "gauge",
    "fastfeed_worker_restarts_total": "counter",
}


class Scrape:
    """One /metrics answer, parsed."""

    def __init__(self, url: str) -> None:
        status, body = http_get(url + "/metrics")
        assert status == 200
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value
                self.types[s.name] = fam.type

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(k)[label] for n, k in self.samples if n == name and label in dict(k)}

    def histogram(self, name: str) -> tuple[list[tuple[float, float]], float, float]:
        buckets = sorted((float(dict(k)["le"]), v) for (n, k), v in self.samples.items()
                         if n == name + "_bucket")
        return buckets, self(name + "_count"), self(name + "_sum")


def scrape_until(url: str):
    """`until` over a fresh scrape each time (counts are flushed once a second)."""
    async def wait(cond, what: str, timeout: float = 20.0) -> Scrape:
        box: list[Scrape] = []

        def ok() -> bool:
            box[:] = [Scrape(url)]
            return cond(box[0])

        await until(ok, timeout, step=0.25, what=what)
        return box[0]
    return wait


async def recv_type(ws, type_: str) -> dict[str, Any]:
    while (msg := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != type_:
        pass
    return msg


def test_the_exported_families_are_the_ones_the_dashboard_reads():
    assert set(metrics.TICK_SOURCES) == set(_core.SOURCES)
    assert set(metrics.TICK_OUTCOMES) == set(_core.OUTCOMES)


async def test_metrics_after_traffic_have_every_family_with_the_values_it_implies():
    async with start_gateway("--high-water-bytes", "16384", "--stall-s", "2",
                             "--heartbeat-s", "0.5", "--drain-delay-s", "3") as g:
        wait = scrape_until(g.url)
        first = Scrape(g.url)
        # every family is there before any traffic, known label values at 0
        for name, kind in FAMILIES.items():
            probe = name + "_count" if kind == "histogram" else name
            assert probe in first.types, f"{name} missing from /metrics"
        assert first("fastfeed_ticks_total", source="ingest", outcome="rejected") == 0
        assert first.labels("fastfeed_errors_total", "code") >= set(metrics.ERROR_CODES)
        assert first.labels("fastfeed_closes_total", "code") >= {"1001", "1008", "1012", "1013"}

        applied = stale = rejected = 0
        async with websockets.connect(g.ingest_url, max_size=None) as pub:
            async def publish(ticks: list[dict[str, Any]], errors: int = 0) -> None:
                await pub.send(json.dumps(ticks))
                for _ in range(errors):
                    assert json.loads(await asyncio.wait_for(pub.recv(), 10))["type"] == "error"

            await publish([{"sym": s, "seq": 1, "bid": 1.0} for s in SYMS])
            applied += len(SYMS)
            a = await websockets.connect(g.ws_url)
            b = await websockets.connect(g.ws_url)
            await a.send(json.dumps({"op": "subscribe", "symbols": SYMS[:10]}))
            await recv_type(a, "snapshot")
            await a.send(json.dumps({"op": "watch", "symbols": SYMS[:1]}))
            await recv_type(a, "ack")
            await b.send(json.dumps({"op": "subscribe", "symbols": SYMS[10:]}))
            await recv_type(b, "snapshot")

            await publish([{"sym": s, "seq": 2, "bid": 2.0} for s in SYMS])
            applied += len(SYMS)
            await publish([{"sym": s, "seq": 2, "bid": 3.0} for s in SYMS[:5]]
                          + [{"sym": s, "seq": 1} for s in SYMS[:3]])
            stale += 8
            await publish([{"sym": "M00", "seq": 9, "bid": "NaN"}, {"sym": "M 1", "seq": 9},
                           {"sym": "M02"}, {"sym": "M03", "seq": "x"}], errors=4)
            rejected += 4
            update_bytes = 0
            for ws, n in ((a, 10), (b, 20)):
                seen: set[str] = set()
                while len(seen) < n:
                    raw = await asyncio.wait_for(ws.recv(), 10)
                    msg = json.loads(raw)
                    if msg["type"] == "update":
                        update_bytes += len(raw)
                        seen.update(r[0] for r in msg["rows"] if r[1] == 2)

            # requests the gateway refuses, by code
            await b.send("not json")
            await b.send(json.dumps({"op": "fly"}))
            await b.send(json.dumps({"op": "unsubscribe", "symbols": ["M00"]}))
            for code in ("bad_request", "unknown_op", "not_subscribed"):
                assert (await recv_type(b, "error"))["code"] == code
            with pytest.raises(InvalidStatus):
                await websockets.connect(g.ws_url, subprotocols=["mqtt"])

            # a client that stops reading: conflated, counted as stalled, then closed 1008
            await publish([{"sym": s, "seq": 1} for s in FLOOD])
            applied += len(FLOOD)
            slow = await RawWS.connect(g.port, limit=2**16, rcvbuf=4096)
            slow.send_text(json.dumps({"op": "subscribe", "symbols": FLOOD}))
            seq = 1
            deadline = time.monotonic() + 90
            while Scrape(g.url)("fastfeed_stall_closes_total") < 1:
                assert time.monotonic() < deadline, "the stalled client was never closed"
                for _ in range(25):
                    seq += 1
                    await publish([{"sym": s, "seq": seq, "bid": seq + 0.5, "volume": 1e6}
                                   for s in FLOOD])
                    applied += len(FLOOD)
                    await asyncio.sleep(0.004)
            slow.close()

            m = await wait(lambda m: m("fastfeed_connections") == 2
                           and m("fastfeed_ticks_total", source="ingest", outcome="applied")
                           == applied, "connections and ticks settled")
        # clients and subscriptions
        assert m("fastfeed_subscriptions") == 30
        assert m("fastfeed_instruments") == len(SYMS) + len(FLOOD)
        # ticks by source and outcome
        assert m("fastfeed_ticks_total", source="ingest", outcome="stale") == stale
        assert m("fastfeed_ticks_total", source="ingest", outcome="rejected") == rejected
        assert m("fastfeed_ticks_total", source="bus", outcome="applied") == 0
        # output
        assert m("fastfeed_frames_total") >= 2
        assert 0 < m("fastfeed_frames_built_total") <= m("fastfeed_frames_total")
        assert m("fastfeed_bytes_sent_total") >= update_bytes
        assert m("fastfeed_conflated_frames_total") > 0
        assert m("fastfeed_watched_pushes_total") >= 1
        assert m("fastfeed_heartbeats_total") >= 1
        assert m("fastfeed_frame_overruns_total") >= 0
        # stalls
        assert m("fastfeed_stall_closes_total") == 1
        assert m("fastfeed_closes_total", code="1008") == 1
        m = await wait(lambda m: m("fastfeed_stalled_clients") == 0, "the stall is over")
        # errors: 4 refused ticks at /ingest and 1 bad request are bad_request
        assert m("fastfeed_errors_total", code="bad_request") == 1 + rejected
        assert m("fastfeed_errors_total", code="unknown_op") == 1
        assert m("fastfeed_errors_total", code="not_subscribed") == 1
        assert m("fastfeed_errors_total", code="forbidden") == 0
        assert m("fastfeed_rejected_upgrades_total", status="400") == 1
        # latency histograms: cumulative buckets ending in +Inf == count
        for name in ("fastfeed_tick_to_send_seconds", "fastfeed_frame_build_seconds"):
            buckets, count, total = m.histogram(name)
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and buckets[-1] == (math.inf, count), name
            assert count >= 1 and total > 0, name
        _, frames_sampled, latency_sum = m.histogram("fastfeed_tick_to_send_seconds")
        assert latency_sum / frames_sampled < 60  # seconds: a sane mean, not a clock mix-up
        # state gauges
        assert (m("fastfeed_feed_up"), m("fastfeed_redis_breaker_state")) == (1, 0)
        assert (m("fastfeed_ready"), m("fastfeed_draining")) == (1, 0)
        assert m("fastfeed_worker_restarts_total") == 0

        # SIGTERM: draining and unready during the drain delay
        g.terminate()
        m = await wait(lambda m: m("fastfeed_draining") == 1 and m("fastfeed_ready") == 0,
                       "draining shows")
        for ws in (a, b):
            with pytest.raises(websockets.ConnectionClosed) as e:
                await recv_type(ws, "never")
            assert e.value.rcvd is not None and e.value.rcvd.code == 1012
        assert await g.wait_exit(30) == 0


async def test_redis_mode_counts_ingest_ticks_redis_drops_and_shows_the_breaker():
    redis = RedisServer()
    redis.start()
    try:
        async with start_gateway("--redis", redis.url, "--redis-channels", "4",
                                 "--feed-grace-s", "0.5") as g:
            wait = scrape_until(g.url)
            async with websockets.connect(g.ingest_url) as pub:
                await pub.send(json.dumps([{"sym": s, "seq": 5, "bid": 1.0} for s in SYMS]))
                await pub.send(json.dumps([{"sym": s, "seq": 4} for s in SYMS[:7]]))
                await pub.send(json.dumps([{"sym": "M00", "seq": 6, "ask": "inf"},
                                           {"sym": "bad sym", "seq": 1}]))
                for _ in range(2):  # the refused ticks are answered by name
                    assert json.loads(await asyncio.wait_for(pub.recv(), 10))["type"] == "error"
                m = await wait(
                    lambda m: m("fastfeed_ticks_total", source="bus", outcome="applied") == 30
                    and m("fastfeed_ticks_total", source="ingest", outcome="stale") == 7,
                    "ticks through Redis counted")
            # in Redis mode /ingest ticks reach the table through the bus; those
            # refused or dropped on the way are counted as ingest ticks
            assert m("fastfeed_ticks_total", source="ingest", outcome="rejected") == 2
            assert m("fastfeed_ticks_total", source="ingest", outcome="applied") == 0
            assert (m("fastfeed_feed_up"), m("fastfeed_redis_breaker_state")) == (1, 0)
            redis.stop()
            m = await wait(lambda m: m("fastfeed_redis_breaker_state") in (1, 2)
                           and m("fastfeed_feed_up") == 0 and m("fastfeed_ready") == 0,
                           "the breaker open and the feed down")
    finally:
        redis.close()
