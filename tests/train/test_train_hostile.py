"""Hostile runs for the trainer: shards that are not what manifest.json says, a recipe changed since
the mix stage, damaged checkpoints, token ids the model cannot take, a run directory that moved.

Every refusal is one line (TrainError, printed by `tinyprep train` as `error: ...`, exit 1) naming
the file, the key or the offset; a damaged latest checkpoint falls back to the previous usable one
with one warning line. Small synthetic runs (tests/synthetic.py) and checkpoints saved in this
process keep the cases fast; only the tests marked slow train.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import synthetic
import torch
import yaml
from conftest import one_line, tinyprep

from pipeline.formats import FormatError
from pipeline.formats.manifest import load_plan
from pipeline.formats.megatron import MegatronReader
from pipeline.recipe import parse_recipe
from pipeline.train import checkpoint
from pipeline.train.loader import HoldoutSet, MixtureLoader, first_bad_row
from pipeline.train.trainer import TrainError, lm_loss, prepare, read_metrics, train

ROOT = Path(__file__).resolve().parents[2]
VOCAB, SEQ = 256, 32
TRAIN = {"model": "tiny", "global_batch": 8, "micro_batch": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2,
         "log_every": 1, "eval_every": 4, "eval_samples": 4, "checkpoint_every": 3, "keep_checkpoints": 3,
         "nproc": 1}
MIX = {"seq_len": SEQ, "seed": 42, "token_budget": None}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe_dict(run: Path, mix: dict | None = None, sources: list | None = None, **train) -> dict:
    return {"name": "hostile-train", "output": str(run),
            "sources": sources or [{"name": "web", "urls": ["unused"], "weight": 0.7},
                                   {"name": "code", "urls": ["unused"], "weight": 0.3}],
            "mix": {**MIX, **(mix or {})}, "train": {**TRAIN, **train}}


def _recipe(run: Path, **kw):
    return parse_recipe(_recipe_dict(run, **kw))


def _write_run(d: Path, bad: dict[str, np.ndarray] | None = None) -> None:
    """Two sources with train and validation shards; `bad` adds a document (hostile token ids) as the
    second document of the first shard of "<source>/<split>"."""
    rng = np.random.default_rng(3)
    sources = {
        "web": {"train": [synthetic.documents(rng, 60, VOCAB, 50) for _ in range(2)],
                "validation": [synthetic.documents(rng, 8, VOCAB, 50)]},
        "code": {"train": [synthetic.documents(rng, 50, VOCAB, 40)],
                 "validation": [synthetic.documents(rng, 6, VOCAB, 40)]},
    }
    for where, doc in (bad or {}).items():
        name, split = where.split("/")
        sources[name][split][0].insert(1, doc)
    synthetic.write_run(str(d), sources, {"web": 0.7, "code": 0.3}, seq_len=SEQ, vocab=VOCAB)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile") / "run"
    _write_run(d)
    return d


@pytest.fixture
def run(small_run, tmp_path) -> Path:
    """A private copy of the small run (each case damages its own)."""
    d = tmp_path / "run"
    shutil.copytree(small_run, d)
    return d


# -- 1. the shards on disk against manifest.json, checked before any rank starts --------------------

def _truncate(path: Path, by: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(0, path.stat().st_size - by))


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


WEB0 = "shards/web/train/00000"
SHARD_CASES = {
    "deleted .bin": (lambda r: (r / f"{WEB0}.bin").unlink(), [f"{WEB0}.bin", "missing", "rerun the tokenize"]),
    "deleted .idx": (lambda r: (r / f"{WEB0}.idx").unlink(), [f"{WEB0}.idx", "missing"]),
    "truncated .idx": (lambda r: _truncate(r / f"{WEB0}.idx", 8), [f"{WEB0}.idx", "bytes, but", "need"]),
    ".idx cut inside its header": (lambda r: os.truncate(r / f"{WEB0}.idx", 20), [f"{WEB0}.idx",
                                                                                 "truncated header (20 of 34"]),
    ".idx of another shard": (lambda r: shutil.copy(r / "shards/code/train/00000.idx", r / f"{WEB0}.idx"),
                              [f"{WEB0}.idx", "documents of uint16, manifest.json says 60"]),
    ".idx of junk": (lambda r: (r / f"{WEB0}.idx").write_bytes(b"\x01" * 100), [f"{WEB0}.idx", "bad magic"]),
    "truncated .bin": (lambda r: _truncate(r / f"{WEB0}.bin", 2), [f"{WEB0}.bin", "bytes, manifest.json says",
                                                                 "truncated or replaced"]),
    ".bin grown": (lambda r: _append(r / f"{WEB0}.bin", b"\0\0"), [f"{WEB0}.bin", "manifest.json says"]),
    "deleted validation .bin": (lambda r: (r / "shards/code/validation/00000.bin").unlink(),
                                ["shards/code/validation/00000.bin", "missing"]),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_shards_that_differ_from_the_manifest_are_refused_at_start_up(case, run):
    damage, words = SHARD_CASES[case]
    prepare(_recipe(run))  # intact: accepted
    damage(run)
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run))
    one_line(e, *words)


def test_validation_shards_are_not_required_without_validation(run):
    (run / "shards/code/validation/00000.bin").unlink()
    assert prepare(_recipe(run, eval_every=0)).resume is None


def test_the_start_up_check_reads_sizes_and_headers_only(tmp_path):
    """Stub shards (sparse, right sizes and headers, no token) of a described run pass: nothing
    but sizes and headers is read. One wrong size is named."""
    from pipeline.train import preflight

    run = tmp_path / "described"
    synthetic.write_described_run(str(run), {"a": 50_000_000, "b": 30_000_000}, {"a": 0.5, "b": 0.5},
                                  seq_len=64, shard_tokens=1_000_000, token_budget=10_000_000)
    assert synthetic.write_stub_shards(str(run)) == 82
    manifest, mixture = load_plan(str(run))
    entries = preflight.shards_to_read(manifest, mixture, validation=True)
    assert len(entries) == 82
    preflight.check_shards(str(run), entries)
    _truncate(run / "shards/b/train/000017.bin", 4096)
    with pytest.raises(FormatError, match=r"shards/b/train/000017.bin: 1,995,904 bytes, manifest.json says "
                                          r"2,000,000"):
        preflight.check_shards(str(run), entries)


# -- 2. the recipe's mix settings against mixture.json ----------------------------------------------

WEIGHTS = [{"name": "web", "urls": ["unused"], "weight": 0.5}, {"name": "code", "urls": ["unused"], "weight": 0.5}]
MIX_CASES = {
    "mix.seq_len": ({"mix": {"seq_len": 64}}, ["mix.seq_len 64 in the recipe, 32 in mixture.json"]),
    "mix.seed": ({"mix": {"seed": 7}}, ["mix.seed 7 in the recipe, 42 in mixture.json"]),
    "mix.token_budget": ({"mix": {"token_budget": 4096}}, ["mix.token_budget 4,096 in the recipe, ",
                                                           "in mixture.json"]),
    "sources[].weight": ({"sources": WEIGHTS}, ["sources[0].weight (web) 0.5 in the recipe (normalized), 0.7 in "
                                                "mixture.json", "sources[1].weight (code)"]),
    "mix.weights": ({"mix": {"weights": "proportional"}}, ["mix.weights proportional in the recipe, explicit"]),
    "a source dropped": ({"sources": WEIGHTS[:1]}, ["sources ['web'] in the recipe, ['web', 'code'] in "
                                                    "mixture.json"]),
}


@pytest.mark.parametrize("case", list(MIX_CASES))
def test_mix_settings_changed_since_the_mix_stage_are_refused(case, run):
    change, words = MIX_CASES[case]
    with pytest.raises(TrainError) as e:
        prepare(_recipe(run, **change))
    one_line(e, "mixture.json: planned with other mix settings", "rerun the mix stage", "--stages mix", *words)


def test_an_unchanged_null_budget_and_max_epochs_are_not_changes(run):
    """token_budget null is planned as one epoch of the limiting source; mix.max_epochs only warns."""
    assert prepare(_recipe(run, mix={"token_budget": None, "max_epochs": 1.5})).resume is None


# -- 3. damaged checkpoints: the newest usable one, or a refusal ------------------------------------

def _save_checkpoints(run: Path, steps: list[int], dir: str = "train") -> None:
    """Checkpoints of the run's tiny model after one optimizer step, at the given steps, saved by
    checkpoint.save in this process (a one-rank gloo group), as the trainer saves them."""
    import torch.distributed as dist

    from pipeline.train.distributed import free_port
    from pipeline.train.model import Llama

    plan = prepare(_recipe(run, dir=dir))
    model = Llama(plan.model)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = next(iter(MixtureLoader(str(run), plan.manifest, plan.mixture, 8))).tokens
    lm_loss(model, tokens).backward()
    opt.step()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for step in steps:
            train_state = {"step": step, "samples": step * 8, "fingerprint": plan.mixture.fingerprint,
                           "global_batch": 8}
            meta = {"world": 1, "model": asdict(plan.model), "model_name": "tiny", "sources": {}}
            checkpoint.save(Path(plan.out_dir) / "checkpoints", step, model, opt, train_state, meta, 0,
                            torch.device("cpu"), keep=len(steps))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run_with_checkpoints(small_run, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "run"
    shutil.copytree(small_run, d)
    _save_checkpoints(d, [3, 6])
    return d


@pytest.fixture
def ckrun(run_with_checkpoints, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, d)
    return d


def _ck(run: Path, step: int) -> Path:
    return run / "train" / "checkpoints" / f"step-{step:08d}"


def _half(path: Path) -> None:
    _truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "truncated .distcp": (lambda d: _half(d / "__0_0.distcp"), "__0_0.distcp is truncated"),
    "deleted .distcp": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "missing .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "junk .metadata": (lambda d: (d / ".metadata").write_bytes(b"\x80\x04junk"), ".metadata is unreadable"),
    "truncated .metadata": (lambda d: _half(d / ".metadata"), ".metadata is unreadable"),
    "junk meta.json": (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is unreadable"),
    "meta.json not an object": (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json is not a JSON object"),
    "meta.json without samples": (lambda d: synthetic.rewrite_json(str(d / "meta.json"), lambda m: m.pop("samples")),
                                  "meta.json: 'samples' is missing or not int"),
    "meta.json of another step": (lambda d: synthetic.rewrite_json(str(d / "meta.json"), lambda m: m.update(step=5)),
                                  "meta.json: step 5 is not the directory's step 6"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(case, ckrun, caplog):
    damage, why = DAMAGE[case]
    assert prepare(_recipe(ckrun)).resume == str(_ck(ckrun, 6))
    damage(_ck(ckrun, 6))
    with caplog.at_level(logging.WARNING, logger="tinyprep"):
        plan = prepare(_recipe(ckrun))
    assert plan.resume == str(_ck(ckrun, 3)) and not plan.done
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(_ck(ckrun, 6)) in warnings[0] and why in warnings[0] and "resuming from" in warnings[0]
    assert str(_ck(ckrun, 3)) in warnings[0]


@pytest.mark.parametrize("case", ["truncated .distcp", "junk meta.json", "missing .metadata"])
def test_no_usable_checkpoint_is_refused(case, ckrun):
    damage, why = DAMAGE[case]
    for step in (3, 6):
        damage(_ck(ckrun, step))
    with pytest.raises(TrainError) as e:
        prepare(_recipe(ckrun))
    one_line(e, str(_ck(ckrun, 6)), why, "and 1 more", "no usable checkpoint", "--fresh")
    assert prepare(_recipe(ckrun), fresh=True).resume is None  # --fresh starts over


def test_an_unfinished_save_is_ignored_and_no_checkpoint_starts_from_step_0(ckrun, caplog):
    """A directory without meta.json is a save that was killed: not damaged, just not there."""
    (_ck(ckrun, 6) / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="tinyprep"):
        assert prepare(_recipe(ckrun)).resume == str(_ck(ckrun, 3))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert prepare(_recipe(ckrun, dir="elsewhere")).resume is None


# -- 4. no absolute path in a checkpoint ------------------------------------------------------------

def test_checkpoints_hold_no_path_of_the_run(run_with_checkpoints):
    """DCP's .metadata records the directory it was written to (a pickled PosixPath keeps each part);
    ours records only the checkpoint's name."""
    parts = [p.encode() for p in run_with_checkpoints.parts[1:]]
    files = [f for f in (run_with_checkpoints / "train").rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {".metadata", "__0_0.distcp", "meta.json"}
    for f in files:
        data = f.read_bytes()
        assert not [p for p in parts if p in data], f
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(_ck(run_with_checkpoints, 6))).read_metadata()
    assert meta.storage_meta.checkpoint_id == "step-00000006"


