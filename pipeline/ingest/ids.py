"""Stable 64-bit document ids: a function of (source, input file, row), nothing else.

Ids do not depend on task splits, retries or worker counts; dedup, tokenize and the shards key
documents by them, so the definition below must never change.
"""

from __future__ import annotations

from hashlib import blake2b

import numpy as np

from ..hashing import GOLDEN, splitmix64


def file_key(source: str, rel_path: str) -> int:
    """blake2b-64 (little-endian) of "source/rel_path"."""
    return int.from_bytes(blake2b(f"{source}/{rel_path}".encode(), digest_size=8).digest(), "little")


def document_ids(source: str, rel_path: str, rows) -> np.ndarray:
    """Ids of records `rows` of one file, vectorized (see document_id)."""
    with np.errstate(over="ignore"):
        r = np.asarray(rows, dtype=np.uint64)
        return splitmix64(np.uint64(file_key(source, rel_path)) + (r + np.uint64(1)) * GOLDEN)


def document_id(source: str, rel_path: str, row: int) -> int:
    """Stable 64-bit id of record `row` (0-based) of an input file.

    splitmix64(K + (row + 1) * 0x9E3779B97F4A7C15 mod 2**64), where K is blake2b-64
    (little-endian) of "source/rel_path". Distinct rows of a file never collide (the map is a
    bijection), and the ids do not depend on splits, retries or worker counts.
    """
    return int(document_ids(source, rel_path, [row])[0])
