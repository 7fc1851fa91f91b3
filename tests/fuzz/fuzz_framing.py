"""Fuzz the framing layer, `MessageListener.on_ws_frame`, with picows WSFrame objects.

The input is a sequence of frames, each a header byte (bits 0-2: opcode
continuation, text, binary, close, ping, pong; bit 3: FIN; bits 4-6: RSV1-3),
a length byte (255: a 2-byte big-endian length follows) and the payload.
Frames picows' own parser refuses before the listener sees them (control
frames fragmented or over 125 bytes, close codes it does not know, a 1-byte
close payload or a reason that is not UTF-8) are made into what picows lets through.

Each input goes to two listeners: one that records the messages it is handed
(limit 256 bytes), checked against a model of RFC 6455 reassembly, and a real
client Session on a real Gateway object (limit 512 bytes), whose replies must
be strict JSON. No exception may escape either.

    python tests/fuzz/fuzz_framing.py -max_total_time=600 fuzz-out/framing tests/fuzz/corpus/framing
"""

from __future__ import annotations

import codecs
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    CLIENT_CLOSE_CODES,
    EVERYTHING,
    FakeTransport,
    MessageListener,
    WSCloseCode,
    WSMsgType,
    check_reply,
    client_session,
    gateway,
    main,
)
from picows.picows import _make_test_ws_frame

OPS = [WSMsgType.CONTINUATION, WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE,
       WSMsgType.PING, WSMsgType.PONG, WSMsgType.TEXT, WSMsgType.BINARY]
CONTROL = {WSMsgType.CLOSE, WSMsgType.PING, WSMsgType.PONG}
KNOWN_CODES = {int(c) for c in WSCloseCode}
MAX_FRAMES = 64
GW = gateway()


class _Frame:
    """A frame with RSV2/RSV3 set (picows' test constructor sets RSV1 only)."""

    def __init__(self, t: WSMsgType, payload: bytes, fin: bool, rsv: int) -> None:
        self.msg_type, self.payload, self.fin = t, payload, fin
        self.rsv1, self.rsv2, self.rsv3 = bool(rsv & 1), bool(rsv & 2), bool(rsv & 4)
        self.payload_size = len(payload)
        self.tail_size = 0  # what picows holds of the next frame: FrameGuard's, not tested here

    def get_payload_as_bytes(self) -> bytes:
        return self.payload

    def get_payload_as_memoryview(self) -> memoryview:
        return memoryview(self.payload)

    def get_close_code(self) -> WSCloseCode:
        raise AssertionError("picows refuses a close frame with reserved bits first")


def frames(data: bytes) -> list[tuple[WSMsgType, bytes, bool, int]]:
    out = []
    i = 0
    while i + 2 <= len(data) and len(out) < MAX_FRAMES:
        hdr, n = data[i], data[i + 1]
        i += 2
        if n == 255:
            n = int.from_bytes(data[i:i + 2], "big")
            i += 2
        payload = data[i:i + n]
        i += n
        t, fin, rsv = OPS[hdr & 7], bool(hdr & 8), (hdr >> 4) & 7
        if t in CONTROL:
            fin, payload = True, payload[:125]
            if t == WSMsgType.CLOSE:
                if rsv:
                    continue  # picows would close 1002 itself... fine either way: skip
                if len(payload) == 1:
                    payload = b""
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if code < 3000 and code not in KNOWN_CODES:
                    continue
                try:
                    payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    continue
        out.append((t, payload, fin, rsv))
    return out


def make(t: WSMsgType, payload: bytes, fin: bool, rsv: int) -> Any:
    if rsv & 6:
        return _Frame(t, payload, fin, rsv)
    return _make_test_ws_frame(t, payload, fin, bool(rsv))


class Recorder(MessageListener):
    def __init__(self) -> None:
        super().__init__(GW.link, 256)
        self.got: list[tuple[WSMsgType, bytes]] = []

    def on_message(self, msg_type: WSMsgType, data: bytes) -> None:
        assert not self.closing, "a message handed on after the close"
        self.got.append((msg_type, data))


def model(fs: list, limit: int) -> tuple[list, int | None, list]:
    """RFC 6455 as the gateway applies it: (messages, close code sent, pongs)."""
    msgs: list = []
    pongs: list = []
    partial: bytearray | None = None
    ptype = WSMsgType.TEXT
    dec = None
    for t, payload, fin, rsv in fs:
        if rsv:
            return msgs, 1002, pongs
        if t == WSMsgType.CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if code is None:
                return msgs, 1000, pongs
            ok = 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
            return msgs, code if ok else 1002, pongs
        if t == WSMsgType.PING:
            pongs.append(payload)
            continue
        if t == WSMsgType.PONG:
            continue
        if t == WSMsgType.CONTINUATION:
            if partial is None:
                return msgs, 1002, pongs
        elif partial is not None:
            return msgs, 1002, pongs
        else:
            partial, ptype = bytearray(), t
            dec = codecs.getincrementaldecoder("utf-8")() if t == WSMsgType.TEXT else None
        if len(partial) + len(payload) > limit:
            return msgs, 1009, pongs
        if dec is not None:
            try:
                dec.decode(payload, fin)
            except UnicodeDecodeError:
                return msgs, 1007, pongs
        partial += payload
        if fin:
            msgs.append((ptype, bytes(partial)))
            partial = None
    return msgs, None, pongs


def fs_closed_by_peer(fs: list) -> bool:
    return any(t == WSMsgType.CLOSE for t, *_ in fs)


def test_one(data: bytes) -> None:
    fs = frames(data)
    rec = Recorder()
    rec.transport = tr = FakeTransport(rec)
    for f in fs:
        rec.on_ws_frame(tr, make(*f))  # type: ignore[arg-type]
    want = model(fs, rec.max_bytes)
    assert (rec.got, tr.close_code, tr.pongs) == want, ((rec.got, tr.close_code, tr.pongs), want)
    tr.check()

    s = client_session(GW, EVERYTHING, False)
    tr = FakeTransport(s)
    s.on_ws_connected(tr)
    s.max_bytes = 512
    s.tokens = 1e9  # the rate limit has its own target (fuzz_requests)
    try:
        for f in fs:
            s.on_ws_frame(tr, make(*f))  # type: ignore[arg-type]
        tr.check()
        for r in tr.sent:
            check_reply(*r)
        # the framing's close (or the echo of the peer's), as for the recorder
        _msgs, code, pongs = model(fs, s.max_bytes)
        assert (tr.close_code, tr.pongs) == (code, pongs), ((tr.close_code, tr.pongs), code)
        assert code is None or code in CLIENT_CLOSE_CODES or fs_closed_by_peer(fs), code
    finally:
        s.on_ws_disconnected(tr)


if __name__ == "__main__":
    main(test_one)
