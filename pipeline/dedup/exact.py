"""Exact duplicates: a 128-bit hash of each document's text, and the star of every bucket.

The same bucket machinery serves exact dedup (key: the text hash) and LSH bands (key: a band
key): the records of a hash-range partition are sorted by (key, node); every record whose key
equals the previous one links to the first record of its bucket (the bucket's smallest node, the
survivor's candidate). A bucket of n documents yields n - 1 edges, never n(n-1)/2.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import xxhash

from .shuffle import U64


def text_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash high words, hash low words, UTF-8 byte lengths) of a string column, without decoding it."""
    texts = texts.cast(pa.large_string()) if texts.type != pa.large_string() else texts
    n = len(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + n + 1]
    data = texts.buffers()[2]
    mv = memoryview(data) if data is not None else memoryview(b"")
    digest = xxhash.xxh3_128_intdigest
    h = [digest(mv[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    hi = np.fromiter((x >> 64 for x in h), dtype=np.uint64, count=n)
    lo = np.fromiter((x & 0xFFFFFFFFFFFFFFFF for x in h), dtype=np.uint64, count=n)
    return hi, lo, np.diff(offsets).astype(np.uint64)


def bucket_stars(keys: list[np.ndarray], hi: np.ndarray, lo: np.ndarray):
    """Star edges of buckets of equal keys: (member hi, member lo, hub hi, hub lo), members > hub.

    `keys` are the bucket key columns, most significant first. The hub of a bucket is its
    smallest node in node order (source priority, then id).
    """
    if not len(hi):
        e = np.empty(0, U64)
        return e, e, e, e
    order = np.lexsort([lo, hi, *reversed(keys)])
    ks = [k[order] for k in keys]
    shi, slo = hi[order], lo[order]
    new = np.zeros(len(shi), dtype=bool)
    new[0] = True
    for k in ks:
        new[1:] |= k[1:] != k[:-1]
    first = np.maximum.accumulate(np.where(new, np.arange(len(shi)), 0))
    member = ~new
    hub = first[member]
    # the same node twice in a bucket (cannot happen for distinct documents) is not an edge
    keep = (shi[member] != shi[hub]) | (slo[member] != slo[hub])
    m = np.flatnonzero(member)[keep]
    h = hub[keep]
    return shi[m], slo[m], shi[h], slo[h]
