"""One load-client process: `python -m bench.loadgen.worker '<json config>'`.

Opens `count` connections (global client indexes `first`..), each subscribing
to `subs` instruments of the universe (and watching `watch` of them when its
global index is below `watch_clients`), then takes line commands on stdin and
answers JSON lines on stdout:

    stats            counters and latency histograms of the window since the
                     last `stats` (then resets them), with this process's CPU time
    final [seqs...]  share of clients whose every subscribed instrument reached
                     the publisher's last seq (a JSON list, one per instrument;
                     in book mode {"seqs": [...], "crcs": [...]}: each book's
                     seq and checksum must be the publisher's)
    quit             close every connection and exit

With `"book": {"depth": D, "truncate": bool, "ring": path, "ring_size": N}`
in the config every subscription is to the `book` channel and each client
keeps its books (see `Conn.use_books`). With `"trades": true` every
subscription is to the `trades` channel and each client checks its `tseq`
sequences (see `Conn.use_trades`); `final` then takes the last `tseq` per
instrument and also reports the clients with a gap (`gapped`), the trades
lost in gaps (`lost`), the gateway's `lost` counts and the trades not
received by the end (`behind_trades`).

The first line it prints is {"event": "ready", ...} once every client has its
snapshot (or the connect timeout passed).
"""

from __future__ import annotations

import base64
import json
import os
import random
import resource
import socket
import sys
import time
from urllib.parse import urlsplit

import numpy as np

from bench.loadgen._client import Conn, Loop, Stats


def choose(seed: int, gi: int, n_instr: int, subs: int, watch: int) -> tuple[list, list]:
    rnd = random.Random(seed * 1_000_003 + gi)
    picked = rnd.sample(range(n_instr), min(subs, n_instr))
    return picked, picked[:watch]


