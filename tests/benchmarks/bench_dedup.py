"""Benchmark: end-to-end fuzzy dedup against datatrove's MinHash and rensa, on the same corpus.

    python tests/benchmarks/bench_dedup.py [--mb 40] [--files 8] [--pairs 300] [--json]

Builds about `--mb` MB of SlimPajama-like `jsonl.zst` (documents of words drawn from the stdlib's
docstrings, about 4.5 KB each; a third with non-ASCII words; SlimPajama sets as metadata), with
planted near-duplicate pairs of known 13-character-shingle Jaccard (the sample's generator,
targets 0.95 ... 0.3) and a few exact copies. It ingests them once (untimed), then times, in this
process and on the same ingested parquet files:

* tinyprep: every phase of the dedup stage (signatures, buckets, gather, verify, the connected
  component rounds, removal lists), task after task as Ray would run them, without Ray itself;
  the recipe's SlimPajama normalization and 13-character shingles, 128 permutations,
  `--bands` x `--rows` (default auto: 17 x 7, the recipe default), threshold 0.8, exact-Jaccard verification;
* datatrove 0.10: its four MinHash stages (signature, buckets, cluster, filter) with its default
  configuration (5-word shingles, 14 buckets x 8 hashes), one task per stage (buckets: one per
  bucket) on a LocalPipelineExecutor with one worker;
* rensa (if installed: `pip install rensa`; skipped with a message otherwise): 13-character
  shingles of the same normalized text, `RMinHash.from_token_sets` (128 permutations), an
  `RMinHashLSH` at threshold 0.8 with `--rensa-bands` bands, candidates verified with the exact
  shingle-set Jaccard, a union-find, and the removal list (lowest id survives).

Speeds are MB of document text (UTF-8) per CPU-second of this process (`time.process_time`, all
threads), i.e. per core. Every side's recall is measured on the planted pairs with true J >= 0.8
(a pair counts when one of its two documents is removed), its false-positive rate on the pairs
with J < 0.5, and its removals outside planted pairs and copies ("spurious"). Importing this
module has no side effects.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia", "RedPajamaArXiv", "RedPajamaStackExchange"]
TARGETS = (0.95, 0.9, 0.85, 0.82, 0.8, 0.75, 0.7, 0.6, 0.5, 0.3)


def _vocabulary() -> tuple[list[str], list[float]]:
    import re

    from bench_ingest import stdlib_docstrings

    counts: dict[str, int] = {}
    for d in stdlib_docstrings(2 << 20):
        for w in re.findall(r"[A-Za-z]{2,14}|[.,;:()]", d):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:20000]
    weights = [1.0 / (i + 10) for i in range(len(words))]  # Zipf-like
    return words, weights


def generate_corpus(out_dir: str, mb: float = 40, files: int = 8, pairs: int = 300, copies: int = 100,
                    seed: int = 0) -> dict:
    """Write SlimPajama-like chunk*/example_train_*.jsonl.zst; return the planted truth."""
    import orjson
    import zstandard

    from pipeline.sample import _make_near_duplicate, jaccard

    rng = random.Random(seed)
    words, weights = _vocabulary()
    accents = ["café", "naïve", "Zürich", "“quoted”", "—", "Ελληνικά", "日本語", "don’t", "São Paulo"]
    vocab = [w for w in words[:5000] if w.isalpha()]

    def doc() -> str:
        n = max(60, min(4000, int(rng.lognormvariate(6.3, 0.8))))  # words; about 4.5 KB on average
        ws = rng.choices(words, weights, k=n)
        if rng.random() < 0.33:
            for _ in range(rng.randint(1, 5)):
                ws.insert(rng.randrange(len(ws)), rng.choice(accents))
        return " ".join(ws)

    records: list[dict] = []
    target_bytes = int(mb * 1e6)
    size = 0
    while size < target_bytes:
        t = doc()
        records.append({"text": t, "meta": {"redpajama_set_name": rng.choice(SETS)}})
        size += len(t.encode("utf-8"))
    # planted near-duplicate pairs (each document in at most one pair) and exact copies
    idx = rng.sample(range(len(records)), min(len(records), pairs * 2 + copies))
    planted_pairs = []
    for k in range(pairs):
        a = records[idx[k]]
        target = TARGETS[k % len(TARGETS)]
        made = _make_near_duplicate(rng, a["text"], target, vocab)
        if made is None:
            continue
        b_text, j = made
        b = records[idx[pairs + k]]
        b["text"] = b_text
        planted_pairs.append({"a": id(a), "b": id(b), "jaccard": j})
    copied = []
    planted = set(idx)
    free = [i for i in range(len(records)) if i not in planted]
    for k, src_i in enumerate(rng.sample(free, min(len(free), len(idx) - 2 * pairs))):
        src, dst = records[src_i], records[idx[2 * pairs + k]]
        dst["text"] = src["text"]
        copied.append((id(src), id(dst)))
    # write files; remember every record's location
    out = Path(out_dir)
    per_file = (len(records) + files - 1) // files
    where: dict[int, tuple[str, int]] = {}
    cctx = zstandard.ZstdCompressor(level=3)
    for f in range(files):
        part = records[f * per_file:(f + 1) * per_file]
        rel = f"chunk{f % 2 + 1}/example_train_{f}.jsonl.zst"
        for row, r in enumerate(part):
            where[id(r)] = (rel, row)
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(cctx.compress(b"".join(orjson.dumps(r) + b"\n" for r in part)))
    del jaccard
    return {"docs": len(records), "text_bytes": size,
            "pairs": [{"a": where[p["a"]], "b": where[p["b"]], "jaccard": p["jaccard"]} for p in planted_pairs],
            "copies": [(where[a], where[b]) for a, b in copied]}


def make_recipe(corpus: str, run_dir: str, bands: int | str, rows: int | str):
    from pipeline.recipe import parse_recipe

    return parse_recipe({
        "name": "bench", "output": run_dir, "stages": ["ingest", "dedup"],
        "sources": [{"name": "slimpajama", "urls": [f"{corpus}/**/*.jsonl.zst"], "text_field": "text",
                     "subset": "meta.redpajama_set_name", "normalize": "nfc", "min_chars": 200}],
        "ingest": {"max_errors": None},
        "dedup": {"bands": bands, "rows": rows, "permutations": 128, "threshold": 0.8, "verify": True,
                  "shingle": "chars", "shingle_size": 13, "normalize": "slimpajama"},
    })


def run_stage_inline(name: str, recipe, run_dir: str) -> int:
    """Every phase's tasks, one after the other, in this process (the runner with the in-process
    executor); returns the number of tasks."""
    from pipeline.executors import LocalExecutor
    from pipeline.runner import run_stage

    report = run_stage(LocalExecutor(), name, recipe, run_dir)
    assert report.ok, report.failed
    return report.tasks


def docs_table(run_dir: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(run_dir, "docs").rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(p, columns=["id", "file", "row", "text"]) for p in files])


# ---------------------------------------------------------------------------------------------
# The three sides; each returns the set of removed document ids


def tinyprep_side(recipe, run_dir: str) -> set[int]:
    import pyarrow.parquet as pq

    run_stage_inline("dedup", recipe, run_dir)
    removed: set[int] = set()
    for p in Path(run_dir, "dedup", "removed").rglob("*.parquet"):
        removed.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
    return removed


def datatrove_side(run_dir: str, work: str) -> set[int]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    _patch_datatrove_xxhash()
    cfg = MinhashConfig()  # datatrove's defaults: 5-word shingles, 14 buckets x 8 hashes
    docs = os.path.join(run_dir, "docs")

    def reader():
        return ParquetReader(docs, text_key="text", id_key="id", glob_pattern="**/*.parquet")

    def run(pipeline, tasks=1):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=os.path.join(work, "logs",
                              str(time.monotonic_ns())), skip_completed=False).run()

    run([reader(), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)])
    run([MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)],
        tasks=cfg.num_buckets)
    run([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=cfg)])
    run([reader(), MinhashDedupFilter(input_folder=f"{work}/remove",
                                      exclusion_writer=JsonlWriter(f"{work}/removed", compression=None))])
    import orjson

    removed = set()
    for p in Path(work, "removed").rglob("*.jsonl"):
        for line in p.read_bytes().splitlines():
            if line.strip():
                removed.add(int(orjson.loads(line)["id"]))
    return removed


def _patch_datatrove_xxhash() -> None:
    """datatrove 0.10.1 passes str to xxhash, which xxhash >= 4 refuses: encode first (as xxhash 3 did in C)."""
    import datatrove.utils.hashes.xxhash as dt_xxhash
    import xxhash

    def xxhash64(data, _h=xxhash.xxh64_intdigest):
        return _h(data.encode("utf-8") if isinstance(data, str) else data)

    def xxhash32(data, _h=xxhash.xxh32_intdigest):
        return _h(data.encode("utf-8") if isinstance(data, str) else data)

    dt_xxhash.xxhash64, dt_xxhash.xxhash32 = xxhash64, xxhash32


def rensa_side(run_dir: str, bands: int, threshold: float = 0.8) -> set[int]:
    from rensa import RMinHash, RMinHashLSH

    from pipeline.text import slimpajama_normalize

    table = docs_table(run_dir)
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist()
    n = 13
    shingles = []
    for t in texts:
        s = slimpajama_normalize(t)
        shingles.append([s[i:i + n] for i in range(len(s) - n + 1)] if len(s) > n else ([s] if s else []))
    hashes = RMinHash.from_token_sets(shingles, 128, 42)
    lsh = RMinHashLSH(threshold, 128, bands)
    lsh.insert_many(hashes)
    parent = list(range(len(ids)))
    sets: dict[int, set] = {}  # shingle sets, built only for the candidates

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def shingle_set(i):
        if i not in sets:
            sets[i] = set(shingles[i])
        return sets[i]

    for i, cands in enumerate(lsh.query_all(hashes)):
        for j in cands:
            if j <= i:
                continue
            a, b = shingle_set(i), shingle_set(j)
            inter = len(a & b)
            if inter / (len(a) + len(b) - inter or 1) >= threshold:  # exact Jaccard of the candidates
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    best: dict[int, int] = {}
    for i in range(len(ids)):
        r = find(i)
        if r not in best or ids[i] < ids[best[r]]:
            best[r] = i
    return {ids[i] for i in range(len(ids)) if best[find(i)] != i}


# ---------------------------------------------------------------------------------------------


def quality(removed: set[int], truth: dict, id_of) -> dict:
    hi = [p for p in truth["pairs"] if p["jaccard"] >= 0.8]
    lo = [p for p in truth["pairs"] if p["jaccard"] < 0.5]
    hit = lambda p: id_of(p["a"]) in removed or id_of(p["b"]) in removed  # noqa: E731
    expected = {id_of(p["a"]) for p in truth["pairs"]} | {id_of(p["b"]) for p in truth["pairs"]}
    for a, b in truth["copies"]:
        expected |= {id_of(a), id_of(b)}
    copies_found = sum(id_of(a) in removed or id_of(b) in removed for a, b in truth["copies"])
    return {"recall_ge_0.8": round(sum(map(hit, hi)) / max(len(hi), 1), 4), "pairs_ge_0.8": len(hi),
            "fp_rate_lt_0.5": round(sum(map(hit, lo)) / max(len(lo), 1), 4), "pairs_lt_0.5": len(lo),
            "copies_found": f"{copies_found}/{len(truth['copies'])}",
            "spurious_removals": len(removed - expected), "removed": len(removed)}


def run_benchmark(mb: float = 40, files: int = 8, pairs: int = 300, bands: int | str = "auto", rows: int | str = "auto",
                  rensa_bands: int = 32, skip_datatrove: bool = False) -> dict:
    results: dict = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_dedup_") as tmp:
        corpus, run_dir = os.path.join(tmp, "corpus"), os.path.join(tmp, "run")
        t0 = time.perf_counter()
        truth = generate_corpus(corpus, mb=mb, files=files, pairs=pairs)
        recipe = make_recipe(corpus, run_dir, bands, rows)
        run_stage_inline("ingest", recipe, run_dir)
        table = docs_table(run_dir)
        text_mb = sum(len(t.encode("utf-8")) for t in table.column("text").to_pylist()) / 1e6
        loc = {(f, r): i for i, f, r in zip(table.column("id").to_pylist(), table.column("file").to_pylist(),
                                           table.column("row").to_pylist())}
        id_of = lambda w: loc[tuple(w)]  # noqa: E731
        ndocs = table.num_rows
        del table
        results["corpus"] = {"docs": ndocs, "text_mb": round(text_mb, 2), "planted_pairs": len(truth["pairs"]),
                             "copies": len(truth["copies"]), "generated_s": round(time.perf_counter() - t0, 1)}

        sides = {f"tinyprep ({recipe.dedup.bands}x{recipe.dedup.rows}, verified)":
                 lambda: tinyprep_side(recipe, run_dir)}
        if not skip_datatrove:
            try:
                import datatrove.pipeline.dedup.minhash  # noqa: F401  (needs `tokenizers`)
                import spacy  # noqa: F401  (datatrove's English word tokenizer)

                sides["datatrove (14x8, 5-grams)"] = lambda: datatrove_side(run_dir, os.path.join(tmp, "datatrove"))
            except ImportError as e:
                print(f"datatrove's MinHash cannot be imported ({e}; pip install tokenizers): its side is skipped",
                      file=sys.stderr)
        try:
            import rensa  # noqa: F401

            sides[f"rensa ({rensa_bands} bands, verified)"] = lambda: rensa_side(run_dir, rensa_bands)
        except ImportError:
            print("rensa is not installed (pip install rensa): its side is skipped", file=sys.stderr)
        for name, fn in sides.items():
            c0, w0 = time.process_time(), time.perf_counter()
            removed = fn()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            results[name] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                             "mb_per_s_per_core": round(text_mb / cpu, 2),
                             "docs_per_s_per_core": round(ndocs / cpu), **quality(removed, truth, id_of)}
        base = next((v for k, v in results.items() if k.startswith("datatrove")), None)
        for k, v in results.items():
            if isinstance(v, dict) and "mb_per_s_per_core" in v and base:
                v["x_datatrove"] = round(v["mb_per_s_per_core"] / base["mb_per_s_per_core"], 1)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=40)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--bands", default="auto", help="LSH bands (default: auto, as the recipe's default)")
    ap.add_argument("--rows", default="auto", help="rows per band (default: auto)")
    ap.add_argument("--rensa-bands", type=int, default=32)
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    import logging

    logging.getLogger("datatrove").setLevel(logging.WARNING)
    try:
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    as_int = lambda v: v if v == "auto" else int(v)  # noqa: E731
    res = run_benchmark(a.mb, a.files, a.pairs, as_int(a.bands), as_int(a.rows), a.rensa_bands, a.skip_datatrove)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"corpus: {res['corpus']}")
    print(f"{'side':34} {'MB/s/core':>9} {'docs/s/core':>11} {'x datatrove':>11} {'recall>=.8':>10} "
          f"{'FP<.5':>6} {'copies':>8} {'spurious':>8} {'cpu s':>7}")
    for k, v in res.items():
        if isinstance(v, dict) and "cpu_s" in v:
            print(f"{k:34} {v['mb_per_s_per_core']:9.2f} {v['docs_per_s_per_core']:11,} "
                  f"{v.get('x_datatrove', float('nan')):11.1f} {v['recall_ge_0.8']:10.3f} {v['fp_rate_lt_0.5']:6.3f} "
                  f"{v['copies_found']:>8} {v['spurious_removals']:8} {v['cpu_s']:7.1f}")


if __name__ == "__main__":
    main()
