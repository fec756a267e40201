"""The files of RUN/dedup/: where each phase writes, the record schemas, and the Layout.

Every path goes through the `RunDir` a function is given (`run.dedup(...)`, `run.removed(...)`).
The Layout (RUN/dedup/layout.json) fixes, once, from the docs' parquet footers and
`dedup.max_task_memory_mb`, the grouping of docs files and the partition counts; see stage.py for
what one task holds under it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..layout import RunDir, as_run
from ..recipe import Recipe
from ..stage import fingerprint
from .shuffle import MAX_FILES, MAX_ROWS, schema

log = logging.getLogger("tinyprep")

LAYOUT_VERSION = 1
_SIG_BYTES = 24  # a band record: key + node (hi, lo)
_EXACT_BYTES = 32  # an exact record: 128-bit hash + node
_EDGE_BYTES = 32  # a directed edge: two nodes
_OVERHEAD = 4  # working copies while sorting

BAND_SCHEMA = schema("key", "hi", "lo", band=pa.uint16())
EXACT_SCHEMA = schema("h1", "h2", "hi", "lo")
CAND_SCHEMA = schema("uhi", "ulo", "vhi", "vlo", exact=pa.uint8())
EDGE_SCHEMA = schema("ahi", "alo", "bhi", "blo")
REQUEST_SCHEMA = schema("hi", "lo", part=pa.uint32())
NODE_SCHEMA = schema("hi", "lo")
TEXT_SCHEMA = schema("hi", "lo", text=pa.large_string())
FINAL_SCHEMA = schema("hi", "lo", "shi", "slo", "size")
INDEX_SCHEMA = pa.schema([pa.field("file", pa.uint32()), pa.field("id", pa.uint64()),
                          pa.field("subset", pa.string()), pa.field("bytes", pa.uint64())])
REMOVED_SCHEMA = pa.schema([pa.field("id", pa.uint64(), nullable=False),
                            pa.field("reason", pa.string(), nullable=False),
                            pa.field("survivor", pa.uint64(), nullable=False)])


# ---------------------------------------------------------------------------------------------
# Removal lists and shuffle files


def removed_url(run: RunDir | str, source: str, docs_rel: str) -> str:
    """The removal list of the docs file RUN/docs/<source>/<docs_rel>: RUN/dedup/removed/<source>/<docs_rel>.

    `docs_rel` is the docs file's path under RUN/docs/<source>/, e.g. "chunk1/example_train_0.jsonl.zst.parquet"
    (ingest's output name: the input's path, a row-group range if split, then ".parquet").
    """
    return as_run(run).removed(source, docs_rel)


def removed_ids(run: RunDir | str, source: str, docs_rel: str) -> np.ndarray:
    """Sorted uint64 ids of the documents of one docs file that dedup removed (empty if none).

    `docs_rel` as in `removed_url`; the input's path without the final ".parquet" is accepted too.
    Raises FileNotFoundError when dedup has not written the file's list.
    """
    url = removed_url(run, source, docs_rel)
    if not storage.exists(url) and storage.exists(url + ".parquet"):
        url += ".parquet"
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        ids = pq.read_table(fh, columns=["id"]).column("id")
    return ids.to_numpy().astype(np.uint64, copy=False) if len(ids) else np.empty(0, np.uint64)


# The shuffle files, one per task (g: a group of docs files, p: a partition, r: a components round);
# all but sig/*.docs.arrow and the round summaries hold one record batch per partition of the phase
# that reads them (shuffle.py).


def sig_url(run, g, kind):
    """signatures: sig/gNNNNNN.{bands,exact,docs}.arrow (band and exact records, the per-document index)."""
    return run.dedup("sig", f"g{g:06d}.{kind}.arrow")


def bucket_url(run, p, kind):
    """buckets: buckets/pNNNNN.{exact,edges,requests}.arrow (exact duplicates, candidates or edges, text requests)."""
    return run.dedup("buckets", f"p{p:05d}.{kind}.arrow")


def gather_url(run, g):
    """gather: gather/gNNNNNN.arrow (the requested texts, by verify partition)."""
    return run.dedup("gather", f"g{g:06d}.arrow")


def verify_url(run, p):
    """verify: verify/pNNNNN.arrow (the verified edges, by edge partition)."""
    return run.dedup("verify", f"p{p:05d}.arrow")


def round_url(run, r, p, kind):
    """components round r: components/RRR/pNNNNN.{arrow,final.arrow,json} (edges out, stars, summary)."""
    return run.dedup("components", f"{r:03d}", f"p{p:05d}.{kind}")


# ---------------------------------------------------------------------------------------------
# Docs files


def docs_url(run: RunDir, f: dict) -> str:
    return run.docs(f["source"], f["rel"])


def open_parquet(url: str):
    fs, path = storage.url_to_fs(url)
    return pq.ParquetFile(path if storage.is_local(fs) else fs.open(path, "rb"))


# ---------------------------------------------------------------------------------------------
# Layout


def verifying(recipe: Recipe) -> bool:
    return recipe.dedup.fuzzy and recipe.dedup.verify


def source_ranks(recipe: Recipe) -> dict[str, int]:
    names = [s.name for s in recipe.sources]
    unknown = [p for p in recipe.dedup.priority if p not in names]
    if unknown:
        log.warning("dedup.priority names sources that are not in the recipe: %s", unknown)
    order = [p for p in recipe.dedup.priority if p in names]
    order += [n for n in names if n not in order]
    return {n: i for i, n in enumerate(order)}


def _docs_files(recipe: Recipe, run: RunDir) -> list[dict]:
    out = []
    for src in recipe.sources:
        for f in run.docs_files(src.name):
            fs, path = storage.url_to_fs(f.url)
            with fs.open(path, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
            names = md.schema.names
            ti = names.index("text") if "text" in names else None
            text_bytes = sum(md.row_group(i).column(ti).total_uncompressed_size
                             for i in range(md.num_row_groups)) if ti is not None else 0
            out.append({"source": src.name, "rel": f.rel, "rows": md.num_rows, "bytes": int(text_bytes),
                        "size": int(fs.size(path))})
    return out


def compute_layout(recipe: Recipe, files: list[dict]) -> dict:
    cfg = recipe.dedup
    mem = cfg.max_task_memory_mb << 20
    bands = cfg.bands if cfg.fuzzy else 0
    per_doc = _SIG_BYTES * bands + _EXACT_BYTES + 32
    docs_per_group = max(1, mem // (per_doc * _OVERHEAD))
    bytes_per_group = max(1, mem // 2)
    groups: list[list[int]] = []
    docs = text = 0
    for i, f in enumerate(files):
        if not groups or docs + f["rows"] > docs_per_group or text + f["bytes"] > bytes_per_group:
            groups.append([i, i])
            docs = text = 0
        groups[-1][1] = i + 1
        docs += f["rows"]
        text += f["bytes"]
    n = sum(f["rows"] for f in files)
    total_text = sum(f["bytes"] for f in files)
    if len(files) >= MAX_FILES or any(f["rows"] >= MAX_ROWS for f in files):
        raise ValueError(f"dedup supports up to {MAX_FILES} docs files of up to {MAX_ROWS} rows")
    band_parts = max(cfg.partitions, math.ceil(n * per_doc * _OVERHEAD / mem))
    edge_parts = max(cfg.partitions, math.ceil(n * 2 * _EDGE_BYTES * _OVERHEAD / mem))
    verify_parts = max(edge_parts, math.ceil(total_text * 3 / mem))  # texts of a partition's pairs
    return {"version": LAYOUT_VERSION, "files": files, "groups": groups, "docs": n, "text_bytes": total_text,
            "band_partitions": band_parts, "edge_partitions": edge_parts, "verify_partitions": verify_parts}


class Layout:
    def __init__(self, data: dict, digest: str):
        self.data, self.digest = data, digest
        self.files = data["files"]
        self.groups = data["groups"]
        self.nb = data["band_partitions"]
        self.ne = data["edge_partitions"]
        self.nv = data["verify_partitions"]
        starts = np.array([g[0] for g in self.groups], dtype=np.int64)
        self._group_starts = starts

    def group_of(self, file_index: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._group_starts, file_index, side="right") - 1

    def group_files(self, g: int) -> range:
        a, b = self.groups[g]
        return range(a, b)


def _layout_url(run):
    return run.dedup("layout.json")


def write_layout(recipe: Recipe, run: RunDir) -> Layout:
    data = compute_layout(recipe, _docs_files(recipe, run))
    raw = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    url = _layout_url(run)
    if not storage.exists(url) or storage.read_bytes(url) != raw:
        storage.write_bytes(url, raw)
    return Layout(data, fingerprint(data))


def read_layout(run: RunDir | str) -> Layout:
    data = storage.read_json(_layout_url(as_run(run)))
    return Layout(data, fingerprint(data))
