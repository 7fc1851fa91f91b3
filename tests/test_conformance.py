"""RFC 6455 conformance of the framing every endpoint shares (`fastfeed.gateway.framing`).

Autobahn|Testsuite's own case files, sections 1 to 10 (framing, pings,
reserved bits, opcodes, fragmentation, UTF-8, close handling, limits and large
messages), run by kosoku (a runner for them under Python 3, from PyPI, in the
`test` extra) as a fuzzing client against `/echo`: the echo
`--conformance-echo` mounts on the very `MessageListener` that `/ws` and
`/ingest` use. The Autobahn-format report (HTML and JSON) is left in
test-artifacts/autobahn/.

The tests after it check each class of those cases on `/ws` itself with raw
frames, so a regression shows without the suite too.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import kosoku
import pytest
import websockets
from kosoku._report import write_reports  # what kosoku's own command line writes
from support import running_gateway
from wsraw import RawWS
from wsraw import client_frame as frame  # reserved bits too: RawWS.send_frame sets none

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "autobahn"
ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
# Sections 1-10 of Autobahn|Testsuite (it has no section 8): 301 cases.
SECTIONS = {"1", "2", "3", "4", "5", "6", "7", "9", "10"}
CASES = [f"{n}.*" for n in sorted(SECTIONS, key=int)]
NCASES = 301
# Fails in picows, under fastfeed: its parser reads one frame ahead of the
# listener and takes a second close frame for a protocol error, so when both
# close frames of this case arrive in one read it sends 1002 before fastfeed
# has seen the first one. Accepted only in exactly that shape (when the two
# frames arrive in two reads the case passes); test_a_second_close_frame_in_
# the_same_read_is_ignored below fails as soon as picows is fixed.
PICOWS_FAILS = {"7.1.2": 1002}
# Cases at once: the suite takes about 15 s one by one, 5 s four at a time on
# two cores, with the same verdicts.
CONCURRENCY = 4

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


# ---- Autobahn|Testsuite, run by kosoku


@pytest.mark.timeout(600)
async def test_autobahn_fuzzing_client_sections_1_to_10() -> None:
    with running_gateway("--conformance-echo", "--idle-timeout-s", "600") as gw:
        try:
            results = await kosoku.run_fuzzingclient(
                f"ws://127.0.0.1:{gw.port}/echo", CASES, concurrency=CONCURRENCY)
        except kosoku.FailureError as failure:  # some case did not pass: judged below
            results = failure.results
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    write_reports(results, str(ARTIFACTS))

    per_section: dict[str, Counter] = {}
    bad = []
    for r in results:
        behavior, behavior_close = r.behavior.value, r.behavior_close.value
        per_section.setdefault(r.case_id.split(".")[0], Counter())[behavior] += 1
        if behavior in ACCEPTED and behavior_close in ACCEPTED:
            continue
        if PICOWS_FAILS.get(r.case_id) == r.remote_close_code:
            print(f"{r.case_id}: fails in picows as known (server close {r.remote_close_code})")
            continue
        bad.append(f"{r.case_id} {behavior}/{behavior_close}: {_text(r.description)}\n"
                   f"    expected: {_text(r.expectation)}\n"
                   f"    got: {_text(r.result)} / {_text(r.result_close)}")
    for sec in sorted(per_section, key=int):
        print(f"section {sec}: {dict(per_section[sec])}")
    assert not bad, (f"{len(bad)} of {len(results)} Autobahn cases failed "
                     f"(report: {ARTIFACTS / 'index.html'}):\n" + "\n".join(bad))
    assert set(per_section) == SECTIONS and len(results) == NCASES, per_section


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()[:300]


# ---- each class of case, on /ws, without Autobahn


@pytest.fixture(scope="module")
def gw():
    with running_gateway("--conformance-echo", "--max-message-bytes", "65536") as g:
        yield g


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


async def closed_with(port: int, *frames: bytes, path: str = "/ws") -> int:
    """Send frames, return the code of the server's close (after any other frames)."""
    ws = await RawWS.connect(port, path)
    try:
        ws.writer.write(b"".join(frames))
        return await ws.recv_close()
    finally:
        ws.close()


