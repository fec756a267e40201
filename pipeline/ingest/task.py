"""One ingest task: its input's batches through the document steps, counted; kept ones written.

Per batch: readable -> subset of each record -> read counted -> selection -> too_large -> NFC ->
short -> empty -> meta -> datatrove filters -> kept counted and handed to the writer. Each step
(steps.py) says what it rejects; `Ingestion._drop` counts and drops it, the one place where
filtered documents are counted.

A selection or subset key that no readable record of the file has (a misspelled
`meta.redpajama_set_nam` would otherwise exclude nothing, silently) is reported as an
`unknown_key` issue, ahead of the others and never capped; the stage fails on it (stage.py).
A key missing from some records only is normal: metadata varies.

An input that cannot be read (`readers.InputUnavailable`: missing, unreachable) is not bad
input: the task raises, so that the runner retries it and then fails the stage.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from ..recipe import IngestConfig, SourceConfig
from . import steps
from .counts import ALL_SUBSET, MISSING_SUBSET, Counts
from .fields import MISSING
from .readers import Batch, Problem, read_records
from .writer import DocsWriter, MetaColumn

UNKNOWN_KEY = "unknown_key"  # the issue kind of a selection / subset key found in no record


def subset_key(v: Any) -> str | None:
    """The subset named by a field's value (strings, booleans and numbers name one)."""
    if type(v) is str:
        return v
    if isinstance(v, (bool, int, float)):
        return str(v)
    return None


