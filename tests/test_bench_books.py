"""The bench's book scenario measures what it says: its compiled load client
holds the books the contract's reference client holds, and its change
generator is accepted by a real gateway, whose checksum is the one the
generator reports as final.

Speed is not asserted here (bench/ measures it); these are the parts the
scenario's convergence count and latency rest on.
"""

from __future__ import annotations

import json
import pathlib
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import websockets
from support import start_gateway, until
from wsraw import server_frame

from fastfeed.orderbook import OrderBook, book_checksum

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)
DEPTH = 10


@pytest.fixture(scope="module")
def client():
    """The compiled load client, built as bench/setup.sh builds it."""
    subprocess.run([sys.executable, "-m", "bench.loadgen.build"], cwd=ROOT, check=True,
                   capture_output=True)
    sys.path.insert(0, str(ROOT))
    try:
        from bench.loadgen import _client, worker
        from bench.publisher import zipf_table
        yield _client, worker, zipf_table
    finally:
        sys.path.remove(str(ROOT))


def levels(book: OrderBook | tuple, side: str) -> list[list[float]]:
    if isinstance(book, tuple):
        return book[1 if side == "bids" else 2]
    return [[lv[0], lv[1]] for lv in getattr(book, side)]


def test_checksum_is_the_contracts(client):
    _client = client[0]
    rnd = random.Random(5)
    for _ in range(200):
        bids = [[rnd.choice([1000.0 - k, 99.5, 0.1 * k]), rnd.randint(1, 9) * 100.0]
                for k in range(rnd.randint(0, 14))]
        asks = [[1001.0 + k * 0.5, float(rnd.randint(1, 500))] for k in range(rnd.randint(0, 14))]
        depth = rnd.randint(1, 12)
        assert _client.checksum(bids, asks, depth) == book_checksum(bids, asks, depth)


def test_load_client_books_follow_the_reference_client(client):
    """Entries as fastfeed and the peers write them (keys in any order,
    `"full":true` last, extra keys, removals, levels beyond the depth):
    after each, the compiled client holds what `fastfeed.orderbook` holds."""
    _client = client[0]
    n_instr, syms = 8, [2, 5]
    ring = np.zeros(n_instr * 64 * 2, np.int64)
    rnd = random.Random(11)
    for truncate in (True, False):
        a, b = socket.socketpair()
        stats = _client.Stats()
        conn = _client.Conn(stats, b.fileno(), n_instr, syms, [])
        conn.use_books(DEPTH, truncate, ring, 64)
        loop = _client.Loop()
        loop.add(conn)
        ref = {i: OrderBook(f"S{i:04d}", depth=DEPTH if truncate else 1000) for i in syms}
        seq = {i: 1 for i in syms}

        def book_entry(i, full, seq=seq):
            bids = [[990.0 + k, 100.0 * (k + 1), 1] for k in range(12)]
            asks = [[1001.0 + k, 50.0 * (k + 1), 2] for k in range(12)]
            return {"sym": f"S{i:04d}", "seq": seq[i], "bids": bids, "asks": asks,
                    "checksum": 1, **({"full": True} if full else {})}

        snap = {"type": "snapshot", "id": 1, "fields": ["sym"], "rows": [],
                "books": [book_entry(i, False) for i in syms], "unknown": []}
        for e in snap["books"]:
            ref[int(e["sym"][1:])].apply(e, full=True)
        msgs = [json.dumps(snap)]
        for k in range(300):
            i = rnd.choice(syms)
            seq[i] += 1
            if k % 50 == 49:
                e = book_entry(i, True)
            else:
                asks = [[float(rnd.choice(range(1001, 1016))), rnd.choice([0.0, 300.0, 7.5]), 0]
                        for _ in range(rnd.randint(0, 3))]
                bids = [[float(rnd.choice(range(985, 1000))), rnd.choice([0.0, 100.0, 2500.0]),
                         rnd.randint(0, 9)] for _ in range(rnd.randint(0, 4))]
                e = {"seq": seq[i], "asks": asks, "sym": f"S{i:04d}", "bids": bids}
                if rnd.random() < 0.3:
                    e["stale"] = False
            ref[i].apply(e)
            msgs.append(json.dumps({"type": "update", "t": 1, "rows": [], "books": [e]},
                                   separators=(",", ":") if k % 2 else (", ", ": ")))
        for m in msgs:
            a.sendall(server_frame(m))
            loop.run(0.001)
        final = np.zeros(n_instr, np.int64)
        crcs = np.zeros(n_instr, np.int64)
        for i in syms:
            final[i] = seq[i]
            crcs[i] = book_checksum(ref[i].bids, ref[i].asks, DEPTH)
        deadline = time.monotonic() + 20  # every byte is written: only reading is left
        while stats.updates < len(msgs) - 1 and time.monotonic() < deadline:
            loop.run(0.01)
        assert stats.updates == len(msgs) - 1 and stats.errors == 0
        for i in syms:
            held = conn.book(i)
            assert held[0] == seq[i]
            assert levels(held, "bids") == levels(ref[i], "bids")
            assert levels(held, "asks") == levels(ref[i], "asks")
        assert conn.converged(final, crcs)
        crcs[syms[0]] += 1
        assert not conn.converged(final, crcs) and conn.books_behind(final, crcs) == 1
        a.close()
        conn.close()
        b.close()


