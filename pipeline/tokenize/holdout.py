"""The holdout: which documents go to the validation split, their text digests, the holdout index.

A document goes to the validation split when `splitmix64(id ^ splitmix64(holdout_seed)) <
holdout_fraction * 2**64`, a pure function of its stable id. The holdout phase writes, per docs
file, its validation documents with the SHA-256 of their UTF-8 text to
`RUN/tokenize/holdout/<source>/<rel>.parquet` (and the file's train/validation text bytes in
its metadata). The group phase merges those digests into `RUN/tokenize/holdout.sha256` (sorted,
32 bytes each), which the train encode tasks use to drop documents whose text is a holdout text.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..formats import FormatError
from ..hashing import MASK64, splitmix64, splitmix64_int
from ..layout import DocsFile, RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from .docs import read_table, removed_ids

HOLDOUT_INDEX = "holdout.sha256"  # under RUN/tokenize/

HOLDOUT_SCHEMA = pa.schema([
    pa.field("id", pa.uint64(), nullable=False),
    pa.field("text", pa.large_string(), nullable=False),
    pa.field("sha256", pa.binary(32), nullable=False),
])


def holdout_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the documents that go to the validation split (a pure function of id and seed)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    salt = np.uint64(splitmix64_int(seed))
    threshold = np.uint64(min(int(fraction * 2.0**64), MASK64))
    return splitmix64(ids ^ salt) < threshold


def holdout_settings(recipe: Recipe) -> dict:
    c = recipe.tokenize
    return {"fraction": c.holdout_fraction, "seed": c.holdout_seed}


def holdout_url(run: RunDir, f: DocsFile) -> str:
    return run.tokenize("holdout", f.source, f.rel)


def sha256_texts(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


def member(sorted_index: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """digests (S32) found in the sorted index (S32)."""
    if not len(sorted_index) or not len(digests):
        return np.zeros(len(digests), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_index, digests), len(sorted_index) - 1)
    return sorted_index[pos] == digests


def run_holdout(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    """One docs file: write its validation documents and digests; count its dedup removals."""
    p = task.payload
    table = read_table(p["docs"], ["id", "text"])
    read = table.num_rows
    ids = table.column("id").to_numpy()
    removed = removed_ids(run, task.source, p["rel"])
    alive = ~np.isin(ids, removed) if len(removed) else np.ones(read, dtype=bool)
    held = alive & holdout_mask(ids, recipe.tokenize.holdout_fraction, recipe.tokenize.holdout_seed)
    train = alive & ~held
    text_bytes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
    val = table.filter(pa.array(held))
    texts = val.column("text").to_pylist()
    out = pa.table({"id": val.column("id"), "text": val.column("text").cast(pa.large_string()),
                    "sha256": pa.array(list(sha256_texts(texts)), type=pa.binary(32))},
                   schema=HOLDOUT_SCHEMA)
    out = out.replace_schema_metadata({
        "tinyprep.train_text_bytes": str(int(text_bytes[train].sum())),
        "tinyprep.validation_text_bytes": str(int(text_bytes[held].sum())),
    })
    with storage.atomic_open(p["out"]) as fh:
        pq.write_table(out, fh, compression="zstd")
    stats = {"sources": {task.source: {"read": read, "removed": {"dedup": int(read - alive.sum())}}}}
    return TaskResult(outputs=[p["out"]], stats=stats, docs=read, bytes=int(text_bytes.sum()))


def read_holdout(url: str) -> tuple[np.ndarray, int, int]:
    """A holdout file's digests (S32) and its docs file's train and validation text bytes."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        t = pq.read_table(fh, columns=["sha256"])
    meta = t.schema.metadata or {}
    digests = np.array(t.column("sha256").to_pylist(), dtype="S32") if t.num_rows else np.zeros(0, "S32")
    return (digests, int(meta[b"tinyprep.train_text_bytes"]), int(meta[b"tinyprep.validation_text_bytes"]))


def write_index(run: RunDir, digests: np.ndarray) -> str:
    """Write the holdout index (sorted, distinct S32 digests); returns its URL."""
    url = run.tokenize(HOLDOUT_INDEX)
    storage.write_bytes(url, digests.tobytes())
    return url


def load_index(run: RunDir) -> np.ndarray:
    url = run.tokenize(HOLDOUT_INDEX)
    raw = storage.read_bytes(url)
    if len(raw) % 32:
        raise FormatError(f"{url}: size {len(raw)} is not a multiple of 32")
    return np.frombuffer(raw, dtype="S32")
