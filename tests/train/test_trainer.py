"""The trainer (pipeline/train/trainer.py and its parts) on CPU with gloo: two processes per run.

One uninterrupted run through the CLI is the reference; a killed-and-resumed run, a run resumed on
one process instead of two, and FSDP2's gradients are compared with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import synthetic
import torch
import yaml

from pipeline.recipe import parse_recipe
from pipeline.train.distributed import launch
from pipeline.train.trainer import (
    FAULT_ENV,
    TrainError,
    lm_loss,
    prepare,
    read_metrics,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 256, 32
TRAIN = {"model": "tiny", "global_batch": 8, "micro_batch": 2, "max_steps": 8, "lr": 3e-3, "min_lr": 3e-4,
         "warmup_steps": 2, "log_every": 1, "eval_every": 4, "eval_samples": 6, "checkpoint_every": 3,
         "keep_checkpoints": 2, "nproc": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe_dict(run_dir: str, seed: int = 42, **train) -> dict:
    """The recipe of the synthetic run: its mix settings are those the run's mixture was planned with."""
    return {"name": "train-test", "output": run_dir,
            "sources": [{"name": "web", "urls": ["unused"], "weight": 0.7},
                        {"name": "code", "urls": ["unused"], "weight": 0.3}],
            "mix": {"seq_len": SEQ, "seed": seed, "token_budget": None},
            "train": {**TRAIN, **train}}


def _recipe(run_dir: str, seed: int = 42, **train):
    return parse_recipe(_recipe_dict(run_dir, seed, **train))


def _by_step(records: list[dict], kind: str = "train") -> dict[int, dict]:
    """The last record of each step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r for r in records if r.get("kind") == kind}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("train_run"))
    rng = np.random.default_rng(1)
    sources = {
        "web": {"train": [synthetic.documents(rng, 150, VOCAB, 60) for _ in range(2)],
                "validation": [synthetic.documents(rng, 12, VOCAB, 60)]},
        "code": {"train": [synthetic.documents(rng, 120, VOCAB, 40)],
                 "validation": [synthetic.documents(rng, 8, VOCAB, 40)]},
    }
    synthetic.write_run(d, sources, {"web": 0.7, "code": 0.3}, seq_len=SEQ, vocab=VOCAB)
    return d


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory) -> dict[int, dict]:
    """8 uninterrupted steps on 2 processes, started through the CLI as a user would."""
    recipe = tmp_path_factory.mktemp("recipe") / "train.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_dict(run_dir, dir="reference")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(recipe)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step      8/8" in p.stderr and "val loss" in p.stderr
    return read_metrics(Path(run_dir) / "reference")


def test_loss_falls(reference):
    steps = _by_step(reference)
    assert sorted(steps) == list(range(1, 9))
    assert all(r["world"] == 2 for r in steps.values())
    assert (steps[7]["loss"] + steps[8]["loss"]) / 2 < steps[1]["loss"] - 0.3
    evals = _by_step(reference, "eval")
    assert sorted(evals) == [4, 8] and evals[8]["val_loss"] < evals[4]["val_loss"]
    assert set(evals[8]["per_source"]) == {"web", "code"}
    # tokens consumed and epochs per source follow the plan's proportions
    src = steps[8]["sources"]
    assert src["web"]["tokens"] + src["code"]["tokens"] == 8 * 8 * SEQ
    assert src["web"]["samples"] in (44, 45) and src["web"]["epochs"] > 0
    assert steps[8]["tokens_per_s"] > 0 and steps[8]["mfu"] is None  # no peak FLOP/s known for a CPU


def test_kill_and_resume_gives_the_identical_loss_sequence(run_dir, reference, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(FAULT_ENV, "exit-after-step:5")  # every rank dies after step 5 (checkpoint at 3)
    with pytest.raises(TrainError, match="a training process failed"):
        train(_recipe(run_dir, dir="killed"))
    assert [c.name for c in sorted((Path(run_dir) / "killed" / "checkpoints").iterdir())] == ["step-00000003"]
    monkeypatch.delenv(FAULT_ENV)
    train(_recipe(run_dir, dir="killed"))
    got, want = _by_step(read_metrics(Path(run_dir) / "killed")), _by_step(reference)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["batch"] == want[step]["batch"], step
        assert got[step]["loss"] == want[step]["loss"], step  # bit for bit
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step
    assert _by_step(read_metrics(Path(run_dir) / "killed"), "eval")[8]["val_loss"] == \
        _by_step(reference, "eval")[8]["val_loss"]


def test_resume_on_another_world_size_continues_the_same_stream(run_dir, reference, monkeypatch):
    """The checkpoint of step 6 (2 processes) resumed on 1 process: the same global batches follow,
    and the same losses up to float summation order."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = Path(run_dir) / "reference" / "checkpoints" / "step-00000006"
    dst = Path(run_dir) / "one" / "checkpoints" / "step-00000006"
    shutil.copytree(src, dst)
    train(_recipe(run_dir, dir="one", nproc=1))
    got, want = _by_step(read_metrics(Path(run_dir) / "one")), _by_step(reference)
    assert sorted(got) == [7, 8] and all(got[s]["world"] == 1 for s in got)
    for step in (7, 8):
        assert got[step]["batch"] == want[step]["batch"]
        assert got[step]["samples"] == want[step]["samples"] == step * 8
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)


