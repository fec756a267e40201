"""Gradient accumulation without communication (Trainer.forward_backward under FSDP2, gloo on CPU).

Only the last micro-batch of a step reduce-scatters; the earlier ones accumulate unsharded
gradients on their rank. The gradient must stay the mean over the global batch: one step in four
micro-batches equals one step in one, on one rank and on two, and the two-rank gradients equal the
one-rank ones. Reduce-scatters are counted by wrapping torch.distributed's entry points, which
FSDP2 calls through the module (`dist.reduce_scatter_single` in this PyTorch), for every call made
on this rank while the step runs.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from pipeline.train import trainer as trainer_mod
from pipeline.train.distributed import launch
from pipeline.train.model import model_config
from pipeline.train.parallelize import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GLOBAL_BATCH, SEQ, VOCAB = 8, 32, 256


def _global_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


@contextlib.contextmanager
def _counting_reduce_scatters():
    """count[0]: reduce-scatter collectives started on this rank inside the block."""
    count = [0]
    saved = {}
    for name in ("reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter"):
        if hasattr(dist, name):
            saved[name] = original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                count[0] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    try:
        yield count
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _step(env, micro_batch: int) -> tuple[dict[str, torch.Tensor], int, list[bool]]:
    """One forward_backward of a fresh model over this rank's slice of the global batch: the full
    gradients, the reduce-scatters it started, and whether any sharded gradient existed before
    each micro-batch (FSDP2 sets them only when it reduces)."""
    model = build_model(model_config("tiny", vocab_size=VOCAB, max_seq_len=SEQ), env.device, env.world, seed=5)
    per_rank = GLOBAL_BATCH // env.world
    rows = _global_batch()[env.rank * per_rank:(env.rank + 1) * per_rank]
    trainer = SimpleNamespace(cfg=SimpleNamespace(micro_batch=micro_batch), accum=per_rank // micro_batch,
                              env=env, model=model, doc_ids=None)
    grads_before = []

    def lm_loss(model, tokens, doc_ids=None):
        grads_before.append(any(p.grad is not None for p in model.parameters()))
        return original_loss(model, tokens, doc_ids)

    original_loss = trainer_mod.lm_loss
    trainer_mod.lm_loss = lm_loss
    try:
        with _counting_reduce_scatters() as count:
            trainer_mod.Trainer.forward_backward(trainer, rows)
    finally:
        trainer_mod.lm_loss = original_loss
    groups = sum(isinstance(m, FSDPModule) for m in model.modules())
    assert groups == 3  # two blocks and the root (embedding, final norm, output head)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    return grads, count[0], grads_before


def _worker(env, out: str) -> None:
    results = {mb: _step(env, mb) for mb in (1, 4)}  # 4 micro-batches of 1 row, 1 of 4 rows
    if env.rank == 0:
        torch.save(results, out)


def _assert_same(got: dict, want: dict) -> None:
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_accumulating_four_micro_batches_gives_one_batchs_gradients_on_one_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "one.pt")

    def worker(env, out):
        torch.save({mb: _step(env, mb) for mb in (2, 8)}, out)

    launch(worker, (out,), 1, "cpu")  # one rank runs in this process
    results = torch.load(out)
    accumulated, count, grads_before = results[2]
    whole, _, _ = results[8]
    _assert_same(accumulated, whole)
    assert count == 0  # one rank: FSDP2 copies instead of reduce-scattering
    # no sharded gradient appears before the last micro-batch's backward: nothing was reduced
    assert grads_before == [False, False, False, False]
    assert all(g.abs().sum() > 0 for g in accumulated.values())


@pytest.mark.slow
def test_two_ranks_reduce_once_per_group_per_step_with_the_same_gradients(tmp_path, monkeypatch):
    """4 micro-batches on each of 2 ranks: 3 reduce-scatters (one per FSDP group), not 12, and the
    gradients of the whole global batch on one rank."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "two.pt")
    launch(_worker, (out,), 2, "cpu")
    results = torch.load(out)
    accumulated, count, grads_before = results[1]
    whole, count_whole, _ = results[4]
    assert count == count_whole == 3
    assert grads_before == [False, False, False, False]
    _assert_same(accumulated, whole)

    reference = str(tmp_path / "one.pt")
    launch(lambda env, out: torch.save(_step(env, 8), out), (reference,), 1, "cpu")
    one_rank, _, _ = torch.load(reference)
    _assert_same(accumulated, one_rank)
