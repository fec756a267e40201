"""The shuffle: files partitioned by hash range, and the node keys of the dedup graph.

A shuffle file is an Arrow IPC file holding one record batch per destination partition (empty
batches included), written atomically by the producing task. A consumer task reads batch p of
every producer's file: a footer read and one ranged read each, on local disks and object stores
alike. Nothing passes through Ray but task descriptions and small results.

A document is a graph node of two uint64 words that order it the way the survivor is chosen,
source priority first, then lowest document id (then location, which only breaks ties between
equal ids from different files):

    hi = rank << 56 | id >> 8
    lo = (id & 0xff) << 56 | file_index << 32 | row

`file_index` is the docs file's position in the layout, `row` the document's row in it, so a node
also says where its document is and which removal task owns it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import storage
from ..hashing import splitmix64
from .minhash import mulhi

U64 = np.uint64
LOC_MASK = U64((1 << 56) - 1)
MAX_FILES = 1 << 24
MAX_ROWS = 1 << 32


# ---------------------------------------------------------------------------------------------
# Nodes


def make_nodes(rank: int, ids: np.ndarray, file_index: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = ids.astype(np.uint64, copy=False)
    hi = (U64(rank) << U64(56)) | (ids >> U64(8))
    lo = ((ids & U64(0xFF)) << U64(56)) | (U64(file_index) << U64(32)) | rows.astype(np.uint64)
    return hi, lo


def node_id(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The document id of nodes."""
    return ((hi & U64((1 << 56) - 1)) << U64(8)) | (lo >> U64(56))


def node_file(lo: np.ndarray) -> np.ndarray:
    return ((lo & LOC_MASK) >> U64(32)).astype(np.int64)


def node_row(lo: np.ndarray) -> np.ndarray:
    return (lo & U64(0xFFFFFFFF)).astype(np.int64)


def node_partition(hi: np.ndarray, lo: np.ndarray, n: int) -> np.ndarray:
    return mulhi(splitmix64(hi ^ splitmix64(lo)), n).astype(np.int64)


def less(ahi, alo, bhi, blo) -> np.ndarray:
    """a < b in node order, elementwise."""
    return (ahi < bhi) | ((ahi == bhi) & (alo < blo))


# ---------------------------------------------------------------------------------------------
# Partitioned files


def write_partitioned(url: str, columns: dict[str, np.ndarray | pa.Array], part: np.ndarray, nparts: int,
                      schema: pa.Schema) -> list[int]:
    """Write rows into one batch per partition (rows keep their order within a partition).

    Returns the row count of every partition.
    """
    n = len(part)
    order = np.argsort(part, kind="stable") if n else np.empty(0, np.int64)
    counts = np.bincount(part, minlength=nparts) if n else np.zeros(nparts, np.int64)
    arrays = []
    for f in schema:
        col = columns[f.name]
        if isinstance(col, (pa.Array, pa.ChunkedArray)):
            arrays.append(col.take(pa.array(order)) if n else pa.array([], f.type))
        else:
            arrays.append(pa.array(col[order], f.type) if n else pa.array(np.empty(0, col.dtype), f.type))
    batch = pa.RecordBatch.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                        for a in arrays], schema=schema)
    with storage.atomic_open(url, "wb") as fh:
        with pa.ipc.new_file(fh, schema) as w:
            start = 0
            for p in range(nparts):  # one batch per partition, empty ones included
                c = int(counts[p])
                w.write_batch(batch.slice(start, c))
                start += c
    return [int(c) for c in counts]


def read_partition(urls: list[str], p: int, schema: pa.Schema) -> pa.Table:
    """Batch p of every file, concatenated in the order of `urls` (a missing file is an error)."""
    batches = []
    for url in urls:
        fs, path = storage.url_to_fs(url)
        src = pa.OSFile(path, "rb") if storage.is_local(fs) else fs.open(path, "rb")
        try:
            batches.append(pa.ipc.open_file(src).get_batch(p))  # reads the footer and batch p only
        finally:
            src.close()
    if not batches:
        return schema.empty_table()
    return pa.Table.from_batches(batches, schema=schema)


def u64(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy()
    if col.num_chunks == 0:
        return np.empty(0, np.uint64)
    return np.concatenate([c.to_numpy() for c in col.chunks])


def schema(*names: str, **types: pa.DataType) -> pa.Schema:
    """A schema of uint64 columns `names` plus typed ones."""
    return pa.schema([pa.field(n, pa.uint64(), nullable=False) for n in names]
                     + [pa.field(n, t) for n, t in types.items()])
