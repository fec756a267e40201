"""Compressed input: zstd frames and gzip members, decoded and released only once verified.

`zstd_chunks` and `gzip_chunks` turn a file's compressed bytes into its decompressed bytes, in
order, walking the container themselves so that they know where each frame (zstd) or member
(gzip) begins and ends:

* a zstd frame with a content checksum, and every gzip member (CRC32 and length), is held
  (`Held`) until its check has passed and only then released; a frame that fails (bad checksum,
  undecodable data, cut by the end of the file) yields a `Lost` instead of its bytes, and the
  frames after it are read as usual. Nothing unverified reaches a document.
* a zstd frame without a checksum has nothing to wait for: it streams as it is decoded (what it
  released before an error stays released).
* a frame's bytes are held in memory up to `HOLD_BYTES` decompressed bytes; a larger frame is
  held in an anonymous temporary file, so memory stays bounded whatever the frame size.

Only a broken container (a zstd block header or frame magic that makes no sense, gzip data that
cannot be inflated: the end of the member is then unknown) ends the stream early: `StreamError`.
An error of `read()` (the storage: `readers.InputUnavailable`) is not about the content and
passes through as it is; a frame held when it happens is dropped, never counted.
"""

from __future__ import annotations

import tempfile
import zlib
from typing import Callable, Iterator

import zstandard

HOLD_BYTES = 64 << 20  # decompressed bytes of one frame held in memory; beyond, in a temporary file
_STEP = 1 << 16  # compressed bytes per decompression step (the output stays in cache)
_GZIP_STEP_BYTES = 1 << 22  # most decompressed bytes per gzip step
_SPILL_READ = 1 << 20  # bytes per read when a held frame is released from its temporary file
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_MAX = 1 << 17  # a block never holds more (RFC 8878, Block_Maximum_Size)
_GZIP_MAGIC = b"\x1f\x8b"


