"""Tick publisher: `python -m bench.publisher --url ws://127.0.0.1:P ...`.

Sends ticks to `<url>/ingest` as JSON arrays, stamped `ts = time.time_ns()`
when the batch is sent, with skewed (Zipf-like) activity over a shuffled
universe `S0000`..`S<n-1>`; `seq` strictly increases per instrument.

It first sends one tick per instrument and waits until the server holds the
last one (so every client gets a full snapshot), prints {"event":"seeded"},
then waits for `go` on stdin and:

  --mode stream   follows --schedule "SECONDS:RATE,...", sending whatever is
                  due every --interval-ms, printing {"event":"phase",...} at
                  each phase start and {"event":"done","final":[...]} (last
                  seq per instrument) at the end;
  --mode ingest   sends --ingest-ticks pre-built ticks as fast as the socket
                  drains, then one marker tick on the last instrument, and
                  measures until a client subscribed to that instrument sees
                  the marker: ticks applied per second, in order.

With `--kind book` it sends order-book changes instead (`BookFeed`: one
level change per `{"type":"book",...}` message, skewed to the top of the
book), after one full book per instrument; their send times go into the
shared `--ring` file the load clients read, and `done` carries every book's
last seq and checksum.

With `--kind trades` it seeds one quote per instrument (so every symbol is
known), then streams contract trades (`{"type":"trade",...}`, `TickGen.trades`:
`tseq` consecutive per instrument from 1, `ts` the send time) by the same
activity; `done` carries every instrument's last `tseq`.

It exits on `quit` or end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import struct
import sys
import time

import numpy as np
from picows import WSListener, WSMsgType, ws_connect

from bench.loadgen._client import BookFeed, TickGen


def zipf_table(n: int, s: float, seed: int, exclude_last: bool) -> list[int]:
    """65,536 draws' worth of instrument indexes with Zipf(s) activity."""
    m = n - 1 if exclude_last and n > 1 else n
    order = list(range(m))
    random.Random(seed).shuffle(order)
    weights = [1.0 / (r + 1) ** s for r in range(m)]
    total = sum(weights)
    table: list[int] = []
    acc = 0.0
    for r in range(m):
        acc += weights[r]
        upto = round(acc / total * 65536)
        table.extend([order[r]] * (upto - len(table)))
    table.extend([order[-1]] * (65536 - len(table)))
    return table[:65536]


