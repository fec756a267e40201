"""Ingest: read a source's input files, select, normalize, filter; write documents as parquet.

One task per input file (or per range of a parquet file's row groups). A task streams its
input (zstd / gzip / plain JSON lines, or parquet batches), turns each record into a document
and writes `RUN/docs/<source>/<rel_path>.parquet`:

    id uint64 | source | subset (nullable) | file | row int64 | text large_string | meta

Per document, in this order: parse -> text field -> selection -> size limit -> NFC ->
SlimPajama's short-document filter -> datatrove filters -> kept. Every record encountered is
counted once, per source and per subset: `read == kept + sum(filtered) + sum(unreadable)`.
Bad input is counted and reported (file, line, kind), never raised.

The hot path works on batches of records (about 1 MB of lines, or one parquet batch): parsing
is `map(orjson.loads, lines)`, every later step is one list operation over the batch, and a
slow per-line path runs only for the batches that hold a bad or blank line.
"""

from __future__ import annotations

import importlib
import string
import time
import unicodedata
import zlib
from bisect import bisect_right
from collections import Counter
from hashlib import blake2b
from typing import Any, Callable, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from . import storage
from .inputs import list_inputs
from .layout import RunDir, as_run
from .recipe import IngestConfig, Recipe, SourceConfig
from .stage import Stage, Task, TaskResult, fingerprint

STAGE = "ingest"

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

ALL_SUBSET = "(all)"  # stats key when the source has no subset field
MISSING_SUBSET = "(missing)"  # the record has no usable value at the subset path
UNREADABLE_SUBSET = "(unreadable)"

# Suffix -> format, longest first so that ".jsonl.zst" wins over ".zst".
_SUFFIXES = (
    (".jsonl.zst", "jsonl.zst"), (".json.zst", "jsonl.zst"),
    (".jsonl.gz", "jsonl.gz"), (".json.gz", "jsonl.gz"),
    (".jsonl", "jsonl"), (".json", "jsonl"),
    (".parquet", "parquet"),
)

_RAW_READ = 1 << 20  # bytes per read of a plain file
_RAW_READ_COMPRESSED = 1 << 16  # compressed bytes per decompression step (output stays in cache)
_BATCH_LINES_BYTES = 1 << 20  # lines are processed in batches of about this many bytes
_GZIP_STEP_BYTES = 1 << 22  # most decompressed bytes per gzip step
_PARQUET_BATCH_ROWS = 2048
_OPEN_RETRIES = 3  # re-opens (resuming at the same offset) after an I/O error
_RETRY_BACKOFF_S = 0.2


# ---------------------------------------------------------------------------------------------
# Ids, formats, planning


def _file_key(source: str, rel_path: str) -> int:
    return int.from_bytes(blake2b(f"{source}/{rel_path}".encode(), digest_size=8).digest(), "little")


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of uint64 that mixes every input bit into every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _document_ids(source: str, rel_path: str, rows) -> np.ndarray:
    """Ids of records `rows` of one file, vectorized (see document_id)."""
    with np.errstate(over="ignore"):
        r = np.asarray(rows, dtype=np.uint64)
        return _splitmix64(np.uint64(_file_key(source, rel_path)) + (r + np.uint64(1)) * _GOLDEN)


def document_id(source: str, rel_path: str, row: int) -> int:
    """Stable 64-bit id of record `row` (0-based) of an input file.

    splitmix64(K + (row + 1) * 0x9E3779B97F4A7C15 mod 2**64), where K is blake2b-64
    (little-endian) of "source/rel_path". Distinct rows of a file never collide (the map is a
    bijection), and the ids do not depend on splits, retries or worker counts.
    """
    return int(_document_ids(source, rel_path, [row])[0])


def detect_format(rel_path: str) -> str:
    low = rel_path.lower()
    for suffix, fmt in _SUFFIXES:
        if low.endswith(suffix):
            return fmt
    raise ValueError(
        f"{rel_path}: unknown input format (expected .jsonl.zst, .jsonl.gz, .jsonl, .json or .parquet; "
        "or set the source's format)"
    )


def output_url(run: RunDir | str, source: str, rel_path: str, split: tuple[int, int] | None = None) -> str:
    name = rel_path + (f"@rg{split[0]:05d}-{split[1]:05d}" if split else "") + ".parquet"
    return as_run(run).docs(source, name)


def _output_settings(cfg: IngestConfig) -> dict:
    return {
        "max_document_bytes": cfg.max_document_bytes,
        "parquet_compression": cfg.parquet_compression,
        "rows_per_group": cfg.rows_per_group,
    }


