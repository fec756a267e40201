"""The trainer (pipeline/train/trainer.py and its parts) on CPU with gloo: two processes per run.

One uninterrupted run through the CLI is the reference; a killed-and-resumed run, a run resumed on
one process instead of two, and FSDP2's gradients are compared with it. It logs every other step
(and each checkpoint's step): the records' "batches" hash every step all the same.
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
from pipeline.train.loader import plan_record
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
         "warmup_steps": 2, "log_every": 2, "eval_every": 4, "eval_samples": 6, "checkpoint_every": 3,
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


LOGGED = [1, 2, 3, 4, 6, 8]  # the first step, every log_every, every checkpoint_every, the last


def _by_step(records: list[dict], kind: str = "train") -> dict[int, dict]:
    """The record of each step, checking that no step is there twice."""
    steps = [r["step"] for r in records if r.get("kind") == kind]
    assert len(steps) == len(set(steps)), f"{kind} records of a step twice: {steps}"
    return {r["step"]: r for r in records if r.get("kind") == kind}


def _batch_hashes(records: list[dict]) -> dict[int, str]:
    """Every step's batch hash from the train records' "batches", checking that each step is in one."""
    out: dict[int, str] = {}
    for r in records:
        if r.get("kind") == "train":
            assert r["batches"][str(r["step"])] == r["batch"]
            for step, digest in r["batches"].items():
                assert int(step) not in out, f"step {step} hashed twice"
                out[int(step)] = digest
    return out


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
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(recipe)], cwd=ROOT, env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step      8/8" in p.stderr and "val loss" in p.stderr
    return read_metrics(Path(run_dir) / "reference")


def test_loss_falls(reference):
    steps = _by_step(reference)
    assert sorted(steps) == LOGGED
    hashes = _batch_hashes(reference)
    assert sorted(hashes) == list(range(1, 9)) and len(set(hashes.values())) == 8
    assert sorted(steps[6]["batches"]) == ["5", "6"] and sorted(steps[8]["batches"]) == ["7", "8"]
    assert all(r["world"] == 2 for r in steps.values())
    assert (steps[6]["loss"] + steps[8]["loss"]) / 2 < steps[1]["loss"] - 0.3
    evals = _by_step(reference, "eval")
    assert sorted(evals) == [4, 8] and evals[8]["val_loss"] < evals[4]["val_loss"]
    assert set(evals[8]["per_source"]) == {"web", "code"}
    # tokens consumed and epochs per source follow the plan's proportions
    src = steps[8]["sources"]
    assert src["web"]["tokens"] + src["code"]["tokens"] == 8 * 8 * SEQ
    assert src["web"]["samples"] in (44, 45) and src["web"]["epochs"] > 0
    assert steps[8]["tokens_per_s"] > 0 and steps[8]["mfu"] is None  # no peak FLOP/s known for a CPU
    assert all(0 <= r["data_wait"] < 1 for r in steps.values())


def test_kill_and_resume_gives_the_identical_loss_sequence(run_dir, reference, monkeypatch):
    """With a prefetch thread reading 2 batches ahead (the GPU default; the reference reads in the
    step): the checkpoint's position counts only the batches the steps took."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(FAULT_ENV, "exit-after-step:5")  # every rank dies after step 5 (checkpoint at 3)
    with pytest.raises(TrainError, match="a training process failed"):
        train(_recipe(run_dir, dir="killed", prefetch=2))
    assert [c.name for c in sorted((Path(run_dir) / "killed" / "checkpoints").iterdir())] == ["step-00000003"]
    before = read_metrics(Path(run_dir) / "killed")
    assert [(r["kind"], r["step"]) for r in before] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                        ("eval", 4)]
    monkeypatch.delenv(FAULT_ENV)
    train(_recipe(run_dir, dir="killed", prefetch=2))
    records = read_metrics(Path(run_dir) / "killed")
    # steps 4 and 5 ran twice (before the crash, and after resuming from step 3); logged once
    got, want = _by_step(records), _by_step(reference)
    assert sorted(got) == LOGGED
    assert sorted(_by_step(records, "eval")) == [4, 8]
    assert _batch_hashes(records) == _batch_hashes(reference)  # every step's batch, not only the logged ones
    for step in LOGGED:
        assert got[step]["batch"] == want[step]["batch"], step
        assert got[step]["loss"] == want[step]["loss"], step  # bit for bit
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step
    assert _by_step(records, "eval")[8]["val_loss"] == _by_step(reference, "eval")[8]["val_loss"]


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
    hashes = _batch_hashes(read_metrics(Path(run_dir) / "one"))
    assert hashes == {s: h for s, h in _batch_hashes(reference).items() if s > 6}
    assert got[7]["samples"] == 7 * 8 and got[8]["samples"] == want[8]["samples"] == 8 * 8
    assert got[8]["loss"] == pytest.approx(want[8]["loss"], rel=1e-5)


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
    with pytest.raises(TrainError, match="step 8 was trained on a different plan: mix.seed 42 -> 43"):
        prepare(_recipe(str(other), seed=43, dir="reference"))
    plan = prepare(_recipe(str(other), seed=43, dir="reference"), fresh=True)  # --fresh starts over
    assert plan.resume is None and not (other / "reference" / "checkpoints").exists()

    finished = train(_recipe(run_dir, dir="reference"))  # a rerun of a finished run does nothing
    assert finished.done and finished.resume.endswith("step-00000008")
    assert sorted(_by_step(read_metrics(Path(run_dir) / "reference"))) == LOGGED
    assert prepare(_recipe(run_dir, dir="reference", max_steps=10)).resume.endswith("step-00000008")


