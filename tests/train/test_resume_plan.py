"""Resuming checks the plan a checkpoint was trained on (loader.plan_record in its meta.json)
against this run's, field by field: a change that alters a sample to come is refused in one line
naming it, one that does not (a validation setting, a re-planned mixture whose batches are the same)
resumes. The mixture fingerprint alone misses a re-run of `mix` with another token budget: same
shards, weights, seq_len and seed, other per-source sample counts, hence other batches.

One real checkpoint (two steps of the tiny model in this process), copied for each case.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
import synthetic
import yaml
from conftest import one_line, tinyprep

from pipeline.formats.manifest import load_manifest, load_plan
from pipeline.recipe import parse_recipe
from pipeline.train.loader import MixtureIndex, plan_changes
from pipeline.train.trainer import TrainError, prepare, train

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ, GB = 256, 32, 8
BUDGET = 100 * SEQ  # 100 samples: web 70, code 30
WEIGHTS = {"web": 0.7, "code": 0.3}
TRAIN = {"model": "tiny", "global_batch": GB, "micro_batch": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1,
         "eval_every": 0, "checkpoint_every": 2, "nproc": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe_dict(run: Path, token_budget: int = BUDGET, seed: int = 42, **train) -> dict:
    return {"name": "resume-plan", "output": str(run),
            "sources": [{"name": n, "urls": ["unused"], "weight": w} for n, w in WEIGHTS.items()],
            "mix": {"seq_len": SEQ, "seed": seed, "token_budget": token_budget}, "train": {**TRAIN, **train}}


def _recipe(run: Path, token_budget: int = BUDGET, seed: int = 42, **train):
    return parse_recipe(_recipe_dict(run, token_budget, seed, **train))


def _replan(run: Path, token_budget: int = BUDGET, seed: int = 42) -> None:
    """Re-run the mix stage's planner over the same shards (mixture.json rewritten)."""
    synthetic.plan(str(run), load_manifest(str(run)), WEIGHTS, SEQ, seed=seed, token_budget=token_budget)


def _ck(run: Path) -> Path:
    return run / "train" / "checkpoints" / "step-00000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plan") / "run"
    rng = np.random.default_rng(5)
    sources = {"web": {"train": [synthetic.documents(rng, 60, VOCAB, 50) for _ in range(2)]},
               "code": {"train": [synthetic.documents(rng, 50, VOCAB, 40)]}}
    synthetic.write_run(str(d), sources, WEIGHTS, seq_len=SEQ, vocab=VOCAB, token_budget=BUDGET)
    train(_recipe(d))
    assert _ck(d).is_dir()
    return d


@pytest.fixture
def run(trained, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    return d


def _refs(run: Path, batches: int) -> np.ndarray:
    """(source, sample) of the global samples of the batches after the checkpoint's two."""
    refs = MixtureIndex(load_plan(str(run))[1], GB).refs(2 * GB, (2 + batches) * GB)
    return np.stack([refs.source, refs.sample])


def test_another_token_budget_is_refused_in_one_line_naming_what_changed(run):
    before, refs = load_plan(str(run))[1], _refs(run, 20)
    _replan(run, token_budget=125 * SEQ)  # 125 samples: web 87 or 88, code 38 or 37
    after = load_plan(str(run))[1]
    assert after.fingerprint == before.fingerprint  # what the fingerprint alone let through
    assert not np.array_equal(_refs(run, 20), refs)  # the batches to come differ
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run, token_budget=125 * SEQ))
    was, now = before.source("web").samples, after.source("web").samples
    code = (before.source("code").samples, after.source("code").samples)
    one_line(e, f"{_ck(run)}: step 2 was trained on a different plan: source 'web' samples {was} -> {now}, "
              f"source 'code' samples {code[0]} -> {code[1]} (mix.token_budget {BUDGET:,} -> {125 * SEQ:,}); "
              "to resume, re-run mix with the original settings, or start over with --fresh")
    assert prepare(_recipe(run, token_budget=125 * SEQ), fresh=True).resume is None  # --fresh starts over


