"""The bus on a highly available Redis: a real Redis Cluster of 3 masters and
3 replicas (`redis_server.RedisCluster`), and a Redis with a replica and a
Sentinel (`redis_server.RedisSentinel`), started by the tests on free ports.

Slot routing is checked against the cluster's own answers (`CLUSTER KEYSLOT`,
where the keys land, who holds our connections); a slot moved by hand makes
the bus follow `MOVED`/`ASK` and re-read the map; a master killed with
SIGKILL while ticks flow is replaced by its replica and every client of every
gateway ends on the true state with no gap. The same failover runs under
Sentinel.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
from typing import Any

import pytest
from redis_server import RedisCluster, RedisSentinel, RedisServer
from support import Feed, as_row, http_get, merge, start_gateway, until

from fastfeed._core import FIELDS, Table, partition
from fastfeed.bus import ClusterBus, RedisBus, parse_url
from fastfeed.bus.cluster import key_slot, parse_cluster_url, spread_tags
from fastfeed.client import Backoff, Client, Row
from fastfeed.feed.publish import RedisPublisher

pytestmark = pytest.mark.timeout(180)

VALUES = FIELDS[3:]
CHANNELS = 16
FAST = Backoff(base=0.05, factor=2.0, cap=0.5, jitter=0.5)


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    with RedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as c:
        print(f"cluster of 6 nodes up in {time.monotonic() - t0:.1f}s")
        yield c



def by_port(cluster: RedisCluster) -> dict[int, RedisServer]:
    return {n.port: n for n in cluster.nodes}


def owner_port(cluster: RedisCluster, slot: int) -> int:
    for a, b, p in cluster.slots():
        if a <= slot <= b:
            return p
    raise AssertionError(f"slot {slot} unserved")



# ---- slots and names --------------------------------------------------------------


def test_crc16_slots_match_cluster_keyslot(cluster):
    node = cluster.nodes[0]
    rng = random.Random(7)
    keys = [f"fastfeed:row:{{{t}}}".encode() for t in spread_tags(CHANNELS)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 24))) for _ in range(400)]
    keys += [b"", b"{}", b"{}a", b"a{}b{c}", b"{a}{b}", b"x{", b"}{y}", b"{{a}}", "é{ü}".encode()]
    for k in keys:
        assert key_slot(k) == int(node.command("CLUSTER", "KEYSLOT", k)), k


def test_partitions_spread_evenly_over_the_masters(cluster):
    for parts in (3, 8, 16, 64, 256):
        tags = spread_tags(parts)
        assert len(set(tags)) == parts
        ports = [owner_port(cluster, key_slot(f"{{{t}}}")) for t in tags]
        counts = sorted(ports.count(p) for p in set(ports))
        assert len(counts) == 3 and counts[-1] - counts[0] <= 1, (parts, counts)


def test_cluster_urls():
    u = parse_cluster_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert u.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (u.password, u.tls) == ("s3cret", False)
    assert "s3cret" not in str(u)
    assert parse_cluster_url("rediss+cluster://user:pw@h:1/0").tls
    for bad in ("redis+cluster://h:1/2", "redis+cluster://", "redis+cluster://h:x",
                "redis+cluster://h:1?db=1"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)
    with pytest.raises(ValueError):
        parse_url("redis+cluster://h:1")  # the single-node parser says what it takes
    assert isinstance(RedisBus("redis+cluster://h:1", None, subscribe=False), ClusterBus)
    assert not isinstance(RedisBus("redis://h:1", None, subscribe=False), ClusterBus)


# ---- routing ----------------------------------------------------------------------------


def fastfeed_clients(node: RedisServer, name: str) -> list[str]:
    text = node.command("CLIENT", "LIST").decode()
    return [ln for ln in text.splitlines() if f"name=fastfeed-{name}-" in ln]


async def test_bus_routes_each_partition_to_its_master(cluster, prefix):
    table = Table()
    rng = random.Random(3)
    ticks = [{"sym": f"S{i:03d}", "seq": 1, "bid": rng.uniform(1, 100)} for i in range(300)]
    ref: dict = {}
    merge(ref, ticks)
    async with RedisBus(cluster.url, table, channels=CHANNELS, prefix=prefix, name="gw") as sub, \
            RedisBus(cluster.url, None, channels=CHANNELS, prefix=prefix, subscribe=False,
                     name="pub") as pub:
        await sub.wait_ready(10)
        await pub.wait_ready(10)
        assert await pub.publish(ticks) == []
        await until(lambda: len(table) == 300, what="every tick through the cluster")
        nodes = by_port(cluster)
        masters = {n.port for n in cluster.masters()}
        # one command connection per master, and the gateway's one subscription
        # connection per master
        for port in masters:
            assert len(fastfeed_clients(nodes[port], "pub")) == 1
            assert len(fastfeed_clients(nodes[port], "gw")) == 2
        # each partition's row hash is on the master owning its slot, nowhere else
        state = await pub.read_state()
        assert set(state) == set(ref)
        for key in sub.row_keys:
            port = owner_port(cluster, key_slot(key))
            assert nodes[port].command("EXISTS", key) == 1
            assert sub.part_node[sub.row_keys.index(key)][1] == port
        # and a late subscriber loads the snapshot from all of them
        late = Table()
        async with RedisBus(cluster.url, late, channels=CHANNELS, prefix=prefix) as lb:
            await lb.wait_ready(10)
            assert lb.snapshot_rows == 300 and len(late) == 300


async def test_publish_command_and_serve_on_a_cluster_url(cluster, prefix, tmp_path):
    ticks = [{"sym": f"F{i:02d}", "seq": 1, "last": float(i)} for i in range(40)]
    path = tmp_path / "ticks.ndjson"
    path.write_text("\n".join(json.dumps(t) for t in ticks) + "\n")
    args = ["--redis", cluster.url, "--redis-channels", str(CHANNELS), "--redis-prefix", prefix]
    async with start_gateway(*args) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastfeed", "publish", *args, "--file", str(path),
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"published 40 ticks" in err
        c = Client(gw.ws_url, stale_after=None)
        try:
            await c.connect()
            await c.subscribe([t["sym"] for t in ticks])
            want = {t["sym"]: as_row(t) for t in ticks}
            await until(lambda: c.rows == want, what="the published ticks")
        finally:
            await c.close()


async def test_a_slot_moved_by_hand_ask_and_moved_are_followed(cluster, prefix):
    """Move partition 0's slot from its master to another while a gateway bus
    and a publisher run: ASK while the slot migrates, MOVED after, and
    Redis's `sunsubscribe` makes the subscriber re-read the map."""
    table = Table()
    rng = random.Random(5)
    ref: dict = {}
    seqs: dict[str, int] = {}

    def ticks(n: int) -> list[dict]:
        out = []
        for _ in range(n):
            s = f"M{rng.randrange(60):02d}"
            seqs[s] = seqs.get(s, 0) + 1
            out.append({"sym": s, "seq": seqs[s], "last": rng.uniform(1, 100)})
        merge(ref, out)
        return out

    def truth_held() -> bool:
        return {s: table.row(table.lookup(s))[1] for s in table.symbols()} == \
            {s: t["seq"] for s, t in ref.items()}

    async with RedisBus(cluster.url, table, channels=CHANNELS, prefix=prefix,
                        backoff_base=0.05) as sub, \
            RedisBus(cluster.url, None, channels=CHANNELS, prefix=prefix,
                     subscribe=False) as pub:
        await sub.wait_ready(10)
        await pub.wait_ready(10)
        await pub.publish(ticks(300))
        await until(truth_held, what="the first ticks")
        nodes = by_port(cluster)
        key, slot = sub.row_keys[0], sub.part_slots[0]
        src = nodes[owner_port(cluster, slot)]
        dst = next(n for n in cluster.masters() if n is not src)
        src_id, dst_id = src.command("CLUSTER", "MYID"), dst.command("CLUSTER", "MYID")
        assert dst.command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id) == b"OK"
        assert src.command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id) == b"OK"
        assert src.command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", key) == b"OK"
        # the key is on dst now, the slot still src's: src answers ASK
        await pub.publish(ticks(100))
        assert pub.redirects >= 1
        for n in cluster.masters():
            n.command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        await asyncio.to_thread(cluster.wait_ok, 20)
        assert dst.command("HLEN", key) == len([s for s in ref if partition(s, CHANNELS) == 0])
        # the subscriber lost its subscription on src and moved to dst
        await until(lambda: sub.ready and sub.part_node[0] == ("127.0.0.1", dst.port), 20,
                    what="the subscriber re-read the slot map")
        before = pub.redirects
        await pub.publish(ticks(300))  # MOVED for partition 0
        assert pub.redirects > before and pub.part_node[0] == ("127.0.0.1", dst.port)
        await until(truth_held, what="every tick, on the new master too")
        assert sub.disconnects >= 1 and pub.publish_errors == 0


