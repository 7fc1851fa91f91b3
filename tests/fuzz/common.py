"""What the fuzz targets share: a real Gateway object without a socket, a fake
transport that records what the gateway sends, and the checks every reply must pass.

A fuzz finding is an exception escaping a handler (the documented answer to bad
input is an `error` reply or a close code, never an exception), two ingest
parsers that disagree, a reply that is not strict JSON (RFC 8259: no NaN or
Infinity, no lone surrogate, raw or escaped) or a crash of the process.
"""

from __future__ import annotations

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

    from fastfeed import _core
    from fastfeed.auth import EVERYTHING, Entitlements
    from fastfeed.config import Config
    from fastfeed.feed.ingest import IngestSession
    from fastfeed.framing import MessageListener
    from fastfeed.server import Gateway
    from fastfeed.session import Session

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
    "feature",
    "gateway",
    "main",
]

# what protocol.md lets a client receive (1011 is what picows sends for an
# exception that escaped a handler: never the documented answer)
CLIENT_CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009, 1012, 1013}
REPLY_TYPES = {"snapshot", "ack", "pong", "list", "status", "error"}
ERROR_CODES = {"bad_request", "unknown_op", "not_subscribed", "too_many_subscriptions",
               "too_many_watched", "rate_limited", "forbidden", "unavailable"}


class _Loop:
    """Stands in for the event loop: timers (the close grace) never fire."""

    def call_later(self, *_a: Any) -> None:
        return None

    def call_soon(self, *_a: Any) -> None:
        return None

    def create_task(self, coro: Any) -> None:
        coro.close()


class _Underlying:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    # what flow control may ask of an asyncio transport: nothing is ever queued here
    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def is_reading(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return False


class FakeTransport:
    """The parts of picows' WSTransport the gateway uses; records what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[WSMsgType, bytes]] = []
        self.pongs: list[bytes] = []
        self.close_code: int | None = None
        self.is_disconnected = False
        self.is_close_frame_sent = False
        self.close_handshake = None
        self.underlying_transport = _Underlying()

    def send(self, msg_type: WSMsgType, data: bytes) -> None:
        assert not self.is_disconnected, "send() after disconnect"
        assert not self.is_close_frame_sent, "a message sent after the close frame"
        assert isinstance(data, bytes | bytearray | memoryview), type(data)
        self.sent.append((msg_type, bytes(data)))

    def send_pong(self, data: bytes) -> None:
        assert not self.is_close_frame_sent, "a pong sent after the close frame"
        assert len(data) <= 125, "a pong payload over 125 bytes"
        self.pongs.append(bytes(data))

    def send_close(self, code: Any = WSCloseCode.OK, reason: bytes = b"") -> None:
        assert not self.is_close_frame_sent, "a second close frame"
        assert len(reason) <= 123, "a close reason over 123 bytes"
        reason.decode("utf-8")  # a close reason is UTF-8 (RFC 6455 5.5.1)
        self.close_code = int(code)
        self.is_close_frame_sent = True

    def disconnect(self, graceful: bool = True) -> None:
        self.is_disconnected = True


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
    gw.started = True
    gw.table.apply_objects([{"sym": s, "seq": 5 + i, "ts": 1, "bid": 1.5 * i, "last": i}
                            for i, s in enumerate(SYMBOLS)])
    return gw


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
