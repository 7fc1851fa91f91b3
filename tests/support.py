"""Real gateways for tests: `fastfeed serve` as a subprocess on a free port.

The processes live in `fixtures` (shared with `bench/`); this module keeps
the names the tests import, and the protocol's merge rule.
"""

from __future__ import annotations

from fixtures import (
    Gateway,
    free_port,
    http_get,
    running_gateway,
    start_gateway,
    stop_process,
    until,
)

__all__ = ["Gateway", "free_port", "http_get", "merge", "running_gateway", "start_gateway",
           "stop_process", "until"]


def merge(ref: dict, ticks: list[dict]) -> None:
    """The protocol's rule: a newer seq wins, fields a tick leaves out keep their value."""
    for t in ticks:
        held = ref.get(t["sym"])
        if held is None:
            ref[t["sym"]] = dict(t)
        elif t["seq"] > held["seq"]:
            held.update(t)