def _parquet_splits(url: str, every: int) -> list[tuple[int, int, int, int, int]] | None:
    """(start, end, first_row, rows, compressed_bytes) per range of `every` row groups.

    None when the footer cannot be read (the single task then reports the file); [] when the
    file has no more than `every` row groups (one task, no split).
    """
    try:
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            md = pq.ParquetFile(fh).metadata
    except Exception:  # noqa: BLE001 - an unreadable file becomes one task that reports it
        return None
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


# ---------------------------------------------------------------------------------------------
# SlimPajama's short-document filter


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_PUNCT_BYTES = string.punctuation.encode()
# UTF-8 byte -> 1 when it counts as a character of the normalized text, else 0: ASCII
# punctuation, ASCII whitespace (str.isspace, including \x1c-\x1f) and continuation bytes do
# not count (so a non-ASCII character counts once, by its lead byte).
_COUNTED = bytes(
    0 if (c < 0x80 and (chr(c) in string.punctuation or chr(c).isspace())) or 0x80 <= c < 0xC0 else 1
    for c in range(256)
)
# UTF-8 prefixes covering every non-ASCII character for which str.isspace() is true
# (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
_SPACE_SUSPECTS = (b"\xc2\x85", b"\xc2\xa0", b"\xe1\x9a\x80", b"\xe2\x80", b"\xe2\x81\x9f", b"\xe3\x80\x80")


