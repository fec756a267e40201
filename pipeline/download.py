"""Download stage: copy a source's files into RUN/raw/<source>/, resumably, one task per file.

A local run directory gets `<dest>.partial`, renamed to `<dest>` only after its size and
checksum are verified, so a killed task leaves at most a `.partial` that the next attempt
continues from (a ranged read: open the source, `seek(offset)`). A connection dropped mid-file
is reconnected and resumed from the bytes already written, `download.retries` times per task
with exponential backoff; then the task raises and the runner retries it later. Errors that can
heal (connection resets, timeouts, 5xx, 429, a file missing for now) are reconnected; those that
cannot (access refused, another 4xx) raise at once (`pipeline/retry.py` decides which). Either
way a file that cannot be had fails its task, and so the stage: it is never skipped.

A non-local run directory (s3://, gs://, ...) is written through `storage.atomic_open`: drops
are still resumed within the task, but there is no `.partial` to continue from across tasks.

How fsspec behaves here (fsspec's HTTP filesystem, 2024-2026):
- `open(block_size>0)` gives an `HTTPFile` that issues one ranged GET per read (with
  `cache_type="none"` exactly the bytes asked for). A server that ignores Range answers 200 with
  the whole body: fsspec accepts that only at offset 0 and raises ValueError at any other offset,
  so a file larger than one block cannot be read through HTTPFile from such a server at all.
- `open(block_size=0)` gives a streaming file: one GET for the whole body, no seek. We stream
  from offset 0 (http and hf) and use ranged reads only to resume.
- Directory listings (and so globs) carry no size: the listing asks each file (`fs.info`), and a
  size still unknown (-1, e.g. URL lists) is asked of the remote at run time (one HEAD).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import storage
from .inputs import list_inputs
from .layout import RunDir
from .recipe import Recipe
from .retry import backoff_delay, describe, is_permanent
from .stage import Stage, Task, TaskResult, fingerprint

STAGE = "download"

log = logging.getLogger("tinyprep.download")  # under the runner's "tinyprep" log handler

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
PARTIAL_SUFFIX = ".partial"

# Protocols read from offset 0 as one streaming GET (block_size=0) instead of a GET per block.
_STREAMING_PROTOCOLS = frozenset({"http", "https", "hf"})
_HTTP_PROTOCOLS = frozenset({"http", "https"})
_HASHES: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "md5": hashlib.md5}


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message names the URL."""


class ChecksumMismatch(DownloadError):
    """The bytes that arrived do not match the checksum the source published."""


# ---------------------------------------------------------------------------------------------
# Plan


# ---------------------------------------------------------------------------------------------
# Run one task


@dataclass
class _Counters:
    reconnects: int = 0
    resumed: int = 0


def _result(source: str, dest: str, size: int, *, skipped: int, counters: _Counters, verified: bool,
            issues: list[dict]) -> TaskResult:
    """`stats` holds only what does not depend on retries or kills (they are merged into
    RUN/stats/download.json, which a killed-and-rerun run must reproduce byte for byte); how this
    attempt got the file (skipped, resumed, reconnects) goes under `transfer`."""
    stats = {"files": 1, "bytes": size, "checksum_verified": int(verified)}
    transfer = {"skipped": skipped, "resumed": counters.resumed, "reconnects": counters.reconnects}
    if skipped or counters.resumed or counters.reconnects:
        log.info("%s: %s", dest, ", ".join(f"{k} {v}" for k, v in transfer.items()))
    return TaskResult(outputs=[dest], stats={"sources": {source: stats}}, transfer={"sources": {source: transfer}},
                      issues=issues, bytes=size)


def _download_local(src_fs, src_path: str, url: str, dest_path: str, expected: int, digest, block: int,
                    retries: int, counters: _Counters) -> int:
    os.makedirs(os.path.dirname(dest_path) or ".", exist_ok=True)
    sink = _PartialFile(dest_path + PARTIAL_SUFFIX, digest[0] if digest else None, block)
    try:
        if expected >= 0 and sink.size > expected:
            log.warning("%s: %d bytes, more than the %d expected; starting over", sink.path, sink.size, expected)
            sink.restart()
        elif sink.size:
            log.info("%s: resuming from %d bytes of %s", url_for_log(url), sink.size, _fmt_size(expected))
        try:
            _copy(src_fs, src_path, url, sink, expected, block, retries, counters)
        except BaseException:
            if sink.size == 0:  # nothing to resume from (a missing or refused source): no .partial
                sink.discard()
            raise
        _verify(url, sink, digest, on_mismatch=sink.discard)
        sink.commit(dest_path)
        return sink.size
    finally:
        sink.close()


def _download_remote(src_fs, src_path: str, url: str, dest: str, dest_fs, dest_path: str, expected: int, digest,
                     block: int, retries: int, counters: _Counters) -> int:
    try:
        with storage.atomic_open(dest, "wb") as fh:
            sink = _StreamSink(fh, digest[0] if digest else None)
            _copy(src_fs, src_path, url, sink, expected, block, retries, counters)
            _verify(url, sink, digest)
            return sink.size
    except BaseException:
        # Object-store writers upload on close even when the block raised: take the object back.
        with contextlib.suppress(Exception):
            dest_fs.rm(dest_path)
        raise