# -- token ids the model cannot take, read batch by batch -------------------------------------------

def _offset_of(msg: str) -> tuple[str, int]:
    m = re.search(r"(\S+\.bin): token offset ([\d,]+):", msg)
    assert m, msg
    return m[1], int(m[2].replace(",", ""))


def _tokens(bin_path: str) -> np.ndarray:
    return MegatronReader(bin_path[:-4]).tokens


def test_an_id_outside_the_vocabulary_stops_with_the_shard_and_offset(tmp_path):
    run = tmp_path / "run"
    doc = np.concatenate([[synthetic.BOS], np.arange(3, 200) % 250 + 3])
    doc[100] = 300  # vocabulary 256
    _write_run(run, {"code/train": doc})
    manifest, mixture = load_plan(str(run))
    with pytest.raises(FormatError) as e:
        for _ in MixtureLoader(str(run), manifest, mixture, 8).batches(0, 200):
            pass
    msg = one_line(e, "shards/code/train/00000.bin", "token id 300 is outside the tokenizer's vocabulary of 256")
    path, offset = _offset_of(msg)
    assert _tokens(path)[offset] == 300


def test_an_all_zero_window_stops_with_the_shard_and_offset(run):
    """A zeroed .bin of the right size passes the start-up check (no full read) and is caught at the
    first window read from it."""
    prefix = run / "shards/code/train/00000"
    prefix.with_suffix(".bin").write_bytes(bytes(prefix.with_suffix(".bin").stat().st_size))
    plan = prepare(_recipe(run))
    with pytest.raises(FormatError) as e:
        for _ in MixtureLoader(str(run), plan.manifest, plan.mixture, 8).batches(0, 200):
            pass
    msg = one_line(e, "shards/code/train/00000.bin", f"the {SEQ + 1} tokens from here are all 0", "tinyprep verify")
    path, offset = _offset_of(msg)
    assert offset % SEQ == 0 and offset + SEQ < _tokens(path).size


