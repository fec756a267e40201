"""A keyed bijection of [0, n): the per-epoch shuffle of a source without a stored permutation.

A 4-round Feistel network over the smallest even number of bits that holds n - 1, with
splitmix64's finalizer as the round function, and cycle walking: values that land in
[n, 2^bits) are permuted again until they fall inside [0, n). Every round is invertible, so the
whole map is a bijection of [0, 2^bits), and cycle walking restricts it to a bijection of [0, n)
(the walk from x in [0, n) stays on x's cycle, which returns to [0, n)). 2^bits < 4 n, so a walk
takes under 4 steps on average. Vectorized over numpy arrays: a batch of positions costs a few
dozen array operations, and a position's image needs no state besides the key.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..hashing import splitmix64

ROUNDS = 4
def derive_keys(*parts: object) -> np.ndarray:
    """ROUNDS 64-bit round keys from any printable parts (seed, source, epoch...)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8 * ROUNDS).digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


class FeistelPermutation:
    """perm(x) for x in [0, n): a bijection chosen by `keys` (see derive_keys)."""

    def __init__(self, n: int, keys: np.ndarray):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits & 1
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(k) for k in keys[:ROUNDS]]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (splitmix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The images of positions x (int array, every value in [0, n)) as int64."""
        y = self._rounds(np.asarray(x, dtype=np.uint64))
        n = np.uint64(self.n)
        out = np.flatnonzero(y >= n)
        while out.size:
            z = self._rounds(y[out])
            y[out] = z
            out = out[z >= n]
        return y.astype(np.int64)
