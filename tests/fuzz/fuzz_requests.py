"""Fuzz the client request handler, `Session.on_message`, on a real Gateway object.

Input: one flag byte, then messages separated by 0xFF (a byte no UTF-8 text
holds). A message starting with 0xFE goes in as a binary frame; the others
are text, and only valid UTF-8 reaches the handler (framing refuses the
rest with 1007 before it). Flag bits: 1 a client entitled to BB* and X.*
only, 2 the binary subprotocol, 4 a nearly empty rate-limit bucket, 8 a
client that never reads, on a gateway with small write limits (1 KiB high
water, 4 KiB --max-queued-bytes; with bit 16 both 1 KiB, so the 1008 close
comes first); messages stop once the gateway pauses reading, as the event
loop would stop delivering them.

Checked for every message: no exception escapes; every reply is strict JSON
of a documented type; a request is answered (or the client closed with a
documented code); a request refused as a whole (one error, nothing else)
changes nothing; nothing is written after the close frame or to a closed
transport; what a client leaves unread stays within --max-queued-bytes plus
one reply ("Bounded memory per client" in docs/protocol.md); a list reply
is one sorted page of at most --max-list-symbols (4 here), with `next` when
`more` is true.

    python tests/fuzz/fuzz_requests.py -max_total_time=600 \
        fuzz-out/requests tests/fuzz/corpus/requests
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (
    CLIENT_CLOSE_CODES,
    EVERYTHING,
    Entitlements,
    FakeTransport,
    WSMsgType,
    check_reply,
    client_session,
    feature,
    gateway,
    main,
)

from fastfeed.gateway.registry import Limits

MAX_MESSAGES = 32
GW = gateway(max_list_symbols=4)  # 10 symbols known: lists come in pages
CFG = GW.cfg
SMALL = dataclasses.replace(CFG, high_water_bytes=1024, max_queued_bytes=4096)
TIGHT = dataclasses.replace(CFG, high_water_bytes=1024, max_queued_bytes=1024)
SOME = Entitlements("fuzz", ("BB*", "X.*"))


def test_one(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    gw = GW
    # one Gateway (its metrics register once), its limits per input
    cfg = (TIGHT if flags & 16 else SMALL) if flags & 8 else CFG
    s = client_session(gw, SOME if flags & 1 else EVERYTHING, bool(flags & 2),
                       Limits.from_config(cfg))
    tr = FakeTransport(s, reads=not flags & 8)
    s.on_ws_connected(tr)
    if flags & 4:
        s.tokens = 2.0
    biggest = 0
    try:
        for chunk in body.split(b"\xff")[:MAX_MESSAGES]:
            if not tr.wire.reading:
                break  # the gateway stopped reading this client: the rest waits in the kernel
            if chunk[:1] == b"\xfe":
                t, msg = WSMsgType.BINARY, chunk[1:]
            else:
                t, msg = WSMsgType.TEXT, chunk
                try:
                    msg.decode("utf-8")
                except UnicodeDecodeError:
                    continue
            if s.closing:
                break
            before = (frozenset(s.subs), frozenset(s.watched), s.frame_ms)
            n0 = len(tr.sent)
            s.on_message(t, msg)
            tr.check()
            replies = [check_reply(*r) for r in tr.sent[n0:]]
            for r in replies:
                if r["type"] == "list":  # docs/protocol.md "List pages"
                    syms = r["symbols"]
                    assert len(syms) <= cfg.max_list_symbols and syms == sorted(syms), syms
                    assert r["more"] is ("next" in r), r
            biggest = max([biggest, *(len(d) for _, d in tr.sent[n0:])])
            if flags & 8:  # all of it unread: at most the limit plus the reply that crossed it
                assert tr.wire.written <= cfg.max_queued_bytes + biggest + 2 * 14 + 125, (
                    tr.wire.written, "bytes left unread")
            feature([(r["type"], r.get("code"), len(r.get("symbols") or r.get("rows") or ()) > 0)
                     for r in replies], s.closing)
            if s.closing:
                assert tr.close_code in CLIENT_CLOSE_CODES, tr.close_code
                continue
            assert replies, f"no answer to {msg[:80]!r}"
            if len(replies) == 1 and replies[0]["type"] == "error":
                after = (frozenset(s.subs), frozenset(s.watched), s.frame_ms)
                assert after == before, "a refused request changed the connection"
            assert s.subs >= s.watched, "a watched symbol that is not subscribed"
    finally:
        s.on_ws_disconnected(tr)
    tr.check()
    assert not gw.sessions, "the session was not detached"


if __name__ == "__main__":
    main(test_one)
