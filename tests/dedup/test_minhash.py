"""Signature math: normalization, shingle hashing, one-permutation MinHash, bands, components."""

from __future__ import annotations

import random
import re
import string

import numpy as np
import pytest

from pipeline import sample
from pipeline.dedup import components as cc
from pipeline.dedup.banding import collision_probability
from pipeline.dedup.exact import bucket_stars
from pipeline.dedup.minhash import (
    MinHashParams,
    Shingler,
    Signer,
    estimate_jaccard,
    jaccard_sets,
    normalize_fast,
)
from pipeline.hashing import splitmix64
from pipeline.text import slimpajama_normalize

ALPHABET = list("abcXYZ .,;!?-_'\"\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2000\u3000éÉİßſ’“日本語Ω")
WORDS = ["alpha", "beta", "café", "Zürich", "日本", "naïve", "gamma", "delta", "x", "y", "—", "“q”", "ÿ", "Ā",
         "Hello,", "WORLD!"]


def _reference_normalize(text: str) -> str:
    """SlimPajama's normalization written independently: regex whitespace, str.translate."""
    return re.sub(r"\s+", " ", text.lower().translate(str.maketrans("", "", string.punctuation))).strip()


def test_normalization_is_slimpajamas():
    rng = random.Random(1)
    for _ in range(5000):
        t = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        got = normalize_fast(t)
        assert (got.decode() if isinstance(got, bytes) else got) == _reference_normalize(t), repr(t)
        assert slimpajama_normalize(t) == _reference_normalize(t), repr(t)


@pytest.mark.parametrize("n", [13, 5, 8, 16, 1])
def test_shingle_sets_and_exact_jaccard_match_the_reference(n):
    """Every shingle is hashed the same way whatever the text around it (ASCII, Latin-1 or wider)."""
    rng = random.Random(n)
    sh = Shingler(MinHashParams(shingle_size=n))
    for _ in range(300):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))
        b = a + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 10)))
        if rng.random() < 0.5:
            b = b.replace("café", "cafe").replace("日本", "ÿÿ")
        sa, sb = sh.shingle_set(a), sh.shingle_set(b)
        assert len(sa) == len(sample.shingles(a, n)) and len(sb) == len(sample.shingles(b, n))
        assert jaccard_sets(sa, sb) == pytest.approx(sample.jaccard(a, b, n), abs=1e-12)


def test_texts_shorter_than_a_shingle_have_one_shingle_and_empty_texts_none():
    sh = Shingler(MinHashParams())
    h, d = sh.hashes([b"", "short text", "", "exactly 13 ch", "Zürich"])
    assert sorted(d.tolist()) == [1, 3, 4]
    assert len(set(h.tolist())) == 3


def test_word_shingles():
    sh = Shingler(MinHashParams(shingle="words", shingle_size=5))
    text = "one two three four five six seven eight"
    assert len(sh.shingle_set(text)) == 4
    assert len(sh.shingle_set("only three words")) == 1
    a, b = "a b c d e f g h i j", "a b c d e f g h i k"
    assert jaccard_sets(sh.shingle_set(a), sh.shingle_set(b)) == pytest.approx(5 / 7)


def _random_pair(rng, j_target):
    base = rng.sample(range(1 << 40), rng.randint(200, 2000))
    k = len(base)
    # |A & B| / |A | B| = j  with A = base, B = first m of base + extra
    m = int(round(j_target * k))
    extra = [x + (1 << 41) for x in rng.sample(range(1 << 40), max(0, int(m / j_target) - k))] if j_target else []
    a, b = set(base), set(base[:m]) | set(extra)
    return a, b, len(a & b) / len(a | b)


def test_one_permutation_minhash_estimates_jaccard_without_bias():
    rng = random.Random(7)
    sg = Signer(MinHashParams(permutations=128, bands=21, rows=6))
    errors = []
    for _ in range(300):
        a, b, j = _random_pair(rng, rng.uniform(0.2, 0.95))
        ha = splitmix64(np.array(sorted(a), np.uint64))
        hb = splitmix64(np.array(sorted(b), np.uint64))
        sig = sg.signatures(np.concatenate([ha, hb]), np.r_[np.zeros(len(ha), int), np.ones(len(hb), int)], 2)
        errors.append(estimate_jaccard(sig[0], sig[1]) - j)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.01  # standard error of the mean is about 0.0025
    assert errors.std() < 0.055  # binomial: sqrt(J(1-J)/128) <= 0.044


