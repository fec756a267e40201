"""Readers: an input file (JSON lines, plain / zstd / gzip, or parquet) as batches of records.

A reader yields, in file order, `Batch`es (about 1 MB of lines, or one parquet batch) and
`Problem`s (bad input it met: a file that cannot be opened or decoded, a truncated stream, a
compressed frame that failed its check, a damaged row group). Records that parse but are unusable
(bad JSON or UTF-8 on one line, no text) travel inside a batch as `fields.Bad` / `fields.MISSING`
in place of their text; the steps count them. Readers never raise on bad input.

Compressed JSON lines are decoded by `compressed.py`, which releases a zstd frame (with a content
checksum) or a gzip member only once its check has passed; the lines of a frame that failed are
counted unreadable (one `Problem` with their line range) and reading goes on with the next frame.

Every read of an input goes through `RetryingReader`, which re-opens the file after a storage
error and resumes at the same offset (`OPEN_RETRIES` times, exponential backoff from
`RETRY_BACKOFF_S`; which errors are retried: `pipeline/retry.py`). A storage error is never bad
input: when the retries are spent, or at once for one that cannot heal (access refused), the
reader raises `InputUnavailable` naming the file, the task fails and the runner retries it.
Only what the bytes say (bad JSON, bad compression, bad parquet, wrong types) is a `Problem`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..download import url_for_log
from ..recipe import SourceConfig
from ..retry import call_with_retries, describe
from ..stage import StageFailed
from .compressed import Lost, StreamError, gzip_chunks, zstd_chunks
from .fields import MISSING, Bad, fast_values, getter, values_at

# Suffix -> format, longest first so that ".jsonl.zst" wins over ".zst".
_SUFFIXES = (
    (".jsonl.zst", "jsonl.zst"), (".json.zst", "jsonl.zst"),
    (".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"),
    (".jsonl", "jsonl"), (".json", "jsonl"),
    (".parquet", "parquet"),
)

RAW_READ = 1 << 20  # bytes per read of a plain file
_RAW_READ_COMPRESSED = 1 << 16  # compressed bytes per decompression step (output stays in cache)
_BATCH_LINES_BYTES = 1 << 20  # lines are processed in batches of about this many bytes
_PARQUET_BATCH_ROWS = 2048
OPEN_RETRIES = 3  # re-opens (resuming at the same offset) after a storage error
RETRY_BACKOFF_S = 0.2  # first delay before a re-open (tests set it to 0)
RETRY_BACKOFF_MAX_S = 5.0
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark


class IngestError(StageFailed):
    """The ingest stage cannot run as the recipe asks (an input of unknown format, a selection or
    subset key found in no record); the CLI prints it as one line, exit code 1."""


class InputUnavailable(RuntimeError):
    """An input could not be read (missing, unreachable, refused) after the reader's retries.

    Raised out of the task, never counted as bad input: the runner retries the task and then
    fails the stage with this message, which names the file.
    """


def detect_format(rel_path: str) -> str:
    """The format of an input, from its name; IngestError naming the file and the accepted ones."""
    low = rel_path.lower()
    for suffix, fmt in _SUFFIXES:
        if low.endswith(suffix):
            return fmt
    raise IngestError(unknown_format(rel_path))


def unknown_format(name: str) -> str:
    """The message for an input whose name gives no format."""
    return (f"{name}: unknown input format (accepted: {', '.join(s for s, _ in _SUFFIXES)}); "
            "narrow the source's urls, or set its format")


# ---------------------------------------------------------------------------------------------
# What readers yield


@dataclass(slots=True)
class Batch:
    """Records `first_row`, `first_row + 1`, ... of a file.

    texts[i] is the text of record `first_row + i`, or why it has none (a `Bad`, `MISSING`,
    None or a value that is not a string); `fields(path)` gives the values at a dotted path,
    aligned with texts; `line_of(i)` the line (jsonl) or row (parquet) to report for record i.
    """

    texts: list
    first_row: int
    fields: Callable[[str], list]
    line_of: Callable[[int], int]


@dataclass(slots=True)
class Problem:
    """Bad input a reader met, reported as an issue (kind, line, message).

    rows: records lost with it (counted unreadable, with `kind` as the reason), None when no
    record is counted; file: the file itself counts as unreadable.
    """

    kind: str
    line: int | None
    message: str
    rows: int | None = None
    file: bool = False


def read_records(payload: dict, src: SourceConfig) -> Iterator[Batch | Problem]:
    """The batches and problems of one ingest task's input (its payload: url, format, split).

    payload["head"]: the input is the first bytes of a file (`tinyprep plan`'s sample): the
    compressed frame it ends in is read unverified instead of counted lost.
    """
    if payload["format"] == "parquet":
        return read_parquet(payload["url"], src, payload.get("split"), payload.get("rows"))
    return read_jsonl(payload["url"], payload["format"], src.text_field, bool(payload.get("head")))


# ---------------------------------------------------------------------------------------------
# Input streams


class RetryingReader:
    """An input as a binary file (read, seek, tell) that survives storage errors.

    The file is opened at the first read. After an error it is closed, re-opened and read again
    from the same offset, as `call_with_retries` schedules; when that fails for good the reader
    raises InputUnavailable and keeps it in `failure`, so that a caller that sees the error
    through another library (pyarrow wraps what a Python file raises) still knows it was I/O.
    """

    def __init__(self, url: str, retries: int = OPEN_RETRIES):
        self.url, self.retries = url, retries
        self.pos = 0  # the offset of the next read
        self.fh = None
        self.fh_pos = 0  # where the open file stands
        self.opened = False  # the file was opened once
        self.failure: InputUnavailable | None = None

    def read(self, n: int = -1) -> bytes:
        return self._retrying(lambda: self._read_once(n))

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self.pos = self._retrying(self._size_once) + offset
        else:
            self.pos = offset + (self.pos if whence == 1 else 0)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False

    def _file(self):
        if self.fh is None:
            self.fh, self.fh_pos, self.opened = open_input(self.url), 0, True
        return self.fh

    def _read_once(self, n: int) -> bytes:
        fh = self._file()
        if self.fh_pos != self.pos:
            fh.seek(self.pos)
        data = fh.read(n)
        self.pos += len(data)
        self.fh_pos = self.pos
        return data

    def _size_once(self) -> int:
        self.fh_pos = self._file().seek(0, 2)
        return self.fh_pos

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        if self.failure is not None:
            raise self.failure
        tries = [0]

        def on_error(e: BaseException) -> None:
            tries[0] += 1
            self.close()

        try:
            return call_with_retries(fn, self.retries, RETRY_BACKOFF_S, max_s=RETRY_BACKOFF_MAX_S, on_error=on_error)
        except Exception as e:
            what = f"read failed at byte {self.pos}" if self.opened else "cannot open"
            self.failure = InputUnavailable(f"{url_for_log(self.url)}: {what} ({tries[0]} attempt(s)): {describe(e)}")
            raise self.failure from e

    def close(self) -> None:
        if self.fh is not None:
            try:
                self.fh.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self.fh = None


def open_input(url: str):
    """Open an input for binary reading (tests replace this to inject storage errors)."""
    fs, path = storage.url_to_fs(url)
    if storage.is_local(fs):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=RAW_READ * 4)


def _read_raw(raw: RetryingReader, size: int | None = None) -> bytes:
    return raw.read(size or _RAW_READ_COMPRESSED)


def _plain_chunks(raw: RetryingReader, first: bytes) -> Iterator[bytes]:
    data = first
    while data:
        yield data
        data = _read_raw(raw, RAW_READ)


_COMPRESSED = {"jsonl.zst": zstd_chunks, "jsonl.gz": gzip_chunks}


# ---------------------------------------------------------------------------------------------
# JSON lines


class _LineBatches:
    """Complete lines of a stream of decompressed chunks, in batches of about _BATCH_LINES_BYTES.

    A `Lost` in the stream (a compressed frame that failed its check) ends the batch in progress
    and is yielded as it is; the line in progress is lost with it, and the rest of the line the
    lost bytes end inside is skipped (see `Lost`).
    Once iterated, `tail` holds the bytes after the last newline and `error` the StreamError that
    ended the stream (None: a clean end); the lines read before an error are still yielded.
    """

    def __init__(self, chunks: Iterator[bytes | Lost]):
        self.chunks, self.tail, self.error = chunks, b"", None

    def __iter__(self) -> Iterator[list[bytes] | Lost]:
        parts: list[bytes] = []  # pieces of the line in progress
        batch: list[bytes] = []  # complete lines waiting to be yielded
        batch_bytes = 0
        started = False  # a batch was yielded
        skipping = False  # the rest of a lost line is being skipped, up to its newline
        try:
            for chunk in self.chunks:
                if type(chunk) is not bytes:
                    if batch:
                        yield batch
                        batch, batch_bytes = [], 0
                    if chunk.lines:
                        parts = []
                    started, skipping = True, chunk.skip
                    yield chunk
                    continue
                if skipping:
                    end = chunk.find(b"\n")
                    if end < 0:
                        continue
                    chunk, skipping = chunk[end + 1:], False
                if not started and not batch and not parts and chunk.startswith(_BOM):
                    chunk = chunk[3:]
                lines = chunk.split(b"\n")
                tail = lines.pop()
                if not lines:
                    parts.append(tail)
                    continue
                if parts:
                    parts.append(lines[0])
                    lines[0] = b"".join(parts)
                parts = [tail] if tail else []
                batch += lines
                batch_bytes += len(chunk)
                if batch_bytes >= _BATCH_LINES_BYTES:
                    started = True
                    yield batch
                    batch, batch_bytes = [], 0
        except StreamError as e:
            self.error = e
        if batch:
            yield batch
        self.tail = b"".join(parts)


def read_jsonl(url: str, fmt: str, text_field: str, head: bool = False) -> Iterator[Batch | Problem]:
    """Batches of the records of a JSON-lines file (plain, zstd or gzip); problems as met.

    head: the file is the first bytes of a longer one (see read_records).
    """
    text_of = getter(text_field)
    text_keys = text_field.split(".")
    loads, JSONDecodeError = orjson.loads, orjson.JSONDecodeError
    raw = RetryingReader(url)
    try:
        first = _read_raw(raw, RAW_READ if fmt == "jsonl" else None)
        if not first:
            yield Problem("empty_file", None, "the file is empty", file=True)
            return
        row = 0  # records so far (every non-blank line)
        line = 0  # physical lines so far

        def process(lines: list[bytes]) -> Iterator[Batch]:
            nonlocal row, line
            try:
                objs = list(map(loads, lines))
                blank_at: list[int] = []
            except JSONDecodeError:
                objs, blank_at = _parse_slowly(lines, loads, JSONDecodeError)
            try:
                objs_texts = fast_values(objs, text_keys)
            except (KeyError, TypeError, IndexError):
                objs_texts = [_text_or_why(o, text_of) for o in objs]
            first_line = line + 1

            def fields(path: str) -> list:
                return values_at(objs, path)

            def line_of(i: int) -> int:
                return first_line + i + bisect_right(blank_at, i)

            yield Batch(objs_texts, row, fields, line_of)
            row += len(objs)
            line += len(lines)

        if fmt == "jsonl":
            chunks = _plain_chunks(raw, first)
        else:
            chunks = _COMPRESSED[fmt](lambda: _read_raw(raw), first, release_cut=head)
        batches = _LineBatches(chunks)
        for item in batches:
            if type(item) is list:
                yield from process(item)
                continue
            lost, n = item, item.lines  # a frame that failed its check: its lines are counted, not read
            if n:
                yield Problem(lost.kind, line + 1, f"{lost.message}; line(s) {line + 1}-{line + n} not read",
                              rows=n)
            else:
                yield Problem(lost.kind, None, f"{lost.message}; no line lost")
            row += n
            line += n
        last, error = batches.tail, batches.error
        if last.strip():
            if error is None:
                yield from process([last])
            else:
                yield Problem("truncated", line + 1,
                              f"partial record of {len(last)} bytes at the end of a damaged stream ({error.kind})",
                              rows=1)
                line += 1
                if error.kind == "truncated":
                    error = None  # counted once, as the truncated record
        if error is not None:
            yield Problem(error.kind, None, error.message + f" (after line {line})", file=True)
    finally:
        raw.close()


def _parse_slowly(lines: list[bytes], loads, JSONDecodeError) -> tuple[list, list[int]]:
    """Parse lines one by one: blank lines are skipped (their positions kept), bad ones marked."""
    objs: list = []
    blank_at: list[int] = []  # for each blank line, the number of records before it
    for ln in lines:
        try:
            objs.append(loads(ln))
        except JSONDecodeError as e:
            if not ln.strip():
                blank_at.append(len(objs))
                continue
            try:
                ln.decode("utf-8")
            except UnicodeDecodeError as u:
                objs.append(Bad("bad_utf8", f"invalid UTF-8 at byte {u.start}"))
            else:
                objs.append(Bad("bad_json", f"invalid JSON: {e}"))
    return objs, blank_at


def _text_or_why(o: Any, text_of: Callable) -> Any:
    if isinstance(o, Bad):
        return o
    if type(o) is not dict:
        return Bad("not_an_object", f"a JSON {type(o).__name__}, not an object")
    return text_of(o)


# ---------------------------------------------------------------------------------------------
# Parquet


def read_parquet(url: str, src: SourceConfig, split: list[int] | None,
                 known_rows: int | None) -> Iterator[Batch | Problem]:
    """Batches of a parquet file's rows (of row groups split[0]..split[1] when split); problems as met.

    known_rows: the rows of the split, known from its footer at planning time.
    """
    first_split = not split or split[0] == 0

    def lost(kind: str, message: str) -> Problem:
        # The file cannot be read at all. It counts once (in its first task); rows known from the
        # footer at planning time (splits) are counted unreadable, with `kind` as the reason.
        if known_rows:
            return Problem(kind, None, f"{message}; {known_rows} row(s) not read", rows=known_rows, file=first_split)
        return Problem(kind, None, message, file=first_split)

    raw = RetryingReader(url)
    try:
        problem = None
        try:
            if raw.seek(0, 2) == 0:
                problem = lost("empty_file", "the file is empty")
            else:
                raw.seek(0)
                pf = pq.ParquetFile(raw)
                md = pf.metadata
        except Exception as e:  # noqa: BLE001 - any footer problem is a bad file, unless the storage failed
            if raw.failure is not None:
                raise raw.failure
            problem = lost("bad_parquet", f"not a readable parquet file: {e}")
        if problem is not None:
            yield problem
            return
        yield from _parquet_groups(pf, md, src, split, raw)
    finally:
        raw.close()


def _parquet_groups(pf: pq.ParquetFile, md: pq.FileMetaData, src: SourceConfig,
                    split: list[int] | None, raw: RetryingReader) -> Iterator[Batch | Problem]:
    groups = list(range(split[0], split[1])) if split else list(range(md.num_row_groups))
    row = sum(md.row_group(i).num_rows for i in range(groups[0])) if groups else 0
    total = sum(md.row_group(i).num_rows for i in groups)
    names = pf.schema_arrow.names
    text_top = src.text_field.split(".", 1)[0]
    if text_top not in names:
        if total:
            yield Problem("missing_text", None,
                          f"no column {text_top!r} (columns: {', '.join(names)}); {total} row(s)", rows=total)
        return
    paths = [*src.metadata, *src.select.include, *src.select.exclude]  # the fields the steps read
    if src.subset not in (None, "dir"):
        paths.append(src.subset)
    tops = sorted({p.split(".", 1)[0] for p in [src.text_field, *paths]} & set(names))
    paths = sorted(set(paths))
    for g in groups:  # one row group at a time: a damaged one loses only its own rows
        n, done = md.row_group(g).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[g], columns=tops,
                                         use_threads=False):
                yield _parquet_batch(batch, row + done, src.text_field, paths)
                done += batch.num_rows
        except Exception as e:  # noqa: BLE001 - whatever the reader raises on damaged data
            if raw.failure is not None:  # not damaged data: the storage failed
                raise raw.failure
            yield Problem("bad_parquet", row + done,
                          f"row group {g} unreadable after {done} row(s): {e}; {n - done} row(s) lost",
                          rows=n - done)
        row += n


def _parquet_batch(batch: pa.RecordBatch, first_row: int, text_field: str, paths: list[str]) -> Batch:
    """A Batch of parquet rows; every field the steps read is converted here, so that damaged
    values count against their row group like the rest of the reading."""
    texts = _column_values(batch, text_field)
    if texts and not isinstance(texts[0], str) and any(isinstance(t, (bytes, bytearray)) for t in texts):
        fixed = []
        for t in texts:
            if isinstance(t, (bytes, bytearray)):
                try:
                    t = t.decode("utf-8")
                except UnicodeDecodeError as e:
                    t = Bad("bad_utf8", f"invalid UTF-8 at byte {e.start}")
            fixed.append(t)
        texts = fixed
    cache = {path: _column_values(batch, path) for path in paths}

    def fields(path: str) -> list:
        if path not in cache:
            cache[path] = _column_values(batch, path)
        return cache[path]

    return Batch(texts, first_row, fields, lambda i: first_row + i)


def _column_values(batch: pa.RecordBatch, path: str) -> list:
    top, _, rest = path.partition(".")
    idx = batch.schema.get_field_index(top)
    if idx < 0:
        return [MISSING] * batch.num_rows
    vals = _pylist(batch.column(idx))
    if rest:
        get = getter(rest)
        vals = [get(v) for v in vals]
    return vals


def _pylist(arr: pa.Array) -> list:
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:  # invalid UTF-8 in a string column: find the bad values
        out = []
        for i in range(len(arr)):
            try:
                out.append(arr[i].as_py())
            except UnicodeDecodeError as e:
                out.append(Bad("bad_utf8", f"invalid UTF-8 at byte {e.start}"))
        return out