def test_the_holdout_is_checked_too(tmp_path):
    run = tmp_path / "run"
    _write_run(run, {"web/validation": np.array([synthetic.BOS, 5, 6, 7, 999, 8])})
    manifest, mixture = load_plan(str(run))
    holdout = HoldoutSet(str(run), manifest, mixture, 4)
    with pytest.raises(FormatError) as e:
        holdout.read(holdout.items)
    path, offset = _offset_of(one_line(e, "shards/web/validation/00000.bin", "token id 999"))
    assert _tokens(path)[offset] == 999


ROWS = {
    "plausible": (np.array([[1, 5, 255], [0, 0, 3]], np.uint16), -1),
    "id = vocab": (np.array([[1, 5, 7], [1, 256, 3]], np.uint16), 1),
    "all zeros": (np.array([[1, 5, 7], [0, 0, 0]], np.uint16), 1),
    "negative id (int32 shards)": (np.array([[-1, 5, 7], [1, 2, 3]], np.int32), 0),
    "huge id (int32 shards)": (np.array([[1, 5, 7], [1, 2, 3], [2, 1 << 30, 1]], np.int32), 2),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_first_bad_row(case):
    rows, want = ROWS[case]
    assert first_bad_row(rows, 256) == want


# -- through the CLI: one line, exit 1 --------------------------------------------------------------

def _write_recipe(run: Path, **kw) -> Path:
    path = run.parent / "train.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(run, **kw)))
    return path


def _cli_error(proc, *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


CLI_CASES = {
    "deleted .bin": (lambda r: (r / f"{WEB0}.bin").unlink(), {}, [f"{WEB0}.bin: missing"]),
    "mix changed": (lambda r: None, {"mix": {"seed": 9}}, ["mix.seed 9 in the recipe", "rerun the mix stage"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refusals_areone_line(case, run):
    damage, kw, words = CLI_CASES[case]
    damage(run)
    _cli_error(tinyprep("train", str(_write_recipe(run, **kw)), cwd=ROOT), *words)


def test_cli_refuses_when_no_checkpoint_is_usable_and_warns_on_a_fallback(ckrun):
    recipe = _write_recipe(ckrun, max_steps=3)
    _half(_ck(ckrun, 6) / "__0_0.distcp")
    proc = tinyprep("train", str(recipe), cwd=ROOT)  # falls back to step 3: max_steps reached, nothing to do
    assert proc.returncode == 0, proc.stderr
    warn = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warn) == 1 and "step-00000006 is damaged (__0_0.distcp is truncated" in warn[0], proc.stderr
    assert "step-00000003 is at step 3 of 3: nothing to do" in proc.stderr
    (_ck(ckrun, 3) / ".metadata").unlink()
    _cli_error(tinyprep("train", str(recipe), cwd=ROOT), "step-00000006: damaged checkpoint", "no usable checkpoint")


# -- slow: they train --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_stops_on_an_id_outside_the_vocabulary_withone_line(nproc, tmp_path):
    """One rank (in the CLI's process) or two (spawned): the loader's FormatError comes back as one
    line naming the shard and offset, not torch's IndexError from the embedding."""
    run = tmp_path / "run"
    _write_run(run, {"code/train": np.concatenate([[synthetic.BOS], np.full(2000, 4000)])})  # half the source
    proc = tinyprep("train", str(_write_recipe(run, nproc=nproc)), cwd=ROOT, env={"OMP_NUM_THREADS": "1"})
    line = _cli_error(proc, "shards/code/train/00000.bin: token offset",
                      "token id 4000 is outside the tokenizer's vocabulary of 256 ids")
    assert "IndexError" not in proc.stderr and "FormatError" not in line
    # both ranks read the bad id; whichever stops first is reported
    assert re.match(r"error: rank [01]: " if nproc == 2 else f"error: {re.escape(str(run))}/shards/code", line), line


@pytest.mark.slow
def test_a_moved_run_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(run_with_checkpoints,
                                                                                        tmp_path, monkeypatch):
    """The run directory copied elsewhere, its latest checkpoint truncated: training loads step 3
    (saved where the run was) and goes on to step 4, in one process (`train()` in-process)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    moved = tmp_path / "moved" / "run"
    shutil.copytree(run_with_checkpoints, moved)
    _half(_ck(moved, 6) / "__0_0.distcp")
    plan = train(_recipe(moved, max_steps=4, checkpoint_every=4, eval_every=0))
    assert plan.resume == str(_ck(moved, 3))
    steps = [r["step"] for r in read_metrics(moved / "train") if r.get("kind") == "train"]
    assert steps == [4]
    assert checkpoint.read_info(_ck(moved, 4)).meta["samples"] == 32
    assert os.path.isdir(_ck(moved, 6))  # the damaged one is left for the user to look at
