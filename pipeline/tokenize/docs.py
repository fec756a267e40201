"""The run's documents as the tokenize stage reads them: docs files, batches, dedup removals.

`removed_ids` is the one place where the tokenize stage learns about deduplication: the holdout
and encode phases drop those documents before anything else.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..layout import DocsFile, RunDir, as_run
from ..recipe import Recipe
from .errors import TokenizeError


def all_docs_files(recipe: Recipe, run: RunDir) -> dict[str, list[DocsFile]]:
    """Each recipe source's docs files (sorted); at least one file in all."""
    files = {s.name: run.docs_files(s.name) for s in recipe.sources}
    if not any(files.values()):
        raise TokenizeError(f"{run.docs_root()}: no ingested documents; run the ingest stage first")
    return files


def read_table(url: str, columns: list[str]) -> pa.Table:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def iter_batches(url: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns)


def removed_ids(run: RunDir | str, source: str, rel_path: str) -> np.ndarray:
    """Ids (sorted uint64) of the documents of `RUN/docs/<source>/<rel_path>` that dedup removed.

    The holdout and encode phases drop these ids before anything else, and the holdout phase
    counts them as `removed.dedup`. Without `RUN/dedup/` it is empty; with it, the dedup stage's
    removal list of the file (`pipeline.dedup.removed_ids`) must exist (`removal_versions`
    checks at plan time).
    """
    run = as_run(run)
    if not storage.exists(run.dedup()):
        return np.zeros(0, dtype=np.uint64)
    from ..dedup import removed_ids as dedup_removed_ids

    try:
        return np.sort(np.asarray(dedup_removed_ids(run, source, rel_path), dtype=np.uint64))
    except FileNotFoundError:
        raise TokenizeError(f"{run.dedup()}: no removal list for docs/{source}/{rel_path}; "
                            f"finish the dedup stage (or remove RUN/dedup to tokenize without it)") from None


def removal_versions(run: RunDir, files: dict[str, list[DocsFile]]) -> dict[str, str]:
    """Version (size, mtime) of each docs file's dedup removal list, '' without RUN/dedup/.

    Part of the holdout tasks' fingerprints: new removal lists redo everything after them."""
    keys = [f"{f.source}/{f.rel}" for fs in files.values() for f in fs]
    if not storage.exists(run.dedup()):
        return {k: "" for k in keys}
    root_url = run.dedup("removed")
    found = dict(run.find(root_url))
    out = {}
    for k in keys:
        info = found.get(k if k.endswith(".parquet") else k + ".parquet")
        if info is None:
            raise TokenizeError(f"{root_url}: no removal list for docs/{k}; finish the dedup stage "
                                f"(or remove {run.dedup()} to tokenize without it)")
        out[k] = storage.file_stamp(info)
    return out
