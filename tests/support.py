"""Real gateways for tests: `fastfeed serve` as a subprocess on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable


async def until(cond: Callable[[], bool], timeout: float = 20.0, step: float = 0.02,
                what: str = "condition") -> None:
    """Wait until `cond()` holds; fail saying what did not happen."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(step)


def merge(ref: dict, ticks: list[dict]) -> None:
    """The protocol's rule: a newer seq wins, fields a tick leaves out keep their value."""
    for t in ticks:
        held = ref.get(t["sym"])
        if held is None:
            ref[t["sym"]] = dict(t)
        elif t["seq"] > held["seq"]:
            held.update(t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Gateway:
    """A running `fastfeed serve` process."""

    def __init__(self, args: list[str], env: dict[str, str] | None, port: int | None) -> None:
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("FASTFEED_LOG_LEVEL", "warning")
        # tests stop gateways with SIGINT: drain at once unless a test says otherwise
        self.env.setdefault("FASTFEED_DRAIN_DELAY_S", "0")
        self.env.setdefault("FASTFEED_DRAIN_S", "0.2")
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ingest_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ingest"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "fastfeed", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env)

    async def wait_ready(self, timeout: float = 20.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                status, _ = await asyncio.to_thread(http_get, self.url + path, 0.5)
                if status == 200:
                    return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready after {timeout}s")

    def wait_ready_sync(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                if http_get(self.url + "/readyz", 0.5)[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready after {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the process dies with no chance to drain."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def restart(self) -> None:
        self.kill()
        self.start()
        await self.wait_ready()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def running_gateway(*args: str, env: dict[str, str] | None = None):
    """The same as start_gateway, for synchronous (module-scoped) fixtures."""
    gw = Gateway(list(args), env, None)
    gw.start()
    try:
        gw.wait_ready_sync()
        yield gw
    finally:
        gw.stop()


@contextlib.asynccontextmanager
async def start_gateway(*args: str, env: dict[str, str] | None = None,
                        port: int | None = None, ready: bool = True) -> AsyncIterator[Gateway]:
    gw = Gateway(list(args), env, port)
    gw.start()
    try:
        if ready:
            await gw.wait_ready()
        yield gw
    finally:
        gw.stop()
