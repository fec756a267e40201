"""pipeline/tokenize/: the tokenizer trainer, the holdout, and the stage end to end on the sample.

The end-to-end tests use the session's reference run (recipes/sample.yaml, 2 workers), read its
shards with the spec reader of test_formats.py and decode them with SentencePiece.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from conftest import ROOT, tinyprep, tree_digest
from spec_readers import spec_read_megatron

from pipeline.layout import RunDir
from pipeline.recipe import load_recipe
from pipeline.tokenize import (
    TokenizeError,
    holdout_mask,
    removed_ids,
    stage,
    train_tokenizer,
)

RECIPE = str(ROOT / "recipes" / "sample.yaml")


def tokenize_outputs(run: Path) -> dict[str, str]:
    """What must not depend on workers, retries or interruptions."""
    digest = tree_digest(run, "shards")
    for name in ("manifest.json", "mixture.json", "tokenizer.model", "stats/tokenize.json", "stats/mix.json"):
        digest[name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    return digest


def ingested(run: Path, source: str) -> list[tuple[int, str, bool]]:
    """(id, text, removed by dedup) of a source's ingested documents, in stream order (files
    sorted, then rows)."""
    out = []
    root = run / "docs" / source
    for p in sorted(root.rglob("*.parquet"), key=lambda p: str(p.relative_to(root))):
        t = pq.read_table(p, columns=["id", "text"])
        removed = set(removed_ids(str(run), source, str(p.relative_to(root))).tolist())
        out += [(i, x, i in removed) for i, x in zip(t.column("id").to_pylist(), t.column("text").to_pylist())]
    return out


# --- the tokenizer ---------------------------------------------------------------------------


def test_train_tokenizer_is_deterministic_with_llama2_settings(reference, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    run = reference[0]
    a = train_tokenizer([str(run)], str(tmp_path / "a.model"), vocab_size=1000, max_bytes=1 << 20, seed=3)
    b = train_tokenizer([str(run)], str(tmp_path / "b.model"), vocab_size=1000, max_bytes=1 << 20, seed=3)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a["sha256"] == b["sha256"] == hashlib.sha256((tmp_path / "a.model").read_bytes()).hexdigest()
    assert 0 < a["documents"] < 1551  # a sample of about 1 MB of the run's 12.8 MB
    proto = pb.ModelProto()
    proto.ParseFromString((tmp_path / "a.model").read_bytes())
    t = proto.trainer_spec
    assert (t.model_type, t.byte_fallback, t.split_digits, t.vocab_size) == (pb.TrainerSpec.BPE, True, True, 1000)
    assert proto.normalizer_spec.name == "identity" and proto.normalizer_spec.add_dummy_prefix
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert (sp.vocab_size(), sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1000, 0, 1, 2, -1)
    pieces = sp.encode("x 2024 \u2603", out_type=str)
    assert "2" in pieces and "0" in pieces and "<0xE2>" in pieces  # digits split, bytes for unseen characters
    text = "  tabs\tand  spaces \u00e9\u4e2d\n\nend"
    assert sp.decode(sp.encode(text)) == text  # identity normalization, whitespace kept
    # text inputs too; an impossible vocabulary is a clear error
    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n')
    from pipeline.formats import FormatError
    with pytest.raises(FormatError, match="vocab_size 5000 is too large"):
        train_tokenizer([str(tmp_path / "t.jsonl")], str(tmp_path / "c.model"), vocab_size=5000)
    assert not (tmp_path / "c.model").exists()


def test_holdout_is_a_pure_function_of_the_id():
    ids = np.arange(200_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    m1 = holdout_mask(ids, 0.01, 0)
    m2 = holdout_mask(ids, 0.02, 0)
    assert abs(m1.mean() - 0.01) < 0.002 and abs(m2.mean() - 0.02) < 0.002
    assert not (m1 & ~m2).any()  # a larger fraction only adds documents
    assert np.array_equal(holdout_mask(ids[::-1], 0.01, 0), m1[::-1])  # per document, order-free
    assert (holdout_mask(ids, 0.01, 1) != m1).any()
    assert not holdout_mask(ids, 0.0, 0).any()


# --- the stage on the sample --------------------------------------------------------------------


def test_shards_hold_every_document_and_detokenize_to_the_ingested_text(reference):
    run = reference[0]
    recipe = load_recipe(RECIPE)
    manifest = json.loads((run / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((run / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["path"] == "tokenizer.model" and manifest["dtype"] == "uint16"
    assert (manifest["bos"], manifest["eos"]) == (True, False)
    stats = json.loads((run / "stats" / "tokenize.json").read_text())["stats"]["sources"]
    cfg = recipe.tokenize
    for source in ("slimpajama", "starcoderdata"):
        docs = ingested(run, source)
        ids = np.array([i for i, _, _ in docs], dtype=np.uint64)
        held = holdout_mask(ids, cfg.holdout_fraction, cfg.holdout_seed)
        kept = [not r for _, _, r in docs]
        decoded = {}
        for split in ("train", "validation"):
            out = []
            for shard in [s for s in manifest["shards"] if s["source"] == source and s["split"] == split]:
                for doc in spec_read_megatron(run / shard["path"]):
                    assert doc[0] == sp.bos_id() and sp.bos_id() not in doc[1:] and sp.eos_id() not in doc
                    out.append(sp.decode(doc[1:].tolist()))
            decoded[split] = out
        validation = [t for (_, t, _), h, k in zip(docs, held, kept) if h and k]
        assert decoded["validation"] == validation
        vset = set(validation)
        train = [t for (_, t, _), h, k in zip(docs, held, kept) if k and not h and t not in vset]
        assert decoded["train"] == train  # every other document, in order, text exact
        dup = sum(1 for (_, t, _), h, k in zip(docs, held, kept) if k and not h and t in vset)
        s = stats[source]
        assert s["removed"]["duplicate_holdout"] == dup and s["removed"]["dedup"] == kept.count(False)
        assert s["train"]["docs"] == len(train) and s["validation"]["docs"] == len(validation)
        assert s["read"] == len(docs) == s["train"]["docs"] + s["validation"]["docs"] + sum(s["removed"].values())
        assert s["train"]["tokens"] == manifest["sources"][source]["train"]["tokens"]
    # the sample plants duplicates: without dedup, some are held out and their twins dropped
    assert sum(stats[s]["removed"]["duplicate_holdout"] + stats[s]["removed"]["dedup"] for s in stats) > 0


def test_shards_are_cut_near_the_target_size(reference):
    run = reference[0]
    manifest = json.loads((run / "manifest.json").read_text())
    target = load_recipe(RECIPE).tokenize.shard_mb * (1 << 20)
    by_group: dict[str, list[dict]] = {}
    for s in manifest["shards"]:
        by_group.setdefault(s["path"].rsplit("-", 1)[0], []).append(s)
    for parts in by_group.values():
        for s in parts[:-1]:  # every part but a group's last is full; none is far past the target
            assert target <= s["bin_bytes"] < 1.5 * target
        assert parts[-1]["bin_bytes"] < 1.5 * target
    assert len(manifest["shards"]) > 4


def test_one_worker_interrupted_and_retried_gives_identical_outputs(reference, workdir, tmp_path):
    expected = tokenize_outputs(reference[0])
    run = tmp_path / "w1"
    # the reference's documents (and dedup's removal lists): this run does tokenize and mix only
    shutil.copytree(reference[0] / "docs", run / "docs")
    if (reference[0] / "dedup").exists():
        shutil.copytree(reference[0] / "dedup" / "removed", run / "dedup" / "removed")
    # an encode task fails for good: the stage fails with the task named, no manifest is written
    r = tinyprep("run", RECIPE, "--output", str(run), "--stages", "tokenize,mix", "--workers", "1",
                 "--set", "ray.task_retries=0",
                 env={"TINYPREP_FAULTS": "tokenize:train/starcoderdata/000002:raise:*"}, cwd=workdir)
    assert r.returncode == 1 and "train/starcoderdata/000002" in r.stderr and "Traceback" not in r.stderr
    assert not (run / "manifest.json").exists()
    # the rerun redoes only what is missing, survives a dying worker, and ends byte-identical
    r = tinyprep("run", RECIPE, "--output", str(run), "--stages", "tokenize,mix", "--workers", "1",
                 env={"TINYPREP_FAULTS": "tokenize:train/slimpajama/000000:exit"}, cwd=workdir)
    assert r.returncode == 0, r.stderr
    done = re.search(r"tokenize:encode: (\d+) tasks, (\d+) already done, 1 to run", r.stderr)
    assert done and int(done.group(2)) == int(done.group(1)) - 1
    assert tokenize_outputs(run) == expected


# --- bad input ----------------------------------------------------------------------------------


def _big_vocab_model(path: Path, base: Path, extra: int) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(base.read_bytes())
    for i in range(extra):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"\u2581extra{i}", -1000.0 - i, pb.ModelProto.SentencePiece.USER_DEFINED
    path.write_bytes(proto.SerializeToString())


def test_a_vocabulary_that_does_not_fit_the_dtype_is_refused(reference, tmp_path):
    run = reference[0]
    big = tmp_path / "big.model"
    _big_vocab_model(big, run / "tokenizer.model", 70000 - 4000)
    recipe = load_recipe(RECIPE, [f"tokenizer.model={big}", "tokenize.dtype=uint16"], output=str(run))
    with pytest.raises(TokenizeError, match="vocabulary of 70000 ids does not fit dtype uint16"):
        stage.plan(recipe, RunDir(str(run)), "holdout")
    auto = load_recipe(RECIPE, [f"tokenizer.model={big}"], output=str(run))
    assert stage.plan(auto, RunDir(str(run)), "holdout")  # auto picks int32


def test_missing_tokenizer_and_dedup_lists_are_clear_errors(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0] / "docs", run / "docs")
    recipe = load_recipe(RECIPE, ["tokenizer.train=null", f"tokenizer.model={tmp_path}/nope.model"], output=str(run))
    with pytest.raises(TokenizeError, match=f"tokenizer.model: {tmp_path}/nope.model: no such file"):
        stage.plan(recipe, RunDir(str(run)), "holdout")
    with pytest.raises(TokenizeError, match="no ingested documents; run the ingest stage first"):
        stage.plan(recipe, RunDir(str(tmp_path / "empty")), "holdout")
    # dedup's removal lists: all present or a clear error; read through pipeline.dedup.removed_ids
    rel = "chunk1/example_train_0.jsonl.zst.parquet"
    assert removed_ids(str(run), "slimpajama", rel).size == 0  # no RUN/dedup: nothing removed
    (run / "dedup").mkdir()
    with pytest.raises(TokenizeError, match=f"no removal list for docs/slimpajama/{re.escape(rel)}"):
        removed_ids(str(run), "slimpajama", rel)
    auto = load_recipe(RECIPE, output=str(run))
    shutil.copy(reference[0] / "tokenizer.model", run / "tokenizer.model")
    with pytest.raises(TokenizeError, match="no removal list for docs/"):
        stage.plan(auto, RunDir(str(run)), "holdout")


def test_tokenizer_recipe_keys(tmp_path, monkeypatch):
    from pipeline.recipe import RecipeError, parse_recipe

    base = {"name": "t", "output": str(tmp_path), "sources": [{"name": "a", "urls": ["/x/*.jsonl"]}]}
    with pytest.raises(RecipeError, match="tokenizer: needs model .* or train"):
        parse_recipe({**base, "tokenizer": {}})
    monkeypatch.chdir(tmp_path)
    r = parse_recipe({**base, "tokenizer": {"model": "tok/tokenizer.model"}})
    assert r.tokenizer.model == str(tmp_path / "tok" / "tokenizer.model")  # workers may run elsewhere
    r = parse_recipe({**base, "tokenizer": {"train": {"vocab_size": 4000}}, "tokenize": {"dtype": "int32"}})
    assert r.tokenizer.model is None and r.tokenizer.train.vocab_size == 4000 and r.tokenize.dtype == "int32"
    with pytest.raises(RecipeError, match=r"tokenizer.train.vocab_size: must be >= 300"):
        parse_recipe({**base, "tokenizer": {"train": {"vocab_size": 100}}})
