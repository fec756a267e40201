"""Benchmark: ingest throughput against the floor of reading the same files.

    python tests/benchmarks/bench_ingest.py [--mb 30] [--files 4] [--runs 3] [--codecs zstd,none] [--json]

Builds about `--mb` MB of text as SlimPajama-like `jsonl.zst` files (documents made of stdlib
docstrings, about 3.3 KB on average; a third with some non-ASCII text, 0.5% with decomposed
(NFD) accents, 2% cut short: with the naturally short ones, 9% are filtered), then, in this
process:

* floor: zstd stream decompression plus `orjson.loads` of every line of the same files;
* ingest: the ingest stage run in this process, `run_stage(LocalExecutor(), "ingest", ...)`
  (plan, every file's task, completion records, merged stats), on a recipe built in code:
  SlimPajama settings, NFC, min_chars 200, a selection, a subset and a metadata field; once
  per output codec of `--codecs` (`zstd`, `zstd:LEVEL`, `lz4_raw`, `snappy`, `none`; `all`:
  every one measured in tests/benchmarks/README.md). Before each pass the outputs and
  completion records are removed (untimed), so that every pass runs every task.

The docstrings (1.6 MB) are drawn in shuffled rounds, each once per round, and every round
rotates the ASCII letters by its own amount (rot-N, N = round mod 26): the text of a round
keeps the statistics of prose, and no codec window finds it again in the next round. So the
sizes written (`written`: parquet bytes per byte of text kept) are those of prose-like text,
not of the same documents repeated. After each pass the text column of the documents is read
back (`read`: MB of text per CPU-second, as dedup and tokenize read it; not part of the pass).

Speeds are MB of document text per CPU-second of this process (`time.process_time`, all
threads and the kernel's work for the process counted), i.e. per core; best of `--runs`.
Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import string
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SETS = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaBook", "RedPajamaArXiv", "RedPajamaWikipedia",
        "RedPajamaStackExchange"]


def stdlib_docstrings(limit_bytes: int = 4 << 20) -> list[str]:
    """Docstrings of the running Python's stdlib (sorted walk, deterministic), up to limit_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen, total = [], set(), 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
                    total += len(doc)
        if total >= limit_bytes:
            break
    return out


def generate_corpus(out_dir: str | os.PathLike, mb: float = 30, files: int = 4, seed: int = 0) -> dict:
    """Write SlimPajama-like chunk*/example_train_*.jsonl.zst files; returns sizes and counts."""
    import orjson
    import zstandard

    rng = random.Random(seed)
    docs = stdlib_docstrings()
    pool: list[str] = []
    rounds = [0]
    lower, upper = string.ascii_lowercase, string.ascii_uppercase

    def paragraph() -> str:
        """The docstrings in shuffled rounds, each round's letters rotated by its own amount."""
        if not pool:
            k = rounds[0] % 26
            rot = str.maketrans(lower + upper, lower[k:] + lower[:k] + upper[k:] + upper[:k])
            pool.extend(d.translate(rot) for d in docs)
            rng.shuffle(pool)
            rounds[0] += 1
        return pool.pop()
    accents = ["café", "naïve", "Zürich", "“quoted”", "— dash", "Ελληνικά", "日本語", "don’t"]
    nfd = "e\u0301te\u0301 a\u0300 Mu\u0308nchen"  # decomposed: NFC changes it
    target = int(mb * 1e6)
    per_file = target // files
    out = Path(out_dir)
    text_bytes = n_docs = 0
    cctx = zstandard.ZstdCompressor(level=3)
    for f in range(files):
        lines, size = [], 0
        while size < per_file:
            k = max(1, min(60, int(rng.lognormvariate(2.2, 1.0))))
            text = "\n\n".join(paragraph() for _ in range(k))
            r = rng.random()
            if r < 0.02:
                text = text[: rng.randrange(20, 150)]
            elif r < 0.35:  # a third of SlimPajama-like documents has some non-ASCII text
                pos = rng.randrange(len(text))
                extra = nfd if r < 0.025 else rng.choice(accents)
                text = text[:pos] + " " + extra + " " + text[pos:]
            lines.append(orjson.dumps({"text": text, "meta": {"redpajama_set_name": rng.choice(SETS)}}))
            b = len(text.encode("utf-8"))
            size += b
            text_bytes += b
            n_docs += 1
        p = out / f"chunk{f % 2 + 1}" / f"example_train_{f}.jsonl.zst"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(cctx.compress(b"\n".join(lines) + b"\n"))
    return {"files": files, "docs": n_docs, "text_bytes": text_bytes}


