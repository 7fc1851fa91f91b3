"""The bus on a real Redis Cluster: 3 masters and 3 replicas started by the
tests on free ports (`redis_server.RedisCluster`).

Slot routing is checked against the cluster's own answers (`CLUSTER KEYSLOT`,
where the keys land, who holds our connections); a slot moved by hand makes
the bus follow `MOVED`/`ASK` and re-read the map; a master killed with
SIGKILL while ticks flow is replaced by its replica and every client of every
gateway ends on the true state with no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import sys
import time
from typing import Any

import pytest
from redis_server import RedisCluster, RedisServer
from support import http_get, merge, start_gateway, until

from fastfeed._core import FIELDS, Table
from fastfeed.bus import RedisBus, parse_url
from fastfeed.bus.cluster import ClusterBus, key_slot, parse_cluster_url, spread_tags
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


@pytest.fixture
def prefix(request):
    return "c" + str(abs(hash(request.node.name)) % 10**9)


def by_port(cluster: RedisCluster) -> dict[int, RedisServer]:
    return {n.port: n for n in cluster.nodes}


def owner_port(cluster: RedisCluster, slot: int) -> int:
    for a, b, p in cluster.slots():
        if a <= slot <= b:
            return p
    raise AssertionError(f"slot {slot} unserved")


def as_row(t: dict[str, Any]) -> Row:
    return Row(t["sym"], t["seq"], t.get("ts", 0), *[float(t.get(f, 0.0)) for f in VALUES])


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
