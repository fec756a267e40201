"""dedup.bands / rows: auto: the most selective banding that finds 98% of the pairs at the threshold."""

from __future__ import annotations

import pytest

from pipeline.dedup.banding import RECALL, auto_banding, collision_probability
from pipeline.recipe import RecipeError, parse_recipe


def _brute_force(t: float, perms: int) -> tuple[int, int]:
    """Every (b, r) with b x r <= perms that reaches the recall: the largest r, then the fewest b."""
    ok = [(b, r) for r in range(1, perms + 1) for b in range(1, perms // r + 1)
          if collision_probability(t, b, r) >= RECALL]
    r = max(r for _, r in ok)
    return min(b for b, rr in ok if rr == r), r


@pytest.mark.parametrize("t", [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
@pytest.mark.parametrize("perms", [64, 128, 256])
def test_auto_is_the_most_selective_banding_that_reaches_the_recall(t, perms):
    b, r = auto_banding(t, perms)
    assert b * r <= perms and collision_probability(t, b, r) >= RECALL
    assert (b, r) == _brute_force(t, perms)


def test_slimpajamas_banding_misses_pairs_auto_does_not():
    assert collision_probability(0.8, 9, 13) < 0.5  # SlimPajama's 9 x 13 at its own threshold
    assert auto_banding(0.8, 128) == (17, 7)


def test_one_side_given_the_other_is_chosen_and_impossible_is_an_error():
    assert auto_banding(0.8, 128, rows=6) == (13, 6)
    assert auto_banding(0.8, 128, bands=21) == (21, 6)
    with pytest.raises(ValueError, match="no banding of 4 permutations"):
        auto_banding(0.3, 4)


def _recipe(**dedup):
    return parse_recipe({"name": "x", "output": "/tmp/x", "sources": [{"name": "a", "urls": ["a/*"]}], "dedup": dedup})


def test_the_recipe_resolves_auto_and_keeps_explicit_values():
    assert (_recipe().dedup.bands, _recipe().dedup.rows) == (17, 7)  # the default is auto
    assert (lambda d: (d.bands, d.rows))(_recipe(threshold=0.9).dedup) == auto_banding(0.9, 128)
    assert (lambda d: (d.bands, d.rows))(_recipe(bands=9, rows=13).dedup) == (9, 13)  # SlimPajama's, kept
    with pytest.raises(RecipeError, match="dedup"):
        _recipe(bands="auto", rows="auto", permutations=4, threshold=0.3)
