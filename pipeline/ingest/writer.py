"""The documents parquet: its schema, its `meta` column, and the writer of one task's output.

    id uint64 | source | subset (nullable) | file | row int64 | text large_string | meta

Row groups hold `ingest.rows_per_group` documents (the last one the rest); `meta` is the JSON of
the recipe's metadata fields (sorted keys, `{}` when there are none).
"""

from __future__ import annotations

from typing import Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ..recipe import IngestConfig
from .fields import MISSING
from .ids import document_ids

SCHEMA = pa.schema(
    [
        pa.field("id", pa.uint64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=True),
        pa.field("file", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)


def open_writer(fh, cfg: IngestConfig) -> pq.ParquetWriter:
    """The codec compresses every byte of text once: at the default (zstd level 1) it costs about
    as much CPU as reading the input (tests/benchmarks/README.md, Ingest); the text column gets
    no dictionary and no statistics (both would only cost)."""
    return pq.ParquetWriter(
        fh, SCHEMA,
        compression=cfg.parquet_compression,
        compression_level=cfg.parquet_compression_level,
        use_dictionary=["source", "subset", "file", "meta"],  # repetitive columns; never the text
        write_statistics=["id", "source", "subset", "file", "row"],
        data_page_size=1 << 20,
    )


class MetaColumn:
    """The `meta` values of documents: orjson of the kept fields, sorted keys.

    Metadata values repeat (a handful of set names), so the JSON of string values is cached.
    """

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._cache: dict = {}  # value (one field) or tuple of values -> JSON

    def values(self, column: Callable[[str], list], alive: list[int]) -> list[str] | None:
        """The `meta` of the documents at `alive` (None when the recipe keeps no metadata)."""
        if not self.paths:
            return None
        paths = self.paths
        cols = [column(p) for p in paths]
        cache = self._cache
        out = []
        if len(cols) == 1:
            vals, path = cols[0], paths[0]
            for p in alive:
                v = vals[p]
                s = cache.get(v) if type(v) is str else None
                if s is None:
                    s = orjson.dumps({} if v is MISSING else {path: v}, default=str).decode()
                    if type(v) is str and len(cache) < 4096:
                        cache[v] = s
                out.append(s)
            return out
        for p in alive:
            key = tuple([c[p] for c in cols])
            cacheable = all([type(v) is str for v in key])
            s = cache.get(key) if cacheable else None
            if s is None:
                d = {path: v for path, v in zip(paths, key) if v is not MISSING}
                s = orjson.dumps(d, option=orjson.OPT_SORT_KEYS, default=str).decode()
                if cacheable and len(cache) < 4096:
                    cache[key] = s
            out.append(s)
        return out


class DocsWriter:
    """Kept documents of one task, written in whole row groups as they arrive.

    subset_field: documents come with their own subset; else every one has `dir_subset` (null
    when None). has_meta: documents come with their `meta` (else it is "{}").
    """

    def __init__(self, fh, cfg: IngestConfig, source: str, rel_path: str, subset_field: bool,
                 dir_subset: str | None, has_meta: bool):
        self.writer = open_writer(fh, cfg)
        self.rows_per_group = cfg.rows_per_group
        self.source, self.rel_path = source, rel_path
        self.subset_field, self.dir_subset, self.has_meta = subset_field, dir_subset, has_meta
        # kept documents not yet written (a row group is written once rows_per_group are here)
        self.p_rows: list[int] = []
        self.p_text: list[str | bytes] = []  # ASCII str or UTF-8 bytes
        self.p_subset: list[str | None] = []
        self.p_meta: list[str] = []

    def add(self, rows: list[int], texts: list, subsets: list | None, metas: list[str] | None) -> None:
        self.p_rows += rows
        self.p_text += texts
        if subsets is not None:
            self.p_subset += subsets
        if metas is not None:
            self.p_meta += metas
        if len(self.p_rows) >= self.rows_per_group:
            self._flush(final=False)

    def close(self) -> None:
        """Write the last rows and the footer."""
        self._flush(final=True)
        self.writer.close()

    def _flush(self, final: bool) -> None:
        """Write whole row groups of rows_per_group documents (and the rest when final)."""
        rpg = self.rows_per_group
        while self.p_rows and (final or len(self.p_rows) >= rpg):
            k = min(rpg, len(self.p_rows))
            rows, self.p_rows = self.p_rows[:k], self.p_rows[k:]
            texts, self.p_text = self.p_text[:k], self.p_text[k:]
            if self.subset_field:
                subsets, self.p_subset = self.p_subset[:k], self.p_subset[k:]
                subset_col = pa.array(subsets, pa.string())
            elif self.dir_subset is not None:
                subset_col = pa.repeat(pa.scalar(self.dir_subset, pa.string()), k)
            else:
                subset_col = pa.nulls(k, pa.string())
            if self.has_meta:
                metas, self.p_meta = self.p_meta[:k], self.p_meta[k:]
                meta_col = pa.array(metas, pa.string())
            else:
                meta_col = pa.repeat(pa.scalar("{}", pa.string()), k)
            table = pa.Table.from_arrays(
                [
                    pa.array(document_ids(self.source, self.rel_path, rows), pa.uint64()),
                    pa.repeat(pa.scalar(self.source, pa.string()), k),
                    subset_col,
                    pa.repeat(pa.scalar(self.rel_path, pa.string()), k),
                    pa.array(rows, pa.int64()),
                    pa.array(texts, pa.large_binary()).view(pa.large_string()),  # valid UTF-8 (task.py)
                    meta_col,
                ],
                schema=SCHEMA,
            )
            self.writer.write_table(table, row_group_size=rpg)
