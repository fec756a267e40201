"""The dedup stage: phases, their tasks, and where every phase's files live.

Phases (each a set of Ray tasks; a phase reads only what the previous ones wrote to RUN/dedup/):

  signatures   one task per group of docs files: the 128-bit text hash (exact) and the MinHash
               band keys (fuzzy) of every document, written partitioned by hash range
               (sig/gNNNNN.{exact,bands}.arrow: one batch per bucket partition) plus a small
               per-document index (id, subset, bytes) for the stats.
  buckets      one task per hash-range partition, all bands: sorts its records by (band, key,
               node); each bucket of n documents yields n-1 edges to its smallest node (exact
               buckets also flag their non-smallest members). Candidate edges go to the verify
               partition of their hub, with requests for the texts they need; or, without
               verification, straight into the graph.
  gather       (verify only) one task per group of docs files: reads the requested texts and
               writes them to the verify partitions that asked for them.
  verify       (verify only) one task per edge partition: exact shingle-set Jaccard of every
               candidate pair; the pairs at or above the threshold become graph edges.
  components-NN  connected components, large-star / small-star rounds (components.py) until a
               round finds its input already a union of stars.
  removal      one task per group of docs files: RUN/dedup/removed/<source>/<rel> for every docs
               file (id, reason, survivor), and the stage's stats.

Partition counts and the grouping of docs files are chosen once, from the docs' row counts and
sizes (parquet footers) and `dedup.max_task_memory_mb` (M), and saved in RUN/dedup/layout.json;
they never depend on the number of workers. The removal lists do not depend on them either.
What one task holds: a signatures/gather/removal task, one group of docs files (at most
M / (4 x bytes of its records per document) documents and M / 2 bytes of text, streamed 128
documents at a time); a buckets task, 1/`band_partitions` of all band and exact records
(partitions >= N x record bytes x 4 / M); a verify task, 1/`verify_partitions` of the candidate
texts (>= 3 x text bytes / M); a components task, 1/`edge_partitions` of the edges (>= N x 256 / M,
the graph has at most about one edge per document). `dedup.partitions` is the minimum of each.
The bound holds for data spread by hashing; a single bucket or component of more than about
M / 64 bytes of edges (tens of millions of copies of one document) lands in one task.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..layout import RunDir, as_run
from ..recipe import Recipe
from ..stage import Stage, Task, TaskResult, fingerprint
from . import components as cc
from .exact import bucket_stars, text_hashes
from .minhash import MinHashParams, Shingler, Signer, jaccard_sets, mulhi
from .shuffle import (
    MAX_FILES,
    MAX_ROWS,
    make_nodes,
    node_file,
    node_id,
    node_partition,
    node_row,
    read_partition,
    schema,
    u64,
    write_partitioned,
)

log = logging.getLogger("tinyprep")

STAGE = "dedup"
LAYOUT_VERSION = 1
MAX_ROUNDS = 200
_READ_ROWS = 128  # documents per signature batch (about the size that keeps the arrays in cache)
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
ALL_SUBSET = "(all)"


# ---------------------------------------------------------------------------------------------
# Paths


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


def _sig_url(run, g, kind):
    return run.dedup("sig", f"g{g:06d}.{kind}.arrow")


def _bucket_url(run, p, kind):
    return run.dedup("buckets", f"p{p:05d}.{kind}.arrow")


def _gather_url(run, g):
    return run.dedup("gather", f"g{g:06d}.arrow")


def _verify_url(run, p):
    return run.dedup("verify", f"p{p:05d}.arrow")


def _round_url(run, r, p, kind):
    return run.dedup("components", f"{r:03d}", f"p{p:05d}.{kind}")


# ---------------------------------------------------------------------------------------------
# Layout


def _ranks(recipe: Recipe) -> dict[str, int]:
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


def _base_fingerprint(recipe: Recipe, layout: Layout) -> str:
    return fingerprint(STAGE, recipe.dedup, _ranks(recipe), layout.digest)


def _task(recipe, layout, task_id, size=0, **payload) -> Task:
    return Task(STAGE, task_id, "", fingerprint(_base_fingerprint(recipe, layout), task_id, payload),
                size=size, payload=payload)


# ---------------------------------------------------------------------------------------------
# Phases


def _verifying(recipe: Recipe) -> bool:
    return recipe.dedup.fuzzy and recipe.dedup.verify


def _phases(recipe: Recipe, run: RunDir) -> Iterator[str]:
    """signatures, buckets, [gather, verify,] components-001.. until a round converges, removal."""
    yield "signatures"
    yield "buckets"
    if _verifying(recipe):
        yield "gather"
        yield "verify"
    r = 1
    while True:
        yield f"components-{r:03d}"
        if _round_violations(run, read_layout(run), r) == 0:
            break
        if r >= MAX_ROUNDS:
            raise RuntimeError(f"dedup: connected components did not converge in {MAX_ROUNDS} rounds")
        r += 1
    yield "removal"


def _round_violations(run: RunDir, layout: Layout, r: int) -> int:
    return sum(storage.read_json(_round_url(run, r, p, "json"))["violations"] for p in range(layout.ne))


def _final_round(run: RunDir, layout: Layout) -> int:
    r = 1
    while _round_violations(run, layout, r):
        r += 1
    return r


def _group_text_bytes(layout: Layout, g: int) -> int:
    return sum(layout.files[i]["bytes"] for i in layout.group_files(g))


def _plan(recipe: Recipe, run: RunDir, phase: str) -> list[Task]:
    if phase == "signatures":
        layout = write_layout(recipe, run)
        return [_task(recipe, layout, f"signatures/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g)
                for g in range(len(layout.groups))]
    layout = read_layout(run)
    if phase == "buckets":
        return [_task(recipe, layout, f"buckets/p{p:05d}", phase=phase, part=p) for p in range(layout.nb)]
    if phase == "gather":
        return [_task(recipe, layout, f"gather/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g)
                for g in range(len(layout.groups))]
    if phase == "verify":
        return [_task(recipe, layout, f"verify/p{p:05d}", phase=phase, part=p) for p in range(layout.nv)]
    if phase.startswith("components-"):
        r = int(phase.split("-")[1])
        return [_task(recipe, layout, f"{phase}/p{p:05d}", phase="components", round=r, part=p)
                for p in range(layout.ne)]
    if phase == "removal":
        final = _final_round(run, layout)
        return [_task(recipe, layout, f"removal/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g,
                      round=final) for g in range(len(layout.groups))]
    raise ValueError(f"dedup: unknown phase {phase!r}")


# ---------------------------------------------------------------------------------------------
# signatures


def _docs_url(run: RunDir, f: dict) -> str:
    return run.docs(f["source"], f["rel"])


def _open_parquet(url: str):
    fs, path = storage.url_to_fs(url)
    return pq.ParquetFile(path if storage.is_local(fs) else fs.open(path, "rb"))


def _signatures(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    cfg = recipe.dedup
    g = task.payload["group"]
    ranks = _ranks(recipe)
    params = MinHashParams.from_config(cfg)
    shingler, signer = Shingler(params), Signer(params)
    bands = cfg.bands
    band_parts: list[tuple] = []
    exact_parts: list[tuple] = []
    index_parts: list[pa.Table] = []
    docs = nbytes = 0
    for fi in layout.group_files(g):
        f = layout.files[fi]
        rank = ranks[f["source"]]
        pf = _open_parquet(_docs_url(run, f))
        row = 0
        for batch in pf.iter_batches(batch_size=_READ_ROWS, columns=["id", "subset", "text"], use_threads=False):
            n = batch.num_rows
            if not n:
                continue
            ids = batch.column("id").to_numpy().astype(np.uint64, copy=False)
            hi, lo = make_nodes(rank, ids, fi, np.arange(row, row + n, dtype=np.uint64))
            text_col = batch.column("text")
            h1, h2, lens = text_hashes(text_col)
            if cfg.exact:
                exact_parts.append((h1, h2, hi, lo))
            if cfg.fuzzy:
                texts = [params.normalized(t) for t in text_col.to_pylist()]
                sh, sd = shingler.hashes(texts)
                sig = signer.signatures(sh, sd, n)
                has = np.zeros(n, dtype=bool)
                has[sd] = True
                keys = signer.band_keys(sig[has])
                m = int(has.sum())
                band_parts.append((np.tile(np.arange(bands, dtype=np.uint16), m), keys.ravel(),
                                   np.repeat(hi[has], bands), np.repeat(lo[has], bands)))
            index_parts.append(pa.table({"file": pa.array(np.full(n, fi, np.uint32)), "id": batch.column("id"),
                                         "subset": batch.column("subset").cast(pa.string()), "bytes": pa.array(lens)},
                                        schema=INDEX_SCHEMA))
            row += n
            docs += n
            nbytes += int(lens.sum())
    outputs = []
    cat = lambda parts, i, dt: np.concatenate([p[i] for p in parts]) if parts else np.empty(0, dt)  # noqa: E731
    band, key, bhi, blo = (cat(band_parts, 0, np.uint16), cat(band_parts, 1, np.uint64),
                           cat(band_parts, 2, np.uint64), cat(band_parts, 3, np.uint64))
    url = _sig_url(run, g, "bands")
    write_partitioned(url, {"band": band, "key": key, "hi": bhi, "lo": blo},
                      mulhi(key, layout.nb).astype(np.int64), layout.nb, BAND_SCHEMA)
    outputs.append(url)
    h1, h2, ehi, elo = (cat(exact_parts, i, np.uint64) for i in range(4))
    url = _sig_url(run, g, "exact")
    write_partitioned(url, {"h1": h1, "h2": h2, "hi": ehi, "lo": elo}, mulhi(h1, layout.nb).astype(np.int64),
                      layout.nb, EXACT_SCHEMA)
    outputs.append(url)
    index = pa.concat_tables(index_parts) if index_parts else INDEX_SCHEMA.empty_table()
    url = _sig_url(run, g, "docs")
    with storage.atomic_open(url, "wb") as fh:
        with pa.ipc.new_file(fh, INDEX_SCHEMA) as w:
            w.write_table(index)
    outputs.append(url)
    return TaskResult(outputs=outputs, docs=docs, bytes=nbytes)


# ---------------------------------------------------------------------------------------------
# buckets


def _buckets(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    p = task.payload["part"]
    ngroups = len(layout.groups)
    outputs = []
    # exact: hubs are exact survivors' candidates, members are exact duplicates
    ex = read_partition([_sig_url(run, g, "exact") for g in range(ngroups)], p, EXACT_SCHEMA)
    keys = [u64(ex, "h1"), u64(ex, "h2")]
    ehi, elo = u64(ex, "hi"), u64(ex, "lo")
    xuhi, xulo, xvhi, xvlo = bucket_stars(keys, ehi, elo)
    del ex, keys, ehi, elo
    url = _bucket_url(run, p, "exact")
    write_partitioned(url, {"hi": xuhi, "lo": xulo}, layout.group_of(node_file(xulo)), ngroups, NODE_SCHEMA)
    outputs.append(url)
    # bands: (band, key) buckets
    bd = read_partition([_sig_url(run, g, "bands") for g in range(ngroups)], p, BAND_SCHEMA)
    band = bd.column("band").to_numpy() if bd.num_rows else np.empty(0, np.uint16)
    fuhi, fulo, fvhi, fvlo = bucket_stars([band.astype(np.uint64), u64(bd, "key")], u64(bd, "hi"), u64(bd, "lo"))
    del bd, band
    candidates = len(fuhi)
    uhi, ulo = np.concatenate([xuhi, fuhi]), np.concatenate([xulo, fulo])
    vhi, vlo = np.concatenate([xvhi, fvhi]), np.concatenate([xvlo, fvlo])
    exact = np.concatenate([np.ones(len(xuhi), np.uint8), np.zeros(len(fuhi), np.uint8)])
    uhi, ulo, vhi, vlo, exact = _unique_pairs(uhi, ulo, vhi, vlo, exact)
    url = _bucket_url(run, p, "edges")
    if _verifying(recipe):
        write_partitioned(url, {"uhi": uhi, "ulo": ulo, "vhi": vhi, "vlo": vlo, "exact": exact},
                          node_partition(vhi, vlo, layout.nv), layout.nv, CAND_SCHEMA)
        need = exact == 0
        vp = node_partition(vhi[need], vlo[need], layout.nv).astype(np.uint32)
        rhi = np.concatenate([uhi[need], vhi[need]])
        rlo = np.concatenate([ulo[need], vlo[need]])
        rp = np.concatenate([vp, vp])
        outputs.append(url)
        url = _bucket_url(run, p, "requests")
        write_partitioned(url, {"hi": rhi, "lo": rlo, "part": rp}, layout.group_of(node_file(rlo)), ngroups,
                          REQUEST_SCHEMA)
    else:
        ahi, alo, bhi, blo = cc.both_directions(uhi, ulo, vhi, vlo)
        write_partitioned(url, {"ahi": ahi, "alo": alo, "bhi": bhi, "blo": blo},
                          node_partition(ahi, alo, layout.ne), layout.ne, EDGE_SCHEMA)
    outputs.append(url)
    return TaskResult(outputs=outputs, transfer={"exact_edges": int(len(xuhi)), "band_candidates": int(candidates),
                                                 "pairs": int(len(uhi))})


def _unique_pairs(uhi, ulo, vhi, vlo, flag):
    """Distinct (u, v) pairs, sorted; a pair's flag is the largest of its copies."""
    if not len(uhi):
        return uhi, ulo, vhi, vlo, flag
    order = np.lexsort([-flag.astype(np.int16), vlo, vhi, ulo, uhi])
    uhi, ulo, vhi, vlo, flag = uhi[order], ulo[order], vhi[order], vlo[order], flag[order]
    first = np.ones(len(uhi), dtype=bool)
    first[1:] = (uhi[1:] != uhi[:-1]) | (ulo[1:] != ulo[:-1]) | (vhi[1:] != vhi[:-1]) | (vlo[1:] != vlo[:-1])
    return uhi[first], ulo[first], vhi[first], vlo[first], flag[first]