# ---------------------------------------------------------------------------------------------
# The copy loop


def _copy(src_fs, src_path: str, url: str, sink, expected: int, block: int, retries: int,
          counters: _Counters) -> None:
    """Append the source's bytes from `sink.size` on, reconnecting after drops and short reads."""
    ranges_ok = True
    failures = 0
    while True:
        if not ranges_ok and sink.size:
            sink.restart()
        offset = sink.size
        if expected >= 0 and offset >= expected:
            return
        try:
            with _open_source(src_fs, src_path, offset, expected, block) as f:
                while expected < 0 or sink.size < expected:
                    want = block if expected < 0 else min(block, expected - sink.size)
                    chunk = f.read(want)
                    if not chunk:
                        if expected < 0:
                            return
                        raise _ShortRead(f"the source ended at {sink.size} bytes")
                    sink.write(chunk)
                    if offset:
                        counters.resumed = 1  # a ranged read continued from bytes kept earlier
                return
        except ValueError as e:
            # fsspec's answer to a seek/read at an offset the store cannot serve (an HTTP server
            # that ignores Range, a streaming-only file): start over from the beginning.
            if offset == 0 or not ranges_ok:
                raise
            log.warning("%s: cannot resume from byte %d (%s); starting over", url_for_log(url), offset, e)
            ranges_ok = False
        except Exception as e:
            if isinstance(e, DownloadError):
                raise
            if _is_permanent(e):
                raise DownloadError(f"{url_for_log(url)}: {describe(e)}") from e
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"{url_for_log(url)}: download failed after {retries} reconnect(s): received "
                    f"{sink.size} of {_fmt_size(expected)} bytes; last error: {describe(e)}"
                ) from e
            delay = backoff_delay(failures - 1, BACKOFF_FIRST_S, BACKOFF_MAX_S)
            log.warning("%s: %s at %d of %s bytes; reconnecting in %.1f s (%d/%d)", url_for_log(url),
                        describe(e), sink.size, _fmt_size(expected), delay, failures, retries)
            counters.reconnects += 1
            time.sleep(delay)


class _ShortRead(ConnectionError):
    """The source stopped sending before the expected size."""


def _open_source(fs, path: str, offset: int, expected: int, block: int):
    proto = _protocol(fs)
    kw: dict[str, Any] = {}
    if proto in _HTTP_PROTOCOLS and expected > 0:
        kw["size"] = expected  # spares fsspec a HEAD per open
    if offset == 0 and proto in _STREAMING_PROTOCOLS:
        return fs.open(path, "rb", block_size=0, **kw)
    f = fs.open(path, "rb", block_size=block, cache_type="none", **kw)
    if offset:
        try:
            f.seek(offset)
        except BaseException:
            f.close()
            raise
    return f


def _is_permanent(e: BaseException) -> bool:
    """Errors a reconnect cannot fix: refused access, a 4xx (`retry.is_permanent`), our own
    verdicts. A missing file is retried: it may heal (see `pipeline/retry.py`)."""
    return isinstance(e, DownloadError) or is_permanent(e)


def _remote_size(fs, path: str, url: str) -> int:
    """The source's size asked at run time, or -1 when the store does not say (or not now: a
    flaky HEAD, or a file missing for the moment; the copy has its own retries)."""
    try:
        size = fs.size(path)
    except Exception as e:
        if is_permanent(e):
            raise DownloadError(f"{url_for_log(url)}: {describe(e)}") from e
        log.debug("%s: size unknown (%s)", url_for_log(url), e)
        return -1
    return int(size) if size is not None else -1


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


# ---------------------------------------------------------------------------------------------
# Sinks: where the bytes go, hashed as they are written


