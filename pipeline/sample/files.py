"""The bundled sample's files: records placed into files and written in the formats of SlimPajama
(`slimpajama/train/chunk{1,2}/example_train_{0..4}.jsonl.zst`, one zstd frame each) and
Starcoderdata (`starcoderdata/<language>/train-{i:05d}-of-{n:05d}.parquet`).

The zstd level and the parquet settings are fixed, so the same records give the same bytes.
pipeline/sample.py decides what the records are and documents the layout.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

_SLIM_CHUNKS = 2
_SLIM_FILES_PER_CHUNK = 5
_PYTHON_PARQUET_FILES = 3
_ZSTD_LEVEL = 3


def starcoder_schema():
    """The pyarrow schema of the Starcoderdata parquet files."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("content", pa.string()),
        ("max_stars_repo_path", pa.string()),
        ("max_stars_repo_name", pa.string()),
        ("max_stars_count", pa.int64()),
    ])


def place(rng: random.Random, records: list[dict], nfiles: int) -> list[list[dict]]:
    """Spread records over files: free records round-robin after a shuffle, copies (records
    with "copy_of") into a file holding no other member of their group; then shuffle each file."""
    free = [r for r in records if "copy_of" not in r]
    rng.shuffle(free)
    files: list[list[dict]] = [[] for _ in range(nfiles)]
    for i, r in enumerate(free):
        r["_file"] = i % nfiles
        files[i % nfiles].append(r)
    for r in records:
        if "copy_of" in r:
            taken = {r["copy_of"]["_file"]} | {c["_file"] for c in r["copy_of"].get("_copies", [])}
            choices = [f for f in range(nfiles) if f not in taken] or list(range(nfiles))
            r["_file"] = rng.choice(choices)
            r["copy_of"].setdefault("_copies", []).append(r)
            files[r["_file"]].append(r)
    for f in files:
        rng.shuffle(f)
        for row, r in enumerate(f):
            r["_row"] = row
    return files


def write_slimpajama(root_out: Path, records: list[dict], rng: random.Random, counts: dict) -> None:
    """Place the records (in this order) with rng and write the jsonl.zst chunks; each record gets
    its "_loc" and `counts` its rows per file and set, and text bytes."""
    import orjson
    import zstandard

    nfiles = _SLIM_CHUNKS * _SLIM_FILES_PER_CHUNK
    slim_files = place(rng, records, nfiles)
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    slim_bytes = 0
    for fi, recs in enumerate(slim_files):
        rel = f"train/chunk{fi // _SLIM_FILES_PER_CHUNK + 1}/example_train_{fi % _SLIM_FILES_PER_CHUNK}.jsonl.zst"
        lines = []
        for r in recs:
            r["_loc"] = {"source": "slimpajama", "path": rel, "row": r["_row"]}
            lines.append(orjson.dumps({"text": r["text"], "meta": {"redpajama_set_name": r["set"]}}) + b"\n")
            counts["sets"][r["set"]] = counts["sets"].get(r["set"], 0) + 1
            slim_bytes += len(r["text"].encode("utf-8"))
        dest = root_out / "slimpajama" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(cctx.compress(b"".join(lines)))
        counts["files"]["slimpajama"][rel] = len(recs)
    counts["rows"]["slimpajama"] = len(records)
    counts["text_bytes"]["slimpajama"] = slim_bytes


def write_starcoderdata(root_out: Path, star_records: dict[str, list[dict]], rng: random.Random,
                        counts: dict) -> None:
    """Place each language's records with rng and write its parquet files; each record gets its
    "_loc" and `counts` its rows per file and language, and text bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = starcoder_schema()
    star_bytes = 0
    next_id = 0
    for lang, recs in star_records.items():
        n = _PYTHON_PARQUET_FILES if lang == "python" else 1
        pfiles = place(rng, recs, n)
        rg = max(1, math.ceil(max(len(f) for f in pfiles) / 5))
        for fi, frecs in enumerate(pfiles):
            rel = f"{lang}/train-{fi:05d}-of-{n:05d}.parquet"
            ids = []
            for r in frecs:
                r["_loc"] = {"source": "starcoderdata", "path": rel, "row": r["_row"]}
                ids.append(str(next_id))
                next_id += 1
                star_bytes += len(r["content"].encode("utf-8"))
            table = pa.table({
                "id": pa.array(ids, pa.string()),
                "content": pa.array([r["content"] for r in frecs], pa.string()),
                "max_stars_repo_path": pa.array([r["path"] for r in frecs], pa.string()),
                "max_stars_repo_name": pa.array([r["repo"] for r in frecs], pa.string()),
                "max_stars_count": pa.array([r["stars"] for r in frecs], pa.int64()),
            }, schema=schema)
            dest = root_out / "starcoderdata" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, dest, row_group_size=rg, compression="zstd", compression_level=_ZSTD_LEVEL,
                           use_dictionary=True, write_statistics=True, version="2.6")
            counts["files"]["starcoderdata"][rel] = len(frecs)
        counts["languages"][lang] = len(recs)
    counts["rows"]["starcoderdata"] = sum(counts["languages"].values())
    counts["text_bytes"]["starcoderdata"] = star_bytes