def normalize_for_length(text: str) -> str:
    """SlimPajama's normal form: lowercase, no ASCII punctuation, whitespace runs -> one space, stripped."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def _normalized_length(text: str) -> int:
    # Same result as len(normalize_for_length(text)); deleting ASCII bytes from UTF-8 is exact
    # and much faster than str.translate on non-ASCII text.
    b = text.lower().encode("utf-8", "surrogatepass").translate(None, _PUNCT_BYTES)
    return len(" ".join(b.decode("utf-8", "surrogatepass").split()))


def _length_lower_bound(prefix: str) -> int:
    """A lower bound of the normalized length of any text that starts with `prefix`.

    Counts the characters that are neither ASCII punctuation nor whitespace; lowercasing never
    shortens a character (only U+0130 changes length, to 2) nor turns it into punctuation or
    whitespace, and non-ASCII whitespace is subtracted through a superset of its encodings.
    """
    b = prefix.encode("utf-8", "surrogatepass")
    n = int.from_bytes(b.translate(_COUNTED), "little").bit_count()
    if not b.isascii():
        n -= sum([b.count(s) for s in _SPACE_SUSPECTS])
    return n


def _utf8_prefix_bound(b: bytes, k: int) -> int:
    """_length_lower_bound of the text whose UTF-8 is `b`, on its first k bytes, without decoding.

    The cut may split a character; subtracting 1 keeps it a lower bound (a split whitespace
    character would be counted by its lead byte and not subtracted as a suspect).
    """
    pre = b[:k]
    return (int.from_bytes(pre.translate(_COUNTED), "little").bit_count()
            - sum([pre.count(s) for s in _SPACE_SUSPECTS]) - 1)


def _prefix_len(min_chars: int) -> int:
    return min_chars + (min_chars >> 1) + 16  # prose has well over 2/3 counted characters


def is_short(text: str, min_chars: int) -> bool:
    """len(normalize_for_length(text)) < min_chars, exact; O(min_chars) for most long documents.

    A prefix's lower bound proves most documents long enough; the others (short ones, or long
    ones made mostly of punctuation and spaces) get the exact computation.
    """
    if min_chars <= 0:
        return False
    n = len(text)
    k = _prefix_len(min_chars)
    while k < n:
        if _length_lower_bound(text[:k]) >= min_chars:
            return False
        k *= 4
    if n >= min_chars and _length_lower_bound(text) >= min_chars:
        return False
    return _normalized_length(text) < min_chars


# ---------------------------------------------------------------------------------------------
# Field access


_MISSING = object()


class _Bad:
    """An unreadable record in a batch (in place of its text)."""

    __slots__ = ("reason", "message")

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


def _getter(path: str) -> Callable[[Any], Any]:
    keys = path.split(".")
    if len(keys) == 1:
        key = keys[0]
        return lambda o: o.get(key, _MISSING) if type(o) is dict else _MISSING

    def get(o: Any) -> Any:
        for k in keys:
            if type(o) is not dict:
                return _MISSING
            o = o.get(k, _MISSING)
            if o is _MISSING:
                return o
        return o

    return get


def _subset_key(v: Any) -> str | None:
    if type(v) is str:
        return v
    if isinstance(v, (bool, int, float)):
        return str(v)
    return None


# ---------------------------------------------------------------------------------------------
# Input streams


class _StreamError(Exception):
    """The stream ended badly: kind is truncated / not_zstd / corrupt_zstd / not_gzip / ... / io_error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class _RetryingReader:
    """Reads a file in blocks; after an I/O error re-opens it and resumes at the same offset.

    The file is opened at the first read, so a file that cannot be opened is a stream error.
    """

    def __init__(self, url: str, retries: int = _OPEN_RETRIES):
        self.url, self.retries, self.pos, self.fh = url, retries, 0, None

    def read(self, n: int) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                if self.fh is None:
                    self.fh = _open_input(self.url)
                    if self.pos:
                        self.fh.seek(self.pos)
                data = self.fh.read(n)
                self.pos += len(data)
                return data
            except FileNotFoundError:
                raise
            except OSError:
                self.close()
                if attempt == self.retries:
                    raise
                time.sleep(_RETRY_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.fh is not None:
            try:
                self.fh.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self.fh = None


def _open_input(url: str):
    """Open an input for binary reading (tests replace this to inject I/O errors)."""
    fs, path = storage.url_to_fs(url)
    if storage.is_local(fs):
        return open(path, "rb")
    return fs.open(path, "rb", block_size=_RAW_READ * 4)


def _read_raw(raw: _RetryingReader, size: int | None = None) -> bytes:
    try:
        return raw.read(size or _RAW_READ_COMPRESSED)
    except FileNotFoundError as e:
        raise _StreamError("io_error", f"cannot open: {e}") from None
    except OSError as e:
        raise _StreamError("io_error", f"read failed at byte {raw.pos} after {raw.retries} retries: {e}") from None


def _plain_chunks(raw: _RetryingReader, first: bytes) -> Iterator[bytes]:
    data = first
    while data:
        yield data
        data = _read_raw(raw, _RAW_READ)


def _zstd_chunks(raw: _RetryingReader, first: bytes) -> Iterator[bytes]:
    """Decompressed pieces of a (multi-frame) zstd stream; _StreamError at a bad or cut end."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj(write_size=1 << 20)
    produced = 0
    data, in_frame = first, False
    while True:
        while data:
            in_frame = True
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise _StreamError("not_zstd" if produced == 0 else "corrupt_zstd", f"zstd: {e}") from None
            if out:
                produced += len(out)
                yield out
            if dobj.eof:  # end of a frame: another may follow
                data = dobj.unused_data
                dobj = dctx.decompressobj(write_size=1 << 20)
                in_frame = False
            else:
                data = b""
        data = _read_raw(raw)
        if not data:
            break
    if in_frame:
        raise _StreamError("truncated", "zstd stream ends inside a frame (truncated file)")


def _gzip_chunks(raw: _RetryingReader, first: bytes) -> Iterator[bytes]:
    """Decompressed pieces of a (multi-member) gzip stream; _StreamError at a bad or cut end."""
    dobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
    produced = 0
    data, in_member = first, False
    while True:
        while data:
            in_member = True
            try:
                out = dobj.decompress(data, _GZIP_STEP_BYTES)
            except zlib.error as e:
                raise _StreamError("not_gzip" if produced == 0 else "corrupt_gzip", f"gzip: {e}") from None
            if out:
                produced += len(out)
                yield out
            if dobj.eof:
                data = dobj.unused_data
                dobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
                in_member = False
            else:
                data = dobj.unconsumed_tail
        data = _read_raw(raw)
        if not data:
            break
    if in_member:
        raise _StreamError("truncated", "gzip stream ends inside a member (truncated file)")


_DECODERS = {"jsonl": _plain_chunks, "jsonl.zst": _zstd_chunks, "jsonl.gz": _gzip_chunks}


# ---------------------------------------------------------------------------------------------
# The task


class _Ingest:
    """One task's state: counters, issues, filters, and the rows waiting for the parquet writer."""

    def __init__(self, task: Task, recipe: Recipe, src: SourceConfig, writer: pq.ParquetWriter):
        self.src, self.cfg, self.writer = src, recipe.ingest, writer
        self.source = src.name
        self.rel_path = task.payload["rel_path"]
        self.subsets: dict[str, dict] = {}
        self.issues: list[dict] = []
        self.files_unreadable = 0
        self.subset_path = None if src.subset in (None, "dir") else src.subset
        self.dir_subset = None
        if src.subset == "dir" and "/" in self.rel_path:
            self.dir_subset = self.rel_path.split("/", 1)[0]
        self.include = [(p, frozenset(v)) for p, v in sorted(src.select.include.items())]
        self.exclude = [(p, frozenset(v)) for p, v in sorted(src.select.exclude.items())]
        self.meta_paths = sorted(set(src.metadata))
        self._meta_cache: dict = {}  # value (one field) or tuple of values -> JSON
        self.filters = [_make_filter(f) for f in src.filters]
        # kept documents not yet written (a row group is written once rows_per_group are here)
        self.p_rows: list[int] = []
        self.p_text: list[str | bytes] = []  # ASCII str or UTF-8 bytes
        self.p_subset: list[str | None] = []
        self.p_meta: list[str] = []

    # -- counting ------------------------------------------------------------------------------

    def _sub(self, key: str) -> dict:
        c = self.subsets.get(key)
        if c is None:
            c = self.subsets[key] = {"read": 0, "kept": 0, "bytes_read": 0, "bytes_kept": 0,
                                     "filtered": {}, "unreadable": {}}
        return c

    def issue(self, kind: str, line: int | None, message: str) -> None:
        if len(self.issues) < self.cfg.report_issues:
            self.issues.append({"file": self.rel_path, "line": line, "kind": kind, "message": message})

    def unreadable(self, reason: str, line: int | None, message: str, n: int = 1) -> None:
        c = self._sub(UNREADABLE_SUBSET)
        c["read"] += n
        c["unreadable"][reason] = c["unreadable"].get(reason, 0) + n
        self.issue(reason, line, message)

    def file_problem(self, kind: str, message: str) -> None:
        self.files_unreadable += 1
        self.issue(kind, None, message)

    def _count(self, subs: list[str] | str, positions: list[int], key: str, sizes: list[int] | None = None) -> None:
        """counter `key` (+1, or + sizes[p]) for the documents at `positions`, per subset."""
        if type(subs) is str:
            c = self._sub(subs)
            c[key] += len(positions) if sizes is None else sum([sizes[p] for p in positions])
            return
        if sizes is None:
            groups: dict = Counter([subs[p] for p in positions])
        else:
            groups = {}
            for p in positions:
                s = subs[p]
                groups[s] = groups.get(s, 0) + sizes[p]
        for s, n in groups.items():
            self._sub(s)[key] += n

    def _filtered(self, subs: list[str] | str, positions: list[int], reason: str) -> None:
        groups = {subs: len(positions)} if type(subs) is str else Counter([subs[p] for p in positions])
        for s, n in groups.items():
            f = self._sub(s)["filtered"]
            f[reason] = f.get(reason, 0) + n

    # -- documents -----------------------------------------------------------------------------

    def add(self, texts: list, first_row: int, fields: Callable[[str], list], line_of: Callable[[int], int]) -> None:
        """A batch of records: texts[i] is the text of record `first_row + i` (or why it has none).

        `fields(path)` gives the values at a dotted path, aligned with `texts`; `line_of(i)` the
        line (jsonl) or row (parquet) to report for record i. Each step below works on the whole
        batch; `alive` holds the positions of the documents still in.
        """
        if not texts:
            return
        src, cfg = self.src, self.cfg
        idx: list[int] | None = None  # positions in `texts` of the readable records (None: all)
        if len(set(map(type, texts))) == 1 and type(texts[0]) is str:
            T = texts
        else:
            idx = []
            for i, t in enumerate(texts):
                if type(t) is str:
                    idx.append(i)
                elif isinstance(t, _Bad):
                    self.unreadable(t.reason, line_of(i), t.message)
                elif t is _MISSING:
                    self.unreadable("missing_text", line_of(i), f"no field {src.text_field!r}")
                elif t is None:
                    self.unreadable("null_text", line_of(i), f"field {src.text_field!r} is null")
                else:
                    self.unreadable("text_not_string", line_of(i),
                                    f"field {src.text_field!r} is a {type(t).__name__}, not a string")
            if not idx:
                return
            T = [texts[i] for i in idx]
        cache: dict[str, list] = {}

        def column(path: str) -> list:
            vals = cache.get(path)
            if vals is None:
                vals = fields(path)
                if idx is not None:
                    vals = [vals[i] for i in idx]
                cache[path] = vals
            return vals

        n = len(T)
        rows = list(range(first_row, first_row + n)) if idx is None else [first_row + i for i in idx]
        if self.subset_path is not None:
            subset_vals = [v if type(v) is str else _subset_key(v) for v in column(self.subset_path)]
            subs: list[str] | str = [MISSING_SUBSET if v is None else v for v in subset_vals]
        elif src.subset == "dir":
            subset_vals = None
            subs = self.dir_subset or MISSING_SUBSET
        else:
            subset_vals = None
            subs = ALL_SUBSET
        # ASCII texts stay str (their length is their UTF-8 size); others are encoded once, and
        # the bytes go to the parquet writer as they are.
        U = [t if t.isascii() else t.encode("utf-8", "surrogatepass") for t in T]
        blen = list(map(len, U))
        alive = list(range(n))
        self._count(subs, alive, "read")
        self._count(subs, alive, "bytes_read", blen)

        for path, wanted in self.include:
            vals = column(path)
            out = [p for p in alive if type(vals[p]) is not str or vals[p] not in wanted]
            if out:
                self._filtered(subs, out, "selection")
                alive = _without(alive, out)
        for path, unwanted in self.exclude:
            vals = column(path)
            out = [p for p in alive if type(vals[p]) is str and vals[p] in unwanted]
            if out:
                self._filtered(subs, out, "selection")
                alive = _without(alive, out)
        limit = cfg.max_document_bytes
        out = [p for p in alive if blen[p] > limit]
        if out:
            self._filtered(subs, out, "too_large")
            for p in out:
                self.issue("too_large", line_of(p if idx is None else idx[p]),
                           f"document of {blen[p]} bytes > max_document_bytes {limit}")
            alive = _without(alive, out)
        if src.normalize == "nfc":
            normalize = unicodedata.normalize  # returns its argument when the quick check passes
            for p in alive:
                if type(U[p]) is bytes:
                    t = normalize("NFC", T[p])
                    if t is not T[p] and t != T[p]:
                        T[p] = t
                        U[p] = t.encode("utf-8", "surrogatepass")
                        blen[p] = len(U[p])
        if src.min_chars:
            # Most documents are ASCII and long: one lower bound on a prefix proves them long
            # enough (inline, no call); is_short() settles the rest exactly.
            m, counted = src.min_chars, _COUNTED
            k = _prefix_len(m)
            out = [p for p in alive
                   if (int.from_bytes(U[p][:k].encode().translate(counted), "little").bit_count() < m
                       if type(U[p]) is str else _utf8_prefix_bound(U[p], k) < m)
                   and is_short(T[p], m)]
            if out:
                self._filtered(subs, out, "short")
                alive = _without(alive, out)
        out = [p for p in alive if not blen[p] or T[p].isspace()]
        if out:
            self._filtered(subs, out, "empty")
            alive = _without(alive, out)
        if not alive:
            return
        metas = self._metas(column, alive)
        if self.filters:
            alive, metas = self._run_filters(T, alive, [rows[p] for p in alive], subset_vals, metas, subs)
            if not alive:
                return
        self._count(subs, alive, "kept")
        self._count(subs, alive, "bytes_kept", blen)
        self.p_rows += [rows[p] for p in alive]
        self.p_text += [U[p] for p in alive]
        if subset_vals is not None:
            self.p_subset += [subset_vals[p] for p in alive]
        if metas is not None:
            self.p_meta += metas
        if len(self.p_rows) >= cfg.rows_per_group:
            self._flush(final=False)

    def _metas(self, column, alive: list[int]) -> list[str] | None:
        """The `meta` column of the documents at `alive`: orjson of the kept fields, sorted keys.

        Metadata values repeat (a handful of set names), so the JSON of string values is cached.
        """
        if not self.meta_paths:
            return None
        paths = self.meta_paths
        cols = [column(p) for p in paths]
        cache = self._meta_cache
        out = []
        if len(cols) == 1:
            vals, path = cols[0], paths[0]
            for p in alive:
                v = vals[p]
                s = cache.get(v) if type(v) is str else None
                if s is None:
                    s = orjson.dumps({} if v is _MISSING else {path: v}, default=str).decode()
                    if type(v) is str and len(cache) < 4096:
                        cache[v] = s
                out.append(s)
            return out
        for p in alive:
            key = tuple([c[p] for c in cols])
            cacheable = all([type(v) is str for v in key])
            s = cache.get(key) if cacheable else None
            if s is None:
                d = {path: v for path, v in zip(paths, key) if v is not _MISSING}
                s = orjson.dumps(d, option=orjson.OPT_SORT_KEYS, default=str).decode()
                if cacheable and len(cache) < 4096:
                    cache[key] = s
            out.append(s)
        return out

    def _run_filters(self, T, alive, rows, subset_vals, metas, subs) -> tuple[list[int], list[str] | None]:
        """The datatrove filters of the recipe, in order, on the documents at `alive`."""
        from datatrove.data import Document

        ids = _document_ids(self.source, self.rel_path, rows)
        docs = []
        for j, p in enumerate(alive):
            meta = {"source": self.source, "file": self.rel_path, "row": rows[j]}
            if subset_vals is not None:
                meta["subset"] = subset_vals[p]
            if metas is not None:
                meta.update(orjson.loads(metas[j]))
            docs.append(Document(text=T[p], id=str(int(ids[j])), metadata=meta))
        keep = [True] * len(alive)
        for flt in self.filters:
            todo = [j for j in range(len(alive)) if keep[j]]
            if not todo:
                break
            step = max(int(getattr(flt, "batch_size", 1) or 1), 1)
            step = step if step > 1 else len(todo)
            name = type(flt).__name__
            for b in range(0, len(todo), step):
                part = todo[b:b + step]
                for j, res in zip(part, flt.filter_batch([docs[j] for j in part])):
                    ok, reason = res if isinstance(res, tuple) else (res, None)
                    if not ok:
                        keep[j] = False
                        self._filtered(subs, [alive[j]], f"{name}:{reason}" if reason else name)
        if all(keep):
            return alive, metas
        return ([p for p, k in zip(alive, keep) if k],
                None if metas is None else [m for m, k in zip(metas, keep) if k])

    def _flush(self, final: bool) -> None:
        """Write whole row groups of rows_per_group documents (and the rest when final)."""
        rpg = self.cfg.rows_per_group
        while self.p_rows and (final or len(self.p_rows) >= rpg):
            k = min(rpg, len(self.p_rows))
            rows, self.p_rows = self.p_rows[:k], self.p_rows[k:]
            texts, self.p_text = self.p_text[:k], self.p_text[k:]
            if self.subset_path is not None:
                subsets, self.p_subset = self.p_subset[:k], self.p_subset[k:]
                subset_col = pa.array(subsets, pa.string())
            elif self.dir_subset is not None:
                subset_col = pa.repeat(pa.scalar(self.dir_subset, pa.string()), k)
            else:
                subset_col = pa.nulls(k, pa.string())
            if self.meta_paths:
                metas, self.p_meta = self.p_meta[:k], self.p_meta[k:]
                meta_col = pa.array(metas, pa.string())
            else:
                meta_col = pa.repeat(pa.scalar("{}", pa.string()), k)
            table = pa.Table.from_arrays(
                [
                    pa.array(_document_ids(self.source, self.rel_path, rows), pa.uint64()),
                    pa.repeat(pa.scalar(self.source, pa.string()), k),
                    subset_col,
                    pa.repeat(pa.scalar(self.rel_path, pa.string()), k),
                    pa.array(rows, pa.int64()),
                    pa.array(texts, pa.large_binary()).cast(pa.large_string()),
                    meta_col,
                ],
                schema=SCHEMA,
            )
            self.writer.write_table(table, row_group_size=rpg)

    def result(self) -> dict:
        """Flush the last rows; the source's counters (totals over its subsets, and per subset)."""
        self._flush(final=True)
        subsets = {k: self.subsets[k] for k in sorted(self.subsets)}
        total = {"files": 0, "files_unreadable": self.files_unreadable, "read": 0, "kept": 0,
                 "bytes_read": 0, "bytes_kept": 0, "filtered": {}, "unreadable": {}}
        for c in subsets.values():
            for k in ("read", "kept", "bytes_read", "bytes_kept"):
                total[k] += c[k]
            for group in ("filtered", "unreadable"):
                for reason, n in c[group].items():
                    total[group][reason] = total[group].get(reason, 0) + n
        for c in [total, *subsets.values()]:
            c["filtered"] = dict(sorted(c["filtered"].items()))
            c["unreadable"] = dict(sorted(c["unreadable"].items()))
        total["subsets"] = subsets
        return total


def _without(alive: list[int], out: list[int]) -> list[int]:
    gone = set(out)
    return [p for p in alive if p not in gone]


def _make_filter(spec) -> Any:
    module, _, name = spec.class_.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"filter {spec.class_!r} cannot be imported: {e}") from None
    return cls(**spec.args)