class IngestListener(WSListener):
    def __init__(self) -> None:
        super().__init__()
        self.errors = 0
        self.first_error = ""
        self.writable = asyncio.Event()
        self.writable.set()

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            if b'"error"' in payload:
                self.errors += 1
                if not self.first_error:
                    self.first_error = payload[:300].decode(errors="replace")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class MarkerWatcher(WSListener):
    """One client subscribed to the marker instrument: it tells when the
    server holds the seeded rows, and when the ingest run's last tick is out."""

    def __init__(self, sym: str, channel: str = "quote") -> None:
        super().__init__()
        self.sym = sym
        self.channel = channel
        self.got_snapshot = False
        self.snapshot_rows = 0
        self.marker_seq = 0          # 0: not armed
        self.marker_seen_ns = 0
        self.transport = None

    def on_ws_connected(self, transport) -> None:
        self.transport = transport
        req: dict = {"op": "subscribe", "symbols": [self.sym]}
        if self.channel != "quote":
            req["channels"] = [self.channel]
        transport.send(WSMsgType.TEXT, json.dumps(req).encode())

    def on_ws_frame(self, transport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if msg.get("type") == "snapshot":
            self.got_snapshot = True
            self.snapshot_rows += len(msg.get("rows", ()) if self.channel == "quote"
                                      else msg.get("books", ()))
        elif (msg.get("type") == "update" and self.marker_seq and not self.marker_seen_ns
              and any(r[0] == self.sym and r[1] >= self.marker_seq for r in msg["rows"])):
            self.marker_seen_ns = time.time_ns()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.send_close()
            self.transport.disconnect()


_FFT1_FIELDS = ("bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume")


def fft1(ticks: list[dict]) -> bytes:
    """fastfeed's binary tick batch, written from its documented layout
    (little-endian): b"FFT1", u32 count, then per tick u8 symbol length,
    symbol, u8 field mask (bit 0 ts, bits 1-7 bid ask last bid_size ask_size
    last_size volume), i64 seq, i64 ts if bit 0, f64 per set bit 1-7."""
    out = [b"FFT1", struct.pack("<I", len(ticks))]
    for t in ticks:
        sym = t["sym"].encode()
        mask = 1 if "ts" in t else 0
        vals = []
        for k, name in enumerate(_FFT1_FIELDS, 1):
            if name in t:
                mask |= 1 << k
                vals.append(float(t[name]))
        out.append(struct.pack("<B", len(sym)) + sym + struct.pack("<Bq", mask, t["seq"]))
        if mask & 1:
            out.append(struct.pack("<q", t["ts"]))
        out.append(struct.pack(f"<{len(vals)}d", *vals))
    return b"".join(out)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_schedule(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        secs, _, rate = part.partition(":")
        out.append((float(secs), float(rate)))
    return out


async def run(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    n = a.instruments
    marker = n - 1
    table = zipf_table(n, a.skew, a.seed, a.mode == "ingest")
    gen: TickGen | BookFeed
    if a.kind == "book":
        ring = np.memmap(a.ring, dtype=np.int64, mode="r+", shape=(n * a.ring_size * 2,))
        gen = BookFeed(n, table, ring, a.ring_size, a.book_levels, a.book_depth, a.seed + 7)
    else:
        gen = TickGen(n, table, a.seed + 7)
    tr, lis = await ws_connect(IngestListener, a.url.rstrip("/") + "/ingest")
    for payload in gen.seed_all(time.time_ns()):
        tr.send(WSMsgType.TEXT, payload)

    # A watcher client on the last instrument: ready check and ingest marker.
    for _ in range(200):
        _wtr, watcher = await ws_connect(
            lambda: MarkerWatcher(f"S{marker:04d}", "book" if a.kind == "book" else "quote"),
            a.url.rstrip("/") + "/ws" + (f"?token={a.token}" if a.token else ""))
        for _ in range(100):
            if watcher.got_snapshot:
                break
            await asyncio.sleep(0.01)
        if watcher.got_snapshot and watcher.snapshot_rows:
            break
        watcher.close()
        await asyncio.sleep(0.05)
    else:
        emit({"event": "error", "message": "server never held the seeded instruments"})
        return
    payloads: list[bytes] = []
    if a.mode == "ingest":
        per = a.ingest_batch
        payloads = [gen.batch(per, time.time_ns()) for _ in range(max(1, a.ingest_ticks // per))]
        if a.format == "binary":
            payloads = [fft1(json.loads(p)) for p in payloads]
    emit({"event": "seeded", "instruments": n, "errors": lis.errors})

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = (await reader.readline()).decode().strip()
    if line != "go":
        tr.disconnect()
        return
    r0 = resource.getrusage(resource.RUSAGE_SELF)

    if a.mode == "ingest":
        kind = WSMsgType.BINARY if a.format == "binary" else WSMsgType.TEXT
        sent = 0
        t0 = time.monotonic()
        for p in payloads:
            if not lis.writable.is_set():
                await lis.writable.wait()
            tr.send(kind, p)
            sent += a.ingest_batch
        mark = gen.one(marker, time.time_ns())
        watcher.marker_seq = gen.final_seqs()[marker]
        tr.send(WSMsgType.TEXT, mark)
        t_sent = time.monotonic()
        while watcher.marker_seen_ns == 0 and time.monotonic() - t0 < a.ingest_timeout:
            await asyncio.sleep(0.0005)
        t1 = time.monotonic()
        seen = watcher.marker_seen_ns != 0
        emit({"event": "ingest", "ticks": sent, "seconds": t1 - t0, "send_seconds": t_sent - t0,
              "completed": seen, "rate": sent / (t1 - t0) if seen else None,
              "errors": lis.errors, "first_error": lis.first_error})
    else:
        interval = a.interval_ms / 1000.0
        total = 0
        for k, (secs, rate) in enumerate(parse_schedule(a.schedule)):
            emit({"event": "phase", "i": k, "rate": rate, "secs": secs})
            start = time.monotonic()
            sent = 0
            while True:
                now = time.monotonic()
                el = now - start
                if el >= secs:
                    break
                due = int(rate * el) - sent
                ts = time.time_ns()
                while due > 0:
                    c = min(due, a.max_batch)
                    tr.send(WSMsgType.TEXT, gen.trades(c, ts) if a.kind == "trades"
                            else gen.batch(c, ts))
                    due -= c
                    sent += c
                await asyncio.sleep(interval)
            total += sent
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(0.05)
        final = (gen.final() if isinstance(gen, BookFeed)
                 else gen.final_tseqs() if a.kind == "trades" else gen.final_seqs())
        emit({"event": "done", "sent": total, "final": final, "errors": lis.errors,
              "first_error": lis.first_error,
              "cpu": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime})
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
    tr.disconnect()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.publisher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. ws://127.0.0.1:8080")
    p.add_argument("--token", default="", help="client token of its watcher (a gateway with "
                                                "client auth)")
    p.add_argument("--instruments", type=int, default=500)
    p.add_argument("--mode", choices=["stream", "ingest"], default="stream")
    p.add_argument("--kind", choices=["quote", "book", "trades"], default="quote",
                   help="stream quote ticks, order-book level changes, or trades")
    p.add_argument("--ring", default="", help="book: the shared send-time file (see BookFeed)")
    p.add_argument("--ring-size", type=int, default=65536, help="book: ring slots per instrument")
    p.add_argument("--book-levels", type=int, default=15, help="book: ladder steps per side")
    p.add_argument("--book-depth", type=int, default=10,
                   help="book: the gateway's served depth (the checksum's)")
    p.add_argument("--schedule", default="10:10000", help="SECONDS:RATE phases, comma separated")
    p.add_argument("--interval-ms", type=float, default=1.0, help="send period (stream)")
    p.add_argument("--max-batch", type=int, default=2000, help="most ticks in one message")
    p.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of activity")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ingest-ticks", type=int, default=300_000)
    p.add_argument("--ingest-batch", type=int, default=1000)
    p.add_argument("--ingest-timeout", type=float, default=60.0)
    p.add_argument("--format", choices=["json", "binary"], default="json",
                   help="ingest mode: JSON arrays or fastfeed's binary FFT1 batches")
    a = p.parse_args(argv)
    if a.kind == "book" and (a.mode != "stream" or not a.ring):
        p.error("--kind book streams only, and needs --ring")
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(a))
    else:
        uvloop.run(run(a))


if __name__ == "__main__":
    main()
