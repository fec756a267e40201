"""The signatures phase: per group of docs files, the exact hash and MinHash band keys of every
document, partitioned by hash range, and the per-document index (id, subset, bytes) for the stats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import storage
from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from .exact import text_hashes
from .layout import (
    BAND_SCHEMA,
    EXACT_SCHEMA,
    INDEX_SCHEMA,
    Layout,
    docs_url,
    open_parquet,
    sig_url,
    source_ranks,
)
from .minhash import MinHashParams, Shingler, Signer, mulhi
from .shuffle import make_nodes, write_partitioned

_READ_ROWS = 128  # documents per signature batch (about the size that keeps the arrays in cache)


def signatures_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    cfg = recipe.dedup
    g = task.payload["group"]
    ranks = source_ranks(recipe)
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
        pf = open_parquet(docs_url(run, f))
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
    url = sig_url(run, g, "bands")
    write_partitioned(url, {"band": band, "key": key, "hi": bhi, "lo": blo},
                      mulhi(key, layout.nb).astype(np.int64), layout.nb, BAND_SCHEMA)
    outputs.append(url)
    h1, h2, ehi, elo = (cat(exact_parts, i, np.uint64) for i in range(4))
    url = sig_url(run, g, "exact")
    write_partitioned(url, {"h1": h1, "h2": h2, "hi": ehi, "lo": elo}, mulhi(h1, layout.nb).astype(np.int64),
                      layout.nb, EXACT_SCHEMA)
    outputs.append(url)
    index = pa.concat_tables(index_parts) if index_parts else INDEX_SCHEMA.empty_table()
    url = sig_url(run, g, "docs")
    with storage.atomic_open(url, "wb") as fh:
        with pa.ipc.new_file(fh, INDEX_SCHEMA) as w:
            w.write_table(index)
    outputs.append(url)
    return TaskResult(outputs=outputs, docs=docs, bytes=nbytes)