# ---- failover ---------------------------------------------------------------------------


HOT = [f"H{i:02d}" for i in range(48)]  # tick all the time
# cold instruments tick once, each group at one stage of the failover, and
# never again: only a failover without a hole delivers them
COLD = [[f"C{g}{i:02d}" for i in range(16)] for g in range(3)]
ALL = HOT + [s for g in COLD for s in g]



class Tapped(Client):
    """A `Client` keeping every snapshot and update row it received, in order,
    with the number of the connection it came on."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wire: list[tuple[int, Row]] = []
        self.sessions: list[Any] = []

    def _on_message(self, session: Any, binary: bool, data: bytes) -> None:
        if not binary:
            msg = json.loads(data)
            if msg.get("type") in ("snapshot", "update"):
                if not self.sessions or self.sessions[-1] is not session:
                    self.sessions.append(session)
                self.wire.extend((len(self.sessions) - 1, Row(*r)) for r in msg["rows"])
        super()._on_message(session, binary, data)


def assert_no_gap(c: Tapped, feed: Feed) -> None:
    """Every row received is a state the instrument really had, and on each
    connection an instrument's seq never goes backwards."""
    held: dict[tuple[int, str], int] = {}
    for conn, row in c.wire:
        assert row == feed.history[row.sym][row.seq], f"{row} is not a state it had"
        assert row.seq >= held.get((conn, row.sym), -1), f"{row.sym} went backwards"
        held[conn, row.sym] = row.seq


