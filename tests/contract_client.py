"""The connection under the end-to-end tests' contract clients: `websockets`
and `json` only, nothing of fastfeed, so a client built on it is written from
docs/protocol.md alone.

A subclass says what a new connection asks for (`_opened`: reset what is
per connection, subscribe) and what each message does (`_on`). When a
connection ends for any reason it reconnects after 0.1 s. `pause()` stops
reading the socket (with a small `rcvbuf` the server sees it at once);
`bounce()` closes the connection from this side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

import websockets


class ContractConnection:
    def __init__(self, port: int, syms: list[str], rcvbuf: int = 0) -> None:
        self.port, self.syms, self.rcvbuf = port, syms, rcvbuf
        self.connections = 0
        self.feed: list[str] = []  # "down", "up"
        self.errors: list[dict] = []
        self.local_port = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self._ws: Any = None
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop = True
        self.reading.set()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def pause(self) -> None:
        self.reading.clear()

    def resume(self) -> None:
        self.reading.set()

    async def bounce(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def _opened(self, ws: Any) -> None:
        """A connection is up: reset what is per connection and subscribe."""
        raise NotImplementedError

    async def _on(self, ws: Any, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while not self._stop:
            with contextlib.suppress(OSError, websockets.ConnectionClosed,
                                     websockets.InvalidHandshake, TimeoutError):
                await self._connection()
            self._ws = None
            if not self._stop:
                await asyncio.sleep(0.1)  # then reconnect, and `_opened` subscribes again

    async def _connection(self) -> None:
        sock = socket.socket()
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        self.local_port = sock.getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws", sock=sock,
                                      max_size=None, max_queue=4, ping_interval=None,
                                      open_timeout=10) as ws:
            self.connections += 1
            await self._opened(ws)
            self._ws = ws
            while True:
                await self.reading.wait()
                await self._on(ws, json.loads(await ws.recv()))