# ---------------------------------------------------------------------------------------------
# Readers


def _read_jsonl(run: _Ingest, url: str, fmt: str) -> None:
    src = run.src
    tf = src.text_field
    text_of = _getter(tf)
    text_keys = tf.split(".")
    loads, JSONDecodeError = orjson.loads, orjson.JSONDecodeError
    raw = _RetryingReader(url)
    try:
        try:
            first = _read_raw(raw, _RAW_READ if fmt == "jsonl" else None)
        except _StreamError as e:
            run.file_problem(e.kind, e.message)
            return
        if not first:
            run.file_problem("empty_file", "the file is empty")
            return
        row = 0  # records so far (every non-blank line)
        line = 0  # physical lines so far
        parts: list[bytes] = []
        error: _StreamError | None = None

        def process(lines: list[bytes]) -> None:
            nonlocal row, line
            try:
                objs = list(map(loads, lines))
                blank_at: list[int] = []
            except JSONDecodeError:
                objs, blank_at = _parse_slowly(lines, loads, JSONDecodeError)
            try:
                objs_texts = _fast_values(objs, text_keys)
            except (KeyError, TypeError, IndexError):
                objs_texts = [_text_or_why(o, text_of) for o in objs]
            first_line, first_row = line + 1, row

            def fields(path: str) -> list:
                return _values_at(objs, path)

            def line_of(i: int) -> int:
                return first_line + i + bisect_right(blank_at, i)

            run.add(objs_texts, first_row, fields, line_of)
            row += len(objs)
            line += len(lines)

        batch: list[bytes] = []  # complete lines waiting to be processed
        batch_bytes = 0
        try:
            for chunk in _DECODERS[fmt](raw, first):
                if line == 0 and not batch and not parts and chunk.startswith(b"\xef\xbb\xbf"):
                    chunk = chunk[3:]  # a UTF-8 byte order mark
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
                    process(batch)
                    batch, batch_bytes = [], 0
        except _StreamError as e:
            error = e
        if batch:
            process(batch)
        last = b"".join(parts)
        if last.strip():
            if error is None:
                process([last])
            else:
                run.unreadable("truncated", line + 1,
                               f"partial record of {len(last)} bytes at the end of a damaged stream ({error.kind})")
                row += 1
                line += 1
                if error.kind == "truncated":
                    error = None  # counted once, as the truncated record
        if error is not None:
            run.file_problem(error.kind, error.message + f" (after line {line})")
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
                objs.append(_Bad("bad_utf8", f"invalid UTF-8 at byte {u.start}"))
            else:
                objs.append(_Bad("bad_json", f"invalid JSON: {e}"))
    return objs, blank_at