class StreamError(Exception):
    """The stream ended badly: kind is truncated / not_zstd / corrupt_zstd / not_gzip / bad_gzip."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class Lost:
    """The decompressed bytes of a frame that failed its check, withheld.

    lines: the lines lost with it: one per newline in what was decoded (the first one includes
    the line in progress before the frame), plus the line the lost bytes end inside, if any.
    skip: the lost bytes are known to end inside a line: its rest, up to the next newline, is
    skipped. When part of the frame could not be decoded at all, where it ended is unknown:
    one more line is counted and nothing is skipped (a line's fragment then fails to parse and
    is counted as such; the lines of the undecodable part cannot be counted).
    """

    __slots__ = ("kind", "message", "lines", "skip")

    def __init__(self, kind: str, message: str, lines: int, skip: bool):
        self.kind, self.message, self.lines, self.skip = kind, message, lines, skip


class Held:
    """The decompressed bytes of one frame, held until its check has passed.

    In memory up to HOLD_BYTES, then in an anonymous temporary file (deleted when closed).
    """

    __slots__ = ("chunks", "size", "file", "last")

    def __init__(self):
        self.chunks: list[bytes] = []
        self.size, self.file, self.last = 0, None, b""

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self.last = data[-1:]
        if self.file is not None:
            self.file.write(data)
            return
        self.chunks.append(data)
        if self.size > HOLD_BYTES:
            self.file = tempfile.TemporaryFile(prefix="tinyprep-frame-")
            for c in self.chunks:
                self.file.write(c)
            self.chunks = []

    def _pieces(self) -> Iterator[bytes]:
        if self.file is None:
            yield from self.chunks
            return
        self.file.seek(0)
        while piece := self.file.read(_SPILL_READ):
            yield piece

    def release(self) -> Iterator[bytes]:
        """The held bytes, in order; then nothing is held."""
        try:
            yield from self._pieces()
        finally:
            self.close()

    def lost(self, kind: str, message: str, undecoded: bool) -> Lost:
        """A Lost for the held bytes (undecoded: part of the frame could not be decoded)."""
        lines = sum(piece.count(b"\n") for piece in self._pieces())
        open_end = self.size > 0 and self.last != b"\n"
        self.close()
        if undecoded:
            return Lost(kind, f"{message}; the rest of it could not be decoded", lines + 1, False)
        return Lost(kind, message, lines + open_end, open_end)

    def close(self) -> None:
        self.chunks, self.size, self.last = [], 0, b""
        if self.file is not None:
            self.file.close()
            self.file = None


class _Input:
    """Compressed bytes from `read()` (the next block, b"" at the end), taken piece by piece.

    offset: the file offset of the next byte to take.
    """

    __slots__ = ("read", "buf", "pos", "offset")

    def __init__(self, read: Callable[[], bytes], first: bytes):
        self.read, self.buf, self.pos, self.offset = read, first, 0, 0

    def some(self, n: int) -> bytes:
        """Up to n bytes (fewer only when the block ends; b"" at the end of the file)."""
        if self.pos >= len(self.buf):
            self.buf, self.pos = self.read(), 0
        buf, pos = self.buf, self.pos
        piece = buf if pos == 0 and n >= len(buf) else buf[pos:pos + n]
        self.pos += len(piece)
        self.offset += len(piece)
        return piece

    def exactly(self, n: int) -> bytes:
        """n bytes, or fewer at the end of the file."""
        piece = self.some(n)
        while len(piece) < n:
            more = self.some(n - len(piece))
            if not more:
                break
            piece += more
        return piece

    def until_zero(self) -> bytes:
        """The bytes up to and including the next zero byte (all that is left when there is none)."""
        out = b""
        while True:
            piece = self.some(_STEP)
            if not piece:
                return out
            i = piece.find(0)
            if i >= 0:
                self.unread(piece[i + 1:])
                return out + piece[:i + 1]
            out += piece

    def unread(self, data: bytes) -> None:
        if data:
            self.buf, self.pos = data + self.buf[self.pos:], 0
            self.offset -= len(data)


def _cut(where: str, inp: _Input) -> StreamError:
    return StreamError("truncated", f"the file ends inside {where} (file of {inp.offset} bytes)")


def _end_cut(held, e: StreamError, release_cut: bool):
    """What a frame (or gzip member) cut by `e` still yields: its lines when the caller asked for
    cut frames (a head of a file), else their loss. True when that loss accounts for `e` (a
    truncation inside the frame), so the stream ends without a file-level problem."""
    if release_cut:
        yield from held.release()
        return False
    yield _lost_inside(held, e)
    return e.kind == "truncated"


def _lost_inside(held: Held, e: StreamError) -> Lost:
    """The held bytes of a frame the stream ended inside (a cut counts its lines as truncated,
    like the partial record of a stream that is not held)."""
    return held.lost(e.kind, e.message, undecoded=True)


# ---------------------------------------------------------------------------------------------
# zstd


def _zstd_header_rest(descriptor: int) -> int:
    """Bytes of a zstd frame header after its descriptor byte (window, dictionary id, content size)."""
    single_segment = descriptor >> 5 & 1
    return ((0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
            + ((1 if single_segment else 0), 2, 4, 8)[descriptor >> 6])


def zstd_chunks(read: Callable[[], bytes], first: bytes, release_cut: bool = False) -> Iterator[bytes | Lost]:
    """Decompressed pieces of a (multi-frame) zstd stream, a Lost for each frame that fails.

    release_cut: the data is the head of a file (`tinyprep plan`'s sample): the frame it ends in
    is released unverified, and the cut is reported as a truncated stream.
    """
    inp = _Input(read, first)
    dctx = zstandard.ZstdDecompressor()
    frame = 0
    held: Held | None = None
    try:
        while True:
            start = inp.offset
            magic = inp.exactly(4)
            if not magic:
                return
            if len(magic) == 4 and 0x184D2A50 <= int.from_bytes(magic, "little") <= 0x184D2A5F:
                size = inp.exactly(4)  # a skippable frame: its length, then its bytes
                if len(size) < 4:
                    raise _cut("a skippable frame", inp)
                left = int.from_bytes(size, "little")
                while left:
                    piece = inp.some(min(left, _STEP))
                    if not piece:
                        raise _cut("a skippable frame", inp)
                    left -= len(piece)
                continue
            if magic != _ZSTD_MAGIC:
                if frame == 0:
                    raise StreamError("not_zstd", "zstd: not a zstd file (no frame magic at byte 0)")
                raise StreamError("corrupt_zstd", f"zstd: no frame magic at byte {start}; the rest of the file "
                                                  "cannot be read")
            where = f"zstd frame {frame + 1} (at byte {start})"
            descriptor = inp.exactly(1)
            if not descriptor:
                raise _cut(where, inp)
            checksum = descriptor[0] >> 2 & 1
            header = magic + descriptor + inp.exactly(_zstd_header_rest(descriptor[0]))
            if len(header) < 5 + _zstd_header_rest(descriptor[0]):
                raise _cut(where, inp)
            held = Held() if checksum else None
            dobj = dctx.decompressobj(write_size=1 << 20)
            bad = None  # why the frame cannot be used, once known
            try:
                dobj.decompress(header)
            except zstandard.ZstdError as e:
                bad = ("corrupt_zstd", f"bad frame header: {e}")
            last = False
            while not last:
                block = inp.exactly(3)
                if len(block) < 3:
                    raise _cut(where, inp)
                v = int.from_bytes(block, "little")
                last, kind, size = v & 1, v >> 1 & 3, v >> 3
                if kind == 3 or size > _ZSTD_BLOCK_MAX:
                    raise StreamError("corrupt_zstd", f"{where}: invalid block header at byte {inp.offset - 3}; "
                                                      "the rest of the file cannot be read")
                left = 1 if kind == 1 else size  # an RLE block holds one byte
                piece = block
                while True:
                    if bad is None:
                        try:
                            out = dobj.decompress(piece)
                        except zstandard.ZstdError as e:
                            bad = ("corrupt_zstd", f"cannot be decoded: {e}")
                        else:
                            if out:
                                if held is None:
                                    yield out
                                else:
                                    held.add(out)
                    if not left:
                        break
                    piece = inp.some(min(left, _STEP))
                    if not piece:
                        raise _cut(where, inp)
                    left -= len(piece)
            if checksum:
                tail = inp.exactly(4)
                if len(tail) < 4:
                    raise _cut(where, inp)
                if bad is None:
                    try:
                        dobj.decompress(tail)
                    except zstandard.ZstdError as e:
                        bad = ("bad_checksum" if "checksum" in str(e) else "corrupt_zstd", str(e))
            if bad is None and not dobj.eof:
                bad = ("corrupt_zstd", "the decoder did not reach the end of the frame")
            frame += 1
            message = f"zstd frame {frame}, bytes {start}-{inp.offset}"
            if bad is not None:
                kind, why = bad
                if held is None:
                    held = Held()
                yield held.lost(kind, f"{message}: {why}", undecoded=kind != "bad_checksum")
            elif held is not None:
                yield from held.release()
            held = None
    except StreamError as e:
        if held is not None and (yield from _end_cut(held, e, release_cut)):
            return  # counted with the frame's lines: not a file-level problem
        raise
    finally:
        if held is not None:  # a storage error (or the consumer stopped) inside a frame
            held.close()


# ---------------------------------------------------------------------------------------------
# gzip


def _gzip_header(inp: _Input, start: int, member: int) -> bool:
    """Reads a member's header; False at a clean end of the file (trailing zero padding included)."""
    head = inp.exactly(10)
    if member and head and not head.strip(b"\x00"):  # zero padding after the last member (as gzip allows)
        while piece := inp.some(_STEP):
            if piece.strip(b"\x00"):
                raise StreamError("bad_gzip", f"gzip: data after the zero padding at byte {start}")
        return False
    if not head:
        return False
    if head[:2] != _GZIP_MAGIC:
        if member == 0:
            raise StreamError("not_gzip", "gzip: not a gzip file (no gzip magic at byte 0)")
        raise StreamError("bad_gzip", f"gzip: no member header at byte {start} after member {member}; "
                                      "the rest of the file cannot be read")
    if len(head) < 10:
        raise _cut(f"gzip member {member + 1}'s header", inp)
    if head[2] != 8 or head[3] & 0xE0:
        raise StreamError("bad_gzip", f"gzip member {member + 1} (at byte {start}): unknown compression method "
                                      f"{head[2]} or flags {head[3]:#x}")
    flags = head[3]
    if flags & 4:  # FEXTRA
        n = inp.exactly(2)
        if len(n) < 2 or len(inp.exactly(int.from_bytes(n, "little"))) < int.from_bytes(n, "little"):
            raise _cut(f"gzip member {member + 1}'s header", inp)
    for flag in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & flag and not inp.until_zero().endswith(b"\x00"):
            raise _cut(f"gzip member {member + 1}'s header", inp)
    if flags & 2 and len(inp.exactly(2)) < 2:  # FHCRC
        raise _cut(f"gzip member {member + 1}'s header", inp)
    return True


def gzip_chunks(read: Callable[[], bytes], first: bytes, release_cut: bool = False) -> Iterator[bytes | Lost]:
    """Decompressed pieces of a (multi-member) gzip stream, a Lost for each member that fails.

    Each member is inflated as raw deflate data and checked here against its CRC32 and length
    (the same work zlib does in gzip mode), so that the end of a failed member is known.
    """
    inp = _Input(read, first)
    member = 0
    held: Held | None = None
    try:
        while True:
            start = inp.offset
            if not _gzip_header(inp, start, member):
                return
            where = f"gzip member {member + 1} (at byte {start})"
            held = Held()
            dobj = zlib.decompressobj(-zlib.MAX_WBITS)
            crc = size = 0
            while not dobj.eof:
                data = inp.some(_STEP)
                if not data:
                    raise _cut(where, inp)
                while data:
                    try:
                        out = dobj.decompress(data, _GZIP_STEP_BYTES)
                    except zlib.error as e:
                        raise StreamError("bad_gzip", f"{where}: invalid deflate data ({e}); "
                                                      "the rest of the file cannot be read") from None
                    if out:
                        crc = zlib.crc32(out, crc)
                        size += len(out)
                        held.add(out)
                    if dobj.eof:
                        inp.unread(dobj.unused_data)
                        break
                    data = dobj.unconsumed_tail
            trailer = inp.exactly(8)
            if len(trailer) < 8:
                raise _cut(where, inp)
            member += 1
            want_crc, want_size = int.from_bytes(trailer[:4], "little"), int.from_bytes(trailer[4:], "little")
            if (crc, size & 0xFFFFFFFF) != (want_crc, want_size):
                yield held.lost("bad_checksum", f"gzip member {member}, bytes {start}-{inp.offset}: CRC32 {crc:08x} and length "
                                                f"{size} do not match the trailer ({want_crc:08x}, {want_size})",
                                undecoded=False)
            else:
                yield from held.release()
            held = None
    except StreamError as e:
        if held is not None and (yield from _end_cut(held, e, release_cut)):
            return  # counted with the frame's lines: not a file-level problem
        raise
    finally:
        if held is not None:  # a storage error (or the consumer stopped) inside a frame
            held.close()
