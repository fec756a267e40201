"""A histogram of non-negative integers (document lengths) that merges like the other counters.

Bins are fixed for all time, so histograms of different tasks, shards or runs merge by adding
counts (`merge_counts`): the result, and every quantile read from it, does not depend on how the
values were split or in which order the parts were merged. A bin is [edge_i, edge_{i+1}) over
`EDGES`: every integer below 16, then 8 bins per doubling (edges ceil(2**(k/8)): a bin is
about 9% wide). The histogram
is a plain dict `{"<lower edge, 10 digits>": count}`, with the exact `count`, `sum`, `min` and
`max` kept beside it in `LengthStats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import merge_counts

BINS_PER_DOUBLING = 8
EXACT_BELOW = 16
MAX_VALUE = 1 << 48


def _edges() -> np.ndarray:
    edges = set(range(EXACT_BELOW))
    k = BINS_PER_DOUBLING * 4  # 2 ** (k / 8) == 16
    while (e := math.ceil(2.0 ** (k / BINS_PER_DOUBLING))) <= MAX_VALUE:
        edges.add(e)
        k += 1
    return np.array(sorted(edges), dtype=np.int64)


EDGES = _edges()


def bin_key(lower_edge: int) -> str:
    return f"{int(lower_edge):010d}"


def bin_range(key: str) -> tuple[int, int]:
    """[lo, hi) of the bin with this key."""
    lo = int(key)
    i = int(np.searchsorted(EDGES, lo))
    if i >= len(EDGES) or EDGES[i] != lo:
        raise ValueError(f"{key!r} is not a bin of the length histogram")
    return lo, int(EDGES[i + 1]) if i + 1 < len(EDGES) else MAX_VALUE


def histogram(values: np.ndarray) -> dict[str, int]:
    """Counts per bin of integer values (>= 0)."""
    v = np.asarray(values, dtype=np.int64)
    if not v.size:
        return {}
    if v.min() < 0 or v.max() >= MAX_VALUE:
        raise ValueError("histogram values must be in [0, 2**48)")
    idx = np.searchsorted(EDGES, v, side="right") - 1
    found, counts = np.unique(idx, return_counts=True)
    return {bin_key(EDGES[i]): int(c) for i, c in zip(found.tolist(), counts.tolist())}


QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class LengthStats:
    """count, sum, min, max (exact) and the binned histogram of a set of lengths."""

    count: int = 0
    sum: int = 0
    min: int | None = None
    max: int | None = None
    bins: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, values: np.ndarray) -> "LengthStats":
        v = np.asarray(values, dtype=np.int64)
        if not v.size:
            return cls()
        return cls(int(v.size), int(v.sum()), int(v.min()), int(v.max()), histogram(v))

    def merge(self, other: "LengthStats") -> "LengthStats":
        def pick(f, a, b):
            return b if a is None else a if b is None else f(a, b)

        return LengthStats(self.count + other.count, self.sum + other.sum, pick(min, self.min, other.min),
                           pick(max, self.max, other.max), merge_counts(self.bins, other.bins))

    def quantile(self, q: float) -> float | None:
        """The q-quantile, interpolated inside its bin and clamped to [min, max] (None when empty).

        The value of rank ceil(q * count) lies in a known bin; within it the ranks are taken as
        spread evenly. A pure function of the counts, so equal histograms give equal quantiles.
        """
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for key in sorted(self.bins):
            c = self.bins[key]
            if seen + c >= rank:
                lo, hi = bin_range(key)
                value = lo if hi - lo == 1 else lo + (hi - lo) * (rank - seen - 0.5) / c
                return float(min(max(value, self.min), self.max))
            seen += c
        return float(self.max)

    def to_json(self) -> dict:
        return {
            "count": self.count, "sum": self.sum, "min": self.min, "max": self.max,
            "mean": round(self.sum / self.count, 3) if self.count else None,
            "quantiles": {f"p{round(q * 100):02d}": (round(v, 1) if (v := self.quantile(q)) is not None else None)
                          for q in QUANTILES},
            "histogram": dict(sorted(self.bins.items())),
        }