def _fast_values(objs: list, keys: list[str]) -> list:
    """The value at keys of every object, at C speed; raises where one is missing."""
    if len(keys) == 1:
        k = keys[0]
        return [o[k] for o in objs]
    if len(keys) == 2:
        k1, k2 = keys
        return [o[k1][k2] for o in objs]
    raise KeyError(keys)


def _values_at(objs: list, path: str) -> list:
    """The value at a dotted path of every object (_MISSING where there is none)."""
    try:
        return _fast_values(objs, path.split("."))
    except (KeyError, TypeError, IndexError):
        get = _getter(path)
        return [get(o) for o in objs]


def _text_or_why(o: Any, text_of: Callable) -> Any:
    if isinstance(o, _Bad):
        return o
    if type(o) is not dict:
        return _Bad("not_an_object", f"a JSON {type(o).__name__}, not an object")
    return text_of(o)


def _read_parquet(run: _Ingest, task: Task, url: str) -> None:
    src = run.src
    split = task.payload.get("split")
    known_rows = task.payload.get("rows")  # rows of the split (known from planning)
    first_split = not split or split[0] == 0

    def lost(kind: str, message: str, rows_left: int | None) -> None:
        # The file cannot be read at all. It counts once (in its first task); rows known from the
        # footer at planning time (splits) are counted unreadable, with `kind` as the reason.
        if first_split:
            run.files_unreadable += 1
        if rows_left:
            run.unreadable(kind, None, f"{message}; {rows_left} row(s) not read", n=rows_left)
        else:
            run.issue(kind, None, message)

    try:
        fh = _open_with_retries(url)
    except OSError as e:
        lost("io_error", f"cannot open: {e}", known_rows)
        return
    try:
        try:
            if fh.seek(0, 2) == 0:
                lost("empty_file", "the file is empty", known_rows)
                return
            fh.seek(0)
            pf = pq.ParquetFile(fh)
            md = pf.metadata
        except Exception as e:  # noqa: BLE001 - any footer problem is a bad file
            lost("bad_parquet", f"not a readable parquet file: {e}", known_rows)
            return
        groups = list(range(split[0], split[1])) if split else list(range(md.num_row_groups))
        row = sum(md.row_group(i).num_rows for i in range(groups[0])) if groups else 0
        total = sum(md.row_group(i).num_rows for i in groups)
        names = pf.schema_arrow.names
        text_top = src.text_field.split(".", 1)[0]
        if text_top not in names:
            if total:
                run.unreadable("missing_text", None,
                               f"no column {text_top!r} (columns: {', '.join(names)}); {total} row(s)", n=total)
            return
        wanted = [src.text_field, *src.metadata, *src.select.include, *src.select.exclude]
        if run.subset_path is not None:
            wanted.append(src.subset)
        tops = sorted({p.split(".", 1)[0] for p in wanted} & set(names))
        for g in groups:  # one row group at a time: a damaged one loses only its own rows
            n, done = md.row_group(g).num_rows, 0
            try:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[g], columns=tops,
                                             use_threads=False):
                    _parquet_batch(run, batch, row + done)
                    done += batch.num_rows
            except Exception as e:  # noqa: BLE001 - whatever the reader raises on damaged data
                run.unreadable("bad_parquet", row + done,
                               f"row group {g} unreadable after {done} row(s): {e}; {n - done} row(s) lost",
                               n=n - done)
            row += n
    finally:
        fh.close()


