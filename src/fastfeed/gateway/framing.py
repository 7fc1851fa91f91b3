"""What picows leaves to the application of RFC 6455, done once for every endpoint.

picows refuses unknown opcodes, unmasked or fragmented control frames, control
frames over 125 bytes, frames over `max_frame_size` and close frames whose code
it does not know or whose reason is not UTF-8. `MessageListener` does the
rest: it refuses reserved bits (fastfeed negotiates no extension), answers
pings (the gateway turns picows' own answering off: it would answer a ping
with reserved bits too), answers the close handshake (1002 to a code no
endpoint may send), reassembles fragmented messages within a size limit,
checks that text is UTF-8 (fragment by fragment, so a bad message fails as
soon as it turns bad) and ignores everything but the peer's close once it
has sent its own. Subclasses receive whole messages in `on_message` and close
with `close`.

picows checks a frame's declared size against one `max_frame_size` for the
whole server (the largest endpoint's limit), and only fails a frame once it
has buffered it whole. `FrameGuard` holds each endpoint to its own limit as
soon as a frame's header has arrived: see its doc.

Every listener gets a `FramingContext` (the loop, picows' frame limit, a
close counter) instead of the gateway: this module knows picows and nothing
of fastfeed above the core and the logs.

`EchoListener` sends every message back. The gateway mounts it at `/echo`
only with `--conformance-echo`, so a conformance suite (Autobahn|Testsuite)
drives the very framing `/ws` and `/ingest` use.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable
from dataclasses import dataclass

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from .. import _core, logs

ECHO_MAX_BYTES = 16 * 1024 * 1024  # Autobahn's largest messages (case 9.x.6)
_MAX_REASON = 123  # a close frame's payload is at most 125 bytes, 2 of them the code
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")
_HEAD = 14  # the longest frame header: 2 bytes, 8 of extended length, 4 of mask


def valid_close_code(code: int) -> bool:
    """A code a peer may put in a close frame (RFC 6455 7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class FramingContext:
    """What every listener needs of the process it runs in."""

    loop: asyncio.AbstractEventLoop  # for the grace timer of a close
    frame_limit: int  # picows' one max_frame_size, the largest endpoint's limit
    count_close: Callable[[int], None]  # a close code the server sent by itself


class MessageListener(WSListener):
    path = "?"  # the endpoint, for logs
    peer = "?"
    cid = -1

    def __init__(self, link: FramingContext, max_bytes: int) -> None:
        self.link = link
        self.max_bytes = max_bytes
        self.transport: WSTransport | None = None
        self.closing = False
        self._partial: bytearray | None = None
        self._partial_type = WSMsgType.TEXT
        self._utf8: codecs.IncrementalDecoder | None = None  # of a fragmented text message
        # for FrameGuard: frames picows handed over in this read, and how many
        # bytes it holds after the last of them (the start of the next frame)
        self.frames_seen = 0
        self.frame_tail = 0

    def guard_frames(self, transport: WSTransport) -> None:
        """Check frame headers against `max_bytes` as they arrive (FrameGuard)."""
        under = transport.underlying_transport
        if self.max_bytes < self.link.frame_limit:
            # the transport takes any protocol object; FrameGuard is one by duck typing
            under.set_protocol(FrameGuard(under.get_protocol(), self))  # type: ignore[arg-type]

    def is_user_specific_pong(self, frame: WSFrame) -> bool:
        # picows asks this, instead of calling on_ws_frame, of frames that
        # arrive while it waits for the answer to its own ping
        self.frames_seen += 1
        self.frame_tail = frame.tail_size
        return frame.msg_type == WSMsgType.PONG

    def on_ping(self, transport: WSTransport, payload: bytes) -> None:
        transport.send_pong(payload)

    def on_message(self, msg_type: WSMsgType, data: bytes) -> None:
        raise NotImplementedError

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.frames_seen += 1
        self.frame_tail = frame.tail_size
        if not _core.connected(transport):
            # the socket failed (a reset client); picows learns it one loop pass
            # later. Whatever else this read holds needs no answer.
            return
        try:
            self._on_frame(transport, frame)
        except Exception as e:
            self.internal_error(e, "on_ws_frame")

    def internal_error(self, exc: Exception, where: str) -> None:
        """A bug met on this connection: log it once per kind, close 1011."""
        logs.report_exception(exc, f"{self.path} {where}", client=self.peer, path=self.path,
                              cid=self.cid)
        self.close(WSCloseCode.INTERNAL_ERROR, "internal error")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.count_picows_close(transport)

    def count_picows_close(self, transport: WSTransport) -> None:
        """Count a close picows started by itself: 1001 for a peer that answers no
        ping (--idle-timeout-s), 1002/1009 for what its parser refused, 1011 for
        an exception it caught. Ours are counted in `close`, the peer's not at all."""
        hs = transport.close_handshake
        if not self.closing and hs is not None and hs.sent is not None and not hs.recv_then_sent:
            self.link.count_close(hs.sent.code.value)

    def _on_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            return self.close(WSCloseCode.PROTOCOL_ERROR,
                              "reserved bits set, but no extension was negotiated")
        t = frame.msg_type
        if t == WSMsgType.CLOSE:
            return self._on_close_frame(transport, frame)
        if self.closing or transport.is_close_frame_sent:
            # after a close frame only the peer's close counts: ours, or picows'
            # own, sent when its parser refused a later frame of the same read
            # before it handed over the frames ahead of that one
            return
        if t == WSMsgType.PING:
            return self.on_ping(transport, frame.get_payload_as_bytes())
        if t == WSMsgType.PONG:
            return
        if t == WSMsgType.CONTINUATION:
            partial = self._partial
            if partial is None:
                return self.close(WSCloseCode.PROTOCOL_ERROR, "continuation without a message")
            if len(partial) + frame.payload_size > self.max_bytes:
                return self._too_big()
            chunk = frame.get_payload_as_memoryview()
            if self._utf8 is not None and not self._utf8_ok(chunk, frame.fin):
                return
            partial += chunk
            if frame.fin:
                data = bytes(partial)
                self._partial = self._utf8 = None
                self.on_message(self._partial_type, data)
            return
        if self._partial is not None:
            return self.close(WSCloseCode.PROTOCOL_ERROR, "new message before the last one ended")
        if frame.payload_size > self.max_bytes:
            return self._too_big()
        if not frame.fin:
            chunk = frame.get_payload_as_memoryview()
            if t == WSMsgType.TEXT:
                self._utf8 = _Utf8Decoder()
                if not self._utf8_ok(chunk, False):
                    return
            self._partial = bytearray(chunk)
            self._partial_type = t
            return
        data = frame.get_payload_as_bytes()
        if t == WSMsgType.TEXT and not data.isascii():  # ASCII: valid, and found without a copy
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return self._bad_utf8()
        self.on_message(t, data)

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # picows has refused a 1-byte payload, codes under 3000 it does not
        # know and a reason that is not UTF-8; 0, 1006 and 5000+ are left to us
        self.closing = True
        self._partial = self._utf8 = None
        if not transport.is_close_frame_sent:
            code = frame.get_close_code()
            if frame.payload_size == 0:
                transport.send_close(WSCloseCode.OK)
            elif valid_close_code(code.value):
                transport.send_close(code)  # echo the peer's code
            else:
                self.link.count_close(WSCloseCode.PROTOCOL_ERROR.value)
                transport.send_close(WSCloseCode.PROTOCOL_ERROR, b"invalid close code")
        # the handshake is complete on our side: the server hangs up first
        transport.disconnect()

    def _utf8_ok(self, chunk: memoryview, final: bool) -> bool:
        assert self._utf8 is not None
        try:
            self._utf8.decode(chunk, final)
        except UnicodeDecodeError:
            self._bad_utf8()
            return False
        return True

    def _bad_utf8(self) -> None:
        self.close(WSCloseCode.INVALID_TEXT, "text message is not valid UTF-8")

    def _too_big(self) -> None:
        self.close(WSCloseCode.MESSAGE_TOO_BIG, f"message over {self.max_bytes} bytes")

    def check_header(self, head: bytes | None, held: int) -> None:
        """The frame being received starts with `head` (None: not known); picows
        holds `held` bytes of it."""
        if self.closing:
            return
        size = -1
        opcode = head[0] & 0x0F if head else -1
        if head is not None and len(head) >= 2 and 0 <= opcode < 8:  # control ones: <= 125
            flag = head[1] & 0x7F
            if flag < 126:
                size = flag
            elif flag == 126 and len(head) >= 4:
                size = int.from_bytes(head[2:4], "big")
            elif flag == 127 and len(head) >= 10:
                size = int.from_bytes(head[2:10], "big")
        if size >= 0 and opcode == WSMsgType.CONTINUATION and self._partial is not None:
            size += len(self._partial)  # what the fragmented message would come to
        if size > self.max_bytes or held > self.max_bytes + _HEAD:
            self._too_big()
            # the rest of that frame is not wanted: stop reading, let the close go out
            assert self.transport is not None
            self.transport.underlying_transport.pause_reading()

    def close(self, code: WSCloseCode | int, reason: str, grace_s: float = 2.0) -> None:
        tr = self.transport
        if tr is None or self.closing:
            return
        picows_closed = tr.is_close_frame_sent
        if picows_closed:
            # picows closed first, in the same read (a frame over its one
            # max_frame_size, seen before FrameGuard looks): a second close
            # frame would only be dropped. Count picows' close, as at disconnect.
            self.count_picows_close(tr)
        self.closing = True
        self._partial = self._utf8 = None
        if picows_closed or not _core.connected(tr):
            return  # lost: nothing reaches the peer, and picows will hang up
        code = WSCloseCode(code)
        self.link.count_close(code.value)
        # cut to what fits a control frame, never inside a UTF-8 sequence
        tr.send_close(code, reason.encode()[:_MAX_REASON].decode("utf-8", "ignore").encode())
        # the peer should answer; if it doesn't (or can't: stalled), hang up anyway
        self.link.loop.call_later(grace_s, tr.disconnect, False)


class FrameGuard:
    """Between the socket and picows' parser of one connection: fails a frame
    over the endpoint's limit as soon as its header is in, not once picows
    has buffered it whole.

    picows has one `max_frame_size` per server and keeps it in its parser,
    out of reach (it is not in picows.pxd). So the guard takes the place of
    picows' protocol on the transport after the upgrade and passes every
    read on. It needs no parser of its own: after each read picows has handed
    over every complete frame, and the last one's `tail_size` says how many
    bytes it holds of the next one, the last `tail_size` bytes of the read.
    The guard keeps their first 14 bytes (the longest header) and checks the
    declared size, and also what picows holds, against `max_bytes`.

    Bytes a client sends after its upgrade request without waiting for the
    101 (RFC 6455 4.1 forbids it) reach picows before the guard is in place:
    if they end inside a frame, that frame is bounded by what picows holds
    (within 16 KiB, the largest upgrade request), not by its header.
    """

    __slots__ = ("head", "held", "listener", "proto", "view")

    def __init__(self, proto, listener: MessageListener) -> None:
        self.proto = proto
        self.listener = listener
        self.view: memoryview | None = None
        # the first bytes of the frame picows holds part of (None: not known)
        self.head: bytes | None = b""
        self.held = 0
        listener.frames_seen = 0

    def is_buffered_protocol(self) -> bool:
        return True

    def get_buffer(self, hint: int) -> memoryview:
        self.view = self.proto.get_buffer(hint)
        return self.view

    def buffer_updated(self, n: int) -> None:
        assert self.view is not None
        new = bytes(self.view[:n])  # picows may move or grow its buffer while parsing
        self.view = None
        lst = self.listener
        if lst.frames_seen and lst.frame_tail:
            # frames sent with the upgrade request: picows holds the start of
            # the next one, which the guard never saw
            self.held, self.head = lst.frame_tail, None
        lst.frames_seen = 0
        self.proto.buffer_updated(n)
        if lst.frames_seen:
            tail = lst.frame_tail  # within this read: its frame ended in it
            self.held = tail
            self.head = new[n - tail:n - tail + _HEAD] if tail else b""
        else:
            self.held += n
            if self.head is not None and len(self.head) < _HEAD:
                self.head += new[:_HEAD - len(self.head)]
        if self.held:
            lst.check_header(self.head, self.held)

    def connection_made(self, transport) -> None:
        self.proto.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proto.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.proto.eof_received()

    def pause_writing(self) -> None:
        self.proto.pause_writing()

    def resume_writing(self) -> None:
        self.proto.resume_writing()


class EchoListener(MessageListener):
    """Sends every message back as it came (a testing aid, see the module doc)."""

    path = "/echo"

    def __init__(self, link: FramingContext) -> None:
        super().__init__(link, ECHO_MAX_BYTES)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        host, port = (transport.underlying_transport.get_extra_info("peername") or ("?", 0))[:2]
        self.peer = f"{host}:{port}"

    def on_message(self, msg_type: WSMsgType, data: bytes) -> None:
        tr = self.transport
        if tr is not None and _core.can_send(tr):
            tr.send(msg_type, data)
