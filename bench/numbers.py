"""Float <-> text in the core: JSON rows written and JSON ticks parsed, per second.

    python -m bench.numbers format        # rows encoded (Table.rows_json) per second
    python -m bench.numbers parse         # ticks parsed and applied (TickParser) per second
    valgrind --tool=callgrind python -m bench.numbers format 10   # instructions: repeatable

Prices are IDX-like short decimals (two places), sizes whole numbers: what
the integer fast paths in the core are for. Under callgrind, read the
inclusive count of `rows_json` or `TickParser.parse` (callgrind_annotate
--inclusive=yes) and divide by the rows or ticks (2,000 per round).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fastfeed import _core
from fastfeed._tickjson import TickParser

N = 2000


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "format"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    rng = np.random.default_rng(1)
    table = _core.Table()
    ids = np.array([table.intern_symbol(f"S{i:04d}") for i in range(N)], np.int32)
    base = np.round(rng.lognormal(7.5, 1.0, N))

    def vals() -> np.ndarray:
        v = np.empty((N, 7))
        v[:, 0] = base + np.round(rng.random(N) * 100) / 100
        v[:, 1] = v[:, 0] + 0.25
        v[:, 2] = v[:, 0]
        v[:, 3:6] = rng.integers(1, 10000, (N, 3))
        v[:, 6] = rng.integers(1, 10**9, N)
        return v

    if what == "format":
        steps = [vals() for _ in range(rounds)]
        idl = ids.tolist()
        t0 = time.perf_counter()
        for r in range(rounds):
            table.apply_arrays(ids, np.full(N, r + 1, np.int64), np.zeros(N, np.int64), steps[r])
            table.rows_json(idl)
        print(f"format: {rounds * N / (time.perf_counter() - t0) / 1e6:.2f}M rows/s")
        return
    msgs = []
    for r in range(rounds):
        v = vals()
        ticks = [b'{"sym":"S%04d","seq":%d,"ts":%d,"bid":%.2f,"ask":%.2f,"last":%.2f,'
                 b'"bid_size":%d,"ask_size":%d,"last_size":%d,"volume":%d}'
                 % (i, r + 1, 1_700_000_000_000_000_000 + i, *v[i, :3], *v[i, 3:].astype(int))
                 for i in range(N)]
        msgs.append(b"[" + b",".join(ticks) + b"]")
    parser = TickParser()
    t0 = time.perf_counter()
    for m in msgs:
        parser.parse(m)
        parser.apply(table)
    print(f"parse: {rounds * N / (time.perf_counter() - t0) / 1e6:.2f}M ticks/s")


if __name__ == "__main__":
    main()
