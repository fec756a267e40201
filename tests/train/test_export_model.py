"""`tinyprep export-model --format hf` (pipeline/train/export.py): a trainer checkpoint loaded by
transformers' LlamaForCausalLM gives the trainer's logits; the tokenizer encodes like the run's
SentencePiece model.

The fast tests export a checkpoint that the Trainer saves in this process (a one-rank gloo group,
its FSDP2 model, weights perturbed so that no two norms are alike); the slow one trains two steps on
two processes and compares with the checkpoint loaded by the trainer on one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import synthetic
import torch
from conftest import ROOT, tinyprep

from pipeline.formats.manifest import TokenizerInfo, load_manifest
from pipeline.recipe import parse_recipe
from pipeline.train.distributed import launch
from pipeline.train.export import ModelExportError, export_hf, rope_interleaved_to_half
from pipeline.train.model import apply_rope, model_config, rope_tables
from pipeline.train.trainer import prepare, train

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

VOCAB, SEQ = 300, 32
# not the defaults: a config.json that drops them gives other logits
MODEL_ARGS = {"rope_base": 500000.0, "norm_eps": 1e-6}
STEP = 5
TEXTS = ["alpha beta gamma", " a leading space", "  two leading spaces", "tabs\tand\nnewlines\n\n end ",
         "digits 1234567 and 3.14", "héllo wörld ☃ 漢字 🙂", "model data prep pipeline shard mix train", ""]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(run: Path, **train):
    return parse_recipe({
        "name": "export-test", "output": str(run),
        "sources": [{"name": "web", "urls": ["unused"], "weight": 1.0}],
        "mix": {"seq_len": SEQ, "seed": 42, "token_budget": None},
        "train": {"model": "tiny", "model_args": MODEL_ARGS, "global_batch": 4, "micro_batch": 2, "max_steps": 2,
                  "lr": 1e-2, "warmup_steps": 1, "eval_every": 0, "nproc": 1, **train}})


def _batch() -> torch.Tensor:
    vocab = model_config("tiny", vocab_size=VOCAB).vocab_size  # padded: ids past the tokenizer's too
    return torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(3))


def _save_perturbed(env, plan, x: torch.Tensor, out: str) -> None:
    """The Trainer's model with every weight moved off its initialization, saved as the trainer
    saves it (at step STEP); its logits on x go to `out`."""
    from pipeline.train.trainer import Trainer

    trainer = Trainer(env, plan)
    try:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in trainer.model.parameters():
                local = p.to_local()  # one rank: the whole tensor
                local.add_(0.05 * torch.randn(local.shape, generator=g))
        trainer.step = STEP
        trainer.save()
        _save_logits(trainer, x, out)
    finally:
        trainer.close()


def _trainer_logits(env, plan, x: torch.Tensor, out: str) -> None:
    """The logits on x of the Trainer's model resumed from the plan's checkpoint."""
    from pipeline.train.trainer import Trainer

    trainer = Trainer(env, plan)
    try:
        _save_logits(trainer, x, out)
    finally:
        trainer.close()


def _save_logits(trainer, x: torch.Tensor, out: str) -> None:
    trainer.model.eval()
    with torch.no_grad():
        torch.save(trainer.model(x), out)  # causal attention, no document mask


def _hf_logits(out: Path, x: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A synthetic run tokenized (as manifest.json says) with a real 300-piece SentencePiece model."""
    from pipeline.tokenize.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("export") / "run"
    rng = np.random.default_rng(1)
    sources = {"web": {"train": [synthetic.documents(rng, 100, VOCAB, 60)],
                       "validation": [synthetic.documents(rng, 8, VOCAB, 60)]}}
    synthetic.write_run(str(d), sources, {"web": 1.0}, seq_len=SEQ, vocab=VOCAB)
    words = ["alpha", "beta", "gamma", "delta", "token", "model", "data", "prep", "pipeline", "shard", "mix",
             "train", "the", "a", "of", "and"]
    r = random.Random(0)
    corpus = d.parent / "corpus.txt"
    corpus.write_text("\n".join(" ".join(r.choice(words) for _ in range(60)) + " 1234 héllo" for _ in range(40)))
    train_tokenizer([str(corpus)], str(d / "tokenizer.model"), vocab_size=VOCAB)
    tok = TokenizerInfo("tokenizer.model", hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest(),
                        VOCAB, synthetic.BOS, synthetic.EOS)
    synthetic.plan(str(d), dataclasses.replace(load_manifest(str(d)), tokenizer=tok), {"web": 1.0}, SEQ)
    return d


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """(run, the Trainer's logits on _batch()) with the checkpoint of step STEP in RUN/train."""
    out = tmp_path_factory.mktemp("logits") / "trainer.pt"
    launch(_save_perturbed, (prepare(_recipe(run)), _batch(), str(out)), 1, "cpu")
    return run, torch.load(out)


