"""Latency histograms: the Python mirror of the bucket layout in
`bench/loadgen/_client.pyx` (microseconds; exact below 64 us, then 32
sub-buckets per power of two, about 3 % wide). Histograms travel as
{bucket index: count} and merge by adding counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

LINEAR = 64
SUB_BITS = 5
SUB = 32


def bucket_of(lat_ns: int) -> int:
    if lat_ns <= 0:
        return 0
    v = lat_ns // 1000
    if v < LINEAR:
        return v
    e = v.bit_length() - 1
    return LINEAR + (e - 6) * SUB + ((v >> (e - SUB_BITS)) - SUB)


def bounds_us(i: int) -> tuple[float, float]:
    """[low, high) of bucket i, in microseconds."""
    if i < LINEAR:
        return float(i), float(i + 1)
    e = (i - LINEAR) // SUB + 6
    m = (i - LINEAR) % SUB + SUB
    shift = e - SUB_BITS
    return float(m << shift), float((m + 1) << shift)


def merge(hists: Iterable[Mapping]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            k = int(k)
            out[k] = out.get(k, 0) + int(v)
    return out


def count(h: Mapping[int, int]) -> int:
    return sum(h.values())


def percentile(h: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) in milliseconds, at the middle of its bucket."""
    n = count(h)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i in sorted(h):
        seen += h[i]
        if seen >= rank:
            lo, hi = bounds_us(i)
            return (lo + hi) / 2 / 1000.0
    lo, hi = bounds_us(max(h))
    return (lo + hi) / 2 / 1000.0


def cdf(h: Mapping[int, int]) -> tuple[list[float], list[float]]:
    """(latency ms at each bucket's top, cumulative share) for plotting."""
    n = count(h)
    xs, ys = [], []
    seen = 0
    for i in sorted(h):
        seen += h[i]
        xs.append(bounds_us(i)[1] / 1000.0)
        ys.append(seen / n)
    return xs, ys