async def test_echo_returns_messages_of_every_size(gw):
    """Section 1 and 9: payloads at each length boundary, text and binary."""
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/echo", max_size=None) as ws:
        for n in (0, 1, 125, 126, 127, 65535, 65536, 1 << 20):
            for msg in ("é" * (n // 2) + "x" * (n % 2), os.urandom(n)):
                await ws.send(msg)
                assert await asyncio.wait_for(ws.recv(), 10) == msg, n


async def test_echo_is_off_by_default():
    with running_gateway() as g:
        with pytest.raises(ConnectionRefusedError) as e:
            await RawWS.connect(g.port, "/echo")
        assert e.value.args == (404,)


async def test_ping_is_answered_with_its_payload(gw):
    """Section 2: a pong carries the ping's payload, up to 125 bytes."""
    ws = await RawWS.connect(gw.port)
    for payload in (b"", b"\x00\xff\xfe binary", bytes(range(125))):
        ws.writer.write(frame(PING, payload))
        assert await ws.recv_frame() == (PONG, payload)
    ws.writer.write(frame(PONG, b"unsolicited"))  # ignored
    ws.writer.write(frame(PING, b"still here"))
    assert await ws.recv_frame() == (PONG, b"still here")
    ws.close()


async def test_control_frame_over_125_bytes_closes_1002(gw):
    assert await closed_with(gw.port, frame(PING, b"x" * 126)) == 1002


@pytest.mark.parametrize("opcode, rsv", [(TEXT, 1), (TEXT, 2), (BINARY, 4), (TEXT, 7),
                                         (PING, 3), (CLOSE, 7)],
                         ids=["text-1", "text-2", "binary-4", "text-7", "ping-3", "close-7"])
async def test_reserved_bits_close_1002(gw, opcode, rsv):
    """Section 3: no extension is negotiated, so every reserved bit must be 0."""
    payload = close_payload(1000) if opcode == CLOSE else b'{"op":"ping"}'
    assert await closed_with(gw.port, frame(opcode, payload, rsv=rsv)) == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
async def test_reserved_opcodes_close_1002(gw, opcode):
    """Section 4."""
    assert await closed_with(gw.port, frame(opcode, b"payload")) == 1002


@pytest.mark.parametrize("frames", [
    [frame(PING, b"part", fin=False)],  # a fragmented control frame
    [frame(0, b"nothing to continue")],
    [frame(TEXT, b'{"op":', fin=False), frame(TEXT, b'"ping"}')],  # a new message inside one
    [frame(TEXT, b'{"op":', fin=False), frame(BINARY, b"x", fin=False)],
], ids=["fragmented-ping", "stray-continuation", "text-inside-text", "binary-inside-text"])
async def test_fragmentation_errors_close_1002(gw, frames):
    """Section 5."""
    assert await closed_with(gw.port, *frames) == 1002


async def test_fragments_with_control_frames_between_make_one_message(gw):
    ws = await RawWS.connect(gw.port, "/echo")
    ws.writer.write(frame(BINARY, b"a", fin=False) + frame(PING, b"p") + frame(0, b"", fin=False)
                    + frame(PONG) + frame(0, b"bc"))
    assert await ws.recv_frame() == (PONG, b"p")
    assert await ws.recv_frame() == (BINARY, b"abc")
    ws.close()


async def test_utf8_split_inside_a_character_across_fragments_is_valid(gw):
    """Section 6: validity is of the message, not of each fragment."""
    text = "κόσμε €𝄞".encode()
    ws = await RawWS.connect(gw.port, "/echo")
    cuts = [0, 1, 3, 4, 13, len(text)]  # 1 and 13 fall inside multi-byte characters
    for k, (a, b) in enumerate(itertools.pairwise(cuts)):
        ws.writer.write(frame(TEXT if k == 0 else 0, text[a:b], fin=b == len(text)))
    assert await ws.recv_frame() == (TEXT, text)
    ws.close()


@pytest.mark.parametrize("payload", [
    pytest.param(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
                 id="surrogate"),
    pytest.param(b"\xc0\xaf", id="overlong"),
    pytest.param(b"\xf4\x90\x80\x80", id="over-U+10FFFF"),
    pytest.param(b"\xfe", id="never-in-utf8"),
    pytest.param(b"ok\x80", id="stray-continuation-byte"),
    pytest.param(b"\xce", id="cut-short-at-the-end"),
])
async def test_invalid_utf8_text_closes_1007(gw, payload):
    assert await closed_with(gw.port, frame(TEXT, payload)) == 1007
    assert await closed_with(gw.port, frame(TEXT, payload[:1], fin=False),
                             frame(0, payload[1:])) == 1007


async def test_invalid_utf8_fails_at_its_fragment_not_at_the_end(gw):
    """Fail fast: the rest of the message never comes, the close does."""
    assert await closed_with(gw.port, frame(TEXT, b'{"op":"\xed\xa0\x80', fin=False)) == 1007


async def test_invalid_utf8_on_ingest_closes_1007(gw):
    assert await closed_with(gw.port, frame(TEXT, b'{"sym":"\xff"}'), path="/ingest") == 1007


@pytest.mark.parametrize("payload, code", [
    pytest.param(b"", 1000, id="no-code"),  # answered with 1000
    *(pytest.param(close_payload(c, b"bye"), c, id=f"valid-{c}")
      for c in (1000, 1001, 1003, 1011, 1014, 3000, 4999)),
    *(pytest.param(close_payload(c), 1002, id=f"invalid-{c}")
      for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000)),
    pytest.param(b"\x03", 1002, id="one-byte"),
    pytest.param(close_payload(1000, b"\xce\xba\xed\xa0\x80"), 1007, id="reason-not-utf8"),
])
async def test_close_handshake(gw, payload, code):
    """Section 7: a valid code is echoed, a code no endpoint may send is 1002."""
    assert await closed_with(gw.port, frame(CLOSE, payload)) == code


async def test_a_second_close_frame_in_the_same_read_is_answered_1002_by_picows(gw):
    """Case 7.1.2, in the shape that fails every time: both close frames in one
    write. picows 2.3.1 reads one frame ahead and answers the second close with
    1002 where RFC 6455 wants the first one's 1000 echoed. This pins that known
    upstream defect: once picows is fixed the answer is 1000, this test fails,
    and it, PICOWS_FAILS above and the README's note can go."""
    assert await closed_with(gw.port, frame(CLOSE, close_payload(1000)), frame(CLOSE),
                             path="/echo") == 1002


async def test_server_hangs_up_after_the_close_handshake(gw):
    ws = await RawWS.connect(gw.port)
    ws.writer.write(frame(CLOSE, close_payload(1000)))
    assert await ws.recv_close() == 1000
    assert await asyncio.wait_for(ws.reader.read(), 5) == b""  # EOF: the server closed TCP
    ws.close()


async def test_nothing_is_answered_after_the_servers_close(gw):
    ws = await RawWS.connect(gw.port, "/echo")
    ws.writer.write(frame(TEXT, b"\xff") + frame(TEXT, b"late") + frame(PING, b"late"))
    assert await ws.recv_frame() == (CLOSE, close_payload(1007, b"text message is not valid "
                                                                b"UTF-8"))
    ws.writer.write(frame(TEXT, b"later"))
    with pytest.raises((asyncio.TimeoutError, asyncio.IncompleteReadError)):
        await ws.recv_frame(timeout=0.5)
    ws.close()


async def test_fragmented_message_over_the_limit_closes_1009(gw):
    """Section 9's limits: the size of the message counts, not of one fragment."""
    chunk = b"x" * 40_000
    assert await closed_with(gw.port, frame(TEXT, chunk, fin=False), frame(0, chunk)) == 1009
