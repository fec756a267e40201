"""The ingest stage: one task per input file, or per range of a parquet file's row groups.

Planning reads each parquet footer (when `ingest.split_row_groups` > 0) to split large files,
FOOTER_READERS at a time (on an object store each footer is two or three round trips: read one
after another, a thousand Starcoderdata files would hold the driver for minutes); a task writes `RUN/docs/<source>/<rel_path>[@rgSTART-END].parquet` and returns its counters and
issues.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from .. import storage
from ..inputs import list_inputs
from ..layout import RunDir, as_run
from ..recipe import IngestConfig, Recipe, SourceConfig
from ..stage import Stage, Task, TaskResult, fingerprint
from .readers import IngestError, RetryingReader, detect_format, unknown_format
from .task import UNKNOWN_KEY, Ingestion

STAGE = "ingest"
FOOTER_READERS = 32  # parquet footers read at once while planning (latency-bound reads)
log = logging.getLogger("tinyprep")


def output_url(run: RunDir | str, source: str, rel_path: str, split: tuple[int, int] | None = None) -> str:
    name = rel_path + (f"@rg{split[0]:05d}-{split[1]:05d}" if split else "") + ".parquet"
    return as_run(run).docs(source, name)


def _output_settings(cfg: IngestConfig) -> dict:
    """The ingest settings that a task's documents depend on (part of its fingerprint).

    The codec and its level are not among them: they change how the parquet is encoded, not the
    documents, nor the shards made from them. A new codec applies to the tasks that run after
    the change; finished ones are kept (re-encoding them would change their files, and so redo
    dedup and tokenize for the same shards). The key stays, with the default codec, so that
    the fingerprints of runs made while the codec was fingerprinted stay the same.
    """
    return {
        "max_document_bytes": cfg.max_document_bytes,
        "parquet_compression": "zstd",
        "rows_per_group": cfg.rows_per_group,
    }


def parquet_splits(url: str, every: int) -> list[tuple[int, int, int, int, int]] | None:
    """(start, end, first_row, rows, compressed_bytes) per range of `every` row groups.

    None when the footer is not a parquet footer (the single task then reports the file); [] when
    the file has no more than `every` row groups (one task, no split). The footer is read like
    any input (`readers.RetryingReader`): when the storage fails after the retries, IngestError
    naming the file (a plan must not depend on a passing network error).
    """
    raw = RetryingReader(url)
    try:
        md = pq.ParquetFile(raw).metadata
    except Exception as e:  # noqa: BLE001 - an unreadable file becomes one task that reports it
        if raw.failure is not None:
            raise IngestError(f"planning ingest: {raw.failure}") from e
        return None
    finally:
        raw.close()
    groups = [(md.row_group(i).num_rows,
               sum(md.row_group(i).column(c).total_compressed_size for c in range(md.row_group(i).num_columns)))
              for i in range(md.num_row_groups)]
    if len(groups) <= every:
        return []
    out, first = [], 0
    for start in range(0, len(groups), every):
        part = groups[start:start + every]
        rows = sum(g[0] for g in part)
        out.append((start, start + len(part), first, rows, sum(g[1] for g in part)))
        first += rows
    return out


def _input_format(src: SourceConfig, rel_path: str, url: str) -> str:
    """The source's format, or the one the input's name gives (IngestError naming the input when
    it gives none: a glob that matched a .txt is a recipe to fix, not a traceback)."""
    if src.format != "auto":
        return src.format
    try:
        return detect_format(rel_path)
    except IngestError:
        raise IngestError(f"source {src.name}: {unknown_format(url)}") from None


def _splits_of(urls: tuple[str, str], every: int) -> list[tuple[int, int, int, int, int]] | None:
    """parquet_splits of the raw copy's footer, or of the original's when it is not downloaded yet."""
    url, original = urls
    return parquet_splits(url if url == original or storage.exists(url) else original, every)


def _read_splits(inputs: list[tuple[str, str] | None], every: int) -> list:
    """_splits_of each input ((url, original url); None: no footer to read), FOOTER_READERS at a
    time, in order; the first failing read in listing order raises, as a serial loop would."""
    todo = [i for i, urls in enumerate(inputs) if urls is not None]
    out: list = [None] * len(inputs)
    if len(todo) <= 1:
        for i in todo:
            out[i] = _splits_of(inputs[i], every)
        return out
    with ThreadPoolExecutor(min(FOOTER_READERS, len(todo)), thread_name_prefix="tinyprep-footers") as pool:
        for i, parts in zip(todo, pool.map(lambda i: _splits_of(inputs[i], every), todo)):
            out[i] = parts
    return out


class IngestStage(Stage):
    name = STAGE

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None = None) -> list[Task]:
        """One task per input file; parquet files split by `ingest.split_row_groups` (footers read
        here, concurrently; the tasks come out in listing order whatever order the reads end in)."""
        settings = _output_settings(recipe.ingest)
        every = recipe.ingest.split_row_groups
        inputs = []  # (source, its fingerprinted config, input file, url to read, format, footer url)
        for src in recipe.sources:
            src_cfg = src.model_dump(mode="json", by_alias=True)
            src_cfg.pop("weight", None)
            for f in list_inputs(src, run):
                url = run.raw(src.name, f.rel_path) if src.download else f.url
                fmt = _input_format(src, f.rel_path, f.url)
                inputs.append((src, src_cfg, f, url, fmt, fmt == "parquet" and every > 0))
        splits = _read_splits([(url, f.url) if split else None for _, _, f, url, _, split in inputs], every)
        out: list[Task] = []
        for (src, src_cfg, f, url, fmt, _), parts in zip(inputs, splits):
            base = {"url": url, "rel_path": f.rel_path, "format": fmt, "split": None}
            if not parts:
                out.append(Task(STAGE, f"{src.name}/{f.rel_path}", src.name,
                                fingerprint(STAGE, f.version, fmt, src_cfg, settings, None),
                                size=max(f.size, 0), payload=base))
                continue
            for start, end, first_row, rows, nbytes in parts:
                split = [start, end]
                payload = dict(base, split=split, first_row=first_row, rows=rows)
                out.append(Task(STAGE, f"{src.name}/{f.rel_path}@rg{start:05d}-{end:05d}", src.name,
                                fingerprint(STAGE, f.version, fmt, src_cfg, settings, split),
                                size=nbytes, payload=payload))
        return out

    def allowed_errors(self, recipe: Recipe) -> int | None:
        return recipe.ingest.max_errors

    def finish(self, recipe: Recipe, run: RunDir, records: list[dict]) -> None:
        """Fail on a selection or subset key that some input has in no record (`ingest.on_unknown_key`:
        error, the default) or log it (warn). Completion records keep the issues, so a resumed run
        fails the same way until the recipe changes (which changes the tasks' fingerprints)."""
        found = [f"source {r['source']}: {i['file']}: {i['message']}"
                 for r in records for i in r.get("issues", ()) if i.get("kind") == UNKNOWN_KEY]
        if not found:
            return
        if recipe.ingest.on_unknown_key == "warn":
            log.warning("ingest: %d selection/subset key(s) found in no record of an input "
                        "(ingest.on_unknown_key=warn):\n  %s", len(found), "\n  ".join(found))
            return
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise IngestError(f"{found[0]}{more}: fix the key, or set ingest.on_unknown_key=warn to accept it")

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        """Ingest one input file (or row-group range): writes its parquet, returns counts and issues."""
        src = recipe.source(task.source)
        p = task.payload
        split = tuple(p["split"]) if p.get("split") else None
        out = output_url(run, src.name, p["rel_path"], split)
        with storage.atomic_open(out, "wb") as fh:
            ingestion = Ingestion(src, recipe.ingest, p["rel_path"], fh)
            counts = ingestion.run(p)
        counts["files"] = 1 if not split or split[0] == 0 else 0
        errors = sum(counts["unreadable"].values()) + counts["files_unreadable"]
        return TaskResult(outputs=[out], stats={"sources": {src.name: counts}}, issues=ingestion.counts.issues,
                          docs=counts["read"], bytes=counts["bytes_read"], errors=errors)


stage = IngestStage()
