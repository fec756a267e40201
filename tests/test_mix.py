"""pipeline/mix.py: weights and a budget -> mixture.json (exact sample counts, warnings, refusals)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
from conftest import ROOT
from spec_readers import spec_read_megatron

from pipeline.formats.manifest import (
    ShardEntry,
    TokenizerInfo,
    load_mixture,
    make_manifest,
    mixture_fingerprint,
)
from pipeline.layout import RunDir
from pipeline.mix import MixError, largest_remainder, plan_mixture, stage
from pipeline.recipe import load_recipe

RECIPE = str(ROOT / "recipes" / "sample.yaml")


def fake_manifest(tokens: dict[str, list[int]]):
    shards = [ShardEntry(path=f"shards/{src}/train/{i:06d}-0000", source=src, split="train", docs=1, tokens=n,
                         dtype="uint16", bin_sha256=hashlib.sha256(f"{src}/{i}/{n}".encode()).hexdigest(), idx_sha256="0" * 64,
                         bin_bytes=2 * n)
              for src, ns in tokens.items() for i, n in enumerate(ns)]
    m = make_manifest(TokenizerInfo("tokenizer.model", "1" * 64, 4000, 1, 2), True, False, "uint16", shards)
    return m, json.dumps(m.to_json()).encode()


def recipe(*sets: str):
    return load_recipe(RECIPE, list(sets))


def test_largest_remainder_is_exact():
    assert largest_remainder([0.5, 0.5], 3) == [2, 1]  # a tie goes to the earlier source
    w = [0.693584, 0.306416]
    for total in (1, 7, 1000, 1_430_512 * 1024):
        got = largest_remainder(w, total)
        assert sum(got) == total and all(abs(g - x * total) < 1 for g, x in zip(got, w))


def test_explicit_weights_and_budget():
    m, raw = fake_manifest({"slimpajama": [600_000, 400_001], "starcoderdata": [300_000]})
    r = recipe("mix.seq_len=1000", "mix.token_budget=2500000", "mix.seed=5", "mix.max_epochs=2")
    mix = plan_mixture(r, m, raw)
    assert mix.total_samples == 2500 == sum(s.samples for s in mix.sources)
    slim, star = mix.sources
    assert math.isclose(slim.weight + star.weight, 1.0) and math.isclose(slim.weight, 0.693584)
    assert (slim.samples, star.samples) == (1734, 766)  # 0.693584 * 2500 = 1733.96
    assert slim.available_tokens == 1_000_001 and slim.samples_per_epoch == 1000  # (1_000_001 - 1) // 1000
    assert star.samples_per_epoch == 299 and math.isclose(star.epochs, 766 / 299)
    assert slim.tokens == 1734 * 1000 and slim.shards == ["shards/slimpajama/train/000000-0000",
                                                          "shards/slimpajama/train/000001-0000"]
    assert len(mix.warnings) == 1 and "starcoderdata" in mix.warnings[0] and "mix.max_epochs = 2" in mix.warnings[0]
    train_sha = [s.bin_sha256 for s in m.shards]
    assert mix.fingerprint == mixture_fingerprint(train_sha, {"slimpajama": slim.weight, "starcoderdata": star.weight},
                                                  1000, 5)
    assert plan_mixture(recipe("mix.seq_len=1000", "mix.token_budget=2500000", "mix.seed=6"), m, raw).fingerprint \
        != mix.fingerprint
    m2, raw2 = fake_manifest({"slimpajama": [600_000, 400_001], "starcoderdata": [300_001]})
    assert plan_mixture(r, m2, raw2).fingerprint != mix.fingerprint


def test_proportional_weights_and_one_epoch_when_no_budget():
    m, raw = fake_manifest({"slimpajama": [700_001], "starcoderdata": [300_001]})
    mix = plan_mixture(recipe("mix.seq_len=100", "mix.weights=proportional", "mix.token_budget=null"), m, raw)
    slim, star = mix.sources
    assert math.isclose(slim.weight, 0.7, rel_tol=1e-5)
    # no budget: the largest plan in which no source repeats (here: exactly one epoch of both)
    assert (slim.samples, star.samples) == (7000, 3000) and mix.token_budget == 10000 * 100
    assert slim.epochs == star.epochs == 1.0 and not mix.warnings
    # explicit weights that favour the smaller source: it limits the plan to one epoch of itself
    mix = plan_mixture(recipe("mix.seq_len=100", "mix.token_budget=null", "sources[0].weight=1", "sources[1].weight=1"), m, raw)
    assert [s.samples for s in mix.sources] == [3001, 3000] and mix.sources[1].epochs == 1.0  # 6002 would repeat
    assert all(s.samples <= s.samples_per_epoch for s in mix.sources)


def test_impossible_plans_are_refused_with_a_reason():
    m, raw = fake_manifest({"slimpajama": [1_000_000], "starcoderdata": [1000]})
    with pytest.raises(MixError, match=r"source 'starcoderdata' has 1,000 train tokens, fewer than one sample of "
                                       r"seq_len \+ 1 = 2,049"):
        plan_mixture(recipe("mix.seq_len=2048"), m, raw)
    m, raw = fake_manifest({"slimpajama": [1_000_000]})
    with pytest.raises(MixError, match="'starcoderdata' has 0 train tokens"):
        plan_mixture(recipe(), m, raw)
    m, raw = fake_manifest({"slimpajama": [1_000_000], "starcoderdata": [1_000_000]})
    with pytest.raises(MixError, match=r"sources\[1\].weight is not set"):
        plan_mixture(recipe("sources[1].weight=null"), m, raw)


def test_sample_mixture_follows_the_stream_contract(reference):
    run = reference[0]
    mix = load_mixture(str(run))  # validated, and checked against manifest.json
    r = load_recipe(RECIPE)
    assert mix.seq_len == r.mix.seq_len and mix.total_samples == math.ceil(r.mix.token_budget / mix.seq_len)
    for s in mix.sources:
        stream = np.concatenate([d for p in s.shards for d in spec_read_megatron(run / p)])
        assert len(stream) == s.available_tokens
        last = s.samples_per_epoch - 1  # the last sample of an epoch fits, one more would not
        assert last * mix.seq_len + mix.seq_len + 1 <= len(stream) < (last + 1) * mix.seq_len + mix.seq_len + 1
    assert {w.split(":")[0] for w in mix.warnings} <= {"source slimpajama", "source starcoderdata"}


def test_a_manifest_from_another_tokenizer_is_refused(reference, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference[0] / "manifest.json", run / "manifest.json")
    (run / "tokenizer.model").write_bytes(b"another model")
    with pytest.raises(MixError, match=r"tokenized with tokenizer.model \(sha256 [0-9a-f]{12}\), but the recipe's "
                                       r"tokenizer .* has sha256 [0-9a-f]{12}; rerun the tokenize stage"):
        stage.plan(load_recipe(RECIPE, output=str(run)), RunDir(str(run)))
    (run / "manifest.json").unlink()
    with pytest.raises(MixError, match="manifest.json: missing; run the tokenize stage first"):
        stage.plan(load_recipe(RECIPE, output=str(run)), RunDir(str(run)))
