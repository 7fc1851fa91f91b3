"""Record every tick the gateway applies, with its arrival time (`serve --record FILE`).

The file format is in docs/replay.md. In short: an 8-byte magic, then
records of a 17-byte header (payload length u32, CRC-32 of the payload u32,
kind u8, arrival wall-clock ns i64, little-endian) and the payload as it
arrived: an /ingest JSON message, an FFT1 binary batch (from /ingest or the
Redis bus), or the simulator's numpy arrays. Writing costs one copy into a
buffered file per message, never a re-encoding per tick; the buffer goes to
the kernel within FLUSH_S, and a record cut off by a crash is dropped on
replay (or on the next append) at its header.

`RecordingSink` is how the gateway records: it wraps the gateway's local
sink (the table; docs/sources.md), forwards every write to it and records
what the table took. So in embedded mode it records what the sources wrote,
and in Redis mode what came back from the bus (and its snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from .sink import BUS, SIMULATOR, Errors, LocalSink, Reply

log = logging.getLogger("fastfeed.record")

MAGIC = b"FFREC01\n"
HEADER = struct.Struct("<IIBq")  # payload length, crc32(payload), kind, arrival ns
JSON, BATCH, SYMBOLS, ARRAYS = 1, 2, 3, 4
KINDS = {JSON: "json", BATCH: "batch", SYMBOLS: "symbols", ARRAYS: "arrays"}
N_VALUES = 7  # bid, ask, last, bid_size, ask_size, last_size, volume
FLUSH_S = 0.05
MAX_PAYLOAD = 1 << 30


class RecordFileError(ValueError):
    """The file is not a fastfeed recording (bad magic)."""


def scan(fh: BinaryIO) -> Iterator[tuple[int, int, int, bytes]]:
    """(offset, kind, arrival ns, payload) of each whole, intact record,
    leaving `fh` at the first byte after the last one. Stops at a cut-off or
    corrupt record; `fh.tell()` is then where the good part ends."""
    if fh.read(len(MAGIC)) != MAGIC:
        raise RecordFileError("not a fastfeed recording (no FFREC01 header)")
    while True:
        at = fh.tell()
        head = fh.read(HEADER.size)
        if len(head) < HEADER.size:
            fh.seek(at)
            return
        n, crc, kind, ns = HEADER.unpack(head)
        payload = fh.read(n) if n <= MAX_PAYLOAD else b""
        if len(payload) < n or zlib.crc32(payload) != crc or kind not in KINDS:
            fh.seek(at)
            return
        yield at, kind, ns, payload


def encode_arrays(ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray, vals: np.ndarray) -> bytes:
    """The ARRAYS payload: count u32, then ids i32, seqs i64, ts i64, values f64 [count x 7]."""
    return b"".join((struct.pack("<I", len(ids)), np.ascontiguousarray(ids, "<i4").tobytes(),
                     np.ascontiguousarray(seqs, "<i8").tobytes(),
                     np.ascontiguousarray(ts, "<i8").tobytes(),
                     np.ascontiguousarray(vals, "<f8").tobytes()))


def decode_arrays(payload: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    (n,) = struct.unpack_from("<I", payload)
    if len(payload) != 4 + n * (4 + 8 + 8 + 8 * N_VALUES):
        raise ValueError(f"arrays record of {len(payload)} bytes does not hold {n} ticks")
    off = 4
    ids = np.frombuffer(payload, "<i4", n, off)
    off += 4 * n
    seqs = np.frombuffer(payload, "<i8", n, off)
    off += 8 * n
    ts = np.frombuffer(payload, "<i8", n, off)
    off += 8 * n
    vals = np.frombuffer(payload, "<f8", n * N_VALUES, off).reshape(n, N_VALUES)
    return ids, seqs, ts, vals


class Recorder:
    """Appends records to `path`. An existing recording is continued after its
    last whole record (a tail cut off by a crash is cut away, and logged).

    Writing never raises into the gateway: on an I/O error (disk full) the
    recorder logs once, stops recording, and the gateway carries on."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.path = path
        self.loop = loop
        self.records = 0
        self.bytes = 0
        self.failed = False
        self._flush_pending = False
        self.fh: BinaryIO | None = self._open(path)

    @staticmethod
    def _open(path: str) -> BinaryIO:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            fh: BinaryIO = open(path, "r+b")  # noqa: SIM115 (held open until close())
            try:
                for _ in scan(fh):
                    pass
            except RecordFileError:
                fh.close()
                raise
            end, size = fh.tell(), os.path.getsize(path)
            if end < size:
                log.warning("recording %s: cut away %d bytes of a record left incomplete at byte "
                            "%d (a crash mid-write); appending after the last whole record",
                            path, size - end, end)
                fh.truncate(end)
            fh.seek(end)
            log.info("recording: appending to %s (%d bytes so far)", path, end)
            return fh
        fh = open(path, "wb")  # noqa: SIM115
        fh.write(MAGIC)
        log.info("recording every applied tick to %s", path)
        return fh

    def _write(self, kind: int, payload: bytes | bytearray | memoryview) -> None:
        fh = self.fh
        if fh is None:
            return
        try:
            fh.write(HEADER.pack(len(payload), zlib.crc32(payload), kind, time.time_ns()))
            fh.write(payload)
        except OSError as e:
            self._fail(e)
            return
        self.records += 1
        self.bytes += HEADER.size + len(payload)
        if not self._flush_pending:
            self._flush_pending = True
            if self.loop is not None:
                self.loop.call_later(FLUSH_S, self.flush)

    def _fail(self, e: OSError) -> None:
        log.error("recording to %s STOPPED after %d records: %s; the gateway goes on serving, "
                  "the recording ends at its last whole record (free space, then restart "
                  "with --record to append)", self.path, self.records, e)
        self.failed = True
        fh, self.fh = self.fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

    def flush(self) -> None:
        self._flush_pending = False
        if self.fh is not None:
            try:
                self.fh.flush()
            except OSError as e:
                self._fail(e)

    # ---- what the gateway applies

    def json(self, data: bytes | bytearray | memoryview) -> None:
        """An /ingest JSON message: one tick object or an array of them."""
        self._write(JSON, data)

    def batch(self, data: bytes | bytearray | memoryview) -> None:
        """An FFT1 binary batch (from /ingest, the Redis bus or its snapshot)."""
        self._write(BATCH, data)

    def symbols(self, names: Sequence[str]) -> None:
        """The instrument numbering the following ARRAYS records use."""
        import json

        self._write(SYMBOLS, json.dumps(list(names), separators=(",", ":")).encode())

    def arrays(self, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray, vals: Any) -> None:
        """A simulator step: ids in the numbering of the last SYMBOLS record."""
        if self.fh is not None:
            self._write(ARRAYS, encode_arrays(ids, seqs, ts, vals))

    def close(self) -> None:
        fh, self.fh = self.fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError as e:
                log.error("recording to %s: closing failed: %s", self.path, e)
            log.info("recording %s closed: %d records, %d bytes this run",
                     self.path, self.records, self.bytes)