def corpus_files(root: str | os.PathLike) -> list[Path]:
    return sorted(Path(root).rglob("*.jsonl.zst"))


def floor_pass(paths: list[Path]) -> int:
    """Decompress (streaming) and orjson.loads every line; returns the number of records."""
    import orjson
    import zstandard

    loads = orjson.loads
    n = 0
    for p in paths:
        with open(p, "rb") as fh:
            reader = zstandard.ZstdDecompressor().stream_reader(fh)
            rest = b""
            while True:
                chunk = reader.read(1 << 20)
                if not chunk:
                    break
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line:
                        loads(line)
                        n += 1
    return n


CODECS_ALL = ("none", "lz4_raw", "snappy", "zstd:-5", "zstd:-1", "zstd", "zstd:3")


def codec_settings(codec: str) -> dict:
    """The ingest settings of a codec spec: `zstd`, `zstd:LEVEL`, `lz4_raw`, `snappy`, `none`."""
    name, _, level = codec.partition(":")
    out: dict = {"parquet_compression": name}
    if level:
        out["parquet_compression_level"] = int(level)
    return out


def make_recipe(corpus: str, run_dir: str, codec: str = "zstd"):
    from pipeline.recipe import parse_recipe

    return parse_recipe({
        "name": "bench",
        "output": run_dir,
        "stages": ["ingest"],
        "sources": [{
            "name": "slimpajama",
            "urls": [f"{corpus}/**/*.jsonl.zst"],
            "text_field": "text",
            "subset": "meta.redpajama_set_name",
            "metadata": ["meta.redpajama_set_name"],
            "select": {"exclude": {"meta.redpajama_set_name": ["RedPajamaGithub"]}},
            "normalize": "nfc",
            "min_chars": 200,
        }],
        "ingest": {**codec_settings(codec), "max_errors": None},
    })


def ingest_pass(recipe, run_dir: str) -> dict:
    """One run of the ingest stage, in this process; documents read and kept, text bytes read."""
    from pipeline.executors import LocalExecutor
    from pipeline.runner import run_stage

    report = run_stage(LocalExecutor(), "ingest", recipe, run_dir)
    if not report.ok:
        raise RuntimeError(f"ingest failed: {report.failed}")
    counts = report.stats["sources"].values()
    return {"docs": report.docs, "kept": sum(c["kept"] for c in counts), "bytes": report.bytes,
            "bytes_kept": sum(c["bytes_kept"] for c in counts), "written": docs_bytes(run_dir)}


def docs_bytes(run_dir: str) -> int:
    """Bytes of the documents parquet a pass wrote."""
    from pipeline.layout import RunDir

    return sum(p.stat().st_size for p in Path(RunDir(run_dir).docs_root()).rglob("*.parquet"))


def read_back(run_dir: str) -> int:
    """Read the text column of every documents parquet a pass wrote, as dedup and tokenize do."""
    import pyarrow.parquet as pq

    from pipeline.layout import RunDir

    return sum(pq.read_table(p, columns=["text"], use_threads=False).num_rows
               for p in sorted(Path(RunDir(run_dir).docs_root()).rglob("*.parquet")))


def clear_outputs(run_dir: str) -> None:
    """Remove the documents and completion records of a pass, so that the next one redoes every task."""
    from pipeline.layout import RunDir

    run = RunDir(run_dir)
    for path in (run.docs_root(), run.tasks("ingest")):
        shutil.rmtree(path, ignore_errors=True)