def test_checkpoints_record_the_plan(run_dir, reference):
    from pipeline.formats.manifest import load_plan
    from pipeline.train import checkpoint

    info = checkpoint.read_info(Path(run_dir) / "reference" / "checkpoints" / "step-00000008")
    manifest, mixture = load_plan(run_dir)
    assert info.meta["plan"] == plan_record(manifest, mixture, 8)
    assert [s["samples"] for s in info.meta["plan"]["sources"]] == [s.samples for s in mixture.sources]


# -- no host-device sync per step; MFU's peak by GPU name; metrics.jsonl cut back on resume -----------

def test_clip_gradients_returns_the_norm_as_a_tensor_and_clips_like_torch():
    from types import SimpleNamespace

    from pipeline.train.trainer import Trainer

    torch.manual_seed(0)
    model, twin = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 8)
    for m in (model, twin):
        (m(x) ** 2).sum().backward()
    norm = Trainer.clip_gradients(SimpleNamespace(model=model, cfg=SimpleNamespace(grad_clip=0.5)))
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and not norm.requires_grad
    assert norm.item() == pytest.approx(want.item()) and norm.item() > 0.5  # the norm before clipping
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


GPU_NAMES = {  # as torch.cuda.get_device_name reports them
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A800-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H800": 989e12, "NVIDIA H800 PCIe": 756e12, "NVIDIA B200": 2.25e15, "NVIDIA GB200": 2.5e15,
    "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
    "NVIDIA A10G": 70e12, "NVIDIA A40": 150e12, "NVIDIA RTX A6000": 155e12,
    "NVIDIA RTX 6000 Ada Generation": 364e12, "NVIDIA GeForce RTX 4090": 165e12,
    "NVIDIA GeForce RTX 3090": 71e12, "AMD Instinct MI300X": 1307e12,
}


def test_peak_flops_by_gpu_name(monkeypatch, caplog):
    import logging

    from pipeline.train import metrics

    name = {"value": ""}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name["value"])
    monkeypatch.setattr(metrics, "_warned", set())
    cuda = torch.device("cuda", 0)
    for gpu, peak in GPU_NAMES.items():
        name["value"] = gpu
        assert metrics.peak_flops(cuda, None) == peak, gpu
    assert metrics.peak_flops(cuda, 123e12) == 123e12  # train.peak_flops wins
    assert metrics.peak_flops(torch.device("cpu"), None) is None
    with caplog.at_level(logging.WARNING, logger="tinyprep"):
        for gpu in ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB", "NVIDIA GeForce GTX 1080"):
            name["value"] = gpu
            assert metrics.peak_flops(cuda, None) is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "V100" in warnings[0] and "train.peak_flops" in warnings[0], warnings


def test_metrics_are_cut_back_to_the_checkpoint_atomically(tmp_path):
    import orjson

    from pipeline.train.metrics import truncate_after

    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": s} for s in (1, 2, 3, 4)] + [{"kind": "eval", "step": 4}]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b'{"kind": "train", "st')  # cut short
    assert truncate_after(str(path), 4) == 1  # only the cut line goes
    assert truncate_after(str(path), 4) == 0
    assert truncate_after(str(path), 2) == 3
    assert [orjson.loads(line) for line in path.read_bytes().splitlines()] == records[:2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    assert truncate_after(str(tmp_path / "none.jsonl"), 3) == 0


def test_only_logging_steps_read_values_back_from_the_device(run_dir, monkeypatch):
    """On a GPU, reading a tensor's value on the host (item, tolist, float(), bool(), ...) waits for the
    device: the training loop does it on logged steps only (1, 3 and 6 here), once for the loss and
    gradient norm together. Counted on CPU by wrapping those methods for calls made from trainer.py."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls: list[tuple[str, str]] = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.endswith(os.path.join("train", "trainer.py")):
                calls.append((name, caller.co_name))
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train(_recipe(run_dir, dir="nosync", nproc=1, max_steps=6, log_every=3, eval_every=0, checkpoint_every=0))
    hashed = [c for c in calls if c[1] == "row_digests"]  # the loader's host copy of each batch
    assert hashed == [("numpy", "row_digests")] * 6
    assert [c for c in calls if c[1] != "row_digests"] == [("tolist", "fit")] * 3
    assert sorted(_by_step(read_metrics(Path(run_dir) / "nosync"))) == [1, 3, 6]
