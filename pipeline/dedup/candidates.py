"""The candidate phases: buckets (exact and band buckets into star edges and exact-duplicate flags),
and, when verifying, gather (the candidate texts) and verify (exact Jaccard of every candidate pair)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from . import components as cc
from .exact import bucket_stars
from .layout import (
    BAND_SCHEMA,
    CAND_SCHEMA,
    EDGE_SCHEMA,
    EXACT_SCHEMA,
    NODE_SCHEMA,
    REQUEST_SCHEMA,
    TEXT_SCHEMA,
    Layout,
    bucket_url,
    docs_url,
    gather_url,
    open_parquet,
    sig_url,
    verify_url,
    verifying,
)
from .minhash import MinHashParams, Shingler, jaccard_sets
from .shuffle import (
    node_file,
    node_partition,
    node_row,
    read_partition,
    u64,
    write_partitioned,
)


def buckets_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    p = task.payload["part"]
    ngroups = len(layout.groups)
    outputs = []
    # exact: hubs are exact survivors' candidates, members are exact duplicates
    ex = read_partition([sig_url(run, g, "exact") for g in range(ngroups)], p, EXACT_SCHEMA)
    keys = [u64(ex, "h1"), u64(ex, "h2")]
    ehi, elo = u64(ex, "hi"), u64(ex, "lo")
    xuhi, xulo, xvhi, xvlo = bucket_stars(keys, ehi, elo)
    del ex, keys, ehi, elo
    url = bucket_url(run, p, "exact")
    write_partitioned(url, {"hi": xuhi, "lo": xulo}, layout.group_of(node_file(xulo)), ngroups, NODE_SCHEMA)
    outputs.append(url)
    # bands: (band, key) buckets
    bd = read_partition([sig_url(run, g, "bands") for g in range(ngroups)], p, BAND_SCHEMA)
    band = bd.column("band").to_numpy() if bd.num_rows else np.empty(0, np.uint16)
    fuhi, fulo, fvhi, fvlo = bucket_stars([band.astype(np.uint64), u64(bd, "key")], u64(bd, "hi"), u64(bd, "lo"))
    del bd, band
    candidates = len(fuhi)
    uhi, ulo = np.concatenate([xuhi, fuhi]), np.concatenate([xulo, fulo])
    vhi, vlo = np.concatenate([xvhi, fvhi]), np.concatenate([xvlo, fvlo])
    exact = np.concatenate([np.ones(len(xuhi), np.uint8), np.zeros(len(fuhi), np.uint8)])
    uhi, ulo, vhi, vlo, exact = _unique_pairs(uhi, ulo, vhi, vlo, exact)
    url = bucket_url(run, p, "edges")
    if verifying(recipe):
        write_partitioned(url, {"uhi": uhi, "ulo": ulo, "vhi": vhi, "vlo": vlo, "exact": exact},
                          node_partition(vhi, vlo, layout.nv), layout.nv, CAND_SCHEMA)
        need = exact == 0
        vp = node_partition(vhi[need], vlo[need], layout.nv).astype(np.uint32)
        rhi = np.concatenate([uhi[need], vhi[need]])
        rlo = np.concatenate([ulo[need], vlo[need]])
        rp = np.concatenate([vp, vp])
        outputs.append(url)
        url = bucket_url(run, p, "requests")
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


def gather_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    g = task.payload["group"]
    req = read_partition([bucket_url(run, p, "requests") for p in range(layout.nb)], g, REQUEST_SCHEMA)
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
        pf = open_parquet(docs_url(run, layout.files[fi]))
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
    url = gather_url(run, g)
    write_partitioned(url, {"hi": hi, "lo": lo, "text": text}, part, layout.nv, TEXT_SCHEMA)
    return TaskResult(outputs=[url], transfer={"texts": int(len(hi)), "bytes": int(nbytes)})


def verify_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    cfg = recipe.dedup
    p = task.payload["part"]
    cand = read_partition([bucket_url(run, q, "edges") for q in range(layout.nb)], p, CAND_SCHEMA)
    uhi, ulo, vhi, vlo = (u64(cand, c) for c in ("uhi", "ulo", "vhi", "vlo"))
    exact = cand.column("exact").to_numpy() if cand.num_rows else np.empty(0, np.uint8)
    uhi, ulo, vhi, vlo, exact = _unique_pairs(uhi, ulo, vhi, vlo, exact)
    texts_t = read_partition([gather_url(run, g) for g in range(len(layout.groups))], p, TEXT_SCHEMA)
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
    url = verify_url(run, p)
    write_partitioned(url, {"ahi": ahi, "alo": alo, "bhi": bhi, "blo": blo},
                      node_partition(ahi, alo, layout.ne), layout.ne, EDGE_SCHEMA)
    return TaskResult(outputs=[url], transfer={"candidates": int(len(todo)), "verified": int(keep.sum() - exact.sum())})