def open_recorder(path: str, loop: asyncio.AbstractEventLoop | None = None) -> Recorder | None:
    """The gateway's recorder for `--record PATH`, or None without one."""
    if not path:
        return None
    try:
        return Recorder(path, loop)
    except (OSError, RecordFileError) as e:
        raise SystemExit(f"fastfeed: --record {path}: {e}") from None


class _Taken:
    """The reply a `RecordingSink` hands its sink: it passes everything on and
    notes whether the sink admitted the message (reused: a local sink answers
    before it returns)."""

    __slots__ = ("admitted", "reply")

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.admitted = False

    def admit(self, n: int) -> bool:
        assert self.reply is not None
        self.admitted = self.reply.admit(n)
        return self.admitted

    def refused(self, errors: Errors) -> None:
        assert self.reply is not None
        self.reply.refused(errors)

    def error(self, code: str, message: str) -> None:
        assert self.reply is not None
        self.reply.error(code, message)


class _Numbering:
    __slots__ = ("inner", "names")

    def __init__(self, inner: Any, names: list[str]) -> None:
        self.inner = inner
        self.names = names


class RecordingSink:
    """A `fastfeed.feed.sink.Sink` that forwards every write to `inner` (the
    gateway's `LocalSink`) and then records it with `recorder`, if the table
    took it: a message the sink did not admit (over the publisher's rate) or
    refused whole (not JSON, a bad batch) is not recorded; one whose ticks
    were partly refused is, as it arrived (a replay refuses the same ticks)."""

    name = "local table, recorded"

    def __init__(self, inner: LocalSink, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self.table = inner.table
        self.books = inner.books  # the bus's book subscriber writes there directly
        self._taken = _Taken()
        self._numbering: _Numbering | None = None  # the last one recorded

    @property
    def ticks_in(self) -> int:
        return self.inner.ticks_in

    @property
    def ticks_refused(self) -> int:
        return self.inner.ticks_refused

    @property
    def failures(self) -> int:
        return self.inner.failures

    @property
    def takes_books(self) -> bool:
        return bool(getattr(self.inner, "takes_books", False))

    @property
    def takes_trades(self) -> bool:
        return bool(getattr(self.inner, "takes_trades", False))

    def _forward(self, call: Any, data: Any, source: int, reply: Reply) -> bool:
        taken = self._taken
        taken.reply, taken.admitted = reply, False
        failures = self.inner.failures
        try:
            call(data, source, taken)
        finally:
            taken.reply = None
        return taken.admitted and self.inner.failures == failures

    def json(self, data: bytes, source: int, reply: Reply) -> None:
        if self._forward(self.inner.json, data, source, reply):
            self.recorder.json(data)

    def ticks(self, ticks: list[Any], source: int, reply: Reply) -> None:
        if self._forward(self.inner.ticks, ticks, source, reply):
            import orjson

            self.recorder.json(orjson.dumps(ticks))

    def batch(self, data: bytes, source: int, reply: Reply) -> None:
        if self._forward(self.inner.batch, data, source, reply):
            self.recorder.batch(data)

    def apply_batch(self, data: bytes, source: int = BUS) -> tuple[int, int, int]:
        """The bus's subscriber (messages and snapshots): recorded once applied."""
        out = self.inner.apply_batch(data, source)
        self.recorder.batch(data)
        return out  # type: ignore[no-any-return]

    def symbols(self, names: Sequence[str]) -> _Numbering:
        return _Numbering(self.inner.symbols(names), list(names))

    def arrays(self, numbering: _Numbering, ids: np.ndarray, seqs: np.ndarray, ts: np.ndarray,
               vals: np.ndarray, source: int = SIMULATOR) -> None:
        self.inner.arrays(numbering.inner, ids, seqs, ts, vals, source)
        if numbering is not self._numbering:  # ids are in this numbering from here on
            self._numbering = numbering
            self.recorder.symbols(numbering.names)
        self.recorder.arrays(ids, seqs, ts, vals)

    async def drain(self) -> None:
        await self.inner.drain()

    async def wait_ready(self) -> None:
        await self.inner.wait_ready()

    def kick(self) -> None:
        self.inner.kick()

    def observe(self, metrics: Any) -> None:
        self.inner.observe(metrics)

    def close(self) -> None:
        self.recorder.close()