@pytest.fixture(scope="module")
def exported(saved) -> tuple[Path, dict]:
    run, _ = saved
    summary = export_hf(str(run))
    return Path(summary["out"]), summary


def test_rope_permutation_turns_interleaved_pairs_into_hf_rotate_half():
    """apply_rope on interleaved pairs, then the row permutation, equals the permutation, then
    transformers' apply_rotary_pos_emb (rotate_half) with its own cos/sin tables."""
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = model_config("tiny", vocab_size=VOCAB, max_seq_len=SEQ, rope_base=500000.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, cfg.n_head, SEQ, cfg.head_dim, generator=g)
    k = torch.randn(2, cfg.n_kv_head, SEQ, cfg.head_dim, generator=g)
    cos, sin = rope_tables(cfg)

    def to_half(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, hd): permute each head's features
        b, h, t, hd = x.shape
        rows = x.permute(1, 3, 0, 2).reshape(h * hd, b * t)  # features as the rows of a projection
        return rope_interleaved_to_half(rows, h).reshape(h, hd, b, t).permute(2, 0, 3, 1)

    hf_cfg = transformers.LlamaConfig(hidden_size=cfg.dim, num_attention_heads=cfg.n_head,
                                      num_key_value_heads=cfg.n_kv_head, rope_theta=cfg.rope_base,
                                      max_position_embeddings=SEQ)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(q, torch.arange(SEQ)[None])
    hq, hk = apply_rotary_pos_emb(to_half(q), to_half(k), hf_cos, hf_sin)
    torch.testing.assert_close(hq, to_half(apply_rope(q, cos, sin)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hk, to_half(apply_rope(k, cos, sin)), rtol=1e-5, atol=1e-5)
    # and it is a permutation, not the identity
    w = torch.arange(cfg.n_head * cfg.head_dim, dtype=torch.float32)[:, None]
    perm = rope_interleaved_to_half(w, cfg.n_head)[:, 0].long()
    assert sorted(perm.tolist()) == list(range(len(perm))) and perm[1] == 2 and perm[cfg.head_dim // 2] == 1


def test_hf_model_gives_the_trainers_logits(saved, exported):
    run, want = saved
    out, summary = exported
    assert out == run / "train" / "export" / f"hf-step-{STEP}"
    got = _hf_logits(out, _batch())
    assert got.shape == want.shape == (3, SEQ, 320)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    _, loading = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 320 and cfg["tie_word_embeddings"] is False  # padded vocabulary, untied head
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 176, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (500000.0, 1e-6, SEQ)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    info = json.loads((out / "tinyprep-export.json").read_text())
    assert info["step"] == STEP and info["checkpoint"] == f"train/checkpoints/step-{STEP:08d}"
    assert info["parameters"] == summary["parameters"] == model_config("tiny", vocab_size=VOCAB).num_params()


def test_export_is_byte_identical_and_never_overwrites_unasked(saved, exported):
    run, _ = saved
    out, _ = exported
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ModelExportError, match="already holds files") as e:
        export_hf(str(run))
    assert e.value.code == 2
    (out / "notes.txt").write_text("mine")
    export_hf(str(run), force=True)  # replaces the export's own files, keeps the rest
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == before
    assert (out / "notes.txt").read_text() == "mine"


def test_bf16_export(saved, exported, tmp_path):
    """The fp32 export's tensors rounded to bf16, and a model that still computes the same logits
    within bf16's precision."""
    from safetensors.torch import load_file

    run, want = saved
    out = tmp_path / "bf16"
    export_hf(str(run), str(out), dtype="bf16")
    half, full = load_file(out / "model.safetensors"), load_file(exported[0] / "model.safetensors")
    assert set(half) == set(full) and len(half) == 2 * 9 + 3
    for name, t in half.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, full[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    got = _hf_logits(out, _batch()).float()
    assert (got - want).abs().max() < 0.15 and (got - want).abs().mean() < 0.02


def test_tokenizer_encodes_like_sentencepiece(run, exported):
    import sentencepiece as spm

    out, _ = exported
    assert (out / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok(text).input_ids == [1, *ids], text  # BOS, as the run's documents start
        assert tok.decode(ids) == sp.decode(ids), text
    assert any(len(sp.encode(t)) > len(t.encode()) // 2 for t in TEXTS)  # byte fallback was exercised


def test_tokenizer_comes_from_the_runs_copy_and_is_checked(saved, tmp_path):
    """The path manifest.json records may be on another machine: the run's RUN/assets copy serves;
    a model of other bytes is refused, naming both hashes."""
    run, _ = saved
    manifest = load_manifest(str(run))
    moved = dataclasses.replace(manifest, tokenizer=dataclasses.replace(manifest.tokenizer,
                                                                        path="/elsewhere/tokenizer.model"))
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    synthetic.plan(str(copy), moved, {"web": 1.0}, SEQ)
    (copy / "assets").mkdir()
    (copy / "tokenizer.model").rename(copy / "assets" / "tokenizer.model")
    summary = export_hf(str(copy), str(tmp_path / "a"))
    assert summary["tokenizer_read"].endswith("assets/tokenizer.model")
    (copy / "assets" / "tokenizer.model").write_bytes(b"another model")
    with pytest.raises(ModelExportError, match=r"tokenized with /elsewhere/tokenizer.model \(sha256 [0-9a-f]{12}\)"):
        export_hf(str(copy), str(tmp_path / "b"))
    summary = export_hf(str(copy), str(tmp_path / "c"), tokenizer=str(run / "tokenizer.model"))
    assert (tmp_path / "c" / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()


def test_nothing_to_export_as_asked_is_exit_code_2(saved, tmp_path):
    run, _ = saved
    for kwargs, message in [
        ({"step": 4}, f"step-00000004: no checkpoint of step 4 (complete checkpoints: {STEP})"),
        ({"train_dir": "other"}, f"{run / 'other' / 'checkpoints'}: no complete checkpoint to export"),
        ({"train_dir": "../train"}, "--train-dir: '../train' escapes the run directory"),
        ({"out": str(run / "manifest.json")}, "manifest.json: exists and is not a directory"),
    ]:
        with pytest.raises(ModelExportError, match=re.escape(message)) as e:
            export_hf(str(run), **kwargs)
        assert e.value.code == 2
    assert not (run / "other").exists() and not (run / "train" / "export" / "hf-step-4").exists()
    with pytest.raises(ModelExportError, match="must be a local") as e:
        export_hf("memory://run")
    assert e.value.code == 2


def test_a_damaged_newest_checkpoint_is_skipped_unless_asked_for(saved, exported, tmp_path, caplog):
    import shutil

    run, _ = saved
    root = run / "train" / "checkpoints"
    damaged = root / "step-00000007"
    shutil.copytree(root / f"step-{STEP:08d}", damaged)
    try:
        meta = json.loads((damaged / "meta.json").read_text())
        (damaged / "meta.json").write_text(json.dumps({**meta, "step": 7}))
        distcp = damaged / "__0_0.distcp"
        with open(distcp, "r+b") as fh:
            fh.truncate(distcp.stat().st_size // 2)
        with caplog.at_level(logging.WARNING, logger="tinyprep"):
            summary = export_hf(str(run), str(tmp_path / "older"))
        assert summary["step"] == STEP and "__0_0.distcp is truncated" in caplog.text
        assert (tmp_path / "older" / "model.safetensors").read_bytes() == \
            (exported[0] / "model.safetensors").read_bytes()
        with pytest.raises(ModelExportError, match="step-00000007: __0_0.distcp is truncated") as e:
            export_hf(str(run), str(tmp_path / "asked"), step=7)
        assert e.value.code == 1 and not (tmp_path / "asked").exists()
    finally:
        shutil.rmtree(damaged)


def test_cli_errors_are_one_line(saved):
    run, _ = saved
    r = tinyprep("export-model", str(run), "--train-dir", "other", cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not r.stdout
    assert r.stderr.startswith(f"error: {run / 'other' / 'checkpoints'}: no complete checkpoint to export")
    r = tinyprep("export-model", str(run), "--format", "litgpt", cwd=ROOT)
    assert r.returncode == 2 and "Invalid value for '--format': 'litgpt' is not 'hf'" in r.stderr


@pytest.mark.slow
def test_cli_export(saved, tmp_path):
    run, want = saved
    out = tmp_path / "cli"
    r = tinyprep("export-model", str(run), "--out", str(out), "--dtype", "fp32", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{out}: hf export of step {STEP} (0.1M parameters, fp32, tokenizer sha256 ")
    torch.testing.assert_close(_hf_logits(out, _batch()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_of_two_ranks_exports_on_one_process(run, tmp_path, monkeypatch):
    """Two steps trained on two processes (FSDP2 shards in the checkpoint), exported here without a
    process group: the logits of the trainer's model resumed from that checkpoint on one process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train(_recipe(run, dir="two", nproc=2))
    out = Path(export_hf(str(run), train_dir="two")["out"])
    assert out == run / "two" / "export" / "hf-step-2"
    logits = tmp_path / "trainer.pt"
    launch(_trainer_logits, (prepare(_recipe(run, dir="two")), _batch(), str(logits)), 1, "cpu")
    torch.testing.assert_close(_hf_logits(out, _batch()), torch.load(logits), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "tinyprep-export.json").read_text())["world"] == 2