def _open_with_retries(url: str):
    for attempt in range(_OPEN_RETRIES + 1):
        try:
            return _open_input(url)
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == _OPEN_RETRIES:
                raise
            time.sleep(_RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _column_values(batch: pa.RecordBatch, path: str) -> list:
    top, _, rest = path.partition(".")
    idx = batch.schema.get_field_index(top)
    if idx < 0:
        return [_MISSING] * batch.num_rows
    vals = _pylist(batch.column(idx))
    if rest:
        get = _getter(rest)
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
                out.append(_Bad("bad_utf8", f"invalid UTF-8 at byte {e.start}"))
        return out


def _parquet_batch(run: _Ingest, batch: pa.RecordBatch, first_row: int) -> None:
    tf = run.src.text_field
    texts = _column_values(batch, tf)
    if texts and not isinstance(texts[0], str) and any(isinstance(t, (bytes, bytearray)) for t in texts):
        fixed = []
        for t in texts:
            if isinstance(t, (bytes, bytearray)):
                try:
                    t = t.decode("utf-8")
                except UnicodeDecodeError as e:
                    t = _Bad("bad_utf8", f"invalid UTF-8 at byte {e.start}")
            fixed.append(t)
        texts = fixed
    cache: dict[str, list] = {}

    def fields(path: str) -> list:
        if path not in cache:
            cache[path] = _column_values(batch, path)
        return cache[path]

    run.add(texts, first_row, fields, lambda i: first_row + i)


# ---------------------------------------------------------------------------------------------
# Entry point


def _writer(fh, cfg: IngestConfig) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        fh, SCHEMA,
        compression=cfg.parquet_compression,
        use_dictionary=["source", "subset", "file", "meta"],  # repetitive columns; never the text
        write_statistics=["id", "source", "subset", "file", "row"],
        data_page_size=1 << 20,
    )


