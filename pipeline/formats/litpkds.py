"""lit-gpt / TinyLlama packed chunks (`LITPKDS`, lit_gpt/packed_dataset.py), read unchanged by its loader.

A chunk file, little-endian: bytes 0-6 `b"LITPKDS"`; 7-14 `<Q` version 1; 15 `<B` dtype code
(DTYPE_CODES: note 6/7 are float32/float64, swapped relative to Megatron); 16-23 `<Q` chunk_size
in tokens; then exactly chunk_size tokens. Files are `{prefix}_{counter:010d}.bin`.

TinyLlama's loader takes dtype and chunk_size from the first file it opens and reads every file
as chunk_size // block_size blocks, so every file of a prefix must be a full chunk of the same
size. `ChunkWriter` therefore writes full chunks only; what happens to the last partial chunk is
the caller's policy (the exporter drops it: padding never reaches training, TinyLlama #83).
"""

from __future__ import annotations

import struct

import numpy as np

from .. import storage
from . import FormatError

MAGIC = b"LITPKDS"
VERSION = 1
HEADER = struct.Struct("<7sQBQ")  # magic, version, dtype code, chunk_size
HEADER_SIZE = HEADER.size  # 24
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {v: k for k, v in DTYPE_CODES.items()}
DEFAULT_BLOCK_SIZE = 2049  # TinyLlama: block_size 2048 + 1
DEFAULT_CHUNK_SIZE = DEFAULT_BLOCK_SIZE * 1024


def chunk_name(prefix: str, counter: int) -> str:
    return f"{prefix}_{counter:010d}.bin"


def chunk_bytes(tokens: np.ndarray, dtype) -> bytes:
    """A whole chunk file: header + tokens (the chunk_size is the number of tokens)."""
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        raise FormatError(f"dtype {dt} has no LITPKDS code")
    arr = np.ascontiguousarray(tokens, dtype=dt.newbyteorder("<"))
    return HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dt], arr.size) + arr.tobytes()


class ChunkWriter:
    """Cut a token stream into full chunks `{prefix}_{counter:010d}.bin` under out_url.

    `add(tokens)` appends to the stream and writes every chunk that fills; `close()` drops the
    unfinished last chunk and reports how many tokens it held. The buffer of a chunk starts
    filled with `sep` (as TinyLlama's PackedDatasetBuilder), which only shows in a chunk that is
    written before it is full, and this writer never does that.
    """

    def __init__(self, out_url: str, prefix: str, chunk_size: int, dtype, sep: int, first_counter: int = 0):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        self.out_url, self.prefix, self.chunk_size = out_url, prefix, int(chunk_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise FormatError(f"dtype {self.dtype} has no LITPKDS code")
        self.sep = sep
        self._buf = np.full(self.chunk_size, sep, dtype=self.dtype)
        self._fill = 0
        self.counter = first_counter
        self.files: list[str] = []
        self.tokens_written = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        pos = 0
        while pos < tokens.size:
            take = min(self.chunk_size - self._fill, tokens.size - pos)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.chunk_size:
                self._write()

    def _write(self) -> None:
        name = chunk_name(self.prefix, self.counter)
        storage.write_bytes(storage.join(self.out_url, name), chunk_bytes(self._buf, self.dtype))
        self.files.append(name)
        self.counter += 1
        self.tokens_written += self.chunk_size
        self._buf.fill(self.sep)
        self._fill = 0

    def close(self) -> int:
        """Drop the unfinished last chunk; return how many tokens it held."""
        dropped = self._fill
        self._buf.fill(self.sep)
        self._fill = 0
        return dropped


def read_header(url: str) -> tuple[np.dtype, int]:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise FormatError(f"{url}: truncated header ({len(head)} of {HEADER_SIZE} bytes)")
    magic, version, code, chunk_size = HEADER.unpack(head)
    if magic != MAGIC:
        raise FormatError(f"{url}: bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"{url}: unsupported version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise FormatError(f"{url}: unknown dtype code {code}")
    return DTYPE_CODES[code], int(chunk_size)


def read_chunk(url: str) -> tuple[np.dtype, int, np.ndarray]:
    """(dtype, chunk_size, tokens) of a chunk file, checking that it holds exactly chunk_size tokens."""
    dtype, chunk_size = read_header(url)
    size = storage.size(url) or 0
    expect = HEADER_SIZE + chunk_size * dtype.itemsize
    if size != expect:
        raise FormatError(f"{url}: {size} bytes, a chunk of {chunk_size} {dtype.name} tokens has {expect}")
    data = storage.read_bytes(url)[HEADER_SIZE:]
    return dtype, chunk_size, np.frombuffer(data, dtype=dtype.newbyteorder("<"))