def breakdown(corpus: str, run_dir: str, codec: str = "zstd", runs: int = 5) -> dict:
    """CPU ms of one ingest pass, and of its parts (best pass of `runs`): the functions below are
    timed in place (each is called a few times per batch, so the timers cost nothing to speak of).

    read: the task less its steps and its writing (decompression, parsing, line splitting, fields).
    """
    from pipeline.ingest import counts, steps, task, writer

    spent: dict[str, float] = {}
    targets = [(steps, n, n) for n in ("readable", "selection", "too_large", "nfc", "short", "empty")]
    targets += [(task.Ingestion, "run", "task"), (task.Ingestion, "add", "steps (all)"),
                (writer.DocsWriter, "close", "write (close)"), (writer.DocsWriter, "add", "write (add)"),
                (counts.Counts, "add", "counters")]
    saved = []
    for owner, attr, label in targets:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def timed(*a, _fn=fn, _label=label, **k):
            c0 = time.process_time()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.process_time() - c0

        setattr(owner, attr, timed)
    try:
        recipe = make_recipe(corpus, run_dir, codec)
        best: tuple[float, dict] | None = None
        for _ in range(runs):
            clear_outputs(run_dir)
            spent.clear()
            cpu, _, _ = _timed(lambda: ingest_pass(recipe, run_dir))
            if best is None or cpu < best[0]:
                best = (cpu, dict(spent))
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    cpu, parts = best
    # the writer's add runs inside the steps' add: the steps own what is left
    parts["steps (all)"] -= parts.get("write (add)", 0.0)
    parts["read"] = parts["task"] - parts["steps (all)"] - parts.get("write (add)", 0.0) - parts["write (close)"]
    parts["stage (plan, records, fsync)"] = cpu - parts.pop("task")
    floor = min(_timed(lambda: floor_pass(corpus_files(corpus)))[0] for _ in range(runs))
    return {"codec": codec, "total_ms": cpu * 1e3, "floor_ms": floor * 1e3,
            "parts_ms": {k: round(v * 1e3, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}


def _timed(fn) -> tuple[float, float, object]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def run_benchmark(mb: float = 30, files: int = 4, runs: int = 3, corpus: str | None = None,
                  profile: str | None = None, codecs: tuple[str, ...] = ("zstd", "none")) -> dict:
    """Generate (or use) a corpus and time floor and ingest (once per codec), best of `runs` each.

    The measurements are interleaved (floor, ingest with each codec, floor, ...) so that a
    slow spell of a shared machine weighs on all of them alike. `profile`: a pstats sort key;
    prints a cProfile of one ingest pass (the first codec) first.
    """
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        if corpus is None:
            corpus = os.path.join(tmp, "corpus")
            info = generate_corpus(corpus, mb=mb, files=files)
        else:
            info = {"files": len(corpus_files(corpus))}
        paths = corpus_files(corpus)
        in_bytes = sum(p.stat().st_size for p in paths)
        results = {"corpus": {**info, "compressed_bytes": in_bytes}, "runs": runs, "python": sys.version.split()[0]}

        floor_name = "floor (zstd + orjson.loads)"
        jobs = {floor_name: (lambda: floor_pass(paths), None)}
        run_dirs: dict[str, str] = {}
        for codec in codecs:
            run_dir = os.path.join(tmp, f"run-{codec.replace(':', '_')}")
            recipe = make_recipe(corpus, run_dir, codec)
            if profile and codec == codecs[0]:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(ingest_pass, recipe, run_dir)
                pstats.Stats(prof).sort_stats(profile).print_stats(35)
            # outputs and records are removed before each run (untimed): replacing a file would
            # time its deletion, and a completed record would skip its task
            run_dirs[f"ingest ({codec})"] = run_dir
            jobs[f"ingest ({codec})"] = (
                lambda recipe=recipe, run_dir=run_dir: ingest_pass(recipe, run_dir),
                lambda run_dir=run_dir: clear_outputs(run_dir))
        rows: dict[str, dict] = {}
        text_bytes = 0
        for _ in range(runs):
            for name, (fn, setup) in jobs.items():
                if setup:
                    setup()
                cpu, wall, out = _timed(fn)
                row = rows.setdefault(name, {"cpu_s": cpu, "wall_s": wall})
                row["cpu_s"], row["wall_s"] = min(row["cpu_s"], cpu), min(row["wall_s"], wall)
                if isinstance(out, dict):
                    row.update(docs=out["docs"], kept=out["kept"], written=out["written"] / out["bytes_kept"])
                    text_bytes = out["bytes"]
                    read_cpu, _, _ = _timed(lambda name=name: read_back(run_dirs[name]))
                    row["read_mb_per_s"] = max(row.get("read_mb_per_s", 0.0), out["bytes_kept"] / 1e6 / read_cpu)
                else:
                    row.update(docs=out, kept=None, written=None, read_mb_per_s=None)
        floor_speed = text_bytes / 1e6 / rows[floor_name]["cpu_s"]
        for row in rows.values():
            row["mb_per_s_per_core"] = text_bytes / 1e6 / row["cpu_s"]
            row["ratio_to_floor"] = row["mb_per_s_per_core"] / floor_speed
        results["text_mb"] = text_bytes / 1e6
        results["rows"] = rows
        results["goal"] = "ingest ratio_to_floor >= 0.7"
        return results


def format_table(res: dict) -> str:
    head = (f"text: {res['text_mb']:.1f} MB in {res['corpus']['files']} jsonl.zst files "
            f"({res['corpus']['compressed_bytes'] / 1e6:.1f} MB compressed); best of {res['runs']}; "
            "MB/s = MB of text per CPU-second; written = parquet bytes per byte of text kept; "
            "read = MB/s per core reading the text column back")
    columns = " ".join([f"{'':30s}", *(f"{c:>{w}s}" for c, w in (("MB/s/core", 10), ("ratio", 7), ("cpu s", 7),
                                                                  ("wall s", 7), ("docs", 7), ("kept", 7),
                                                                  ("written", 8), ("read", 7)))])
    lines = [head, columns]
    for name, r in res["rows"].items():
        kept = "" if r["kept"] is None else r["kept"]
        written = "" if r["written"] is None else f"{r['written']:.3f}"
        read = "" if r["read_mb_per_s"] is None else f"{r['read_mb_per_s']:.0f}"
        lines.append(f"{name:30s} {r['mb_per_s_per_core']:10.1f} {r['ratio_to_floor']:7.2f} {r['cpu_s']:7.3f} "
                     f"{r['wall_s']:7.3f} {r['docs']:7d} {kept:>7} {written:>8s} {read:>7s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30, help="MB of text to generate")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--corpus", help="use these jsonl.zst files (a directory) instead of generating")
    ap.add_argument("--profile", nargs="?", const="tottime", help="print a cProfile of one ingest pass (sort key)")
    ap.add_argument("--codecs", default="zstd,none",
                    help=f"output codecs, comma-separated (zstd, zstd:LEVEL, lz4_raw, snappy, none; all: {','.join(CODECS_ALL)})")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: CPU ms of one ingest pass per codec, by part (read, steps, write, stage)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    codecs = CODECS_ALL if args.codecs == "all" else tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
            corpus = args.corpus or os.path.join(tmp, "corpus")
            if not args.corpus:
                generate_corpus(corpus, mb=args.mb, files=args.files)
            for codec in codecs:
                b = breakdown(corpus, os.path.join(tmp, f"run-{codec.replace(':', '_')}"), codec, max(args.runs, 5))
                print(f"{codec}: total {b['total_ms']:.0f} ms (floor {b['floor_ms']:.0f} ms): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in b["parts_ms"].items()))
        return 0
    res = run_benchmark(args.mb, args.files, args.runs, args.corpus, profile=args.profile, codecs=codecs)
    if args.json:
        import json

        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