class IngestStage(Stage):
    name = STAGE

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None = None) -> list[Task]:
        """One task per input file; parquet files split by `ingest.split_row_groups` (footer read here)."""
        out: list[Task] = []
        settings = _output_settings(recipe.ingest)
        for src in recipe.sources:
            src_cfg = src.model_dump(mode="json", by_alias=True)
            src_cfg.pop("weight", None)
            for f in list_inputs(src, run):
                url = run.raw(src.name, f.rel_path) if src.download else f.url
                fmt = detect_format(f.rel_path) if src.format == "auto" else src.format
                base = {"url": url, "rel_path": f.rel_path, "format": fmt, "split": None}
                splits = None
                if fmt == "parquet" and recipe.ingest.split_row_groups > 0:
                    # the footer of the raw copy, or of the original when it is not downloaded yet
                    splits = _parquet_splits(url, recipe.ingest.split_row_groups)
                    if splits is None and url != f.url:
                        splits = _parquet_splits(f.url, recipe.ingest.split_row_groups)
                if not splits:
                    out.append(Task(STAGE, f"{src.name}/{f.rel_path}", src.name,
                                    fingerprint(STAGE, f.version, fmt, src_cfg, settings, None),
                                    size=max(f.size, 0), payload=base))
                    continue
                for start, end, first_row, rows, nbytes in splits:
                    split = [start, end]
                    payload = dict(base, split=split, first_row=first_row, rows=rows)
                    out.append(Task(STAGE, f"{src.name}/{f.rel_path}@rg{start:05d}-{end:05d}", src.name,
                                    fingerprint(STAGE, f.version, fmt, src_cfg, settings, split),
                                    size=nbytes, payload=payload))
        return out

    def allowed_errors(self, recipe: Recipe) -> int | None:
        return recipe.ingest.max_errors

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        """Ingest one input file (or row-group range): writes its parquet, returns counts and issues."""
        src = recipe.source(task.source)
        p = task.payload
        split = tuple(p["split"]) if p.get("split") else None
        out = output_url(run, src.name, p["rel_path"], split)
        with storage.atomic_open(out, "wb") as fh:
            writer = _writer(fh, recipe.ingest)
            ingest = _Ingest(task, recipe, src, writer)
            if p["format"] == "parquet":
                _read_parquet(ingest, task, p["url"])
            else:
                _read_jsonl(ingest, p["url"], p["format"])
            counts = ingest.result()
            writer.close()
        counts["files"] = 1 if not split or split[0] == 0 else 0
        errors = sum(counts["unreadable"].values()) + counts["files_unreadable"]
        return TaskResult(outputs=[out], stats={"sources": {src.name: counts}}, issues=ingest.issues,
                          docs=counts["read"], bytes=counts["bytes_read"], errors=errors)


stage = IngestStage()
