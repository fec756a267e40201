"""LSH banding: which (bands, rows) catch near duplicates at the threshold.

Two documents of Jaccard j share at least one of b bands of r rows with probability
1 - (1 - j^r)^b. `dedup.bands: auto` / `rows: auto` take the largest r, then the fewest b, for
which that probability at the threshold is at least RECALL with b x r <= permutations: the most
selective banding (fewest false candidates for the exact-Jaccard check to drop) that still
finds RECALL of the pairs at the threshold, and more of those above it. SlimPajama's 9 x 13 finds
40% of the pairs at J 0.8; at threshold 0.8 with 128 permutations `auto` gives 17 x 7 (0.982).
Pure arithmetic: the recipe resolves it when it is validated.
"""

from __future__ import annotations

import math

RECALL = 0.98


def collision_probability(j: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard j share at least one band: 1 - (1 - j^r)^b."""
    return 1.0 - (1.0 - j**rows) ** bands


def bands_for(threshold: float, rows: int, recall: float = RECALL, most: int = 1 << 20) -> int:
    """The fewest bands of `rows` rows that find `recall` of the pairs at the threshold (a number
    above `most` when more than `most` would be needed)."""
    p = threshold**rows
    if p >= 1.0:
        return 1
    if p <= 0.0:
        return 1 << 62  # never fits
    b = max(1, math.ceil(math.log1p(-recall) / math.log1p(-p)))
    while b <= most and collision_probability(threshold, b, rows) < recall:  # float rounding at the boundary
        b += 1
    return b


def auto_banding(threshold: float, permutations: int, bands: int | None = None, rows: int | None = None,
                 recall: float = RECALL) -> tuple[int, int]:
    """(bands, rows) for the threshold: the given one(s) kept, the other(s) chosen (see above).

    ValueError when no banding within `permutations` reaches `recall` at the threshold."""
    if bands is not None and rows is not None:
        return bands, rows
    candidates = [rows] if rows is not None else range(permutations, 0, -1)
    for r in candidates:
        b = bands_for(threshold, r, recall, most=permutations // r)
        if bands is not None:
            if bands < b:
                continue
            b = bands
        if b * r <= permutations:
            return int(b), int(r)
    raise ValueError(f"no banding of {permutations} permutations finds {recall:.0%} of the pairs at "
                     f"threshold {threshold}" + (f" with {bands} bands" if bands is not None else "")
                     + (f" with {rows} rows" if rows is not None else "")
                     + "; raise dedup.permutations (or dedup.threshold)")
