"""Runs made of synthetic tokens, for the trainer's and loader's tests and the loader benchmark.

`write_run` writes real shards (MegatronWriter), manifest.json and a mixture planned by the mix
stage's own `plan_mixture`, from token arrays; `write_described_run` writes only a manifest and a
mixture that describe a corpus of any size (fake checksums, no shard files): the loader's start-up
and index math on a 3T-token plan, without 3T tokens on disk; `write_stub_shards` then gives such a
run shard files of the described sizes (sparse: no token is written), for the trainer's start-up
check of the shards.
"""

from __future__ import annotations

import hashlib

import numpy as np
import orjson

from pipeline import storage
from pipeline.formats.manifest import (
    Manifest,
    ShardEntry,
    TokenizerInfo,
    make_manifest,
    write_manifest,
    write_mixture,
)
from pipeline.formats.megatron import (
    HEADER,
    MAGIC,
    VERSION,
    MegatronWriter,
    dtype_code,
)
from pipeline.mix import plan_mixture
from pipeline.recipe import parse_recipe

BOS, EOS = 1, 2


def _recipe(run_url: str, weights: dict[str, float], seq_len: int, seed: int, token_budget: int | None):
    return parse_recipe({
        "name": "synthetic", "output": run_url,
        "sources": [{"name": n, "urls": [f"/nonexistent/{n}"], "weight": w} for n, w in weights.items()],
        "mix": {"seq_len": seq_len, "seed": seed, "token_budget": token_budget, "max_epochs": 1e9},
    })


def plan(run_url: str, manifest: Manifest, weights: dict[str, float], seq_len: int, seed: int = 42,
         token_budget: int | None = None) -> None:
    """Plan RUN/mixture.json with the mix stage's planner and write it."""
    raw = write_manifest(run_url, manifest)
    write_mixture(run_url, plan_mixture(_recipe(run_url, weights, seq_len, seed, token_budget), manifest, raw))


def documents(rng: np.random.Generator, n_docs: int, vocab: int, mean_len: int, kind: str = "cycle") -> list[np.ndarray]:
    """Documents that start with BOS. "cycle": ids follow one fixed cyclic order of the vocabulary
    (each token predicts the next, 10% noise: a model can learn it); "random": uniform ids."""
    orbit = np.random.default_rng(7).permutation(np.arange(3, vocab))
    lengths = rng.integers(max(2, mean_len // 2), mean_len * 3 // 2 + 2, size=n_docs)
    docs = []
    for n in lengths.tolist():
        if kind == "random":
            body = rng.integers(3, vocab, size=n)
        else:
            body = orbit[(rng.integers(orbit.size) + np.arange(n)) % orbit.size]
            noise = rng.random(n) < 0.1
            body[noise] = rng.integers(3, vocab, size=int(noise.sum()))
        docs.append(np.concatenate([[BOS], body]))
    return docs


def write_run(run_url: str, sources: dict[str, dict[str, list[list[np.ndarray]]]], weights: dict[str, float],
              seq_len: int, vocab: int, seed: int = 42, token_budget: int | None = None) -> None:
    """sources: {name: {"train": [shard docs, ...], "validation": [...]}}, a shard being a list of
    documents (token arrays). Writes RUN/shards/<source>/<split>/NNNNN.bin|idx, manifest, mixture."""
    entries = []
    for name, splits in sources.items():
        for split, shards in splits.items():
            for i, docs in enumerate(shards):
                path = f"shards/{name}/{split}/{i:05d}"
                w = MegatronWriter(storage.join(run_url, path), np.uint16)
                for d in docs:
                    w.add_document(d)
                info = w.close()
                entries.append(ShardEntry(path=path, source=name, split=split, docs=info["docs"],
                                          tokens=info["tokens"], dtype="uint16", bin_sha256=info["bin_sha256"],
                                          idx_sha256=info["idx_sha256"], bin_bytes=info["bin_bytes"]))
    tok = TokenizerInfo(path="synthetic.model", sha256=hashlib.sha256(b"synthetic").hexdigest(),
                        vocab_size=vocab, bos_id=BOS, eos_id=EOS)
    plan(run_url, make_manifest(tok, True, False, "uint16", entries), weights, seq_len, seed, token_budget)


def write_described_run(run_url: str, tokens: dict[str, int], weights: dict[str, float], seq_len: int,
                        shard_tokens: int, token_budget: int, seed: int = 42, vocab: int = 32000) -> int:
    """A manifest and mixture describing `tokens` train tokens per source in shards of
    `shard_tokens` (plus one small validation shard per source); no shard file is written.
    Returns the number of shards described."""
    entries = []
    for name, total in tokens.items():
        n_shards = -(-total // shard_tokens)
        for i in range(n_shards):
            t = min(shard_tokens, total - i * shard_tokens)
            digest = hashlib.sha256(f"{name}/{i}".encode()).hexdigest()
            entries.append(ShardEntry(path=f"shards/{name}/train/{i:06d}", source=name, split="train",
                                      docs=max(1, t // 1000), tokens=t, dtype="uint16", bin_sha256=digest,
                                      idx_sha256=digest, bin_bytes=2 * t))
        digest = hashlib.sha256(f"{name}/validation".encode()).hexdigest()
        entries.append(ShardEntry(path=f"shards/{name}/validation/000000", source=name, split="validation",
                                  docs=1000, tokens=1_000_000, dtype="uint16", bin_sha256=digest,
                                  idx_sha256=digest, bin_bytes=2_000_000))
    tok = TokenizerInfo(path="synthetic.model", sha256=hashlib.sha256(b"synthetic").hexdigest(),
                        vocab_size=vocab, bos_id=BOS, eos_id=EOS)
    plan(run_url, make_manifest(tok, True, False, "uint16", entries), weights, seq_len, seed, token_budget)
    return len(entries)


def write_stub_shards(run_url: str) -> int:
    """For every shard of the run's manifest: a sparse `.bin` of `bin_bytes` and an `.idx` with the
    right header and size (its body is zeros), so that the files pass the checks that read only
    sizes and headers. Returns the number of shards written."""
    import os

    from pipeline.formats.manifest import load_manifest, shard_prefix

    manifest = load_manifest(run_url)
    for e in manifest.shards:
        prefix = storage.url_to_fs(shard_prefix(run_url, e))[1]
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        with open(prefix + ".bin", "wb") as fh:
            fh.truncate(e.bin_bytes)
        with open(prefix + ".idx", "wb") as fh:
            fh.write(HEADER.pack(MAGIC, VERSION, dtype_code(e.dtype), e.docs, e.docs + 1))
            fh.truncate(HEADER.size + 12 * e.docs + 8 * (e.docs + 1))
    return len(manifest.shards)


def rewrite_json(url: str, edit) -> None:
    """Load a JSON file, apply `edit(dict)`, write it back (tests that tamper with a plan)."""
    data = orjson.loads(storage.read_bytes(url))
    edit(data)
    storage.write_bytes(url, orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")
