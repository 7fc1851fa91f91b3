import pathlib
import sys

import pytest
import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on uvloop, the loop the gateway runs on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis():
    """A redis-server of the test's own on a free port (tests/redis_server.py)."""
    from redis_server import RedisServer

    with RedisServer() as r:
        yield r


@pytest.fixture
def prefix(request):
    """A key prefix of the test's own, for tests that share a server."""
    return "t" + str(abs(hash(request.node.name)) % 10**9)
