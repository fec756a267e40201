"""Benchmark: tokenize+pack against SentencePiece alone and a TinyLlama-style baseline.

    python tests/benchmarks/bench_tokenize.py [--corpus prose,code] [--mb 8] [--runs 3]
        [--tokenizer PATH] [--profile tottime] [--json]

Corpora (`--corpus`, comma-separated, each measured on its own):

* prose: `--mb` MB of real English of this machine (pipeline/tools/realtext.py `make_prose`:
  /usr/share/doc, Perl manuals, pydoc topics; no line twice), documents of about 4.5 KB;
* code: `--mb` MB of real code, C headers (/usr/include) and Python sources alternating, one
  file a document (realtext's files);
* stdlib: the older corpus, SlimPajama-like prose made of stdlib docstrings joined into
  documents of about 4.5 KB (as bench_ingest.py does); many repeated paragraphs.

Each is written as ingested docs parquet in a scratch run directory. The tokenizer: a
32,000-piece Llama-2-like BPE (`train_tokenizer`) trained on held-back real text (the 6 MB of
prose and 4 MB of code that follow the measured documents); `--tokenizer` uses a given model
instead, e.g. Llama-2's `tokenizer.model`. Then, in this process, on the same documents:

* floor: `sp.encode(batch_of_1024_texts, num_threads=1)`, texts already in memory;
* tinyprep: the tokenize stage run in this process (`run_stage(LocalExecutor(), "tokenize", ...)`:
  holdout, group and encode phases and the manifest, `cpus_per_task: 1`, BOS per document)
  reading the docs parquet and writing `.bin`/`.idx` shards, with the exact segment-caching
  encoder (pipeline/tokenize/encoder.py) starting from an empty cache in every pass;
* tinyllama_style (TinyLlama's prepare_slimpajama.py, written here from REFERENCES.md): the same
  documents as SlimPajama `jsonl.zst`, read as a zstd text stream, `json.loads` of each line (twice,
  for the text and the set name, as the script does), lit-gpt's `Tokenizer.encode` (`sp.encode(text)`,
  BOS prepended, `torch.tensor(ids, dtype=torch.int)`), `np.array(tensor, dtype=uint16)` into a
  LITPKDS builder (buffer pre-filled with the separator, a chunk written when full);
* tinyprep_plain: the same stage with `tokenize.cache_entries: 0` (plain batched SentencePiece);
* per_document (the same loop without the JSON and torch steps, reading our docs parquet): the
  cost of encoding one document per call into a builder, apart from the input format.

Speeds are tokens per CPU-second of this process (`time.process_time`, all threads counted),
i.e. per core; best of `--runs`, interleaved. The shards' ids are checked equal to the floor's
after every stage pass. `--profile` prints a cProfile of one more tinyprep pass per corpus.
Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LITPKDS_HEADER = b"LITPKDS"


def stdlib_texts(mb: float, seed: int = 0) -> list[str]:
    """SlimPajama-like prose made of stdlib docstrings (the older corpus)."""
    from bench_ingest import stdlib_docstrings

    rng = random.Random(seed)
    pool = stdlib_docstrings()
    texts, size = [], 0
    while size < mb * 1e6:
        k = max(1, min(60, int(rng.lognormvariate(2.2, 1.0))))
        text = "\n\n".join(rng.choice(pool) for _ in range(k))
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts


def real_texts(mb: float) -> tuple[dict[str, list[str]], list[str]]:
    """({"prose": documents, "code": documents}, held-back documents to train a tokenizer on)."""
    from bench_encoder import real_corpora

    corpora, prose_rest, code_rest = real_corpora(mb)
    held, size = [], 0
    for d in prose_rest:
        held.append(d)
        size += len(d)
        if size >= 6e6:
            break
    size = 0
    for d in code_rest:
        held.append(d)
        size += len(d)
        if size >= 4e6:
            break
    return {"prose": corpora["prose"], "code": corpora["code"]}, held


def build_docs(run: Path, all_texts: list[str], files: int = 4) -> int:
    """Docs parquet (the ingest schema) of the documents under run/docs/slimpajama/, and the same
    as SlimPajama jsonl.zst under run/raw/ (for the TinyLlama-style baseline)."""
    import numpy as np
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from pipeline.ingest import SCHEMA, document_ids

    n = 0
    per_file = -(-len(all_texts) // files)
    for f in range(files):
        texts = all_texts[f * per_file:(f + 1) * per_file]
        if not texts:
            break
        rel = f"chunk1/example_train_{f}.jsonl.zst.parquet"
        rows = np.arange(len(texts))
        table = pa.table({"id": document_ids("slimpajama", rel, rows), "source": ["slimpajama"] * len(texts),
                          "subset": ["RedPajamaCommonCrawl"] * len(texts), "file": [rel] * len(texts),
                          "row": rows, "text": texts, "meta": ["{}"] * len(texts)}, schema=SCHEMA)
        out = run / "docs" / "slimpajama" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out, compression="zstd", row_group_size=4096)
        raw = run / "raw" / "slimpajama" / rel[:-len(".parquet")]
        raw.parent.mkdir(parents=True, exist_ok=True)
        lines = b"".join(orjson.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}}) + b"\n"
                         for t in texts)
        raw.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        n += len(texts)
    return n


def read_texts(run: Path) -> list[str]:
    import pyarrow.parquet as pq

    out = []
    for p in sorted((run / "docs" / "slimpajama").rglob("*.parquet")):
        out += pq.read_table(p, columns=["text"]).column("text").to_pylist()
    return out


def floor(sp, texts: list[str]) -> tuple[float, list[list[int]]]:
    t0 = time.process_time()
    ids: list[list[int]] = []
    for i in range(0, len(texts), 1024):
        ids += sp.encode(texts[i:i + 1024], num_threads=1)
    return time.process_time() - t0, ids


class PackedBuilder:
    """TinyLlama's PackedDatasetBuilder, from the LITPKDS layout: a buffer pre-filled with the
    separator, `add_array` copies into it and writes a chunk file whenever it is full."""

    def __init__(self, out: Path, prefix: str, chunk_size: int, sep: int):
        import numpy as np

        self.out, self.prefix, self.chunk_size, self.sep = out, prefix, chunk_size, sep
        self.arr = np.full(chunk_size, sep, dtype=np.uint16)
        self.idx = 0
        self.counter = 0

    def _write_chunk(self) -> None:
        import struct

        with open(self.out / f"{self.prefix}_{self.counter:010d}.bin", "wb") as fh:
            fh.write(LITPKDS_HEADER + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", self.chunk_size))
            fh.write(self.arr.tobytes(order="C"))
        self.counter += 1
        self.arr.fill(self.sep)
        self.idx = 0

    def add_array(self, arr) -> None:
        while self.idx + arr.shape[0] > self.chunk_size:
            part_len = self.chunk_size - self.idx
            self.arr[self.idx:self.idx + part_len] = arr[:part_len]
            self._write_chunk()
            arr = arr[part_len:]
        self.arr[self.idx:self.idx + arr.shape[0]] = arr
        self.idx += arr.shape[0]

    def write_reminder(self) -> None:
        self._write_chunk()  # TinyLlama's padded remainder (issue #83), kept for an equal amount of I/O


def tinyllama_style(sp, run: Path, out: Path, chunk_size: int = 2049 * 1024) -> tuple[float, int]:
    """prepare_slimpajama.py: jsonl.zst, json.loads per line, lit-gpt Tokenizer.encode, builder."""
    import io
    import json as pyjson

    import numpy as np
    import torch
    import zstandard

    t0 = time.process_time()
    bos = sp.bos_id()
    builder = PackedBuilder(out, "train_slimpajama", chunk_size, bos)
    tokens = 0
    for path in sorted((run / "raw" / "slimpajama").rglob("*.jsonl.zst")):
        with open(path, "rb") as raw, io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw),
                                                        encoding="utf-8") as f:
            for row in f:
                text = pyjson.loads(row)["text"]
                if pyjson.loads(row)["meta"]["redpajama_set_name"] == "RedPajamaGithub":
                    continue
                ids = torch.tensor([bos] + sp.encode(text), dtype=torch.int)  # lit_gpt Tokenizer.encode(bos=True)
                with warnings.catch_warnings():  # numpy 2 warns about torch's __array__ signature
                    warnings.simplefilter("ignore", DeprecationWarning)
                    arr = np.array(ids, dtype=np.uint16)
                tokens += arr.size
                builder.add_array(arr)
    builder.write_reminder()
    return time.process_time() - t0, tokens


def per_document(sp, run: Path, out: Path, chunk_size: int = 2049 * 1024) -> tuple[float, int]:
    """The same builder fed one sp.encode per document, reading our docs parquet (no JSON, no torch)."""
    import numpy as np
    import pyarrow.parquet as pq

    t0 = time.process_time()
    bos = sp.bos_id()
    builder = PackedBuilder(out, "train_slimpajama", chunk_size, bos)
    tokens = 0
    for p in sorted((run / "docs" / "slimpajama").rglob("*.parquet")):
        for batch in pq.ParquetFile(p).iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                arr = np.array([bos] + sp.encode(text), dtype=np.uint16)
                tokens += arr.size
                builder.add_array(arr)
    builder.write_reminder()
    return time.process_time() - t0, tokens


def tinyprep_stage(run: Path, tokenizer: Path, cache_entries: int = 1_000_000) -> tuple[float, object]:
    from pipeline.executors import LocalExecutor
    from pipeline.recipe import parse_recipe
    from pipeline.runner import run_stage
    from pipeline.tokenize import packer

    # the previous pass's outputs and completion records: run_stage would skip its tasks
    for sub in ("shards", "tokenize", "tasks", "manifest.json"):
        p = run / sub
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    recipe = parse_recipe({
        "name": "bench", "output": str(run), "stages": ["tokenize"],
        "sources": [{"name": "slimpajama", "urls": [str(run / "docs" / "x")]}],
        "tokenizer": {"model": str(tokenizer)},
        "tokenize": {"bos": True, "eos": False, "cpus_per_task": 1, "cache_entries": cache_entries},
    })
    packer._ENCODERS.clear()  # a cold segment cache every pass: no credit for a previous pass
    t0 = time.process_time()
    run_stage(LocalExecutor(), "tokenize", recipe, str(run))
    return time.process_time() - t0, recipe


def check_ids(run: Path, recipe, sp, floor_ids: list[list[int]]) -> int:
    """The train shards hold exactly BOS + the floor's ids of every train document, in order."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.formats.manifest import load_manifest, shard_prefix
    from pipeline.formats.megatron import MegatronReader
    from pipeline.tokenize import holdout_mask

    ids = np.concatenate([pq.read_table(p, columns=["id"]).column("id").to_numpy()
                          for p in sorted((run / "docs" / "slimpajama").rglob("*.parquet"))])
    held = holdout_mask(ids, recipe.tokenize.holdout_fraction, recipe.tokenize.holdout_seed)
    manifest = load_manifest(str(run))
    got = [d for s in manifest.shards_of("slimpajama", "train") for d in MegatronReader(shard_prefix(str(run), s))]
    expected = [x for x, h in zip(floor_ids, held) if not h]
    dup = manifest.sources["slimpajama"]["train"]["docs"] - len(expected)
    assert dup <= 0
    if len(got) != len(expected):  # train documents equal to a held-out one were dropped: compare as multisets
        raise AssertionError(f"{len(got)} train documents in the shards, {len(expected)} expected")
    for g, e in zip(got, expected):
        if g[0] != sp.bos_id() or g[1:].tolist() != e:
            raise AssertionError("shard ids differ from SentencePiece's")
    return len(got)