# ---------------------------------------------------------------------------------------------
# gather + verify


def _gather(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    g = task.payload["group"]
    req = read_partition([_bucket_url(run, p, "requests") for p in range(layout.nb)], g, REQUEST_SCHEMA)
    rhi, rlo = u64(req, "hi"), u64(req, "lo")
    rp = req.column("part").to_numpy().astype(np.int64) if req.num_rows else np.empty(0, np.int64)
    if len(rhi):  # distinct (node, partition)
        order = np.lexsort([rp, rlo, rhi])
        rhi, rlo, rp = rhi[order], rlo[order], rp[order]
        first = np.ones(len(rhi), dtype=bool)
        first[1:] = (rhi[1:] != rhi[:-1]) | (rlo[1:] != rlo[:-1]) | (rp[1:] != rp[:-1])
        rhi, rlo, rp = rhi[first], rlo[first], rp[first]
    files = node_file(rlo)
    rows = node_row(rlo)
    out_hi, out_lo, out_p, out_text = [], [], [], []
    nbytes = 0
    for fi in np.unique(files).tolist():
        sel = np.flatnonzero(files == fi)
        pf = _open_parquet(_docs_url(run, layout.files[fi]))
        md = pf.metadata
        bounds = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        rg_of = np.searchsorted(bounds, rows[sel], side="right") - 1
        for rg in np.unique(rg_of).tolist():
            s = sel[rg_of == rg]
            col = pf.read_row_group(rg, columns=["text"]).column("text")
            texts = col.take(pa.array(rows[s] - bounds[rg]))
            out_hi.append(rhi[s])
            out_lo.append(rlo[s])
            out_p.append(rp[s])
            out_text.append(texts)
            nbytes += texts.nbytes
    if out_hi:
        text = pa.concat_arrays([t.combine_chunks() if isinstance(t, pa.ChunkedArray) else t for t in out_text])
        text = text.cast(pa.large_string())
        hi, lo, part = np.concatenate(out_hi), np.concatenate(out_lo), np.concatenate(out_p)
    else:
        text = pa.array([], pa.large_string())
        hi = lo = np.empty(0, np.uint64)
        part = np.empty(0, np.int64)
    url = _gather_url(run, g)
    write_partitioned(url, {"hi": hi, "lo": lo, "text": text}, part, layout.nv, TEXT_SCHEMA)
    return TaskResult(outputs=[url], transfer={"texts": int(len(hi)), "bytes": int(nbytes)})


def _verify(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    cfg = recipe.dedup
    p = task.payload["part"]
    cand = read_partition([_bucket_url(run, q, "edges") for q in range(layout.nb)], p, CAND_SCHEMA)
    uhi, ulo, vhi, vlo = (u64(cand, c) for c in ("uhi", "ulo", "vhi", "vlo"))
    exact = cand.column("exact").to_numpy() if cand.num_rows else np.empty(0, np.uint8)
    uhi, ulo, vhi, vlo, exact = _unique_pairs(uhi, ulo, vhi, vlo, exact)
    texts_t = read_partition([_gather_url(run, g) for g in range(len(layout.groups))], p, TEXT_SCHEMA)
    texts = dict(zip(zip(u64(texts_t, "hi").tolist(), u64(texts_t, "lo").tolist()),
                     texts_t.column("text").to_pylist()))
    params = MinHashParams.from_config(cfg)
    shingler = Shingler(params)
    keep = exact.astype(bool)
    todo = np.flatnonzero(~keep)
    todo = todo[np.lexsort([vlo[todo], vhi[todo]])]  # by hub: its shingle set is computed once
    hub_key, hub_set = None, None
    for i in todo.tolist():
        hk = (int(vhi[i]), int(vlo[i]))
        if hk != hub_key:
            hub_key, hub_set = hk, shingler.shingle_set(texts[hk])
        j = jaccard_sets(shingler.shingle_set(texts[(int(uhi[i]), int(ulo[i]))]), hub_set)
        keep[i] = j >= cfg.threshold
    ahi, alo, bhi, blo = cc.both_directions(uhi[keep], ulo[keep], vhi[keep], vlo[keep])
    url = _verify_url(run, p)
    write_partitioned(url, {"ahi": ahi, "alo": alo, "bhi": bhi, "blo": blo},
                      node_partition(ahi, alo, layout.ne), layout.ne, EDGE_SCHEMA)
    return TaskResult(outputs=[url], transfer={"candidates": int(len(todo)), "verified": int(keep.sum() - exact.sum())})


# ---------------------------------------------------------------------------------------------
# components


def _round_inputs(recipe: Recipe, run: RunDir, layout: Layout, r: int) -> list[str]:
    if r > 1:
        return [_round_url(run, r - 1, q, "arrow") for q in range(layout.ne)]
    if _verifying(recipe):
        return [_verify_url(run, q) for q in range(layout.nv)]
    return [_bucket_url(run, q, "edges") for q in range(layout.nb)]


def _components(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    r, p = task.payload["round"], task.payload["part"]
    t = read_partition(_round_inputs(recipe, run, layout, r), p, EDGE_SCHEMA)
    nb = cc.Neighbourhoods(*(u64(t, c) for c in ("ahi", "alo", "bhi", "blo")))
    del t
    violations, leaves, centres = nb.check()
    ngroups = max(len(layout.groups), 1)
    # leaf -> centre, and centres with their component's size; valid once a round has no violation
    fhi = np.concatenate([leaves[0], centres[0]])
    flo = np.concatenate([leaves[1], centres[1]])
    shi = np.concatenate([leaves[2], centres[0]])
    slo = np.concatenate([leaves[3], centres[1]])
    size = np.concatenate([np.zeros(len(leaves[0]), np.uint64), centres[2]])
    final_url = _round_url(run, r, p, "final.arrow")
    write_partitioned(final_url, {"hi": fhi, "lo": flo, "shi": shi, "slo": slo, "size": size},
                      layout.group_of(node_file(flo)), ngroups, FINAL_SCHEMA)
    # (a partition whose input is already stars still runs the round: the reverse halves of its
    # edges live in other partitions, and only the round as a whole keeps both)
    ahi, alo, bhi, blo = nb.large_star() if r % 2 == 1 else nb.small_star()
    url = _round_url(run, r, p, "arrow")
    write_partitioned(url, {"ahi": ahi, "alo": alo, "bhi": bhi, "blo": blo},
                      node_partition(ahi, alo, layout.ne), layout.ne, EDGE_SCHEMA)
    summary_url = _round_url(run, r, p, "json")
    storage.write_json(summary_url, {"round": r, "part": p, "edges_in": len(nb), "edges_out": int(len(ahi)),
                                     "violations": violations})
    return TaskResult(outputs=[final_url, url, summary_url])


# ---------------------------------------------------------------------------------------------
# removal


def cluster_bucket(size: int) -> str:
    """Power-of-two bin of a cluster size, keyed by its lower edge (10 digits): sizes 2-3 -> '0000000002',
    4-7 -> '0000000004', 8-15 -> '0000000008', ... (bins merge by adding counts)."""
    return f"{1 << (int(size).bit_length() - 1):010d}"


def _removal(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    g, r = task.payload["group"], task.payload["round"]
    fin = read_partition([_round_url(run, r, q, "final.arrow") for q in range(layout.ne)], g, FINAL_SCHEMA)
    fhi, flo, shi, slo, size = (u64(fin, c) for c in ("hi", "lo", "shi", "slo", "size"))
    ex = read_partition([_bucket_url(run, q, "exact") for q in range(layout.nb)], g, NODE_SCHEMA)
    xhi, xlo = u64(ex, "hi"), u64(ex, "lo")
    exact_set = set(zip(xhi.tolist(), xlo.tolist()))
    src = storage.url_to_fs(_sig_url(run, g, "docs"))
    with (pa.OSFile(src[1], "rb") if storage.is_local(src[0]) else src[0].open(src[1], "rb")) as fh:
        index = pa.ipc.open_file(fh).read_all()
    ifile = index.column("file").to_numpy().astype(np.int64)
    isub = index.column("subset").combine_chunks().fill_null(ALL_SUBSET).dictionary_encode()
    sub_names = isub.dictionary.to_pylist()
    sub_codes = isub.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ibytes = index.column("bytes").to_numpy()
    leaf = size == 0
    stats: dict = {"sources": {}, "clusters": {}}
    for s in size[~leaf].tolist():  # clusters whose survivor lives in this group
        b = cluster_bucket(s)
        stats["clusters"][b] = stats["clusters"].get(b, 0) + 1
    lfile = node_file(flo[leaf])
    lrow = node_row(flo[leaf])
    lhi, llo, lshi, lslo = fhi[leaf], flo[leaf], shi[leaf], slo[leaf]
    outputs = []
    for fi in layout.group_files(g):
        f = layout.files[fi]
        in_file = np.flatnonzero(ifile == fi)
        sel = np.flatnonzero(lfile == fi)
        rows = lrow[sel]
        ids = node_id(lhi[sel], llo[sel])
        surv = node_id(lshi[sel], lslo[sel])
        is_exact = np.array([(h, l) in exact_set for h, l in zip(lhi[sel].tolist(), llo[sel].tolist())], dtype=bool)
        order = np.lexsort([rows, ids])
        ids, surv, is_exact, rows = ids[order], surv[order], is_exact[order], rows[order]
        table = pa.table({"id": pa.array(ids, pa.uint64()),
                          "reason": pa.array(np.where(is_exact, "exact", "fuzzy").tolist(), pa.string()),
                          "survivor": pa.array(surv, pa.uint64())}, schema=REMOVED_SCHEMA)
        url = removed_url(run, f["source"], f["rel"])
        with storage.atomic_open(url, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        outputs.append(url)
        status = np.zeros(len(in_file), dtype=np.int64)  # 0 kept, 1 exact, 2 fuzzy
        status[rows] = np.where(is_exact, 1, 2)
        _count(stats, f["source"], sub_names, sub_codes[in_file], ibytes[in_file], status)
    return TaskResult(outputs=outputs, stats=stats)


_STATUS = (("kept", "bytes_kept"), ("duplicate_exact", "bytes_duplicate_exact"),
           ("duplicate_fuzzy", "bytes_duplicate_fuzzy"))


def _count(stats: dict, source: str, sub_names: list[str], codes: np.ndarray, nbytes: np.ndarray,
           status: np.ndarray) -> None:
    """Add one docs file's documents to the stats: per source and per subset, counts and bytes."""
    if not len(codes):
        stats["sources"].setdefault(source, _zero() | {"subsets": {}})
        return
    k = len(sub_names)
    cell = codes * 3 + status
    n = np.bincount(cell, minlength=3 * k).reshape(k, 3)
    b = np.bincount(cell, weights=nbytes.astype(np.float64), minlength=3 * k).reshape(k, 3)
    # float weights are exact below 2**53 bytes per cell; recompute exactly when that could fail
    if nbytes.sum(dtype=np.uint64) >= (1 << 53):
        b = np.array([[int(nbytes[cell == c * 3 + s].sum(dtype=np.uint64)) for s in range(3)] for c in range(k)])
    src = stats["sources"].setdefault(source, _zero() | {"subsets": {}})
    for c in range(k):
        if not n[c].sum():
            continue
        node = src["subsets"].setdefault(sub_names[c], _zero())
        for s, (count_key, bytes_key) in enumerate(_STATUS):
            for target in (src, node):
                target[count_key] += int(n[c, s])
                target[bytes_key] += int(b[c, s])
                target["docs"] += int(n[c, s])
                target["bytes"] += int(b[c, s])


def _zero() -> dict:
    return {"docs": 0, "kept": 0, "duplicate_exact": 0, "duplicate_fuzzy": 0,
            "bytes": 0, "bytes_kept": 0, "bytes_duplicate_exact": 0, "bytes_duplicate_fuzzy": 0}


class DedupStage(Stage):
    name = STAGE

    def phases(self, recipe: Recipe, run: RunDir) -> Iterator[str]:
        return _phases(recipe, run)

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None) -> list[Task]:
        return _plan(recipe, run, phase)

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        fn = {"signatures": _signatures, "buckets": _buckets, "gather": _gather, "verify": _verify,
              "components": _components, "removal": _removal}[task.payload["phase"]]
        return fn(task, recipe, run, read_layout(run))


stage = DedupStage()
