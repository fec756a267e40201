"""Megatron-LM indexed datasets (MMIDIDX v1): a `.bin` of raw tokens and its `.idx`.

Layout of `<prefix>.idx`, little-endian (megatron/core/datasets/indexed_dataset.py):

    9 bytes  b"MMIDIDX\\x00\\x00"
    <Q       version = 1
    <B       dtype code (DTYPE_CODES)
    <Q       sequence_count  (n)
    <Q       document_count  (n + 1 here: the entries of document_indices)
    int32    sequence_lengths[n]     tokens per sequence
    int64    sequence_pointers[n]    byte offset of each sequence in the .bin
    int64    document_indices[n + 1] 0, then the index one past each document's last sequence

We write one sequence per document, so `document_indices = [0, 1, ..., n]` and document
boundaries are kept. `<prefix>.bin` holds the tokens of all sequences back to back.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

from .. import storage
from . import FormatError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence_count, document_count
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks: uint16 below 65,500 entries, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def check_vocab_fits(dtype, vocab_size: int, where: str = "tokens") -> None:
    """Raise FormatError when ids 0..vocab_size-1 do not all fit `dtype`."""
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        raise FormatError(f"{where}: dtype {dt.name} is not an integer type")
    if vocab_size - 1 > np.iinfo(dt).max:
        raise FormatError(f"{where}: a vocabulary of {vocab_size} ids does not fit dtype {dt.name} "
                          f"(largest id {np.iinfo(dt).max}); use {dtype_for_vocab(vocab_size).name}")


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        raise FormatError(f"dtype {dt} has no MMIDIDX code")
    return CODE_OF_DTYPE[dt]


def index_bytes(lengths: np.ndarray, dtype) -> bytes:
    """The whole `.idx` for documents of these token counts (one sequence per document)."""
    dt = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise FormatError("a document length does not fit the index's int32 lengths")
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1] * dt.itemsize, out=pointers[1:])
    return b"".join([
        HEADER.pack(MAGIC, VERSION, dtype_code(dt), n, n + 1),
        lengths.astype("<i4").tobytes(),
        pointers.astype("<i8").tobytes(),
        np.arange(n + 1, dtype="<i8").tobytes(),
    ])


class MegatronWriter:
    """Write `<prefix>.bin` and `<prefix>.idx`, one sequence per document.

    Both files appear under their final names only when `close()` succeeds (temp + rename via
    `storage.atomic_open`); `abort()` (or an exception inside a `with` block) leaves nothing.
    """

    def __init__(self, prefix_path: str, dtype):
        self.prefix = str(prefix_path)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "iu" or self.dtype not in CODE_OF_DTYPE:
            raise FormatError(f"{self.prefix}: dtype {self.dtype} cannot hold tokens")
        self._lengths: list[np.ndarray] = []
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._tokens = 0
        self._cm = storage.atomic_open(self.prefix + ".bin", "wb")
        self._fh = self._cm.__enter__()
        self._closed = False

    def _cast(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            if tokens.size and tokens.dtype.kind in "iu":
                lo, hi = int(tokens.min()), int(tokens.max())
                info = np.iinfo(self.dtype)
                if lo < info.min or hi > info.max:
                    raise FormatError(f"{self.prefix}: token id {hi if hi > info.max else lo} does not fit "
                                      f"dtype {self.dtype.name}")
            elif tokens.size:
                raise FormatError(f"{self.prefix}: tokens must be integers, got {tokens.dtype}")
            tokens = tokens.astype(self.dtype)
        return np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))

    def _write(self, flat: np.ndarray) -> None:
        data = flat.tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self._bytes += len(data)
        self._tokens += flat.size

    def add_document(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids) as one sequence."""
        flat = self._cast(tokens).reshape(-1)
        self._write(flat)
        self._lengths.append(np.array([flat.size], dtype=np.int64))

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents at once: their tokens back to back and the count of each."""
        flat = self._cast(flat_tokens).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, got {flat.size} tokens")
        self._write(flat)
        self._lengths.append(lengths.copy())

    @property
    def docs(self) -> int:
        return sum(len(x) for x in self._lengths)

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def bin_bytes(self) -> int:
        return self._bytes

    def close(self) -> dict:
        """Commit both files; return {docs, tokens, bin_sha256, idx_sha256, bin_bytes}."""
        if self._closed:
            raise RuntimeError(f"{self.prefix}: writer already closed")
        self._closed = True
        self._cm.__exit__(None, None, None)  # commits the .bin
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        idx = index_bytes(lengths, self.dtype)
        storage.write_bytes(self.prefix + ".idx", idx)
        return {
            "docs": int(len(lengths)),
            "tokens": int(self._tokens),
            "bin_sha256": self._sha.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
            "bin_bytes": int(self._bytes),
        }

    def abort(self) -> None:
        """Drop what was written; no file appears."""
        if self._closed:
            return
        self._closed = True
        err = RuntimeError("aborted")
        try:
            self._cm.__exit__(type(err), err, None)
        except RuntimeError:
            pass

    def __enter__(self) -> "MegatronWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _load(url: str, dtype, offset: int = 0, count: int = -1) -> np.ndarray:
    """A read-only memmap of a local file (a loaded array for remote URLs)."""
    fs, path = storage.url_to_fs(url)
    dt = np.dtype(dtype)
    if storage.is_local(fs):
        size = os.path.getsize(path)
        n = (size - offset) // dt.itemsize if count < 0 else count
        if n == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(path, dtype=dt, mode="r", offset=offset, shape=(n,))
    with fs.open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read() if count < 0 else fh.read(count * dt.itemsize)
    return np.frombuffer(data, dtype=dt)


def read_header(fh, size: int, url: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence_count, document_count) of an open `.idx` of `size` bytes.

    FormatError for a short header, a bad magic, version or dtype code, a file size that
    disagrees with the counts, or no document_indices entry.
    """
    head = fh.read(HEADER.size)
    if len(head) < HEADER.size:
        raise FormatError(f"{url}: truncated header ({len(head)} of {HEADER.size} bytes)")
    magic, version, code, n, m = HEADER.unpack(head)
    if magic != MAGIC:
        raise FormatError(f"{url}: bad magic {magic!r} (expected {MAGIC!r}): not a Megatron index")
    if version != VERSION:
        raise FormatError(f"{url}: unsupported index version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise FormatError(f"{url}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    expect = HEADER.size + 4 * n + 8 * n + 8 * m
    if size != expect:
        raise FormatError(f"{url}: {size} bytes, but {n} sequences and {m} document entries need {expect}")
    if m < 1:
        raise FormatError(f"{url}: no document_indices entry")
    return DTYPE_CODES[code], int(n), int(m)


def read_index(prefix_url: str, pointers: bool = True) -> tuple[np.dtype, np.ndarray, np.ndarray | None]:
    """(token dtype, document lengths, byte offsets or None) from a Megatron `.idx`, reading only the index.

    Validates the header and the file size (FormatError names the file). Unlike MegatronReader it
    never loads the `.bin`, and without `pointers` it reads only the lengths: cheap on remote run
    directories too.
    """
    url = prefix_url + ".idx"
    fs, path = storage.url_to_fs(url)
    try:
        size = fs.size(path)
        with fs.open(path, "rb") as fh:
            dtype, n, _ = read_header(fh, size, url)
            body = fh.read((12 if pointers else 4) * n)
    except FileNotFoundError:
        raise FormatError(f"{url}: missing") from None
    lengths = np.frombuffer(body, "<i4", n).astype(np.int64)
    return dtype, lengths, np.frombuffer(body, "<i8", n, 4 * n) if pointers else None


class MegatronReader:
    """Read a `.bin`/`.idx` pair (memory-mapped for local files) after validating it.

    Raises FormatError("<path>: <reason>") for a missing file, a bad magic, version or dtype code,
    an index whose size or pointers disagree with its counts, or a `.bin` whose size is not the
    one the index describes (a truncated shard).
    """

    def __init__(self, prefix_path: str):
        self.prefix = str(prefix_path)
        self.bin_url = self.prefix + ".bin"
        self.idx_url = self.prefix + ".idx"
        idx_size = storage.size(self.idx_url)
        if idx_size is None:
            raise FormatError(f"{self.idx_url}: missing")
        bin_size = storage.size(self.bin_url)
        if bin_size is None:
            raise FormatError(f"{self.bin_url}: missing")
        fs, path = storage.url_to_fs(self.idx_url)
        with fs.open(path, "rb") as fh:
            self.dtype, n, m = read_header(fh, idx_size, self.idx_url)
        self.num_sequences = int(n)
        self.doc_lengths = _load(self.idx_url, "<i4", HEADER.size, n)
        self.doc_pointers = _load(self.idx_url, "<i8", HEADER.size + 4 * n, n)
        self.document_indices = _load(self.idx_url, "<i8", HEADER.size + 12 * n, m)
        if self.document_indices[0] != 0 or self.document_indices[-1] != n or (
                m > 1 and np.any(np.diff(self.document_indices) < 0)):
            raise FormatError(f"{self.idx_url}: document_indices must rise from 0 to {n}")
        if n and self.doc_lengths.min() < 0:
            raise FormatError(f"{self.idx_url}: negative sequence length")
        item = self.dtype.itemsize
        if n:
            expected_ptr = np.zeros(n, dtype=np.int64)
            np.cumsum(self.doc_lengths[:-1].astype(np.int64) * item, out=expected_ptr[1:])
            if not np.array_equal(expected_ptr, self.doc_pointers):
                bad = int(np.flatnonzero(expected_ptr != self.doc_pointers)[0])
                raise FormatError(f"{self.idx_url}: sequence_pointers[{bad}] = {int(self.doc_pointers[bad])}, "
                                  f"expected {int(expected_ptr[bad])} (sequences are not back to back)")
            need = int(self.doc_pointers[-1]) + int(self.doc_lengths[-1]) * item
        else:
            need = 0
        if bin_size < need:
            raise FormatError(f"{self.bin_url}: truncated: {bin_size} bytes, the index needs {need}")
        if bin_size != need:
            raise FormatError(f"{self.bin_url}: {bin_size} bytes, the index describes {need}")
        self.tokens = _load(self.bin_url, self.dtype.newbyteorder("<"), 0, need // item)
        self.num_tokens = need // item

    @property
    def num_docs(self) -> int:
        """Documents (= sequences: our shards hold one sequence per document)."""
        return self.num_sequences

    def __len__(self) -> int:
        return self.num_sequences

    def document(self, i: int) -> np.ndarray:
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"{self.prefix}: document {i} out of range ({self.num_sequences})")
        start = int(self.doc_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.doc_lengths[i])]

    def __iter__(self):
        for i in range(self.num_sequences):
            yield self.document(i)