class _PartialFile:
    """`<dest>.partial`, opened for appending; its existing bytes are hashed on open."""

    def __init__(self, path: str, algo: str | None, block: int):
        self.path = path
        self.algo = algo
        self.fh = open(path, "ab")
        self.size = self.fh.tell()
        self.hasher = _HASHES[algo]() if algo else None
        if self.hasher and self.size:
            with open(path, "rb") as existing:
                while chunk := existing.read(block):
                    self.hasher.update(chunk)

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as e:  # the local disk, not the source: no reconnect helps
            raise DownloadError(f"cannot write {self.path}: {e}") from e
        if self.hasher:
            self.hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = _HASHES[self.algo]() if self.algo else None
        self.size = 0

    def hexdigest(self) -> str | None:
        return self.hasher.hexdigest() if self.hasher else None

    def commit(self, dest_path: str) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.path, dest_path)
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
            dfd = os.open(os.path.dirname(dest_path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def discard(self) -> None:
        self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()


class _StreamSink:
    """A writer that cannot go back: resuming after a drop works, starting over does not."""

    def __init__(self, fh, algo: str | None):
        self.fh = fh
        self.size = 0
        self.hasher = _HASHES[algo]() if algo else None

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        if self.hasher:
            self.hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        raise DownloadError(
            f"the source cannot resume from byte {self.size} and the destination cannot be rewound; "
            "the task will start over when retried"
        )

    def hexdigest(self) -> str | None:
        return self.hasher.hexdigest() if self.hasher else None


# ---------------------------------------------------------------------------------------------
# Checksums


def _expected_digest(checksum: str | None) -> tuple[str, str] | None:
    """("sha256"|"md5", lowercase hex) for a checksum we can verify; None for etag: or none.

    Stores give digests in hex (Hugging Face LFS, S3 ETags) or base64 (GCS md5Hash, S3
    ChecksumSHA256); both are accepted.
    """
    if not checksum:
        return None
    algo, _, value = checksum.partition(":")
    if algo not in _HASHES or not value:
        return None
    n = _HASHES[algo]().digest_size
    if re.fullmatch(rf"[0-9a-fA-F]{{{2 * n}}}", value):
        return algo, value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != n:
        raise ValueError(f"checksum {checksum!r} is neither hex nor base64 of a {algo} digest")
    return algo, raw.hex()


def _verify(url: str, sink, digest: tuple[str, str] | None, on_mismatch: Callable[[], None] | None = None) -> None:
    if digest is None:
        return
    algo, want = digest
    got = sink.hexdigest()
    if got != want:
        if on_mismatch:
            on_mismatch()
        raise ChecksumMismatch(
            f"{url_for_log(url)}: checksum mismatch after {sink.size} bytes: the source says {algo}:{want}, "
            f"the bytes received hash to {algo}:{got}; the partial download was deleted"
        )


def _hash_file(fs, path: str, algo: str, block: int) -> str:
    h = _HASHES[algo]()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(fs, path: str, expected: int, digest, block: int) -> tuple[bool, str | None]:
    """Is the destination already the file? (False, why) when it exists but is not."""
    try:
        have = int(fs.size(path))
    except FileNotFoundError:
        return False, None
    if expected >= 0 and have != expected:
        return False, f"has {have} bytes, expected {expected}"
    if digest:
        algo, want = digest
        got = _hash_file(fs, path, algo, block)
        if got != want:
            return False, f"{algo} is {got}, expected {want}"
    return True, None


# ---------------------------------------------------------------------------------------------
# Messages


def url_for_log(url: str) -> str:
    """The URL without user:password@ (credentials never reach logs or errors)."""
    proto, rest = storage.split_protocol(url)
    host, sep, tail = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    return proto + host + sep + tail


def _fmt_size(n: int) -> str:
    return str(n) if n >= 0 else "an unknown number of"


class DownloadStage(Stage):
    name = STAGE

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None = None) -> list[Task]:
        """One task per input file of every source with `download: true`, in listing order."""
        out: list[Task] = []
        for src in recipe.sources:
            if not src.download:
                continue
            for f in list_inputs(src, run):
                out.append(
                    Task(
                        stage=STAGE,
                        id=f"{src.name}/{f.rel_path}",
                        source=src.name,
                        fingerprint=fingerprint(f.version, f.size),
                        size=max(f.size, 0),  # -1 (unknown) would skew progress totals
                        payload={
                            "url": f.url,
                            "rel_path": f.rel_path,
                            "size": f.size,
                            "checksum": f.checksum,
                            "dest": run.raw(src.name, f.rel_path),
                        },
                    )
                )
        return out

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        """Copy one file to its destination in the run (see the module docstring)."""
        p = task.payload
        cfg = recipe.download
        url, dest = p["url"], p["dest"]
        block = cfg.block_mb << 20
        digest = _expected_digest(p.get("checksum")) if cfg.verify_checksum else None

        src_fs, src_path = storage.url_to_fs(url)
        dest_fs, dest_path = storage.url_to_fs(dest)
        expected = int(p["size"]) if p.get("size") is not None else -1
        if expected <= 0:  # unknown (URL lists) or not given by the listing (HTTP globs)
            expected = _remote_size(src_fs, src_path, url)

        issues: list[dict] = []
        counters = _Counters()
        local = storage.is_local(dest_fs)

        complete, why = _is_complete(dest_fs, dest_path, expected, digest, block)
        if complete:
            if local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest_path + PARTIAL_SUFFIX)  # stale: the file is already complete
            size = int(dest_fs.size(dest_path))
            return _result(task.source, dest, size, skipped=1, counters=counters, verified=digest is not None,
                           issues=issues)
        if why:
            log.warning("%s: %s; downloading it again", dest, why)
            issues.append({"file": p["rel_path"], "line": None, "kind": "bad_destination",
                           "message": f"{dest}: {why}; downloaded again"})

        if local:
            size = _download_local(src_fs, src_path, url, dest_path, expected, digest, block, cfg.retries, counters)
        else:
            size = _download_remote(src_fs, src_path, url, dest, dest_fs, dest_path, expected, digest, block,
                                    cfg.retries, counters)
        return _result(task.source, dest, size, skipped=0, counters=counters, verified=digest is not None,
                       issues=issues)


stage = DownloadStage()
