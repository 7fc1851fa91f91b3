import asyncio
import pathlib
import sys
import threading

import pytest
import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).parent))

_loops: list[asyncio.AbstractEventLoop] = []


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = uvloop.new_event_loop()
    _loops[:] = [loop]
    return loop


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on uvloop, the loop the gateway runs on."""
    return {"uvloop": _new_loop}


def _print_tasks() -> None:
    print("~~~~~~~~ asyncio tasks, a few seconds before the timeout ~~~~~~~~")
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stdout)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """pytest-timeout dumps the threads, and a stuck async test's main thread
    only shows the loop: print what every task awaits just before it fires."""
    mark = item.get_closest_marker("timeout")
    timeout = float(mark.args[0] if mark and mark.args else item.config.getini("timeout") or 0)
    timer = None
    if timeout > 5:
        def dump() -> None:
            if _loops and _loops[0].is_running():
                _loops[0].call_soon_threadsafe(_print_tasks)
        timer = threading.Timer(timeout - 3, dump)
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer:
            timer.cancel()


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