def bench_corpus(run: Path, texts: list[str], model: Path, runs: int, tmp: Path,
                 profile: str | None) -> dict:
    import sentencepiece as spm

    n_docs = build_docs(run, texts)
    texts = read_texts(run)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    sp = spm.SentencePieceProcessor(model_file=str(model))
    results: dict[str, list[float]] = {"floor": [], "tinyprep": [], "tinyprep_plain": [], "tinyllama_style": [],
                                       "per_document": []}
    tokens = 0
    for _ in range(runs):
        secs, floor_ids = floor(sp, texts)
        tokens = sum(map(len, floor_ids))
        results["floor"].append(tokens / secs)
        secs, recipe = tinyprep_stage(run, model)
        results["tinyprep"].append((tokens + n_docs) / secs)  # the shards hold a BOS per document
        check_ids(run, recipe, sp, floor_ids)
        secs, recipe = tinyprep_stage(run, model, cache_entries=0)  # plain SentencePiece batches
        results["tinyprep_plain"].append((tokens + n_docs) / secs)
        check_ids(run, recipe, sp, floor_ids)
        for name, baseline in (("tinyllama_style", tinyllama_style), ("per_document", per_document)):
            out = tmp / "litgpt"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            secs, n = baseline(sp, run, out)
            assert n == tokens + n_docs
            results[name].append(n / secs)
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(tinyprep_stage, run, model)
        pstats.Stats(prof).sort_stats(profile).print_stats(30)
    best = {k: max(v) for k, v in results.items()}
    return {
        "mb": round(mb, 2), "documents": n_docs, "tokens": tokens,
        "tokens_per_cpu_s": {k: round(v) for k, v in best.items()},
        "ratio_to_floor": {k: round(v / best["floor"], 3) for k, v in best.items()},
        "tinyprep_vs_tinyllama_style": round(best["tinyprep"] / best["tinyllama_style"], 3),
        "tinyprep_vs_per_document": round(best["tinyprep"] / best["per_document"], 3),
        "ids_identical_to_sentencepiece": True,
    }


