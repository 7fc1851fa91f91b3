"""The Redis bus against a real redis-server: store script, pub/sub, snapshot, breaker."""

from __future__ import annotations

import asyncio
import io
import random
import struct

import pytest
from redis_server import RedisServer
from support import merge, until

from fastfeed._core import FIELDS, Table, decode_batch, encode_batch, partition
from fastfeed.bus import CLOSED, BusConfigError, BusDown, RedisBus, parse_url
from fastfeed.bus.link import _Conn
from fastfeed.feed.publish import RedisPublisher, read_ticks

VALUES = FIELDS[3:]






def table_rows(table: Table) -> dict[str, list]:
    ids = {s: table.lookup(s) for s in table.symbols()}
    return {s: table.row(i) for s, i in ids.items() if table.seq_of(i) >= 0}


def ref_rows(ref: dict) -> dict[str, list]:
    return {s: [s, t["seq"], t.get("ts", 0)] + [float(t.get(f, 0.0)) for f in VALUES]
            for s, t in ref.items()}


def state_rows(state: dict[str, bytes]) -> dict[str, list]:
    out = {}
    for sym, rec in state.items():
        (t,) = decode_batch(struct.pack("<4sI", b"FFT1", 1) + rec)
        out[sym] = [sym, t["seq"], t.get("ts", 0)] + [float(t.get(f, 0.0)) for f in VALUES]
    return out




def random_ticks(rng: random.Random, syms: list[str], n: int, seqs: dict[str, int],
                 shuffle: bool = True) -> list[dict]:
    out = []
    for _ in range(n):
        s = rng.choice(syms)
        seqs[s] = seqs.get(s, 0) + 1
        t = {"sym": s, "seq": seqs[s]}
        if rng.random() < 0.7:
            t["ts"] = rng.randrange(1, 2**62)
        for f in VALUES:
            if rng.random() < 0.5:
                t[f] = round(rng.uniform(0, 1e4), 2)
        out.append(t)
        if rng.random() < 0.1:
            out.append(dict(t))  # a duplicate
    if shuffle:
        # local disorder: swap neighbours, as a feed with two paths would
        for i in range(0, len(out) - 1, 3):
            if rng.random() < 0.5:
                out[i], out[i + 1] = out[i + 1], out[i]
    return out


def test_parse_url():
    u = parse_url("redis://:pw@redis.example:6380/2")
    assert (u.host, u.port, u.db, u.password, u.tls) == ("redis.example", 6380, 2, "pw", False)
    assert "pw" not in str(u)
    assert parse_url("rediss://user:p@h").tls
    assert parse_url("unix:///run/redis.sock?db=3").path == "/run/redis.sock"
    assert parse_url("unix:///run/redis.sock?db=3").db == 3
    assert parse_url("redis://localhost").port == 6379
    with pytest.raises(ValueError):
        parse_url("http://x")


async def test_store_merges_only_newer_and_pubsub_agrees(redis, prefix):
    """Random partial ticks, duplicates and local disorder: the store, the
    subscriber's table and a reference merge agree exactly."""
    rng = random.Random(7)
    syms = [f"S{i}" for i in range(40)] + ["BB.CA", "a:b/c-d_e"]
    ref: dict = {}
    seqs: dict = {}
    table = Table()
    async with RedisBus(redis.url, table, channels=5, prefix=prefix) as sub, \
            RedisBus(redis.url, None, channels=5, prefix=prefix, subscribe=False) as pub:
        await sub.wait_ready(5)
        await pub.wait_ready(5)
        for _ in range(20):
            ticks = random_ticks(rng, syms, 200, seqs)
            assert await pub.publish(ticks) == []
            merge(ref, ticks)
        await until(lambda: len(table_rows(table)) == len(ref)
                    and table_rows(table) == ref_rows(ref))
        assert state_rows(await pub.read_state()) == ref_rows(ref)
        # every published row was newer than the last one of its symbol
        assert sub.ticks_stale == 0
        assert pub.publish_stale > 0  # duplicates and swapped ticks were dropped by the store
        # partitions: each symbol lives in its own partition's hash
        for s in ("S1", "BB.CA"):
            n = partition(s, 5)
            got = await pub.link.key_conn(n).call("HEXISTS", pub.row_keys[n], s)
            assert got == 1


