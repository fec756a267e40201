"""Counters that merge: nested dicts of integers, summed key by key.

Merging is associative and commutative, so the merged numbers do not depend on how many tasks
there were or in which order their results arrived.
"""

from __future__ import annotations

from typing import Any, Iterable


def merge_counts(a: dict, b: dict) -> dict:
    """Sum two nested count dicts (ints at the leaves) into a new dict with sorted keys."""
    out: dict[str, Any] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None:
            out[key] = _copy(y)
        elif y is None:
            out[key] = _copy(x)
        elif isinstance(x, dict) and isinstance(y, dict):
            out[key] = merge_counts(x, y)
        elif isinstance(x, int) and isinstance(y, int):
            out[key] = x + y
        else:
            raise TypeError(f"cannot merge {key!r}: {type(x).__name__} and {type(y).__name__}")
    return out


def merge_all(parts: Iterable[dict]) -> dict:
    out: dict = {}
    for p in parts:
        out = merge_counts(out, p)
    return out


def _copy(v: Any) -> Any:
    return merge_counts(v, {}) if isinstance(v, dict) else v

