"""A deliberately minimal WebSocket client for sending what good clients never send.

Libraries refuse to write invalid UTF-8, stray continuations or oversized
frames; tests of the server's answers to those need raw frames
(`client_frame` builds one, `RawWS` sends them). `server_frame` builds what a
server sends (a text frame, unmasked), to feed a client under test directly.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class RawWS:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                      limit: int = 2**22, rcvbuf: int = 0) -> RawWS:
        sock = socket.socket()
        if rcvbuf:  # a small receive window makes "not reading" bite at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            writer.close()
            raise ConnectionRefusedError(status)
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        self.writer.write(client_frame(opcode, payload, fin, mask=mask))

    def send_text(self, text: str | bytes, fin: bool = True) -> None:
        self.send_frame(1, text.encode() if isinstance(text, str) else text, fin)

    async def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n)
        return await asyncio.wait_for(read(), timeout)

    async def recv_close(self, timeout: float = 5.0) -> int:
        """Read until the server's close frame; returns its code."""
        while True:
            op, data = await self.recv_frame(timeout)
            if op == 8:
                return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005

    def close(self) -> None:
        self.writer.close()


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, *, rsv: int = 0,
                 declared: int | None = None, key: bytes | None = None,
                 mask: bool = True) -> bytes:
    """One client frame as bytes. The header declares `declared` payload bytes
    (default: the payload's length; more lets a test send less than it
    declares) and the RSV bits `rsv`; the payload is masked with `key`
    (default: a random one; a zero key leaves the payload readable)."""
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4) if key is None else key
    if any(key):
        payload = (bytes(b ^ key[i % 4] for i, b in enumerate(payload))
                   if len(payload) < 65536 else _xor(payload, key))
    return head + key + payload


def server_frame(text: str) -> bytes:
    """One unmasked text frame, as a server writes it."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + data
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + data


def _xor(data: bytes, key: bytes) -> bytes:
    import numpy as np

    arr = np.frombuffer(data, np.uint8)
    k = np.resize(np.frombuffer(key, np.uint8), len(arr))
    return (arr ^ k).tobytes()