async def test_stale_and_duplicate_ticks_are_not_published(redis, prefix):
    table = Table()
    async with RedisBus(redis.url, table, channels=2, prefix=prefix) as sub, \
            RedisBus(redis.url, None, channels=2, prefix=prefix, subscribe=False) as pub:
        await sub.wait_ready(5)
        await pub.wait_ready(5)
        await pub.publish([{"sym": "X", "seq": 5, "bid": 1.0, "ask": 2.0}])
        await pub.publish([{"sym": "X", "seq": 5, "bid": 9.0}, {"sym": "X", "seq": 3, "ask": 9.0},
                           {"sym": "X", "seq": 6, "last": 3.0}])
        await until(lambda: table.lookup("X") >= 0 and table.seq_of(table.lookup("X")) == 6)
        row = table.row(table.lookup("X"))
        assert row[1] == 6 and row[3:6] == [1.0, 2.0, 3.0]
        assert sub.messages == 2 and sub.ticks_applied == 2
        assert pub.publish_stale == 2


async def test_refused_ticks_are_reported_and_the_rest_published(redis, prefix):
    async with RedisBus(redis.url, None, channels=2, prefix=prefix, subscribe=False) as pub:
        await pub.wait_ready(5)
        errors = await pub.publish([{"sym": "OK", "seq": 1, "bid": 1.0},
                                    {"sym": "bad sym", "seq": 1},
                                    {"sym": "NAN", "seq": 1, "bid": float("nan")},
                                    {"sym": "NOSEQ"}])
        assert [e[0] for e in errors] == [1, 2, 3]
        assert set(await pub.read_state()) == {"OK"}


async def test_late_subscriber_loads_snapshot_in_chunks(redis, prefix):
    ref: dict = {}
    async with RedisBus(redis.url, None, channels=3, prefix=prefix, subscribe=False) as pub:
        await pub.wait_ready(5)
        ticks = [{"sym": f"L{i}", "seq": i + 1, "bid": float(i), "volume": i * 10.0}
                 for i in range(5000)]
        await pub.publish(ticks)
        merge(ref, ticks)
        table = Table()
        ups = []
        async with RedisBus(redis.url, table, channels=3, prefix=prefix, snapshot_chunk=100,
                            on_feed=ups.append) as late:
            await late.wait_ready(10)
            assert ups == [True]
            assert late.snapshot_rows >= 5000
            assert table_rows(table) == ref_rows(ref)


async def test_no_tick_lost_while_a_subscriber_joins_mid_stream(redis, prefix):
    """Subscribe first, then snapshot: a flood going on during the join is
    fully reflected in the late table."""
    rng = random.Random(3)
    syms = [f"M{i}" for i in range(300)]
    ref: dict = {}
    seqs: dict = {}
    async with RedisBus(redis.url, None, channels=4, prefix=prefix, subscribe=False) as pub:
        await pub.wait_ready(5)
        stop = asyncio.Event()

        async def flood():
            while not stop.is_set():
                ticks = random_ticks(rng, syms, 300, seqs, shuffle=False)
                await pub.publish(ticks)
                merge(ref, ticks)
                await asyncio.sleep(0)

        task = asyncio.create_task(flood())
        await asyncio.sleep(0.2)
        tables = []
        for _ in range(3):
            t = Table()
            b = RedisBus(redis.url, t, channels=4, prefix=prefix, snapshot_chunk=50)
            await b.start()
            tables.append((t, b))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        stop.set()
        await task
        for t, b in tables:
            await until(lambda t=t: table_rows(t) == ref_rows(ref))
            await b.close()


