"""Token windows of a source's stream: its shards concatenated in manifest order.

What the loader holds per source is one cumulative token count per shard, taken from manifest.json;
no shard is opened until a window is read from it. A shard is validated on first use (its `.idx`
parsed by MegatronReader, its token count and dtype checked against the manifest) and then read
with `os.preadv` straight into the caller's buffer: one system call per window, no memory map (a
3T-token corpus has tens of thousands of shards; a map each would exhaust vm.max_map_count), and
at most `max_open` open files (half the descriptor limit, up to 8192), the oldest closed first.
"""

from __future__ import annotations

import os

import numpy as np

from .. import storage
from ..formats import FormatError
from ..formats.manifest import ShardEntry, shard_prefix
from ..formats.megatron import MegatronReader


class ShardSet:
    """All shards the loader may read, numbered; token windows by (shard, offset)."""

    def __init__(self, run_url: str, entries: list[ShardEntry], max_open: int | None = None):
        fs, _ = storage.url_to_fs(run_url)
        if not storage.is_local(fs):
            raise FormatError(f"{run_url}: the trainer reads shards from a local (or mounted) run directory; "
                              "copy or mount it first")
        self.run_url = run_url
        self.entries = entries
        self.dtype = np.dtype(entries[0].dtype).newbyteorder("<") if entries else np.dtype("<u2")
        self.itemsize = self.dtype.itemsize
        self.max_open = max_open or _fd_budget()
        self.fds: dict[int, int] = {}  # open shards, oldest first (closed first)
        self._checked = np.zeros(len(entries), dtype=bool)

    def open(self, shard: int) -> int:
        """The file descriptor of a shard's .bin, validating the shard on its first use."""
        fd = self.fds.get(shard)
        if fd is not None:
            return fd
        entry = self.entries[shard]
        prefix = shard_prefix(self.run_url, entry)
        if not self._checked[shard]:
            reader = MegatronReader(prefix)
            if reader.num_tokens != entry.tokens or reader.dtype != np.dtype(entry.dtype):
                raise FormatError(f"{prefix}.bin: holds {reader.num_tokens:,} {reader.dtype} tokens, manifest.json "
                                  f"says {entry.tokens:,} {entry.dtype} (shards changed since the manifest)")
            del reader
            self._checked[shard] = True
        if len(self.fds) >= self.max_open:
            os.close(self.fds.pop(next(iter(self.fds))))
        fd = self.fds[shard] = os.open(storage.url_to_fs(prefix + ".bin")[1], os.O_RDONLY)
        return fd

    def bin_path(self, shard: int) -> str:
        return storage.url_to_fs(shard_prefix(self.run_url, self.entries[shard]) + ".bin")[1]

    def short_read(self, shard: int, byte_offset: int) -> None:
        raise FormatError(f"{self.bin_path(shard)}: short read at byte {byte_offset:,}: truncated since it was "
                          "checked?")

    def read(self, shard: int, offset: int, out: np.ndarray) -> None:
        """Fill `out` (a contiguous 1-D array of the shard dtype) from token `offset` of `shard`."""
        if os.preadv(self.open(shard), [memoryview(out).cast("B")], offset * self.itemsize) != out.nbytes:
            self.short_read(shard, offset * self.itemsize)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _fd_budget() -> int:
    """How many shard files to keep open: half the descriptor limit (raised to the hard limit)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 16
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        return max(16, min(soft // 2, 8192))
    except (ImportError, ValueError, OSError):
        return 256


class SourceStream:
    """One source's token stream over its shards (a range of ShardSet numbers, in stream order)."""

    def __init__(self, shards: ShardSet, first: int, tokens: list[int]):
        self.shards = shards
        self.first = first
        self.cum = np.zeros(len(tokens) + 1, dtype=np.int64)  # one entry per shard, never per sample
        np.cumsum(np.asarray(tokens, dtype=np.int64), out=self.cum[1:])

    @property
    def tokens(self) -> int:
        return int(self.cum[-1])

    def locate(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For windows [start, start + length): the global shard number and offset of each start,
        and whether the window stays inside that shard (else it continues in the next ones)."""
        idx = np.searchsorted(self.cum, starts, side="right") - 1  # empty shards are skipped
        offset = starts - self.cum[idx]
        inside = starts + length <= self.cum[idx + 1]
        return idx + self.first, offset, inside

    def where(self, pos: int) -> tuple[str, int]:
        """The .bin file holding token `pos` of the stream, and the token's offset in it."""
        shard, offset, _ = self.locate(np.array([pos], dtype=np.int64), 1)
        return self.shards.bin_path(int(shard[0])), int(offset[0])

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` with tokens [start, start + len(out)) of the stream, across shard ends."""
        pos, filled = start, 0
        i = int(np.searchsorted(self.cum, start, side="right")) - 1
        while filled < out.size:
            if i >= self.cum.size - 1:
                raise ValueError(f"window [{start}, {start + out.size}) runs past the stream's {self.tokens:,} tokens")
            take = min(int(self.cum[i + 1]) - pos, out.size - filled)
            if take > 0:
                self.shards.read(self.first + i, pos - int(self.cum[i]), out[filled:filled + take])
                filled += take
                pos += take
            i += 1
