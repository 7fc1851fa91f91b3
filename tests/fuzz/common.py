"""What the fuzz targets share: a real Gateway object without a socket, picows'
own WSTransport over a transport without a socket that parses what is written
to it (`FakeTransport`, `_Wire`), and the checks every reply must pass.

A fuzz finding is an exception escaping a handler (the documented answer to bad
input is an `error` reply or a close code, never an exception), two ingest
parsers that disagree, a reply that is not strict JSON (RFC 8259: no NaN or
Infinity, no lone surrogate, raw or escaped), a write that no real transport
takes quietly (after the close frame, to a closed transport) or a crash of
the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
import traceback
import zlib
from typing import Any

import atheris

with atheris.instrument_imports(include=["fastfeed"]):
    from picows import WSCloseCode, WSMsgType
    from picows.picows import WSTransport

    from fastfeed import _core, protocol
    from fastfeed.auth import EVERYTHING, Entitlements
    from fastfeed.config import Config
    from fastfeed.feed.ingest import IngestSession
    from fastfeed.gateway.framing import FrameGuard, MessageListener
    from fastfeed.gateway.session import Session
    from fastfeed.server import Gateway

__all__ = [
    "CLIENT_CLOSE_CODES",
    "EVERYTHING",
    "Entitlements",
    "FakeTransport",
    "IngestSession",
    "MessageListener",
    "Session",
    "WSCloseCode",
    "WSMsgType",
    "_core",
    "check_reply",
    "client_session",
    "feature",
    "gateway",
    "main",
]

# what protocol.md lets a client receive (1011 is what picows sends for an
# exception that escaped a handler: never the documented answer)
CLIENT_CLOSE_CODES = {int(WSCloseCode.OK), *protocol.CLOSE_CODES} - {
    protocol.CLOSE_INTERNAL_ERROR}
REPLY_TYPES = {"snapshot", "ack", "pong", "list", "status", "error"}
ERROR_CODES = set(protocol.ERROR_CODES)


class _Loop:
    """Stands in for the event loop: timers (the close grace) never fire."""

    def call_later(self, *_a: Any) -> None:
        return None

    def call_soon(self, *_a: Any) -> None:
        return None

    def create_task(self, coro: Any) -> None:
        coro.close()


_FASTFEED = os.path.dirname(os.path.abspath(sys.modules["fastfeed"].__file__ or ""))
_READS = {FrameGuard.buffer_updated.__code__}  # picows parses within these
_LOOP = asyncio.new_event_loop()  # picows' WSTransport makes one future on it, never awaited


class _NoSocket:
    """What `get_extra_info("socket")` gives: picows' fast path tries `send()` on
    its descriptor, fails (EBADF) and hands the bytes to `write()` instead."""

    def fileno(self) -> int:
        return -1

    def setsockopt(self, *_a: Any) -> None:
        return None

    def getsockopt(self, *_a: Any) -> int:
        return 0


class _PicowsLog:
    """picows' logger. picows drops a message sent after the close frame and logs
    it at debug level; the gateway checks `_core.can_send` first, so that is a finding."""

    def __init__(self, wire: _Wire) -> None:
        self.wire = wire

    def isEnabledFor(self, _level: int) -> bool:
        return False

    def debug(self, msg: str, *_a: Any) -> None:
        caller = sys._getframe(1)  # the Python code below picows' (compiled) send
        if caller.f_code.co_filename.startswith(_FASTFEED) and caller.f_code not in _READS:
            self.wire.problems.append(f"picows dropped a send by {caller.f_code.co_name}: {msg}")
        # else picows' own: its parser, after the gateway's close, refuses a frame
        # and tries to close too (what it drops never reaches the wire either)

    def log(self, _level: int, msg: str, *_a: Any) -> None:
        self.debug(msg)

    def warning(self, msg: str, *a: Any) -> None:
        self.wire.problems.append(f"picows warned: {msg % a}")

    def info(self, *_a: Any) -> None:
        return None

    def error(self, msg: str, *a: Any) -> None:
        if not msg.startswith("WS parser error"):  # a client's protocol violation: 1002
            self.wire.problems.append(f"picows logged an error: {msg % a}")

    def exception(self, msg: str, *a: Any) -> None:
        self.wire.problems.append(f"picows logged an exception: {msg % a}")


class _PicowsProtocol:
    """The part of picows' WSProtocol the transport calls back (flow control),
    which FrameGuard passes on."""

    def __init__(self) -> None:
        self.listener: Any = None

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.pause_writing()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.resume_writing()


class _Wire:
    """The asyncio transport under picows' WSTransport, without a socket: it
    parses every frame picows writes (a server's frames are unmasked) and
    notes what no real transport would take quietly.

    `reads=False`: a client that never reads. Everything written stays queued
    (`get_write_buffer_size`), and past the high-water mark the protocol is
    told to pause writing, as asyncio's transports do."""

    def __init__(self, reads: bool, http: bool = False) -> None:
        self.reads = reads
        self.http = http  # an HTTP response comes first (the upgrade's)
        self.status: int | None = None
        self.buf = bytearray()
        self.written = 0
        self.sent: list[tuple[WSMsgType, bytes]] = []
        self.pongs: list[bytes] = []
        self.close_code: int | None = None
        self.problems: list[str] = []
        self.closed = False
        self.reading = True
        self.high = 64 * 1024
        self.write_paused = False
        self.protocol: Any = _PicowsProtocol()

    # -- asyncio.Transport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 40000)
        return _NoSocket() if name == "socket" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high

    def get_write_buffer_size(self) -> int:
        return 0 if self.reads else self.written

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.high // 4, self.high)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading and not self.closed

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def write(self, data: Any) -> None:
        if self.closed:  # asyncio: "write() called after connection lost", per write
            self.problems.append("a write to a closed transport")
            return
        self.buf += data
        self.written += len(data)
        self._frames()
        if not self.reads and not self.write_paused and self.written > self.high:
            self.write_paused = True
            self.protocol.pause_writing()

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(bytes(x) for x in parts))

    # -- what reached the client
    def _frames(self) -> None:
        buf = self.buf
        if self.http:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(bytes(buf[:end]).split(b" ", 2)[1])
            self.http = False
            del buf[:end + 4]
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                return
            payload = bytes(buf[off:off + n])
            del buf[:off + n]
            self._frame(b0, b1, payload)

    def _frame(self, b0: int, b1: int, payload: bytes) -> None:
        bad = self.problems.append
        if b1 & 0x80:
            bad("a masked frame from the server")
        if b0 & 0x70:
            bad("a frame with reserved bits set")
        if not b0 & 0x80:
            bad("a fragmented message (the gateway sends whole ones)")
        if self.close_code is not None:
            bad("a frame after the close frame")
        op = b0 & 0x0F
        if op == WSMsgType.CLOSE:
            if len(payload) == 1 or len(payload) > 125:
                bad(f"a close frame of {len(payload)} bytes")
            try:
                payload[2:].decode("utf-8")  # a close reason is UTF-8 (RFC 6455 5.5.1)
            except UnicodeDecodeError:
                bad("a close reason that is not UTF-8")
            self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
        elif op == WSMsgType.PONG:
            if len(payload) > 125:
                bad("a pong payload over 125 bytes")
            self.pongs.append(payload)
        elif op in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.sent.append((WSMsgType(op), payload))
        else:
            bad(f"a frame with opcode {op} from the server")