def main(argv: list[str] | None = None) -> dict:
    import sentencepiece as spm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="prose,code", help="prose, code, stdlib (comma-separated)")
    ap.add_argument("--mb", type=float, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokenizer", help="a SentencePiece model (default: train a 32,000-piece BPE on held-back text)")
    ap.add_argument("--profile", default=None, help="pstats sort key: profile one more tinyprep pass")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.corpus.split(",") if k.strip()]
    unknown = set(kinds) - {"prose", "code", "stdlib"}
    if unknown:
        ap.error(f"--corpus: unknown {sorted(unknown)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        corpora, held = real_texts(args.mb)
        if "stdlib" in kinds:
            corpora["stdlib"] = stdlib_texts(args.mb)
        if args.tokenizer:
            model = Path(args.tokenizer)
        else:
            from pipeline.tokenize import train_tokenizer

            model = tmp / "tokenizer.model"
            (tmp / "held.txt").write_text("\n".join(held), encoding="utf-8")
            t0 = time.time()
            train_tokenizer([str(tmp / "held.txt")], str(model), vocab_size=32000)
            print(f"trained a 32,000-piece BPE tokenizer in {time.time() - t0:.1f}s", file=sys.stderr)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        summary: dict = {"tokenizer": str(model) if args.tokenizer else
                         "32,000-piece BPE trained by train_tokenizer on held-back real text",
                         "vocab_size": sp.vocab_size(), "runs": args.runs, "cpus": os.cpu_count()}
        for kind in kinds:
            r = bench_corpus(tmp / f"run-{kind}", corpora[kind], model, args.runs, tmp, args.profile)
            summary[kind] = r
            if not args.json:
                best = r["tokens_per_cpu_s"]
                print(f"{kind}: {r['mb']:.1f} MB, {r['documents']:,} documents, {r['tokens']:,} tokens; "
                      f"best of {args.runs}, tokens per CPU-second:")
                for k in ("floor", "tinyprep", "tinyprep_plain", "tinyllama_style", "per_document"):
                    print(f"  {k:16s} {best[k] / 1e6:6.3f}M  ({r['ratio_to_floor'][k]:.3f}x the floor)")
                print(f"  tinyprep / tinyllama_style = {r['tinyprep_vs_tinyllama_style']:.3f}, "
                      f"tinyprep / per_document = {r['tinyprep_vs_per_document']:.3f}", flush=True)
        if args.json:
            print(json.dumps(summary, indent=2))
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