async def test_generated_changes_through_a_gateway_converge(client):
    """The scenario's publisher messages on a real gateway's /ingest: a
    contract client and the compiled load client both end on every book's
    final seq and on the checksum the generator computes, which is
    the gateway's own."""
    _client, worker, zipf_table = client
    n, ring_size = 30, 1024
    ring = np.zeros(n * ring_size * 2, np.int64)
    gen = _client.BookFeed(n, zipf_table(n, 1.0, 3, False), ring, ring_size, 15, DEPTH, 9)
    subs = list(range(0, n, 3))
    async with (start_gateway("--simulate", "0") as gw,
                websockets.connect(gw.ingest_url) as pub,
                websockets.connect(gw.ws_url, max_size=None) as ws):
        for payload in gen.seed_all(1):
            await pub.send(payload.decode())
        req = {"op": "subscribe", "id": 1, "symbols": [f"S{i:04d}" for i in subs],
               "channels": ["book"]}

        async def seeded() -> bool:
            # a probe of its own: the clients below then subscribe once, to
            # books the gateway holds, and see no seeding updates
            async with websockets.connect(gw.ws_url, max_size=None) as probe:
                await probe.send(json.dumps(req))
                return len(json.loads(await probe.recv())["books"]) == len(subs)

        for _ in range(500):
            if await seeded():
                break
        else:
            raise AssertionError("the gateway never held the seeded books")
        await ws.send(json.dumps(req))
        snap = json.loads(await ws.recv())
        assert snap["type"] == "snapshot", snap
        books: dict[str, OrderBook] = {}
        for e in snap["books"]:
            books[e["sym"]] = OrderBook(e["sym"], DEPTH)
            assert books[e["sym"]].apply(e, full=True)
        sock, rest = worker.handshake(gw.ws_url, None)
        sock.sendall(worker.frame(json.dumps(req).encode()))
        sock.setblocking(False)
        stats = _client.Stats()
        conn = _client.Conn(stats, sock.fileno(), n, subs, [])
        conn.use_books(DEPTH, True, ring, ring_size)
        loop = _client.Loop()
        conn.feed(rest)
        loop.add(conn)
        await until(lambda: loop.run(0.001) or conn.got_snapshot, what="snapshot")
        for _ in range(40):
            await pub.send(gen.batch(50, 2).decode())
        final = gen.final()
        want = {f"S{i:04d}": final["seqs"][i] for i in subs}
        checked = 0
        while any(books[s].seq < q for s, q in want.items()):
            msg = json.loads(await ws.recv())
            assert msg["type"] == "update", msg
            for e in msg.get("books", ()):
                assert books[e["sym"]].apply(e)  # its checksum matched
                checked += 1
        for s, b in books.items():
            i = int(s[1:])
            assert b.seq == final["seqs"][i]
            assert b.checksum() == final["crcs"][i]
        seqs = np.asarray(final["seqs"], np.int64)
        crcs = np.asarray(final["crcs"], np.int64)
        await until(lambda: loop.run(0.001) or conn.converged(seqs, crcs),
                    what="the load client's books at the final seq and checksum")
        # every book changed after its snapshot (how many frames carried the
        # changes is the gateway's conflation: one entry per book or more)
        assert all(q > 1 for q in want.values()) and checked >= len(subs)
        assert stats.stale_rows == 0 and stats.errors == 0
        conn.close()
        sock.close()