async def test_redis_restart_opens_breaker_then_converges(prefix):
    with RedisServer() as r:
        table = Table()
        feed: list[bool] = []
        sub = RedisBus(r.url, table, channels=4, prefix=prefix, on_feed=feed.append,
                       backoff_base=0.05, backoff_cap=0.3, ping_interval=0.2)
        pub = RedisPublisher(r.url, channels=4, prefix=prefix, backoff_base=0.05,
                             backoff_cap=0.3, ping_interval=0.2)
        await sub.start()
        await pub.start()
        await sub.wait_ready(5)
        await pub.wait_ready(5)
        ref: dict = {}
        rng = random.Random(1)
        seqs: dict = {}
        syms = [f"R{i}" for i in range(50)]
        for _ in range(5):
            ticks = random_ticks(rng, syms, 100, seqs, shuffle=False)
            await pub.publish(ticks)
            merge(ref, ticks)
        await pub.sync()
        await until(lambda: table_rows(table) == ref_rows(ref))
        r.stop()
        await until(lambda: sub.breaker != CLOSED and feed[-1:] == [False])
        with pytest.raises(BusDown):
            await sub.publish([{"sym": "R1", "seq": 10**6}])
        # the publisher keeps going while Redis is away: nothing raises, state is kept
        for _ in range(5):
            ticks = random_ticks(rng, syms, 100, seqs, shuffle=False)
            await pub.publish(ticks)
            merge(ref, ticks)
        await asyncio.sleep(0.3)
        r.start()
        await sub.wait_ready(10)
        assert await pub.sync(10)
        for _ in range(3):
            ticks = random_ticks(rng, syms, 100, seqs, shuffle=False)
            await pub.publish(ticks)
            merge(ref, ticks)
        await pub.sync()
        await until(lambda: table_rows(table) == ref_rows(ref))
        assert feed == [True, False, True]
        assert sub.disconnects == 1 and sub.breaker == CLOSED
        assert state_rows(await sub.read_state()) == ref_rows(ref)
        assert pub.resent >= len(syms)
        await pub.close()
        await sub.close()


async def test_reseed_restores_a_flushed_store(redis, prefix):
    table = Table()
    async with RedisBus(redis.url, table, channels=2, prefix=prefix, ping_interval=0.1,
                        backoff_base=0.02, backoff_cap=0.1) as sub:
        await sub.wait_ready(5)
        await sub.publish([{"sym": "K1", "seq": 4, "bid": 1.0}, {"sym": "K2", "seq": 2}])
        await until(lambda: len(table) == 2)
        await sub.delete_state()
        # drop our connections, as a Redis restart would
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: sub.disconnects == 1 and sub.ready)
        assert sub.reseeded_rows == 2
        assert set(await sub.read_state()) == {"K1", "K2"}


async def test_channel_count_mismatch_is_refused(redis, prefix):
    async with RedisBus(redis.url, None, channels=4, prefix=prefix, subscribe=False) as a:
        await a.wait_ready(5)
        b = RedisBus(redis.url, None, channels=8, prefix=prefix, subscribe=False,
                     backoff_base=0.05)
        await b.start()
        await until(lambda: b.connect_failures >= 1)
        assert not b.ready and "channels" in b.last_error
        await b.close()
    assert issubclass(BusConfigError, RuntimeError)


async def test_bad_message_on_channel_is_counted_not_fatal(redis, prefix):
    table = Table()
    async with RedisBus(redis.url, table, channels=1, prefix=prefix) as sub:
        await sub.wait_ready(5)
        redis.command("PUBLISH", f"{prefix}:ticks:0", b"garbage")
        good, _ = encode_batch([{"sym": "G", "seq": 1, "bid": 2.0}], 1)
        redis.command("PUBLISH", f"{prefix}:ticks:0", good[0])
        await until(lambda: table.lookup("G") >= 0)
        assert sub.bad_batches == 1 and sub.ready


async def test_sharded_pubsub_on_standalone_redis7(redis, prefix):
    """SSUBSCRIBE/SPUBLISH with hash-tagged names (the Redis Cluster layout),
    exercised on a single Redis 7 node."""
    version = redis.command("INFO", "server").decode()
    if "redis_version:6" in version:
        pytest.skip("sharded pub/sub needs Redis 7")
    table = Table()
    async with RedisBus(redis.url, table, channels=3, prefix=prefix, sharded=True) as sub, \
            RedisBus(redis.url, None, channels=3, prefix=prefix, sharded=True,
                     subscribe=False) as pub:
        await sub.wait_ready(5)
        await pub.wait_ready(5)
        assert sub.channel_names[0] == f"{prefix}:ticks:{{0}}".encode()
        ticks = [{"sym": f"H{i}", "seq": 1, "ask": float(i)} for i in range(30)]
        await pub.publish(ticks)
        await until(lambda: len(table) == 30)
        assert sub.messages >= 1