def _grad_worker(env, plan, out: str) -> None:
    from pipeline.train.trainer import Trainer

    trainer = Trainer(env, plan)
    batch = next(iter(trainer.loader))
    trainer.forward_backward(batch.tokens)
    grads = {name: p.grad.full_tensor() for name, p in trainer.model.named_parameters()}
    if env.rank == 0:
        torch.save(grads, out)
    trainer.close()


def test_fsdp_gradients_on_two_ranks_equal_single_process_gradients(run_dir, tmp_path, monkeypatch):
    """Catches gloo summing instead of averaging (pytorch#162338): the gradients of one step on two
    ranks with gradient accumulation equal those of one plain model on the whole global batch."""
    from pipeline.train.loader import MixtureLoader
    from pipeline.train.model import Llama

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = prepare(_recipe(run_dir, dir="grads", nproc=2))
    out = str(tmp_path / "grads.pt")
    launch(_grad_worker, (plan, out), 2, "cpu")
    fsdp = torch.load(out)

    model = Llama(plan.model)
    model.init_weights(plan.cfg.seed)
    tokens = next(iter(MixtureLoader(run_dir, plan.manifest, plan.mixture, 8))).tokens
    lm_loss(model, tokens).backward()
    for name, p in model.named_parameters():
        ratio = (fsdp[name].norm() / p.grad.norm()).item()
        assert ratio == pytest.approx(1.0, abs=1e-4), f"{name}: FSDP gradient is {ratio:.3f}x the reference"
        torch.testing.assert_close(fsdp[name], p.grad, rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_clear_errors(run_dir, reference, tmp_path):
    with pytest.raises(TrainError, match="not divisible by the world size 3"):
        prepare(_recipe(run_dir, dir="x"), nproc=3)
    with pytest.raises(TrainError, match="micro_batch 3"):
        prepare(_recipe(run_dir, dir="x", micro_batch=3))

    tampered = tmp_path / "tampered"
    shutil.copytree(run_dir, tampered, ignore=shutil.ignore_patterns("reference", "killed", "one", "grads"))
    synthetic.rewrite_json(str(tampered / "mixture.json"), lambda m: m.update(fingerprint="cd" * 32))
    with pytest.raises(TrainError, match="fingerprint: does not match the shards"):
        prepare(_recipe(str(tampered)))

    # another mixture (another seed) with the reference run's checkpoints
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("killed", "one", "grads"))
    from pipeline.formats.manifest import load_manifest

    synthetic.plan(str(other), load_manifest(str(other)), {"web": 0.7, "code": 0.3}, SEQ, seed=43)
    with pytest.raises(TrainError, match="another mixture"):
        prepare(_recipe(str(other), seed=43, dir="reference"))
    plan = prepare(_recipe(str(other), seed=43, dir="reference"), fresh=True)  # --fresh starts over
    assert plan.resume is None and not (other / "reference" / "checkpoints").exists()

    finished = train(_recipe(run_dir, dir="reference"))  # a rerun of a finished run does nothing
    assert finished.done and finished.resume.endswith("step-00000008")
    assert len(_by_step(read_metrics(Path(run_dir) / "reference"))) == 8
    assert prepare(_recipe(run_dir, dir="reference", max_steps=10)).resume.endswith("step-00000008")
