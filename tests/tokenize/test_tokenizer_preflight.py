"""The tokenizer preflight: before any stage runs, one line says why the recipe's tokenizer cannot
serve its tokenize and mix stages (a missing file, not a SentencePiece model, no BOS/EOS, a
dtype too small), naming tokenizer.model and the path; a recipe without those stages needs none."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.recipe import parse_recipe
from pipeline.tokenize.tokenizer import preflight_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta token model data prep pipeline shard mix train the a of and".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama-2-like model (300 pieces, about 20 KB of text) and copies without BOS / EOS."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    root = tmp_path_factory.mktemp("models")
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    good = root / "good.model"
    train_tokenizer([str(text)], str(good), vocab_size=300)
    out = {"good": good}
    for name, piece, field in (("no_bos", 1, "bos_id"), ("no_eos", 2, "eos_id")):
        proto = pb.ModelProto()
        proto.ParseFromString(good.read_bytes())
        proto.pieces[piece].type = pb.ModelProto.SentencePiece.USER_DEFINED  # <s> / </s> no longer special
        setattr(proto.trainer_spec, field, -1)
        out[name] = root / f"{name}.model"
        out[name].write_bytes(proto.SerializeToString())
    return out


def _recipe(tmp_path: Path, stages=("download", "ingest", "dedup", "tokenize", "mix"), tokenizer=None, **tokenize):
    data = {"name": "t", "output": str(tmp_path / "run"), "stages": list(stages),
            "sources": [{"name": "a", "urls": [str(tmp_path / "in" / "*.jsonl")]}], "tokenize": tokenize}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    return parse_recipe(data)


def test_a_usable_model_or_one_to_train_passes(models, tmp_path):
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer={"model": str(models["good"])})) is None
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer={"model": str(models["good"])}, eos=True)) is None
    # train set, no model: the tokenize stage trains RUN/tokenizer.model
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer={"train": {"vocab_size": 4000}})) is None
    # train set and a model path that does not exist yet: the stage trains it there
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer={"model": str(tmp_path / "new.model"),
                                                            "train": {}})) is None
    # a model without BOS serves a recipe that asks for none
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer={"model": str(models["no_bos"])}, bos=False)) is None


def test_a_recipe_that_stops_before_tokenize_needs_no_tokenizer(tmp_path):
    missing = {"model": str(tmp_path / "nope.model")}
    assert preflight_tokenizer(_recipe(tmp_path, stages=["download", "ingest", "dedup"], tokenizer=missing)) is None
    assert preflight_tokenizer(_recipe(tmp_path, stages=["ingest"])) is None
    # the stages about to run (`tinyprep run --stages ingest`) decide, not the recipe's list
    assert preflight_tokenizer(_recipe(tmp_path, tokenizer=missing), ["download", "ingest"]) is None
    assert preflight_tokenizer(_recipe(tmp_path, stages=["ingest"], tokenizer=missing), ["mix"]) is not None


def _cases(tmp_path: Path, models: dict[str, Path]) -> dict:
    text = tmp_path / "tokenizer.txt"
    text.write_text("not a model\n")
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    missing = tmp_path / "nope.model"
    return {
        "a missing file": ({"tokenizer": {"model": str(missing)}},
                           f"tokenizer.model: {missing}: no such file (give tokenizer.train to train one"),
        "a text file": ({"tokenizer": {"model": str(text)}},
                        f"tokenizer.model: {text}: not a SentencePiece model: the bytes do not parse"),
        "an empty file": ({"tokenizer": {"model": str(empty)}}, f"tokenizer.model: {empty}: not a SentencePiece model"),
        "a directory": ({"tokenizer": {"model": str(folder)}},
                        f"tokenizer.model: {folder}: is a directory, not a tokenizer.model file"),
        "a device": ({"tokenizer": {"model": "/dev/zero"}}, "tokenizer.model: /dev/zero: not a regular file"),
        "no BOS when bos: true": ({"tokenizer": {"model": str(models["no_bos"])}},
                                  f"tokenize.bos: the tokenizer {models['no_bos']} has no BOS piece"),
        "no EOS when eos: true": ({"tokenizer": {"model": str(models["no_eos"])}, "eos": True},
                                  f"tokenize.eos: the tokenizer {models['no_eos']} has no EOS piece"),
        "no tokenizer at all": ({}, "tokenizer: the tokenize and mix stages need tokenizer.model (or tokenizer.train)"),
        "a trained vocabulary past uint16": (
            {"tokenizer": {"train": {"vocab_size": 70000}}, "dtype": "uint16"},
            "tokenize.dtype: a vocabulary of 70000 ids does not fit dtype uint16 (largest id 65535); use int32 "
            "(tokenizer.train.vocab_size 70000)"),
        "mix alone, the trained model not there yet": (
            {"tokenizer": {"train": {}}, "stages": ["mix"]},
            f"tokenizer.model: {tmp_path / 'run' / 'tokenizer.model'}: no such file (the tokenize stage trains it"),
    }


CASES = ["a missing file", "a text file", "an empty file", "a directory", "a device", "no BOS when bos: true",
         "no EOS when eos: true", "no tokenizer at all", "a trained vocabulary past uint16",
         "mix alone, the trained model not there yet"]


@pytest.mark.parametrize("case", CASES)
def test_an_unusable_tokenizer_is_one_line_naming_the_key_and_path(case, models, tmp_path):
    if case == "a device" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    settings, message = _cases(tmp_path, models)[case]
    stages = settings.pop("stages", ("download", "ingest", "dedup", "tokenize", "mix"))
    tokenizer = settings.pop("tokenizer", None)
    got = preflight_tokenizer(_recipe(tmp_path, stages=stages, tokenizer=tokenizer, **settings))
    assert got is not None and message in got, got
    assert "\n" not in got
