"""MinHash signatures, vectorized: shingle hashing, one-permutation hashing, densification, bands.

Per document the cost is O(shingles), not O(shingles x permutations):

* Normalization (SlimPajama's: lowercase, drop ASCII punctuation, collapse whitespace) is the
  same function as `pipeline.text.slimpajama_normalize`, so the planted Jaccard values are the
  ones this module measures.
* Shingle hashing works on a whole batch of documents at once. A 13-character shingle of a
  Latin-1 text is 13 bytes; its hash combines the two overlapping little-endian 64-bit words at
  offsets 0 and 5, read through a stride-1 view of the batch's bytes (no per-shingle Python).
  Shingles with characters above U+00FF use a polynomial hash of the code points (prefix sums);
  a shingle always gets the same hash whichever document it comes from.
* One Permutation Hashing (Li, Owen, Zhang 2012): the 64-bit shingle hash picks one of
  `permutations` bins (its top bits) and each bin keeps the minimum hash. Empty bins are filled
  by optimal densification (Shrivastava 2017): bin j copies the first non-empty bin of a fixed
  probe sequence (16 pseudo-random bins, then j+1, j+2, ... cyclically). For every bin,
  Pr[sig_A[j] == sig_B[j]] = J(A, B), so LSH banding keeps its guarantees.
* A band key is a 64-bit mix of its `rows` values.

Word n-gram shingles (datatrove's style) hash each word, then combine n consecutive word hashes.
The exact shingle-set Jaccard used to verify candidate pairs uses the same shingle hashes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from ..hashing import GOLDEN, splitmix64, splitmix64_int
from ..text import PUNCT_BYTES

EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # an empty OPH bin
_U64 = np.uint64
_GOLDEN = GOLDEN
_PROBES = 16  # pseudo-random probes of the densification before the cyclic scan



def mulhi(x: np.ndarray, n: int) -> np.ndarray:
    """Map uint64 hashes to [0, n) by their top 32 bits (monotone in x): a hash-range partition."""
    return ((x >> _U64(32)) * _U64(n)) >> _U64(32)


# ASCII whitespace that bytes.split() does not split on but str.split() does
_ASCII_SPACE_TABLE = bytes(0x20 if c in (0x1C, 0x1D, 0x1E, 0x1F) else c for c in range(256))


def normalize_fast(text: str) -> bytes | str:
    """slimpajama_normalize(text), as ASCII bytes when it is ASCII (what the shingler wants).

    Deleting ASCII punctuation from UTF-8 bytes is exact and much faster than str.translate.
    """
    low = text.lower()
    if low.isascii():
        return b" ".join(low.encode("ascii").translate(_ASCII_SPACE_TABLE, PUNCT_BYTES).split())
    return " ".join(low.encode("utf-8", "surrogatepass").translate(None, PUNCT_BYTES)
                    .decode("utf-8", "surrogatepass").split())


@dataclass(frozen=True)
class MinHashParams:
    shingle: str = "chars"  # "chars" | "words"
    shingle_size: int = 13
    normalize: str = "slimpajama"  # "slimpajama" | "none"
    permutations: int = 128
    bands: int = 9
    rows: int = 13
    seed: int = 1

    @classmethod
    def from_config(cls, cfg) -> "MinHashParams":
        return cls(cfg.shingle, cfg.shingle_size, cfg.normalize, cfg.permutations, cfg.bands, cfg.rows, cfg.seed)

    def normalized(self, text: str) -> str | bytes:
        """The text the shingles are taken from (ASCII bytes or str: the shingler takes both)."""
        return normalize_fast(text) if self.normalize == "slimpajama" else text


def _constants(seed: int, n: int, salt: int) -> np.ndarray:
    """n odd 64-bit multipliers derived from (seed, salt)."""
    base = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN + _U64(splitmix64_int(seed * 0x1000193 + salt))
    return splitmix64(base) | _U64(1)


class Shingler:
    """Shingle hashes of batches of (normalized) texts."""

    def __init__(self, params: MinHashParams):
        self.p = params
        n = params.shingle_size
        self.n = n
        seed = params.seed
        self.seed_word = _U64(splitmix64_int(seed ^ 0x5EED))
        if n <= 8:
            self.offsets = [0]
        else:
            self.offsets = list(range(0, n - 8, 8)) + [n - 8]
        self.word_mask = _U64((1 << (8 * n)) - 1) if n < 8 else None
        self.mults = _constants(seed, max(len(self.offsets), n) + 2, 1)
        self.poly_base = self.mults[-1]
        self.salt_poly = _U64(splitmix64_int(seed + 0xC0DE))
        self.salt_short = splitmix64_int(seed + 0x5407) & 0xFFFFFFFFFFFFFFFF

    # -- single shingle kinds ------------------------------------------------------------------

    def _short(self, text: str) -> int:
        """The one shingle of a non-empty text shorter than the shingle size (the text itself)."""
        return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), self.salt_short)

    def _byte_windows(self, buf: np.ndarray, count: int) -> np.ndarray:
        """Hashes of the `count` windows of n bytes starting at 0..count-1 of `buf` (padded by 8)."""
        view = np.ndarray(shape=(len(buf) - 7,), dtype=np.uint64, buffer=buf, offset=0, strides=(1,))
        acc = None
        for j, o in enumerate(self.offsets):
            w = view[o:o + count]
            if self.word_mask is not None:
                w = w & self.word_mask
            if acc is None:
                acc = (w ^ self.seed_word) * self.mults[0]
            else:
                acc ^= w
                acc *= self.mults[j]
        # one xorshift-multiply round: the top bits (OPH bin) and the order of values depend on every input bit
        acc ^= acc >> _U64(29)
        acc *= self.mults[-2]
        acc ^= acc >> _U64(32)
        return acc

    def _poly_windows(self, codes: np.ndarray, count: int) -> np.ndarray:
        """Polynomial hashes of n consecutive code points (for shingles beyond Latin-1)."""
        n = self.n
        m = len(codes)
        with np.errstate(over="ignore"):
            powers = _powers(int(self.poly_base), m)  # B^1..B^m
            inv = _powers(pow(int(self.poly_base), -1, 1 << 64), m)  # B^-1..B^-m
            pref = np.zeros(m + 1, dtype=np.uint64)
            np.cumsum(codes.astype(np.uint64) * powers, out=pref[1:])
            win = (pref[n:n + count] - pref[:count]) * inv[:count]
        return splitmix64(win ^ self.salt_poly)

    # -- batches ------------------------------------------------------------------------------

    def hashes(self, texts: list[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes, index of the text each belongs to) of already normalized texts.

        A text is a str, or bytes holding ASCII. Hashes may repeat within a text (a multiset);
        MinHash and set operations do not care.
        """
        if self.p.shingle == "words":
            return self._word_hashes([t.decode("ascii") if isinstance(t, bytes) else t for t in texts])
        n = self.n
        byte_idx, byte_parts, wide_idx, wide_parts, out_h, out_d = [], [], [], [], [], []
        for i, t in enumerate(texts):
            if not t:
                continue
            if len(t) < n:
                out_h.append(np.array([self._short(t if isinstance(t, str) else t.decode("ascii"))],
                                      dtype=np.uint64))
                out_d.append(np.array([i], dtype=np.int64))
                continue
            if isinstance(t, bytes):
                byte_idx.append(i)
                byte_parts.append(t)
                continue
            if t.isascii():
                byte_idx.append(i)
                byte_parts.append(t.encode("ascii"))
                continue
            try:
                b = t.encode("latin-1")
            except UnicodeEncodeError:
                wide_idx.append(i)
                wide_parts.append(t)
                continue
            byte_idx.append(i)
            byte_parts.append(b)
        if byte_parts:
            h, d = self._byte_batch(byte_parts, byte_idx)
            out_h.append(h)
            out_d.append(d)
        if wide_parts:
            h, d = self._wide_batch(wide_parts, wide_idx)
            out_h.append(h)
            out_d.append(d)
        if not out_h:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        if len(out_h) == 1:
            return out_h[0], out_d[0]
        return np.concatenate(out_h), np.concatenate(out_d)

    def _byte_batch(self, parts: list[bytes], idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of byte texts (each at least n bytes), concatenated without separators."""
        n = self.n
        lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        buf = np.frombuffer(b"".join(parts) + b"\0" * 8, dtype=np.uint8)
        count = int(lens.sum()) - n + 1
        h = self._byte_windows(buf, count)
        valid, doc = self._valid_windows(lens, count, idx)
        return h[valid], doc[valid]

    def _valid_windows(self, lens: np.ndarray, count: int, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(mask of windows inside one text, index of the text of every window), texts concatenated."""
        n = self.n
        doc = np.repeat(np.asarray(idx, dtype=np.int64), lens)[:count]
        valid = np.ones(count, dtype=bool)
        if n > 1:
            bad = (np.cumsum(lens)[:, None] - np.arange(1, n, dtype=np.int64)[None, :]).ravel()
            valid[bad[(bad >= 0) & (bad < count)]] = False
        return valid, doc

    def _wide_batch(self, parts: list[str], idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Shingle hashes of texts with characters above U+00FF (each at least n characters).

        A window of Latin-1 characters hashes exactly as in _byte_batch; one with a wider
        character gets the polynomial hash of its code points.
        """
        n = self.n
        codes = np.frombuffer("".join(parts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        count = len(codes) - n + 1
        low = np.empty(len(codes) + 8, np.uint8)
        low[:len(codes)] = codes & 0xFF
        low[len(codes):] = 0
        byte_h = self._byte_windows(low, count)
        wide = np.zeros(len(codes) + 1, dtype=np.int64)
        np.cumsum(codes > 0xFF, out=wide[1:])
        has_wide = (wide[n:n + count] - wide[:count]) > 0
        h = np.where(has_wide, self._poly_windows(codes, count), byte_h)
        valid, doc = self._valid_windows(lens, count, idx)
        return h[valid], doc[valid]

    def _word_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        seed = self.salt_short
        toks, lens, idx, out_h, out_d = [], [], [], [], []
        for i, t in enumerate(texts):
            if not t:
                continue
            words = t.split()
            if len(words) < n:
                out_h.append(np.array([self._short(t)], dtype=np.uint64))
                out_d.append(np.array([i], dtype=np.int64))
                continue
            toks.extend(xxhash.xxh3_64_intdigest(w.encode("utf-8", "surrogatepass"), seed) for w in words)
            lens.append(len(words))
            idx.append(i)
        if toks:
            t_arr = np.array(toks, dtype=np.uint64)
            lens_a = np.array(lens, dtype=np.int64)
            count = len(t_arr) - n + 1
            acc = (t_arr[:count] ^ self.seed_word) * self.mults[0]
            for j in range(1, n):
                acc ^= t_arr[j:j + count]
                acc *= self.mults[j]
            h = splitmix64(acc ^ _U64(0x3D0 + n))
            ends = np.cumsum(lens_a)
            doc = np.repeat(np.asarray(idx, dtype=np.int64), lens_a)[:count]
            valid = np.ones(count, dtype=bool)
            bad = (ends[:, None] - np.arange(1, n, dtype=np.int64)[None, :]).ravel()
            valid[bad[(bad >= 0) & (bad < count)]] = False
            out_h.append(h[valid])
            out_d.append(doc[valid])
        if not out_h:
            return np.empty(0, np.uint64), np.empty(0, np.int64)
        return np.concatenate(out_h), np.concatenate(out_d)

    def shingle_set(self, text: str) -> np.ndarray:
        """Sorted distinct shingle hashes of one raw text (normalized as configured)."""
        h, _ = self.hashes([self.p.normalized(text)])
        return np.unique(h)


_POW_CACHE: dict[int, np.ndarray] = {}


def _powers(base: int, m: int) -> np.ndarray:
    """base^1 .. base^m modulo 2**64 (cached, grown by doubling)."""
    cached = _POW_CACHE.get(base)
    if cached is None or len(cached) < m:
        size = max(m, 1 << 16, 2 * (len(cached) if cached is not None else 0))
        with np.errstate(over="ignore"):
            cached = np.cumprod(np.full(size, base, dtype=np.uint64))
        _POW_CACHE[base] = cached
    return cached[:m]


# ---------------------------------------------------------------------------------------------
# One permutation hashing with densification


def _probe_table(k: int, seed: int) -> np.ndarray:
    """(k, _PROBES) pseudo-random bins each bin probes first when it is empty."""
    j = np.arange(k, dtype=np.uint64)[:, None] * _U64(_PROBES) + np.arange(_PROBES, dtype=np.uint64)[None, :]
    return mulhi(splitmix64(j + _U64(splitmix64_int(seed + 0xD3))), k).astype(np.int64)


class Signer:
    """MinHash signatures (one permutation hashing + densification) and LSH band keys."""

    def __init__(self, params: MinHashParams):
        self.p = params
        self.k = params.permutations
        self.probes = _probe_table(self.k, params.seed)
        self.band_mults = _constants(params.seed, params.bands * params.rows, 2).reshape(params.bands, params.rows)
        self.band_salt = splitmix64(np.arange(params.bands, dtype=np.uint64) + _U64(splitmix64_int(params.seed + 0xBA)))

    def signatures(self, h: np.ndarray, doc: np.ndarray, ndocs: int) -> np.ndarray:
        """(ndocs, k) uint64 signatures; rows of documents without shingles are all EMPTY."""
        k = self.k
        sig = np.full(ndocs * k, EMPTY, dtype=np.uint64)
        if len(h):
            if k & (k - 1) == 0:  # a power of two: the top bits
                key = (h >> _U64(64 - (k.bit_length() - 1))).astype(np.int64) if k > 1 else np.zeros(len(h), np.int64)
            else:
                key = mulhi(h, k).astype(np.int64)
            key += doc * k
            np.minimum.at(sig, key, h)
        sig = sig.reshape(ndocs, k)
        self._densify(sig)
        return sig

    def _densify(self, sig: np.ndarray) -> None:
        filled = sig != EMPTY
        nonempty = filled.any(axis=1)
        rows, cols = np.nonzero(~filled & nonempty[:, None])
        if not len(rows):
            return
        orig = sig.copy()
        for a in range(_PROBES):
            src = self.probes[cols, a]
            ok = filled[rows, src]
            sig[rows[ok], cols[ok]] = orig[rows[ok], src[ok]]
            rows, cols = rows[~ok], cols[~ok]
            if not len(rows):
                return
        # the rest scan cyclically: bin j takes the first filled bin among j+1, j+2, ...
        for r in np.unique(rows):
            have = np.nonzero(filled[r])[0]
            want = cols[rows == r]
            nxt = have[np.searchsorted(have, want, side="right") % len(have)]
            sig[r, want] = orig[r, nxt]

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(ndocs, bands) uint64 band keys."""
        b, r = self.p.bands, self.p.rows
        with np.errstate(over="ignore"):
            view = sig[:, : b * r].reshape(len(sig), b, r)
            acc = (view * self.band_mults[None, :, :]).sum(axis=2, dtype=np.uint64)
        return splitmix64(acc ^ self.band_salt[None, :])


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard_sets(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard of two sorted arrays of distinct hashes (1.0 for two empty sets, like sample.jaccard)."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
