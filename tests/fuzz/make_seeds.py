"""Write the committed seed corpus (tests/fuzz/corpus/<target>/). Re-run after changing it:

    python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"


def j(v) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


REQUESTS = [
    {"op": "subscribe", "symbols": ["BBCA", "TLKM", "NOPE"], "id": 1},
    {"op": "subscribe", "symbols": ["BBCA"], "since": {"BBCA": 3, "TLKM": 99}, "id": "a"},
    {"op": "unsubscribe", "symbols": ["BBCA", "ASII"], "id": None},
    {"op": "watch", "symbols": ["BBCA", "TLKM"], "id": 2.5},
    {"op": "unwatch", "symbols": ["BBCA"], "id": True},
    {"op": "configure", "frame_ms": 16, "id": 3},
    {"op": "configure", "frame_ms": 60001},
    {"op": "list"}, {"op": "list", "match": "BB*"}, {"op": "list", "match": "[!B]*"},
    {"op": "ping", "id": -0.0}, {"op": "ping", "id": [1]}, {"op": "nope"}, {"op": 1}, [1], 7,
    {"op": "subscribe", "symbols": ["bad sym", "Ä", "a" * 33]},
    {"op": "subscribe", "symbols": "BBCA"}, {"op": "subscribe", "since": {"BBCA": "1"},
                                            "symbols": []},
    {"op": "list", "after": "BBCA"}, {"op": "list", "match": "*B*", "after": "A:B/c"},
    {"op": "list", "after": 1},
]
RAW_REQUESTS = [
    b'{"op":"ping","id":1e400}', b'{"op":"ping","id":NaN}', b'{"op":"ping","id":-Infinity}',
    b'{"op":"ping","id":"\\udfff"}', b'{"op":"subscribe","symbols":["\\ud800"]}',
    b'{"op":"ping","id":"\\ud83d\\ude00"}', b'{"op":"list","match":"\\ud800*"}',
    b"[" * 3000, b'{"op":"ping","id":' + b"9" * 500 + b"}", b"{", b"", b" ", b"\xfe",
    b'{"op":"ping","op":"list"}', "{\"op\":\"ping\",\"id\":\"\u00e9\u4e2d\"}".encode(),
]


def requests() -> list[bytes]:
    seeds = []
    for r in REQUESTS:
        seeds.append(b"\x00" + j(r))
    seeds.extend(b"\x00" + r for r in RAW_REQUESTS)
    every = b"\xff".join(j(r) for r in REQUESTS[:8])
    seeds += [b"\x00" + every, b"\x01" + every, b"\x02" + every, b"\x04" + every,
              b"\x00" + b"\xff".join([j({"op": "ping"})] * 30)]
    # clients that never read (flag 8; 24: the 1008 close first), replies growing
    big = b"\xff".join([j({"op": "subscribe", "symbols": ["BBCA", "TLKM", "X.1", "Z" * 32]}),
                        j({"op": "list"}), j({"op": "subscribe", "symbols": ["Z" * 33] * 20})]
                       + [j({"op": "list"})] * 28)
    seeds += [b"\x08" + big, b"\x18" + big, b"\x09" + big]
    return seeds


TICKS = [
    {"sym": "BBCA", "seq": 6, "ts": 1_700_000_000_000_000_000, "bid": 9100.5, "ask": 9101,
     "last": 9100.75, "bid_size": 100, "ask_size": 200, "last_size": 300, "volume": 1.5e7},
    {"sym": "TLKM", "seq": 1, "bid": None, "last": -0.0},
    {"sym": "NEW1", "seq": 1}, {"sym": "BBCA", "seq": 2},
]
RAW_INGEST = [
    b'{"sym":"\\ud800","seq":1}', b'{"sym":"BBCA","seq":9,"bid":NaN}',
    b'{"sym":"BBCA","seq":9,"bid":1e400}', b'{"sym":"BBCA","seq":9,"bid":-Infinity}',
    b"[" * 3000, b'{"sym":"BBCA","seq":9,"bid":' + b"1" * 400 + b"}",
    b'{"sym":"BBCA","seq":' + b"9" * 400 + b"}", b'{"sym":"BBCA","seq":9.0}',
    b'{"sym":"BBCA","seq":99999999999999999999}', b'{"sym":"BBCA","seq":9223372036854775807}',
    b'{"sym":"BBCA","seq":1,"seq":2}', b'{"sym":"BBCA","seq":1,"x":{}}', b'[{"seq":1}]',
    b'{"sym":"bad sym","seq":1}', b'{"sym":"BB\\u0043A","seq":10}', b"[]", b"[1]", b"nul",
    b' \n[ {"seq":11 , "sym" :"GOTO"} ]\n', b'{"sym":"BBCA","seq":12,"bid":5e-324}',
    b'{"sym":"BBCA","seq":13,"bid":2.2250738585072014e-308,"ask":1E5,"last":4.35}',
    b'{"sym":"BBCA","seq":14,"bid":true}', b'{"sym":"BBCA","seq":14,"bid":"1"}',
    b'{"sym":"' + b"Z" * 33 + b'","seq":1}', b'[{"sym":"A1","seq":1},{"sym":"A2","seq":1}]',
]


def ingest() -> list[bytes]:
    return [j(t) for t in TICKS] + [j(TICKS), json.dumps(TICKS, indent=2).encode()] + RAW_INGEST


def frame(op: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """One record of fuzz_framing: header byte, length (255: two more bytes), payload."""
    hdr = {0: 0, 1: 1, 2: 2, 8: 3, 9: 4, 10: 5}[op] | (8 if fin else 0) | (rsv << 4)
    n = len(payload)
    head = bytes([hdr, n]) if n < 255 else bytes([hdr, 255]) + struct.pack("!H", n)
    return head + payload


def framing() -> list[bytes]:
    ping = j({"op": "ping", "id": 1})
    sub = j({"op": "subscribe", "symbols": ["BBCA"]})
    return [
        frame(1, ping), frame(1, sub) + frame(1, ping),
        frame(1, ping[:5], False) + frame(0, ping[5:10], False) + frame(9, b"x")
        + frame(0, ping[10:]),
        frame(2, b"\x00\x01"), frame(9, b"hello"), frame(10, b""),
        frame(8, b""), frame(8, struct.pack("!H", 1000) + b"bye"),
        frame(8, struct.pack("!H", 4999)), frame(8, struct.pack("!H", 5000)),
        frame(8, struct.pack("!H", 1005)), frame(8, struct.pack("!H", 0)),
        frame(0, b"x"), frame(1, b"a", False) + frame(1, b"b"),
        frame(1, "é".encode()[:1], False) + frame(0, "é".encode()[1:]),
        frame(1, b"\xed\xa0\x80"), frame(1, b"\xff"), frame(1, ping, rsv=1),
        frame(1, ping, rsv=4), frame(1, b"x" * 300), frame(1, b"x" * 200, False)
        + frame(0, b"y" * 200), frame(8, b"") + frame(1, ping),
    ]


def wire_frame(op: int, payload: bytes, fin: bool = True, declared: int | None = None) -> bytes:
    """A client frame for fuzz_wire: masked with a zero key (the payload stays readable)."""
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + bytes(4) + payload


def wire() -> list[bytes]:
    ping, lst = j({"op": "ping", "id": 1}), j({"op": "list"})
    tick = j({"sym": "BBCA", "seq": 99, "last": 1.5})
    f = wire_frame
    return [
        b"\x03" + f(1, ping) + f(1, lst), b"\x00" + f(9, b"hi") + f(8, b"\x03\xe8"),
        # a header declaring more than the limit, after a request in the same read:
        # 1 MiB, over picows' own max_frame_size too (it closes first; the gateway
        # must not send a second close frame), and 2,000 bytes (FrameGuard's 1009)
        b"\x03" + f(1, ping) + f(1, b"", declared=1 << 20) + b"x" * 3000,
        b"\x03" + f(1, ping) + f(1, b"", declared=2000) + b"x" * 3000,
        b"\x00" + f(1, ping) + f(1, b"", declared=2000) + b"x" * 3000,
        b"\x00" + f(1, b'{"op":', fin=False) + f(0, b"x" * 1000, declared=1020),
        b"\x40" + f(1, tick) + f(1, b"", declared=5000) + b"x" * 3000,
        b"\x40" + f(1, j([json.loads(tick)] * 3)) + f(2, b"FFT1\x00\x00\x00\x00"),
        b"\x80" + b"".join(f(1, lst) for _ in range(40)),
        b"\x01" + f(1, ping[:4], False) + f(9, b"p") + f(0, ping[4:]),
        # found: picows' parser closed (a later frame of the read refused) before it
        # handed over a ping ahead of it; the gateway must not answer that ping
        FOUND_PONG_AFTER_CLOSE,
    ]


FOUND_PONG_AFTER_CLOSE = (
    b'\x03\x81\x94\x00\x00\x00\x00{"op":"pind,"g"i"'
    b':1}\x81\x8d\x00\x05\x00\x00\x00\x00\x00\x04\x00:"list"@\x89\x82'
    b'\x00\x00}\x00\x00hi\x88\x82\x00\x00\x00\x00\x03\xe8i\x88'
)


def main() -> None:
    for name, seeds in (("requests", requests()), ("ingest", ingest()), ("framing", framing()),
                        ("wire", wire())):
        d = ROOT / name
        d.mkdir(parents=True, exist_ok=True)
        for s in seeds:
            (d / hashlib.sha1(s).hexdigest()).write_bytes(s)


if __name__ == "__main__":
    main()
