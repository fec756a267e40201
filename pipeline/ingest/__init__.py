"""Ingest: read a source's input files, select, normalize, filter; write documents as parquet.

One task per input file (or per range of a parquet file's row groups, `stage.py`). A task reads
its input as batches of records (`readers.py`: zstd / gzip / plain JSON lines, or parquet; about
1 MB of lines or one parquet batch; `compressed.py` releases a checksummed zstd frame or a gzip
member only once its check has passed) and writes `RUN/docs/<source>/<rel_path>.parquet`
(`writer.py`):

    id uint64 | source | subset (nullable) | file | row int64 | text large_string | meta

Per document, in this order (`steps.py`, driven by `task.py`): parse -> text field -> selection
-> size limit -> NFC -> SlimPajama's short-document filter -> empty -> datatrove filters -> kept.
Every record encountered is counted once, per source and per subset (`counts.py`):
`read == kept + sum(filtered) + sum(unreadable)`. Bad input is counted and reported (file, line,
kind), never raised. A recipe that cannot apply is an `IngestError` (a `StageFailed`): an input
whose name gives no format (at planning), a selection or subset key found in no record of an
input (after the tasks, `ingest.on_unknown_key`). Document ids (`ids.py`) depend only on
(source, file, row).

The hot path works on batches: parsing is `map(orjson.loads, lines)`, every later step is one
list operation over the batch, and a slow per-line path runs only for the batches that hold a
bad or blank line.
"""

from .ids import document_id, document_ids
from .readers import IngestError, detect_format
from .stage import STAGE, output_url, parquet_splits, stage
from .writer import SCHEMA

__all__ = ["stage", "STAGE", "SCHEMA", "document_id", "document_ids", "detect_format", "IngestError", "output_url",
           "parquet_splits"]
