"""A real `redis-server` for the tests, on a free port, with stop/restart.

    with RedisServer() as r:          # or: r = RedisServer(); r.start(); ...; r.stop()
        url = r.url                   # redis://127.0.0.1:<port>/0
        r.stop(); r.start()           # a restart on the same port, empty (no persistence)

Also `RedisCluster` and `RedisSentinel`. They live in `fixtures` (shared with
`bench/`); this module keeps the names the tests import. The binary is looked
up on PATH, then /usr/bin and /usr/sbin; if it is missing and we are root with
apt-get available, the Debian package is installed (`apt-get install -y
redis-server`); otherwise the tests that need it skip.
"""

from __future__ import annotations

from fixtures import (
    RedisCluster,
    RedisSentinel,
    RedisServer,
    find_redis_server,
    free_cluster_port,
    free_port,
    redis_command,
)

__all__ = ["RedisCluster", "RedisSentinel", "RedisServer", "find_redis_server",
           "free_cluster_port", "free_port", "redis_command"]