class LoggedGateway:
    """`fastfeed serve` with its log in a file, so the test reads what the
    operator would."""

    def __init__(self, tmp_path: Any, name: str, *args: str) -> None:
        from support import Gateway

        self.log = tmp_path / f"{name}.log"
        self.gw = Gateway(list(args), {"FASTFEED_LOG_LEVEL": "info"}, None, log=self.log)

    async def __aenter__(self) -> Any:
        self.gw.start()
        await self.gw.wait_ready()
        return self.gw

    async def __aexit__(self, *exc: object) -> None:
        self.gw.stop()


def scrape(url: str) -> dict[str, float]:
    status, body = http_get(url + "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            # sum over worker pids: one series per name and remaining labels
            name = re.sub(r',?pid="\d+"', "", name).replace("{}", "")
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def failover_with_clients(tmp_path: Any, url: str, rng: random.Random, feed: Feed,
                                kill: Any, recovered: Any, masters: int) -> dict[str, float]:
    """Two gateways (one with two workers) and a publisher on `url`, 8 clients
    streaming; `kill()` (returns the host:port killed) while ticks flow, then
    `recovered()` (blocking) until the replica serves. Checks convergence, no
    gap, and what the operator sees; returns the times."""
    args = ["--redis", url, "--redis-channels", str(CHANNELS), "--frame-ms", "16",
            "--feed-grace-s", "0.5"]
    times: dict[str, float] = {}
    async with RedisPublisher(url, channels=CHANNELS, backoff_base=0.05,
                              ping_interval=0.2, ping_timeout=1.0) as pub:
        await pub.wait_ready(10)
        await pub.publish(feed.ticks(ALL))
        assert await pub.sync()
        async with LoggedGateway(tmp_path, "a", *args, "--workers", "2") as a, \
                LoggedGateway(tmp_path, "b", *args) as b:
            statuses: list[list[bool]] = [[] for _ in range(8)]
            cs = [Tapped([a.ws_url, b.ws_url][i % 2], stale_after=None, backoff=FAST,
                         on_status=statuses[i].append) for i in range(8)]
            for c in cs:
                await c.connect()
                assert await c.subscribe(ALL) == []
            stop = asyncio.Event()

            async def stream() -> None:
                while not stop.is_set():
                    await pub.publish(feed.ticks(rng.sample(HOT, 12)))
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(stream())
            try:
                await until(lambda: all(len(c.wire) > 200 for c in cs), what="ticks flow")
                await pub.publish(feed.ticks(COLD[0]))  # before the failure
                t_kill = time.monotonic()
                where = kill()
                await pub.publish(feed.ticks(COLD[1]))  # while it is down
                await asyncio.to_thread(recovered)
                times["promoted"] = time.monotonic() - t_kill
                await until(lambda: all(s[-1:] == [True] and False in s for s in statuses),
                            30, what="every client saw the feed go down and come back")
                times["back"] = time.monotonic() - t_kill
                await pub.publish(feed.ticks(COLD[2]))  # after
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await task
            assert await pub.sync(30)
            truth = feed.truth()
            try:
                await until(lambda: all(c.rows == truth for c in cs), 30,
                            what="every client on the true final state")
            except AssertionError:
                bad = {i: [s for s in truth if c.rows.get(s) != truth[s]][:3]
                       for i, c in enumerate(cs)}
                raise AssertionError(f"clients differ from the truth: {bad}") from None
            for c in cs:
                assert_no_gap(c, feed)
                assert c.reconnects == 0  # the gateway kept every client
            # the operator sees which node, and for how long
            # (the gauges are copied once a second: wait for the copy)
            for g in (a, b):
                def seen(g: Any = g) -> bool:
                    m = scrape(g.url)
                    return (m.get(f'fastfeed_redis_outages_total{{node="{where}"}}', 0) >= 1
                            and m["fastfeed_redis_last_outage_seconds"] > 0
                            and m["fastfeed_redis_down_seconds_total"] > 0
                            and m["fastfeed_redis_cluster_masters"] == masters
                            and m["fastfeed_redis_breaker_state"] == 0)
                await until(seen, 10, what=f"the outage of {where} in /metrics")
            for g in ("a", "b"):
                text = (tmp_path / f"{g}.log").read_text()
                assert where in text and "was down" in text, text[-3000:]
    return times


async def test_failover_of_a_random_master_every_client_converges_with_no_gap(tmp_path):
    seed = int(os.environ.get("FASTFEED_TEST_SEED") or random.randrange(10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    t0 = time.monotonic()
    with RedisCluster(masters=3, replicas=1, node_timeout_ms=1000) as cluster:
        t_up = time.monotonic() - t0
        victim = rng.choice(cluster.masters())

        def kill() -> str:
            moved = [n for n, t in enumerate(spread_tags(CHANNELS))
                     if owner_port(cluster, key_slot(f"{{{t}}}")) == victim.port]
            print(f"killing master 127.0.0.1:{victim.port} (partitions {moved})")
            cluster.kill(victim)
            return f"127.0.0.1:{victim.port}"

        def recovered() -> None:
            cluster.wait_ok(30)
            assert victim.port not in {n.port for n in cluster.masters()}

        times = await failover_with_clients(tmp_path, cluster.url, rng, Feed(seed), kill,
                                            recovered, masters=3)
        print(f"cluster up in {t_up:.1f}s; replica promoted {times['promoted']:.1f}s after "
              f"the kill; every client back {times['back']:.1f}s after; whole test "
              f"{time.monotonic() - t0:.1f}s")


# ---- Sentinel ----------------------------------------------------------------------------


def test_sentinel_urls():
    u = parse_url("redis+sentinel://:pw@s1,s2:26380/prices/2")
    assert u.sentinels == (("s1", 26379), ("s2", 26380))
    assert (u.service, u.db, u.password) == ("prices", 2, "pw")
    assert str(u) == "redis+sentinel://s1:26379,s2:26380/prices/2"
    for bad in ("redis+sentinel://s1", "redis+sentinel://s1/", "redis+sentinel://s1/m/x",
                "redis+sentinel://s1:x/m"):
        with pytest.raises(ValueError):
            parse_url(bad)


async def test_sentinel_failover_every_client_converges_with_no_gap(tmp_path):
    """The same failover as above, with one Redis, its replica and a Sentinel."""
    seed = int(os.environ.get("FASTFEED_TEST_SEED") or random.randrange(10**6))
    print(f"seed {seed}")
    rng = random.Random(seed)
    t0 = time.monotonic()
    with RedisSentinel(down_after_ms=1000) as sen:
        t_up = time.monotonic() - t0
        old = sen.master()

        def kill() -> str:
            sen.kill(old)
            return f"127.0.0.1:{old.port}"

        times = await failover_with_clients(tmp_path, sen.url, rng, Feed(seed), kill,
                                            lambda: sen.wait_failover(old), masters=0)
        print(f"sentinel set up in {t_up:.1f}s; replica promoted {times['promoted']:.1f}s "
              f"after the kill; every client back {times['back']:.1f}s after; whole test "
              f"{time.monotonic() - t0:.1f}s")