def sym(i: int) -> str:
    return f"S{i:04d}"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def frame(payload: bytes, op: int = 1) -> bytes:
    """A masked client frame; the zero mask key leaves the payload as is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | op, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | op, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | op, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def handshake(url: str, protocol: str | None, timeout: float = 20) -> tuple[socket.socket, bytes]:
    """Connect and upgrade with a blocking socket; return it and any bytes
    that came after the 101 response."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    proto = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")  # a token, say
    sock.sendall((f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{proto}\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        sock.close()
        raise ConnectionError(f"upgrade refused: {status.decode(errors='replace')}")
    return sock, rest


def run(cfg: dict) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stats = Stats()
    loop = Loop()
    n_instr = cfg["instruments"]
    conns: list[Conn] = []
    socks: list[socket.socket] = []
    failures: list[str] = []
    url = cfg["url"]
    protocol = cfg.get("protocol")
    book = cfg.get("book")
    trades = bool(cfg.get("trades"))
    ring = None
    if book:
        ring = np.memmap(book["ring"], dtype=np.int64, mode="r",
                         shape=(n_instr * book["ring_size"] * 2,))

    def hello_for(gi: int) -> tuple[list, list, bytes]:
        subs, watch = choose(cfg.get("seed", 1), gi, n_instr, cfg.get("subs", 0), 0)
        if gi < cfg.get("watch_clients", 0):
            watch = subs[: cfg.get("watch", 0)]
        out = b""
        if subs:
            req = {"op": "subscribe", "id": 1, "symbols": [sym(i) for i in subs]}
            if book:
                req["channels"] = ["book"]
            elif trades:
                req["channels"] = ["trades"]
            out += frame(json.dumps(req).encode())
        if watch:
            out += frame(json.dumps({"op": "watch", "id": 2,
                                     "symbols": [sym(i) for i in watch]}).encode())
        if cfg.get("configure"):
            out += frame(json.dumps({"op": "configure", "id": 3, **cfg["configure"]}).encode())
        return subs, watch, out

    t0 = time.monotonic()
    first = cfg.get("first", 0)
    for k in range(cfg["count"]):
        subs, watch, hello = hello_for(first + k)
        last: Exception | None = None
        for _attempt in range(3):
            try:
                sock, rest = handshake(url, protocol)
                sock.sendall(hello)
                sock.setblocking(False)
                break
            except OSError as exc:
                last = exc
                time.sleep(0.2)
        else:
            failures.append(repr(last))
            continue
        conn = Conn(stats, sock.fileno(), n_instr, subs, watch, cfg.get("read_buffer", 65536))
        if book:
            conn.use_books(book["depth"], book["truncate"], ring, book["ring_size"])
        elif trades:
            conn.use_trades()
        conn.feed(rest)
        loop.add(conn)
        conns.append(conn)
        socks.append(sock)  # keeps the fd open
        if k % 50 == 49:
            loop.run(0.0)    # read what arrived meanwhile
    deadline = time.monotonic() + cfg.get("snapshot_timeout", 20)
    while time.monotonic() < deadline and not all(c.got_snapshot for c in conns):
        loop.run(0.05)
    emit({"event": "ready", "connected": len(conns), "failed": len(failures),
          "errors": failures[:3], "snapshots": sum(1 for c in conns if c.got_snapshot),
          "seconds": round(time.monotonic() - t0, 3)})

    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    loop.watch_fd(stdin)
    stats.reset()
    w0, (u0, s0) = time.monotonic(), cpu()
    pending = b""
    running = True
    while running:
        if not loop.run(3600.0, stdin):
            continue
        try:
            chunk = os.read(stdin, 1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode().strip()
            cmd, _, arg = line.partition(" ")
            if not line or cmd == "quit":
                running = False
                break
            if cmd == "stats":
                w1, (u1, s1) = time.monotonic(), cpu()
                emit({"event": "stats", "wall": w1 - w0, "cpu_user": u1 - u0,
                      "cpu_sys": s1 - s0, "reads": stats.reads,
                      "updates": stats.updates, "frames": stats.frames, "bytes": stats.bytes,
                      "changes": stats.changes, "levels": stats.levels,
                      "untimed": stats.untimed, "lost": stats.lost, "gw_lost": stats.gw_lost,
                      "watched_updates": stats.watched_updates, "stale_rows": stats.stale_rows,
                      "unexpected_rows": stats.unexpected_rows, "errors": stats.errors,
                      "bad_frames": stats.bad_frames, "max_lat_ms": stats.max_lat_ns / 1e6,
                      "connected": stats.connected, "disconnected": stats.disconnected,
                      "closed_by_server": stats.closed_by_server,
                      "close_codes": {str(k): v for k, v in stats.close_codes.items()},
                      "hist": stats.histogram(False), "whist": stats.histogram(True)})
                stats.reset()
                w0, u0, s0 = w1, u1, s1
            elif cmd == "final":
                got = json.loads(arg)
                if book:
                    final = np.asarray(got["seqs"], dtype=np.int64)
                    crcs = np.asarray(got["crcs"], dtype=np.int64)
                    conv = sum(1 for c in conns if c.converged(final, crcs))
                    behind = sum(c.books_behind(final, crcs) for c in conns)
                else:
                    final = np.asarray(got, dtype=np.int64)
                    conv = sum(1 for c in conns if c.converged(final))
                    behind = sum(c.behind(final) for c in conns)
                out = {"event": "final", "clients": cfg["count"], "converged": conv,
                       "behind_rows": int(behind), "disconnected": stats.disconnected}
                if trades:
                    out.update(gapped=sum(1 for c in conns if c.lost),
                               lost=sum(c.lost for c in conns),
                               gw_lost=sum(c.gw_lost for c in conns),
                               behind_trades=sum(c.trades_behind(final) for c in conns))
                emit(out)
            else:
                emit({"event": "error", "message": f"unknown command {cmd!r}"})
    for c in conns:
        c.close()
    time.sleep(0.2)
    for s in socks:
        s.close()


def main() -> None:
    run(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
