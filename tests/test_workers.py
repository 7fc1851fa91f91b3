"""The supervisor: configuration checks, pinning, restarts, signal forwarding."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from fixtures import wait_http_ok
from support import Gateway, http_get, stop_process, until

from fastfeed.client import Client
from fastfeed.config import Config
from fastfeed.workers import check, describe_status, worker_count

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(x) for x in fh.read().split()]


def cpus_allowed(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)




class Pod:
    def __init__(self, tmp_path, *args: str):
        gw = Gateway(["--drain-delay-s", "0.2", "--drain-s", "0.5", *args],
                     {"FASTFEED_LOG_LEVEL": "info"}, None)
        self.port = gw.port
        self.log = gw.log = tmp_path / f"serve-{self.port}.log"
        gw.start()
        assert gw.proc is not None
        self.proc = gw.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 20.0) -> None:
        await asyncio.to_thread(wait_http_ok, self.url + "/readyz", timeout, self.proc,
                                log=self.log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc, signal.SIGKILL)



def test_worker_count_and_config_errors():
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    assert worker_count("3") == 3
    assert check(Config(workers="1")) == 1
    assert check(Config(workers="2", redis="redis://x:6379/0")) == 2
    with pytest.raises(SystemExit, match="needs --redis"):
        check(Config(workers="2"))


def test_more_workers_without_redis_is_refused_by_the_cli():
    r = subprocess.run([sys.executable, "-m", "fastfeed", "serve", "--workers", "2",
                        "--port", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "needs --redis" in r.stderr


def test_describe_status():
    assert describe_status(0) == "exit code 0"
    assert describe_status(3 << 8) == "exit code 3"
    assert describe_status(signal.SIGKILL) == "killed by SIGKILL"


async def test_supervisor_pins_restarts_and_drains(redis, tmp_path):
    pod = Pod(tmp_path, "--workers", "2", "--redis", redis.url, "--redis-prefix", "wk")
    try:
        await pod.ready()
        sup = pod.proc.pid
        await until(lambda: len(children(sup)) == 2, what="two workers")
        first = children(sup)
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) > 1:
            pinned = [cpus_allowed(p) for p in first]
            assert all(len(p) == 1 for p in pinned), pinned
            assert pinned[0] != pinned[1]
        victim = first[1]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: len(children(sup)) == 2 and victim not in children(sup),
                    what="restart")
        await until(lambda: "killed by SIGKILL" in pod.text(), what="restart logged")
        line = next(ln for ln in pod.text().splitlines() if "killed by SIGKILL" in ln)
        assert f"pid {victim}" in line and "worker 1" in line and "restarting in" in line
        await pod.ready()
        # the restart is counted in the pod's metrics
        await until(lambda: b"fastfeed_worker_restarts_total 1.0"
                    in http_get(pod.url + "/metrics")[1], what="restart metric")
        workers = children(sup)
        pod.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(pod.proc.wait, 30)
        assert code == 0, pod.text()
        for w in workers:
            assert not os.path.exists(f"/proc/{w}"), f"worker {w} outlived the supervisor"
        assert "drained, exiting" in pod.text()
    finally:
        pod.close()


async def test_simulated_feed_runs_once_per_pod(redis, tmp_path):
    pod = Pod(tmp_path, "--workers", "2", "--redis", redis.url, "--redis-prefix", "simfeed",
              "--simulate", "20", "--rate", "500")
    try:
        await pod.ready()
        sup = pod.proc.pid
        await until(lambda: len(children(sup)) == 3, what="two workers and the feed")
        async with Client(f"ws://127.0.0.1:{pod.port}/ws", stale_after=None) as c:
            syms: list[str] = []
            end = time.monotonic() + 15
            while len(syms) < 20 and time.monotonic() < end:
                syms = await c.list()
                await asyncio.sleep(0.1)
            assert len(syms) == 20
            await c.subscribe(["BBCA"])
            s0 = c.rows["BBCA"].seq
            await until(lambda: c.rows["BBCA"].seq > s0, what="BBCA ticks")
    finally:
        pod.proc.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.to_thread(pod.proc.wait, 30) == 0, pod.text()
        finally:
            pod.close()
