"""Fuzz the bytes a client sends after its upgrade, through picows' own parser.

The other targets hand the listeners frames; this one drives the whole read
path of one connection: a real picows `WSProtocol` (server side) on a
transport without a socket, the gateway's listener factory answering a
valid upgrade request, `framing.FrameGuard` in front of picows' parser from
then on, and the session behind it. Limits are small so the fuzzer reaches
them: 1 KiB client messages (held by FrameGuard), 4 KiB on /ingest (held by
picows' own `max_frame_size`, the gateway's largest).

Input: one flag byte, then the client's bytes (frames must be masked, as
RFC 6455 requires of a client; a zero key leaves the payload readable).
Flag bits 0-5: the bytes arrive in reads of 1 + 16 * n bytes; bit 6: /ingest
instead of /ws; bit 7: a client that never reads. Reads stop once the
gateway pauses reading or closes the transport, as the event loop would.

Checked: the upgrade is answered 101; no exception is logged (by picows or
by the gateway); nothing is written after the close frame or to a closed
transport; every reply is strict JSON of a documented type; a data frame
whose header declares more than the endpoint's limit (its own size, or with
the fragments before it) has been answered with a close frame by the end of
the read that completed that header, before its payload; the session is
detached once the connection is lost.

    python tests/fuzz/fuzz_wire.py -max_total_time=600 fuzz-out/wire tests/fuzz/corpus/wire
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import _LOOP, _PicowsLog, _Wire, check_reply, feature, gateway, main
from picows.picows import WSAutoPingStrategy, WSProtocol

from fastfeed.gateway import framing
from fastfeed.gateway.app import READ_BUFFER_BYTES

GW = gateway(max_message_bytes=1024, max_ingest_bytes=4096)
LIMIT = {b"/ws": 1024, b"/ingest": 4096}
UPGRADE = (b"GET %s HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_errors: list[str] = []


def _report_exception(exc: BaseException, what: str, **_kw: Any) -> None:
    _errors.append(f"{what}: {type(exc).__name__}: {exc}")


framing.logs.report_exception = _report_exception  # type: ignore[assignment]


async def _protocol(log: _PicowsLog) -> WSProtocol:
    # picows takes the running loop at construction
    return WSProtocol(None, None, False, GW.factory, log, True, None, False, 10.0, 10.0,
                      WSAutoPingStrategy.PING_WHEN_IDLE, False, GW.link.frame_limit, None,
                      READ_BUFFER_BYTES)


class _NoTimer:
    def cancel(self) -> None:
        return None


# picows' timers (a disconnect after its parser refused a frame) never fire here,
# as the gateway's do not: kept, they would pile up in a loop that is never run
_LOOP.call_later = lambda *_a, **_k: _NoTimer()  # type: ignore[method-assign]


def too_big_at(data: bytes, limit: int) -> int | None:
    """Where (byte offset just past its length field) the first data frame ends
    its header declaring more than `limit`; None if the frames before it end the
    model (a frame picows or the gateway refuses, a close) or none does."""
    i, partial = 0, None
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        op, n, ext = b0 & 0x0F, b1 & 0x7F, 0
        if n == 126:
            ext = 2
        elif n == 127:
            ext = 8
        if i + 2 + ext > len(data):
            return None
        if ext:
            n = int.from_bytes(data[i + 2:i + 2 + ext], "big")
        if not b1 & 0x80 or b0 & 0x70 or op not in (0, 1, 2, 9, 10):
            return None  # unmasked, reserved bits, unknown opcode or a close: closed anyway
        if op >= 8:
            if n > 125 or not b0 & 0x80:
                return None
        else:
            if (op == 0) != (partial is not None):
                return None  # 1002 once the frame is in
            size = n + (partial or 0)
            if size > limit:
                return i + 2 + ext
            partial = None if b0 & 0x80 else size
        i += 2 + ext + 4 + n
    return None


def test_one(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    step = 1 + 16 * (flags & 0x3F)
    path = b"/ingest" if flags & 0x40 else b"/ws"
    wire = _Wire(reads=not flags & 0x80, http=True)
    log = _PicowsLog(wire)
    proto = _LOOP.run_until_complete(_protocol(log))
    wire.protocol = proto
    _errors.clear()
    proto.connection_made(wire)

    def read(chunk: bytes) -> None:
        off = 0
        while off < len(chunk) and wire.reading and not wire.closed:
            p = wire.protocol  # FrameGuard, once the upgrade has put it there
            room = p.get_buffer(-1)
            n = min(len(room), len(chunk) - off)
            room[:n] = chunk[off:off + n]
            off += n
            p.buffer_updated(n)

    try:
        read(UPGRADE % path)
        assert wire.status == 101, f"the upgrade was answered {wire.status}"
        at = too_big_at(body, LIMIT[path])
        for k in range(0, len(body), step):
            if not wire.reading or wire.closed:
                break
            read(body[k:k + step])
            if at is not None and k + step >= at:
                assert wire.close_code is not None, (
                    f"a frame over {LIMIT[path]} bytes declared by its header at byte {at}, "
                    f"read, and no close")
        assert not _errors, sorted(set(_errors))
        assert not wire.problems, sorted(set(wire.problems))
        for r in wire.sent:
            check_reply(*r)
        feature(path, wire.close_code, len(wire.sent) > 0, at is not None, wire.reading)
    finally:
        proto.connection_lost(None)
    assert not _errors, sorted(set(_errors))
    assert not wire.problems, sorted(set(wire.problems))
    assert not GW.sessions, "the session was not detached"


if __name__ == "__main__":
    main(test_one)