def test_densification_keeps_small_sets_comparable():
    """Sets much smaller than the number of bins: empty bins are filled consistently."""
    sg = Signer(MinHashParams(permutations=128))
    h = splitmix64(np.arange(1, 11, dtype=np.uint64))
    sig = sg.signatures(np.concatenate([h, h[:9]]), np.r_[np.zeros(10, int), np.ones(9, int)], 3)
    assert (sig[2] == np.iinfo(np.uint64).max).all()  # no shingles: no signature
    assert not (sig[:2] == np.iinfo(np.uint64).max).any()
    assert 0.6 < estimate_jaccard(sig[0], sig[1]) < 1.0


def test_lsh_collision_rate_follows_the_s_curve():
    rng = random.Random(3)
    params = MinHashParams(permutations=128, bands=9, rows=13)
    sg = Signer(params)
    for j_target, lo, hi in ((0.8, 0.25, 0.55), (0.95, 0.97, 1.0), (0.5, 0.0, 0.02)):
        hits = 0
        trials = 150
        for _ in range(trials):
            a, b, j = _random_pair(rng, j_target)
            ha, hb = splitmix64(np.array(sorted(a), np.uint64)), splitmix64(np.array(sorted(b), np.uint64))
            keys = sg.band_keys(sg.signatures(np.concatenate([ha, hb]),
                                              np.r_[np.zeros(len(ha), int), np.ones(len(hb), int)], 2))
            hits += bool((keys[0] == keys[1]).any())
        assert lo <= hits / trials <= hi, (j_target, hits / trials, collision_probability(j_target, 9, 13))


def test_a_bucket_of_n_identical_keys_gives_n_minus_1_edges():
    n = 10_000
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 4, n).astype(np.uint64)
    lo = rng.integers(0, 2**63, n).astype(np.uint64)
    key = np.zeros(n, np.uint64)
    uhi, ulo, vhi, vlo = bucket_stars([key], hi, lo)
    assert len(uhi) == n - 1
    first = np.lexsort([lo, hi])[0]
    assert (vhi == hi[first]).all() and (vlo == lo[first]).all()


def _union_find_leaves(nodes_hi, nodes_lo, a, b):
    n = len(nodes_hi)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a, b):
        parent[find(x)] = find(y)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    out = {}
    for members in groups.values():
        m = min(members, key=lambda i: (int(nodes_hi[i]), int(nodes_lo[i])))
        for i in members:
            if i != m:
                out[(int(nodes_hi[i]), int(nodes_lo[i]))] = (int(nodes_hi[m]), int(nodes_lo[m]))
    return out


def test_large_star_small_star_rounds_find_the_components_and_their_minimum():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n, m = int(rng.integers(2, 300)), int(rng.integers(1, 400))
        nhi = rng.integers(0, 3, n).astype(np.uint64)
        nlo = rng.choice(np.arange(1 << 20, dtype=np.uint64), n, replace=False)
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        leaves, _ = cc.components_in_memory(*cc.both_directions(nhi[a], nlo[a], nhi[b], nlo[b]))
        got = {(int(h), int(lo)): (int(h2), int(l2)) for h, lo, h2, l2 in zip(*leaves)}
        assert got == _union_find_leaves(nhi, nlo, a, b)
    # a long path (the worst case for label propagation) converges in few rounds
    n = 20_000
    hi = np.zeros(n, np.uint64)
    lo = rng.permutation(n).astype(np.uint64)
    leaves, rounds = cc.components_in_memory(*cc.both_directions(hi[:-1], lo[:-1], hi[1:], lo[1:]))
    assert len(leaves[0]) == n - 1 and (leaves[3] == 0).all() and rounds <= 40
