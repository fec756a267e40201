"""The removal phase: the removal list of every docs file (id, reason, survivor) and the stage's
stats (documents and bytes kept or removed per source and subset, cluster sizes)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from .layout import (
    FINAL_SCHEMA,
    NODE_SCHEMA,
    REMOVED_SCHEMA,
    Layout,
    bucket_url,
    removed_url,
    round_url,
    sig_url,
)
from .shuffle import node_file, node_id, node_row, read_partition, u64

ALL_SUBSET = "(all)"


def cluster_bucket(size: int) -> str:
    """Power-of-two bin of a cluster size, keyed by its lower edge (10 digits): sizes 2-3 -> '0000000002',
    4-7 -> '0000000004', 8-15 -> '0000000008', ... (bins merge by adding counts)."""
    return f"{1 << (int(size).bit_length() - 1):010d}"


def removal_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    g, r = task.payload["group"], task.payload["round"]
    fin = read_partition([round_url(run, r, q, "final.arrow") for q in range(layout.ne)], g, FINAL_SCHEMA)
    fhi, flo, shi, slo, size = (u64(fin, c) for c in ("hi", "lo", "shi", "slo", "size"))
    ex = read_partition([bucket_url(run, q, "exact") for q in range(layout.nb)], g, NODE_SCHEMA)
    xhi, xlo = u64(ex, "hi"), u64(ex, "lo")
    exact_set = set(zip(xhi.tolist(), xlo.tolist()))
    src = storage.url_to_fs(sig_url(run, g, "docs"))
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
