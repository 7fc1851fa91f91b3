import pathlib
import sys

import uvloop

sys.path.insert(0, str(pathlib.Path(__file__).parent))


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on uvloop, the loop the gateway runs on."""
    return {"uvloop": uvloop.new_event_loop}
