"""Speed of the simulator: quote ticks generated per second, alone and with
the order books that follow them (`fastfeed.feed.bookgen`).

    python -m bench.sim_bench                      # this tree
    python -m bench.sim_bench --before /tmp/old    # and an older src/ tree, in the same run

`--before DIR` is a `src` directory of another commit with its compiled core
(e.g. ``git archive OLD src | tar -x -C /tmp/old`` and copy
``src/fastfeed/_*.so`` in); its `Simulator` is timed interleaved with this
one's, so the ratio holds on a busy machine. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1]) if sys.argv[1] != "-" else None
from fastfeed.feed.simulator import Simulator
n, rate, steps, books = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
sim = Simulator(n, rate, seed=1)
gen = None
if books:
    from fastfeed.feed.bookgen import BookGen
    gen = BookGen(sim.symbols, seed=1)
out = sim.step(0.005)
if gen is not None:
    gen.step(*out)
t = time.perf_counter(); ticks = 0
for _ in range(steps):
    out = sim.step(0.005)
    ticks += len(out[0])
    if gen is not None:
        gen.step(*out)
print(ticks / (time.perf_counter() - t))
"""


def one(src: str, args: argparse.Namespace, books: bool) -> float:
    # a fresh interpreter each time: the two trees' modules never mix
    r = subprocess.run([sys.executable, "-c", CHILD, src, str(args.instruments), str(args.rate),
                        str(args.steps), "1" if books else "0"],
                       capture_output=True, text=True, check=True)
    return float(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instruments", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=50000.0, help="ticks per second simulated")
    ap.add_argument("--steps", type=int, default=1000, help="5 ms steps per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default="", help="an older src/ tree to compare with")
    args = ap.parse_args(argv)
    importlib.import_module("fastfeed.feed.simulator")  # fail early if this tree is broken
    cases = [("quotes", "-", False), ("quotes + books", "-", True)]
    if args.before:
        cases.insert(0, ("quotes, before", args.before, False))
    res: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    t0 = time.monotonic()
    for _ in range(args.repeats):
        for name, src, books in cases:
            res[name].append(one(src, args, books))
    print(f"simulator, {args.instruments} instruments, {args.rate:g} ticks/s simulated, "
          f"{args.steps} steps of 5 ms, median of {args.repeats} "
          f"({time.monotonic() - t0:.0f} s):")
    base = statistics.median(res[cases[0][0]])
    for name, vals in res.items():
        med = statistics.median(vals)
        print(f"  {name:16s} {med:12,.0f} ticks/s generated  ({med / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
