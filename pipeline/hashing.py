"""64-bit mixing shared by ids, holdout, MinHash and the loader's permutations.

`splitmix64` is SplitMix64's finalizer: a bijection of uint64 that mixes every input bit into
every output bit (wrapping arithmetic). Document ids, the holdout draw, MinHash's hash family
and the Feistel rounds of the loader's permutation all use it; their outputs are on disk or
decide samples, so this function must never change.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
MASK64 = (1 << 64) - 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: SplitMix64's increment


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over a uint64 array; returns a new array."""
    x = np.asarray(x, dtype=np.uint64)
    x = x ^ (x >> _S30)  # a new array: the caller's is never modified
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def splitmix64_int(x: int) -> int:
    """splitmix64 of one Python int (taken mod 2**64)."""
    return int(splitmix64(np.array([x & MASK64], dtype=np.uint64))[0])
