"""What picows leaves to the application of RFC 6455, done once for every endpoint.

`MessageListener` answers the close handshake, reassembles fragmented
messages within a size limit and closes on protocol errors; subclasses
receive whole messages in `on_message` and close with `close`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

if TYPE_CHECKING:
    from .server import Gateway


class MessageListener(WSListener):
    def __init__(self, gw: Gateway, max_bytes: int) -> None:
        self.gw = gw
        self.max_bytes = max_bytes
        self.transport: WSTransport | None = None
        self.closing = False
        self._partial: bytearray | None = None
        self._partial_type = WSMsgType.TEXT

    def on_message(self, msg_type: WSMsgType, data: bytes) -> None:
        raise NotImplementedError

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t == WSMsgType.CLOSE:
            # answer the close handshake with the peer's code, then hang up
            code = frame.get_close_code()
            if not transport.is_close_frame_sent:
                transport.send_close(code if code != WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()
            return
        if t in (WSMsgType.PING, WSMsgType.PONG):
            return  # picows answers pings itself
        if t == WSMsgType.CONTINUATION:
            if self._partial is None:
                return self.close(WSCloseCode.PROTOCOL_ERROR, "continuation without a message")
            self._partial += frame.get_payload_as_memoryview()
            if len(self._partial) > self.max_bytes:
                return self._too_big()
            if frame.fin:
                data, self._partial = bytes(self._partial), None
                self.on_message(self._partial_type, data)
            return
        if self._partial is not None:
            return self.close(WSCloseCode.PROTOCOL_ERROR, "new message before the last one ended")
        if frame.payload_size > self.max_bytes:
            return self._too_big()
        if not frame.fin:
            self._partial = bytearray(frame.get_payload_as_memoryview())
            self._partial_type = t
            return
        self.on_message(t, frame.get_payload_as_bytes())

    def _too_big(self) -> None:
        self._partial = None
        self.close(WSCloseCode.MESSAGE_TOO_BIG, f"message over {self.max_bytes} bytes")

    def close(self, code: WSCloseCode | int, reason: str, grace_s: float = 2.0) -> None:
        tr = self.transport
        if tr is None or self.closing:
            return
        self.closing = True
        code = WSCloseCode(code)
        self.gw.count_close(code.value)
        tr.send_close(code, reason.encode()[:120])
        # the peer should answer; if it doesn't (or can't: stalled), hang up anyway
        self.gw.loop.call_later(grace_s, tr.disconnect, False)
