"""Random order-book messages for the book tests (the bus, the gateway)."""

from __future__ import annotations

import random

SYMS = [f"B{i:02d}" for i in range(12)]


class BookFeed:
    """Random book messages: full books, changes near the top, sweeps,
    levels beyond the kept maximum, and now and then a seq gap, a crossing
    change or a stale seq (the book goes stale and a later full book heals it).
    Without `faults`, none of those: every book stays good, so a gateway's
    book is the source's book exactly as long as it keeps every level.
    `full_rate` is the share of full books (each symbol's first message is one)."""

    def __init__(self, seed: int, syms: list[str] = SYMS, faults: bool = True,
                 full_rate: float = 0.08) -> None:
        self.rng = random.Random(seed)
        self.faults = faults
        self.full_rate = full_rate
        self.syms = syms
        self.seq = dict.fromkeys(syms, 0)
        self.mid = {s: 1000.0 + 100 * k for k, s in enumerate(syms)}

    def level(self, sym: str, side: int, k: int) -> list:
        p = self.mid[sym] + (-1 if side == 0 else 1) * (5 * (k + 1))
        return [p, float(self.rng.choice([0, 100, 200, 500, 1000])), self.rng.randint(0, 9)]

    def msgs(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            rng = self.rng
            s = rng.choice(self.syms)
            r = rng.random()
            if r < self.full_rate or self.seq[s] == 0:
                self.seq[s] += 1
                out.append({"type": "book", "sym": s, "seq": self.seq[s], "full": True,
                            "bids": [self.level(s, 0, k) for k in range(rng.randint(0, 14))],
                            "asks": [self.level(s, 1, k) for k in range(rng.randint(0, 14))]})
                continue
            if not self.faults and r < 0.15:
                r = 0.5  # a plain change instead of a gap, a repeated seq or a crossing
            if r < 0.11:
                self.seq[s] += 2  # a gap
            elif r < 0.13:
                pass  # a repeated seq: stale
            else:
                self.seq[s] += 1
            m: dict = {"type": "book", "sym": s, "seq": self.seq[s], "bids": [], "asks": []}
            if r > 0.99:  # a sweep through the bids
                m["bids"] = [[self.mid[s] - 5 * (k + 1), 0.0, 0] for k in range(8)]
            elif 0.13 <= r < 0.15:  # a bid through the asks: crosses
                m["bids"] = [[self.mid[s] + 50, 100.0, 1]]
            else:
                for _ in range(rng.randint(1, 4)):
                    side = rng.randint(0, 1)
                    k = min(int(rng.expovariate(0.5)), 16)  # most changes near the top
                    m["bids" if side == 0 else "asks"].append(self.level(s, side, k))
            out.append(m)
        return out