class Ingestion:
    """One task's state: the source's steps, counters and issues, and the documents writer."""

    def __init__(self, src: SourceConfig, cfg: IngestConfig, rel_path: str, fh):
        self.src, self.cfg = src, cfg
        self.source, self.rel_path = src.name, rel_path
        self.counts = Counts(rel_path, cfg.report_issues)
        self.subset_path = None if src.subset in (None, "dir") else src.subset
        self.dir_subset = None
        if src.subset == "dir" and "/" in rel_path:
            self.dir_subset = rel_path.split("/", 1)[0]
        self.include = [(p, frozenset(v)) for p, v in sorted(src.select.include.items())]
        self.exclude = [(p, frozenset(v)) for p, v in sorted(src.select.exclude.items())]
        self.meta = MetaColumn(sorted(set(src.metadata)))
        self.writer = DocsWriter(fh, cfg, self.source, rel_path, self.subset_path is not None, self.dir_subset,
                                 bool(self.meta.paths))
        self.filters = [steps.make_filter(f) for f in src.filters]
        # key path -> the settings naming it, until a record has a value there
        self.unseen: dict[str, list[str]] = {}
        for setting, paths in (("select.include", src.select.include), ("select.exclude", src.select.exclude),
                               ("subset", [self.subset_path] if self.subset_path else [])):
            for path in paths:
                self.unseen.setdefault(path, []).append(setting)
        self.looked = 0  # readable records looked at for the unseen keys

    def run(self, payload: dict) -> dict:
        """Read the task's input through the steps; write the rest; the source's counters."""
        try:
            with contextlib.closing(read_records(payload, self.src)) as events:
                for event in events:
                    if type(event) is Batch:
                        self.add(event)
                    else:
                        self.problem(event)
        except BaseException:
            # The input could not be read (InputUnavailable) or a filter raised: the task fails
            # and its output is discarded; close the parquet writer now, while its file is still
            # open, not at garbage collection (where it would write to a closed file).
            with contextlib.suppress(Exception):
                self.writer.writer.close()
            raise
        self.writer.close()
        if self.unseen and self.looked:
            self.counts.issues[:0] = [
                {"file": self.rel_path, "line": None, "kind": UNKNOWN_KEY,
                 "message": f"{' and '.join(settings)} key {path!r} is in none of the {self.looked} records read "
                            "(misspelled?)"}
                for path, settings in sorted(self.unseen.items())]
        return self.counts.result()

    def problem(self, p: Problem) -> None:
        if p.file:
            self.counts.files_unreadable += 1
        if p.rows is None:
            self.counts.issue(p.kind, p.line, p.message)
        else:
            self.counts.unreadable(p.kind, p.line, p.message, n=p.rows)

    def add(self, batch: Batch) -> None:
        """A batch of records through the steps; `alive` holds the positions of the documents still in."""
        line_of = batch.line_of
        if not batch.texts:
            return
        T, idx, bad = steps.readable(batch.texts, self.src.text_field)
        for i, reason, message in bad:
            self.counts.unreadable(reason, line_of(i), message)
        if not T:
            return
        src, cfg, fields = self.src, self.cfg, batch.fields
        cache: dict[str, list] = {}

        def column(path: str) -> list:  # a field's values, aligned with T
            vals = cache.get(path)
            if vals is None:
                vals = fields(path)
                if idx is not None:
                    vals = [vals[i] for i in idx]
                cache[path] = vals
            return vals

        if self.unseen:
            self._look_for_keys(column, len(T))
        n, first_row = len(T), batch.first_row
        rows = list(range(first_row, first_row + n)) if idx is None else [first_row + i for i in idx]
        subs, subset_vals = self._subsets(column)
        # ASCII texts stay str (their length is their UTF-8 size); others are encoded once
        # (strictly: the writer takes the bytes as valid UTF-8), and go to the writer as they are.
        U = [t if t.isascii() else t.encode() for t in T]
        blen = list(map(len, U))
        alive = list(range(n))
        self.counts.add(subs, alive, "read")
        self.counts.add(subs, alive, "bytes_read", blen)
        report = line_of if idx is None else (lambda p: line_of(idx[p]))

        alive = self._drop(subs, alive, steps.selection(column, alive, self.include, self.exclude), report)
        alive = self._drop(subs, alive, steps.too_large(blen, alive, cfg.max_document_bytes), report)
        if src.normalize == "nfc":
            steps.nfc(T, U, blen, alive)
        if src.min_chars:
            alive = self._drop(subs, alive, steps.short(T, U, alive, src.min_chars), report)
        alive = self._drop(subs, alive, steps.empty(T, blen, alive), report)
        if not alive:
            return
        metas = self.meta.values(column, alive)
        if self.filters:
            alive, metas = self._filter(T, alive, rows, subs, subset_vals, metas, report)
            if not alive:
                return
        self.counts.add(subs, alive, "kept")
        self.counts.add(subs, alive, "bytes_kept", blen)
        self.writer.add([rows[p] for p in alive], [U[p] for p in alive],
                        None if subset_vals is None else [subset_vals[p] for p in alive], metas)

    def _look_for_keys(self, column: Callable[[str], list], n: int) -> None:
        """Forget the unseen keys that a record of this batch has (usually its first record)."""
        self.looked += n
        for path in [p for p in self.unseen if any(v is not MISSING for v in column(p))]:
            del self.unseen[path]

    def _subsets(self, column: Callable[[str], list]) -> tuple[list[str] | str, list | None]:
        """The subset to count each document under (one for the whole batch, or a list), and the
        values of the subset column when each document has its own."""
        if self.subset_path is not None:
            subset_vals = [v if type(v) is str else subset_key(v) for v in column(self.subset_path)]
            return [MISSING_SUBSET if v is None else v for v in subset_vals], subset_vals
        if self.src.subset == "dir":
            return self.dir_subset or MISSING_SUBSET, None
        return ALL_SUBSET, None

    def _count(self, subs: list[str] | str, rejected: steps.Rejected, report: Callable[[int], int]) -> None:
        self.counts.filtered(subs, rejected.positions, rejected.reason)
        if rejected.messages:
            for p, message in zip(rejected.positions, rejected.messages):
                self.counts.issue(rejected.reason, report(p), message)

    def _drop(self, subs: list[str] | str, alive: list[int], rejected: steps.Rejected,
              report: Callable[[int], int]) -> list[int]:
        """Count what a step rejected (and report it, when the step gives messages); what is left."""
        if not rejected.positions:
            return alive
        self._count(subs, rejected, report)
        return steps.without(alive, rejected.positions)

    def _filter(self, T: list[str], alive: list[int], rows: list[int], subs: list[str] | str, subset_vals: list | None,
                metas: list[str] | None, report: Callable[[int], int]) -> tuple[list[int], list[str] | None]:
        """The datatrove filters: the documents left, and their metas."""
        gone: set[int] = set()
        for rejected in steps.datatrove_filters(self.filters, T, alive, [rows[p] for p in alive], self.source,
                                                self.rel_path, subset_vals, metas):
            self._count(subs, rejected, report)
            gone.update(rejected.positions)
        if not gone:
            return alive, metas
        return ([p for p in alive if p not in gone],
                None if metas is None else [m for p, m in zip(alive, metas) if p not in gone])
