"""An asyncio publisher for feed handlers: ticks in, batches to a gateway.

    from fastfeed.publisher import Publisher

    async with Publisher("ws://localhost:8080/ingest", token=None) as p:
        await p.publish({"sym": "BBCA", "seq": 1, "bid": 9100, "ask": 9125})
        await p.publish([{"sym": "TLKM", "seq": 7, "last": 3010}, ...])

`publish` validates each tick (``sym`` and ``seq`` required, known fields
only, finite numbers) and queues it; a background task sends the queue as one
message every `flush_ms` milliseconds, or as soon as `max_batch` ticks are
waiting. A tick the gateway still refuses comes back as an ``error`` message
naming it: the publisher counts it (`errors`, `last_error`) and hands it to
`on_error`.

When the connection is lost the publisher reconnects with the client's
jittered exponential backoff. Ticks are never lost across a reconnection: it
keeps the latest state of every symbol it has published (each tick merged
over the previous ones, as the gateway merges them) and sends that state
first on every new connection. The gateway drops what it already has (a tick
whose ``seq`` is not above the one it holds), so this is harmless to a
gateway that stayed up and restores one that restarted empty. While
disconnected, memory is bounded by the number of symbols, not ticks.

The wire is pluggable: `Publisher(transport=...)` takes any object with the
`Transport` methods; `WebSocketTransport` (the gateway's ``/ingest``) is the
default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect
from picows.common import WSHandshakeError

from fastfeed._core import check_tick
from fastfeed.client import Backoff, ConnectionClosed, FastfeedError
from fastfeed.protocol import CLIENT_FAULT_CLOSE_CODES, FIELDS

__all__ = ["Publisher", "Transport", "WebSocketTransport", "validate_tick"]

log = logging.getLogger("fastfeed.publisher")

Tick = dict[str, Any]

_KNOWN = frozenset(FIELDS)


def validate_tick(tick: Mapping[str, Any]) -> None:
    """Raise `ValueError` unless the gateway would accept `tick`.

    The gateway's own rules (from the core), plus one of the publisher's:
    field names outside the protocol are refused, because the gateway would
    silently ignore a misspelt one.
    """
    if not isinstance(tick, Mapping):
        raise ValueError(f"a tick is a mapping, not {type(tick).__name__}")
    why = check_tick(dict(tick))
    if why is not None:
        raise ValueError(f"{tick.get('sym')!r}: {why}")
    unknown = tick.keys() - _KNOWN
    if unknown:
        raise ValueError(f"{tick['sym']}: unknown field(s) {sorted(unknown)}")


class Transport(Protocol):
    """Where batches go. Implementations: `WebSocketTransport` (the gateway's
    ``/ingest``); a Redis one can follow the same shape.

    `connect` raises `OSError` (or a subclass) when it cannot connect, and
    `ConnectionClosed` when it must not retry (a refused token). `send`
    raises `ConnectionError` once the connection is gone. `closed` resolves
    with a close code when the connection ends. `on_error` is set by the
    publisher before `connect` and receives the gateway's ``error`` replies.
    """

    on_error: Callable[[FastfeedError], None] | None

    async def connect(self) -> None: ...

    async def send(self, ticks: list[Tick]) -> None: ...

    async def closed(self) -> int: ...

    async def close(self) -> None: ...


class _IngestListener(WSListener):  # type: ignore[misc]
    def __init__(self, transport: WebSocketTransport):
        super().__init__()
        self.owner = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t is WSMsgType.TEXT:
            self.owner._on_text(frame.get_payload_as_bytes())
        elif t is WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.owner.close_code = code
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(1000 if code == 1005 else code))
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        done = self.owner._done
        if done is not None and not done.done():
            done.set_result(self.owner.close_code)
        self.owner._writable.set()

    def pause_writing(self) -> None:
        self.owner._writable.clear()

    def resume_writing(self) -> None:
        self.owner._writable.set()


class WebSocketTransport:
    """Batches as JSON arrays of tick objects over the gateway's ``/ingest``
    WebSocket. `token` is the publisher token, sent as a Bearer header."""

    def __init__(self, url: str, token: str | None = None, connect_timeout: float = 10.0):
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout
        self.on_error: Callable[[FastfeedError], None] | None = None
        self.close_code = 1006
        self._ws: WSTransport | None = None
        self._done: asyncio.Future[int] | None = None
        self._writable = asyncio.Event()

    async def connect(self) -> None:
        self.close_code = 1006
        self._done = asyncio.get_running_loop().create_future()
        self._writable.set()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws, _ = await ws_connect(
                lambda: _IngestListener(self),
                self.url,
                extra_headers=headers,
                websocket_handshake_timeout=self.connect_timeout,
            )
        except WSHandshakeError as e:
            status = int(e.response.status) if e.response is not None else 0
            if status in (401, 403, 404):
                raise ConnectionClosed(
                    status, f"{self.url} refused the upgrade: HTTP {status}"
                ) from e
            raise ConnectionError(f"{self.url}: {e}") from e

    async def send(self, ticks: list[Tick]) -> None:
        ws = self._ws
        if ws is None or ws.is_disconnected:
            raise ConnectionError("not connected")
        if not self._writable.is_set():
            await self._writable.wait()  # the socket's buffer is full: wait for it
            if ws.is_disconnected:
                raise ConnectionError("connection lost")
        ws.send(WSMsgType.TEXT, json.dumps(ticks, separators=(",", ":")).encode())

    async def closed(self) -> int:
        assert self._done is not None
        return await asyncio.shield(self._done)

    async def close(self) -> None:
        ws = self._ws
        if ws is not None and not ws.is_disconnected:
            ws.send_close(WSCloseCode.OK)
            ws.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.wait_disconnected(), 2.0)

    def _on_text(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            log.warning("fastfeed publisher: unreadable message %.200r", data)
            return
        if isinstance(msg, dict) and msg.get("type") == "error" and self.on_error is not None:
            self.on_error(
                FastfeedError(
                    str(msg.get("code", "error")), str(msg.get("message", "")), msg.get("symbols")
                )
            )


class Publisher:
    """Publishes ticks to a fastfeed gateway in batches, across reconnections.

    Parameters:
      url: the gateway's ``ws://host:port/ingest`` (ignored with `transport`).
      token: the publisher token, if the gateway requires one.
      transport: a `Transport` to use instead of the WebSocket one.
      flush_ms: longest time a tick waits in the queue.
      max_batch: most ticks per message; a full batch is sent at once.
      max_queue: `publish` waits while this many ticks are queued and the
        connection is up (backpressure); while it is down the queue is
        folded into the per-symbol state, so nothing waits.
      backoff: the `fastfeed.client.Backoff` between reconnection attempts.
      validate: check every tick in `publish` (`validate_tick`).
      on_error: ``callback(FastfeedError)`` for each ``error`` the gateway
        sends back (a refused tick names its symbol in ``symbols``).

    Counters: `published` (ticks accepted by `publish`), `sent` (ticks
    written to the wire, resends included), `batches`, `errors`,
    `reconnects`; `last_error`; `connected`.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        transport: Transport | None = None,
        flush_ms: float = 5.0,
        max_batch: int = 1000,
        max_queue: int = 100_000,
        backoff: Backoff | None = None,
        validate: bool = True,
        on_error: Callable[[FastfeedError], Any] | None = None,
    ):
        if transport is None:
            if url is None:
                raise ValueError("Publisher needs a url or a transport")
            transport = WebSocketTransport(url, token)
        self.transport = transport
        self.flush_ms = flush_ms
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.backoff = backoff or Backoff()
        self.validate = validate
        self.on_error = on_error

        self.published = 0
        self.sent = 0
        self.batches = 0
        self.errors = 0
        self.reconnects = 0
        self.last_error: FastfeedError | None = None
        #: why the publisher stopped, once it has
        self.error: BaseException | None = None

        self._queue: list[Tick] = []
        self._state: dict[str, Tick] = {}  # every symbol's ticks merged: resent on reconnect
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()  # the flusher has work
        self._full = asyncio.Event()  # a whole batch is waiting
        self._space = asyncio.Event()  # the queue has room
        self._space.set()
        self._idle = asyncio.Event()  # the queue is empty and nothing is in flight
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def state(self) -> Mapping[str, Tick]:
        """The latest merged tick of every symbol published (read-only)."""
        return self._state

    async def start(self) -> None:
        """Start the background sender (``async with`` and `publish` do)."""
        if self._task is None:
            self.transport.on_error = self._on_error
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the transport is connected."""
        await self.start()
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def publish(self, ticks: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Queue one tick or a list of ticks. Raises `ValueError` for an
        invalid tick (and queues none of the list), `ConnectionClosed` once
        the publisher has stopped."""
        if self._stopped.is_set():
            raise self.error or ConnectionClosed(1000, "publisher closed")
        batch = [ticks] if isinstance(ticks, Mapping) else list(ticks)
        if self.validate:
            for t in batch:
                validate_tick(t)
        await self.start()
        while len(self._queue) >= self.max_queue and self._connected.is_set():
            self._space.clear()
            await self._space.wait()
            if self._stopped.is_set():
                raise self.error or ConnectionClosed(1000, "publisher closed")
        state = self._state
        queue = self._queue
        live = self._connected.is_set()
        for t in batch:
            tick = dict(t)
            held = state.get(tick["sym"])
            if held is None:
                state[tick["sym"]] = dict(tick)  # a copy: the queued tick must not change
            elif tick["seq"] > held["seq"]:
                held.update(tick)
            else:
                continue  # the gateway would drop it too
            if live:
                queue.append(tick)
        self.published += len(batch)
        self._idle.clear()
        self._wake.set()
        if len(queue) >= self.max_batch:
            self._full.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued tick is written to the connection."""
        if self._task is None:
            return
        async with asyncio.timeout(timeout):
            while not self._idle.is_set():
                if self._stopped.is_set():
                    raise self.error or ConnectionClosed(1000, "publisher closed")
                waiter = asyncio.ensure_future(self._idle.wait())
                stopper = asyncio.ensure_future(self._stopped.wait())
                try:
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then disconnect."""
        if self._task is not None and self._connected.is_set():
            with contextlib.suppress(Exception):
                await self.flush(timeout)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.transport.close()
        self._stop(ConnectionClosed(1000, "publisher closed"))

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- internals

    def _on_error(self, err: FastfeedError) -> None:
        self.errors += 1
        self.last_error = err
        if self.on_error is not None:
            try:
                self.on_error(err)
            except Exception:
                log.exception("fastfeed publisher: on_error callback failed")
        else:
            log.warning("fastfeed publisher: gateway refused: %s", err)

    def _stop(self, error: BaseException) -> None:
        if not self._stopped.is_set():
            self.error = error
            self._stopped.set()
            self._connected.clear()
            self._space.set()
            self._idle.set()

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                try:
                    await self.transport.connect()
                except ConnectionClosed as e:
                    log.error("fastfeed publisher: %s", e)
                    self._stop(e)
                    return
                except (TimeoutError, OSError) as e:
                    log.info("fastfeed publisher: cannot connect: %s", e)
                else:
                    attempt = 0
                    await self._serve()
                    if self._closing:
                        return
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1
                self.reconnects += 1
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("fastfeed publisher stopped")
            self._stop(e)

    async def _serve(self) -> None:
        """Send the held state, then batches, until the connection ends."""
        closed = asyncio.ensure_future(self.transport.closed())
        wake: asyncio.Future[Any] | None = None
        try:
            # what was queued is folded into the state: send the state instead
            self._queue = []
            self._connected.set()
            state = list(self._state.values())
            for i in range(0, len(state), self.max_batch):
                await self._send([dict(t) for t in state[i : i + self.max_batch]])
            while not closed.done():
                if not self._queue:
                    self._idle.set()
                    self._wake.clear()
                    wake = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({closed, wake}, return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    if closed.done():
                        break
                if len(self._queue) < self.max_batch and self.flush_ms > 0:
                    # gather a batch: until flush_ms passes or max_batch ticks wait
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.flush_ms / 1000)
                self._full.clear()
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                if len(self._queue) < self.max_queue:
                    self._space.set()
                if len(self._queue) >= self.max_batch:
                    self._full.set()
                if batch:
                    await self._send(batch)
        except ConnectionError:
            pass
        finally:
            if wake is not None:
                wake.cancel()
            self._connected.clear()
            self._queue = []
            self._space.set()
            if self._state:
                self._idle.clear()  # the state goes again on the next connection
        code = closed.result() if closed.done() else 1006
        closed.cancel()
        if not self._closing:
            if code in CLIENT_FAULT_CLOSE_CODES:
                log.warning(
                    "fastfeed publisher: the gateway closed for a publisher fault (%s)", code
                )
            else:
                log.info("fastfeed publisher: connection closed (%s), reconnecting", code)

    async def _send(self, batch: list[Tick]) -> None:
        await self.transport.send(batch)
        self.sent += len(batch)
        self.batches += 1