async def test_publisher_batches_and_flushes(redis, prefix):
    table = Table()
    errors = []
    async with RedisBus(redis.url, table, channels=4, prefix=prefix) as sub:
        await sub.wait_ready(5)
        async with RedisPublisher(redis.url, channels=4, prefix=prefix, max_batch=100,
                                  on_error=lambda *e: errors.append(e)) as p:
            await p.wait_ready(5)
            for i in range(1050):
                await p.publish({"sym": f"P{i % 70}", "seq": i + 1, "last": float(i)})
            await p.publish({"sym": "bad sym", "seq": 1})
            assert await p.sync()
            assert p.published == 1050 and p.rejected == 1 and len(errors) == 1
        await until(lambda: len(table) == 70)
        assert table.row(table.lookup("P69"))[5] == 1049.0


def test_read_ticks_ndjson_and_csv():
    nd = io.StringIO('{"sym":"A","seq":1}\n\n[{"sym":"B","seq":2},{"sym":"C","seq":3}]\nnope\n')
    problems: list[str] = []
    assert [t["sym"] for t in read_ticks(nd, "auto", problems)] == ["A", "B", "C"]
    assert len(problems) == 1 and "line 4" in problems[0]
    csv_text = io.StringIO("sym,seq,ts,bid,ask\nA,1,5,1.5,\nB,2,,,3\n")
    assert list(read_ticks(csv_text)) == [{"sym": "A", "seq": 1, "ts": 5, "bid": 1.5},
                                           {"sym": "B", "seq": 2, "ask": 3.0}]
    with pytest.raises(ValueError):
        list(read_ticks(io.StringIO("sym,price\nA,1\n"), "csv"))


async def test_a_bus_without_a_table_has_no_subscriber(redis, prefix):
    """The parts: a link, its store and its book job always; a subscriber,
    with its own connection, only for a bus given a table (and a book
    subscription only for one given books)."""
    """The parts: a link, its store and its trade store always; a subscriber,
    with its own connection, only for a bus given a table."""
    from fastfeed.bus import Link, RowStore, Subscriber

    table = Table()
    async with RedisBus(redis.url, channels=2, prefix=prefix, name="solo") as pub, \
            RedisBus(redis.url, table, channels=2, prefix=prefix, name="gw") as sub:
        await pub.wait_ready(5)
        await sub.wait_ready(5)
        assert isinstance(pub.link, Link) and isinstance(pub.store, RowStore)
        assert pub.subscriber is None and isinstance(sub.subscriber, Subscriber)
        assert pub.link.jobs == [pub.store, pub.book_bus, pub.trade_store]
        assert sub.link.jobs == [sub.store, sub.subscriber, sub.book_bus, sub.trade_store]
        names = [ln for ln in redis.command("CLIENT", "LIST").decode().splitlines()
                 if "name=fastfeed-" in ln]
        assert sum("name=fastfeed-solo-" in ln for ln in names) == 1  # cmd only
        assert sum("name=fastfeed-gw-" in ln for ln in names) == 2  # cmd and sub
        assert pub.stats()["messages"] == 0
        await pub.publish([{"sym": "J1", "seq": 1, "bid": 1.0}])
        await until(lambda: len(table) == 1)
    with pytest.raises(ValueError, match="table"):
        RedisBus(redis.url, table, subscribe=False)
    with pytest.raises(ValueError, match="table"):
        RedisBus(redis.url, None, subscribe=True)


async def test_a_connection_lost_while_paused_fails_drain_instead_of_hanging():
    """The transport paused writing (its buffer was full) and then the server
    went away: a later drain() must fail at once, as the publisher's next send
    would otherwise wait for a resume that never comes."""

    async def hang_up(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    async with await asyncio.start_server(hang_up, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn("t", lambda _c, _e: None),
                                               "127.0.0.1", port)
        conn.pause_writing()  # as the transport does above its high-water mark
        await until(lambda: conn.closed, 10, what="the server's hang-up")
        with pytest.raises(BusDown):
            await asyncio.wait_for(conn.drain(), 10)