class FakeTransport(WSTransport):
    """picows' own WSTransport (so `_core.can_send` and the core's casts take
    it, and sends, pongs and closes are picows' code) over `_Wire`, with what
    reached the client: `sent` (data messages), `pongs`, `close_code`."""

    def __init__(self, listener: Any = None, reads: bool = True) -> None:
        wire = _Wire(reads)
        wire.protocol.listener = listener
        super().__init__(False, wire, _PicowsLog(wire), _LOOP)
        self.wire = wire

    @property
    def sent(self) -> list[tuple[WSMsgType, bytes]]:
        return self.wire.sent

    @property
    def pongs(self) -> list[bytes]:
        return self.wire.pongs

    @property
    def close_code(self) -> int | None:
        return self.wire.close_code

    def check(self) -> None:
        """Nothing reached the client that a real transport would refuse or drop."""
        w = self.wire
        assert not w.problems, sorted(set(w.problems))
        assert not w.buf, f"{len(w.buf)} bytes of an unfinished frame written"


def _no_constant(name: str) -> Any:
    raise AssertionError(f"reply holds {name}: not JSON (RFC 8259)")


def _strings_ok(v: Any) -> None:
    if isinstance(v, str):
        v.encode("utf-8")  # raises on a lone surrogate, raw or from a \\uD800 escape
    elif isinstance(v, list):
        for x in v:
            _strings_ok(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            _strings_ok(k)
            _strings_ok(x)


def check_reply(msg_type: WSMsgType, data: bytes) -> dict:
    """A control message the gateway sent: strict JSON, a known type, a known error code."""
    assert msg_type == WSMsgType.TEXT, f"control message sent as {msg_type!r}"
    text = data.decode("utf-8")  # strict: refuses encoded surrogates too
    obj = json.loads(text, parse_constant=_no_constant)
    _strings_ok(obj)
    assert isinstance(obj, dict), "a reply is a JSON object"
    assert obj.get("type") in REPLY_TYPES, obj.get("type")
    if obj["type"] == "error":
        assert obj.get("code") in ERROR_CODES, obj.get("code")
        assert isinstance(obj.get("message"), str)
    return obj


def strict_json(data: bytes) -> bool:
    """Whether a message is JSON by RFC 8259 (what a strict decoder such as orjson takes)."""
    try:
        _strings_ok(json.loads(data.decode("utf-8"), parse_constant=_no_constant))
    except (ValueError, AssertionError, RecursionError):
        return False
    return True


SYMBOLS = ["BBCA", "BBRI", "BBNI", "TLKM", "ASII", "X.1", "A:B/c", "GOTO-W", "idx_30", "Z" * 32]


def gateway(**cfg: Any) -> Gateway:
    """A real Gateway (table, hub, metrics) with no socket and no running loop."""
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gw = Gateway(Config(**cfg), loop=_Loop())  # type: ignore[arg-type]
    gw.wire_feed()  # the sink and the /ingest source, as start() does
    gw.routes = gw._wire_routes()
    gw.started = True
    gw.table.apply_objects([{"sym": s, "seq": 5 + i, "ts": 1, "bid": 1.5 * i, "last": i}
                            for i, s in enumerate(SYMBOLS)])
    return gw


def client_session(gw: Gateway, ent: Entitlements, binary: bool,
                   limits: Any = None) -> Session:
    """A /ws session as the gateway's routes make one (optionally held to other limits)."""
    assert gw.routes is not None
    ctx = gw.routes.session_ctx
    if limits is not None:
        ctx = dataclasses.replace(ctx, limits=limits)
    return Session(ctx, ent, binary, "")


def _make_buckets(n: int) -> list:
    ns: dict[str, Any] = {}
    exec("\n".join(f"def b{i}():\n    return {i}" for i in range(n)), ns)
    return [atheris.instrument_func(ns[f"b{i}"]) for i in range(n)]


_BUCKETS = _make_buckets(4096)


def feature(*outcome: Any) -> None:
    """Coverage from outcomes: the compiled parsers and json's C scanner give
    atheris no edges, so an input that leads to a new kind of outcome (its
    repr hashed into one of 4096 instrumented functions) counts as new coverage."""
    _BUCKETS[zlib.crc32(repr(outcome).encode()) % len(_BUCKETS)]()


class _KeepGoing:
    """FUZZ_KEEP_GOING=DIR: record each distinct finding (exception type and the
    line it came from) once in DIR and go on fuzzing, instead of stopping at the
    first. For long runs on code with known findings; CI runs without it."""

    def __init__(self, test_one: Any, out: str) -> None:
        self.test_one, self.out, self.seen = test_one, out, set()
        os.makedirs(out, exist_ok=True)

    def __call__(self, data: bytes) -> None:
        try:
            self.test_one(data)
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)[-1]
            key = f"{type(e).__name__} at {os.path.basename(tb.filename)}:{tb.lineno}"
            if key not in self.seen:
                self.seen.add(key)
                name = hashlib.sha1(key.encode()).hexdigest()[:12]
                with open(os.path.join(self.out, f"finding-{name}"), "wb") as f:
                    f.write(data)
                with open(os.path.join(self.out, f"finding-{name}.txt"), "w") as f:
                    f.write(f"{key}\n{str(e)[:2000]}\ninput: {data[:300]!r}\n")
                print(f"FINDING {key}: {str(e)[:200]} input={data[:120]!r}", flush=True)


def main(test_one: Any) -> None:
    logging.disable(logging.CRITICAL)  # the gateway's warnings would drown the fuzzer's lines
    out = os.environ.get("FUZZ_KEEP_GOING")
    atheris.Setup(sys.argv, _KeepGoing(test_one, out) if out else test_one)
    atheris.Fuzz()