@pytest.mark.slow  # a fresh interpreter importing torch: about 10 s on a loaded machine
def test_the_cli_refuses_with_one_error_line_and_no_traceback(run):
    _replan(run, token_budget=125 * SEQ)
    recipe = run.parent / "train.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_dict(run, token_budget=125 * SEQ)))
    metrics = (run / "train" / "metrics.jsonl").read_bytes()
    proc = tinyprep("train", str(recipe), cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "trained on a different plan: source 'web' samples 70 -> " in errors[0], errors[0]
    assert (run / "train" / "metrics.jsonl").read_bytes() == metrics  # a refused run changes nothing


def test_settings_outside_the_plan_resume(run):
    plan = prepare(_recipe(run, max_steps=4, eval_every=1, eval_samples=2, log_every=3, checkpoint_every=1,
                           lr=1e-2, warmup_steps=0, keep_checkpoints=5, nproc=2, micro_batch=2))
    assert plan.resume == str(_ck(run)) and not plan.done


def test_a_replanned_mixture_with_the_same_batches_resumes(run):
    """Twice the budget plans exactly twice the samples of each source: every source's share of a
    batch, hence every batch, is the same, so the run goes on (now towards 25 steps)."""
    refs = _refs(run, 40)
    _replan(run, token_budget=2 * BUDGET)
    assert [s.samples for s in load_plan(str(run))[1].sources] == [140, 60]
    assert np.array_equal(_refs(run, 40), refs)
    plan = prepare(_recipe(run, token_budget=2 * BUDGET, max_steps=None))
    assert plan.resume == str(_ck(run)) and plan.max_steps == 25


def test_another_global_batch_is_refused(run):
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run, global_batch=16))
    one_line(e, "different plan: train.global_batch 8 -> 16; to resume, set train.global_batch back to 8, or "
                 "start over with --fresh")


def test_another_seed_is_refused(run):
    _replan(run, seed=43)
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run, seed=43))
    one_line(e, "trained on a different plan: mix.seed 42 -> 43;")


def test_a_checkpoint_without_a_plan_record_keeps_the_fingerprint_check(run):
    """Checkpoints written before the plan record: the mixture fingerprint (and global batch) only."""
    meta = orjson.loads((_ck(run) / "meta.json").read_bytes())
    del meta["plan"]
    (_ck(run) / "meta.json").write_bytes(orjson.dumps(meta))
    _replan(run, token_budget=125 * SEQ)
    assert prepare(_recipe(run, token_budget=125 * SEQ)).resume == str(_ck(run))
    _replan(run, seed=43)
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run, seed=43))
    one_line(e, "another mixture", "--fresh")


def test_a_malformed_plan_record_makes_the_checkpoint_damaged(run):
    synthetic.rewrite_json(str(_ck(run) / "meta.json"), lambda m: m["plan"]["sources"][0].pop("samples"))
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run))
    one_line(e, "damaged checkpoint", "'plan' is not a plan record of version 1", "--fresh")


# -- plan_changes on edited records ----------------------------------------------------------------

@pytest.fixture(scope="module")
def record(trained) -> dict:
    return orjson.loads((_ck(trained) / "meta.json").read_bytes())["plan"]


def _edited(record: dict, edit) -> dict:
    out = orjson.loads(orjson.dumps(record))
    edit(out)
    return out


def _shares(record: dict, web: int, code: int) -> dict:
    def edit(r):
        r["sources"][0]["samples"], r["sources"][1]["samples"] = web, code
    return _edited(record, edit)


def test_plan_changes_name_every_stream_field(record):
    assert plan_changes(record, record) == []
    cases = {
        "mix.seq_len 32 -> 64": lambda r: r.update(seq_len=64),
        "train.global_batch 8 -> 16": lambda r: r.update(global_batch=16),
        "sources ['web', 'code'] -> ['code', 'web']": lambda r: r["sources"].reverse(),
        "source 'code' train shards have other contents (1 shards, ": lambda r: r["sources"][1].update(
            shards_sha256="0" * 64),
        "source 'web' train shards 2 (": lambda r: r["sources"][0].update(shards=3, tokens=9_999,
                                                                          shards_sha256="1" * 64),
    }
    for phrase, edit in cases.items():
        changes = plan_changes(record, _edited(record, edit))
        assert len(changes) == 1 and changes[0].startswith(phrase), (phrase, changes)


def test_plan_changes_follow_the_shares_of_a_batch_not_the_raw_counts(record):
    assert plan_changes(record, _shares(record, 7, 3)) == []  # 70:30 as 7:3: the same batches
    changes = plan_changes(record, _shares(record, 71, 29))
    assert changes == [("source 'web' samples 70 -> 71, source 'code' samples 30 -> 29 "
                        "(mix.token_budget or the weights changed?)")]
    reweighted = _edited(_shares(record, 71, 29), lambda r: (r["sources"][0].update(weight=0.71),
                                                            r["sources"][1].update(weight=0.29)))
    assert plan_changes(record, reweighted) == [
        "source 'web' samples 70 -> 71 (weight 0.7 -> 0.71), source 'code' samples 30 -> 29 (weight 0.3 -> 0.29)"]
    # a weight whose planned counts did not move changes no batch
    assert plan_changes(record, _edited(record, lambda r: r["sources"][0].update(weight=0.7001))) == []
