"""Real gateways for tests: `fastfeed serve` as a subprocess on a free port.

The processes live in `fixtures` (shared with `bench/`); this module keeps
the names the tests import, and the protocol's merge rule.
"""

from __future__ import annotations

import random
import time
from typing import Any

from fixtures import (
    Gateway,
    free_port,
    http_get,
    running_gateway,
    start_gateway,
    stop_process,
    until,
)

from fastfeed.client import Row
from fastfeed.protocol import FIELDS

__all__ = ["Feed", "Gateway", "as_row", "free_port", "http_get", "merge", "running_gateway",
           "start_gateway", "stop_process", "until"]


def merge(ref: dict, ticks: list[dict]) -> None:
    """The protocol's rule: a newer seq wins, fields a tick leaves out keep their value."""
    for t in ticks:
        held = ref.get(t["sym"])
        if held is None:
            ref[t["sym"]] = dict(t)
        elif t["seq"] > held["seq"]:
            held.update(t)


def as_row(t: dict[str, Any]) -> Row:
    """A merged tick as the client's `Row` (left-out values are 0)."""
    return Row(t["sym"], t["seq"], t.get("ts", 0), *[float(t.get(f, 0.0)) for f in FIELDS[3:]])


class Feed:
    """Partial ticks with increasing seq per symbol; the truth, and its history:
    `history[sym][seq]` is the instrument's whole row once that tick applied."""

    def __init__(self, seed: int = 3) -> None:
        self.rng = random.Random(seed)
        self.seq: dict[str, int] = {}
        self.ref: dict[str, dict[str, Any]] = {}
        self.history: dict[str, dict[int, Row]] = {}

    def ticks(self, syms: list[str]) -> list[dict[str, Any]]:
        out = []
        for s in syms:
            self.seq[s] = self.seq.get(s, 0) + self.rng.randint(1, 3)
            t = {"sym": s, "seq": self.seq[s], "ts": time.time_ns()}
            for f in FIELDS[3:]:
                if s not in self.ref or self.rng.random() < 0.5:
                    t[f] = round(self.rng.uniform(1, 1e4), 2)
            out.append(t)
            merge(self.ref, [t])
            self.history.setdefault(s, {})[t["seq"]] = as_row(self.ref[s])
        return out

    def truth(self) -> dict[str, Row]:
        return {s: as_row(t) for s, t in self.ref.items()}
