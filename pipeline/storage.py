"""Every path goes through fsspec: URLs, globs, atomic commits, checksums.

Local files are committed by writing `<name>.tmp-<random>` (`temp_name`) and renaming it over the final name,
so a killed task never leaves a half-written output under its final name. On object stores a
single PUT is already atomic, so the final key is written directly.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import re
import uuid
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterator

import fsspec
import orjson
from fsspec.core import url_to_fs as _url_to_fs

_GLOB_CHARS = "*?["
_TEMP_MARK = ".tmp-"  # <name>.tmp-<12 hex>: an atomic commit in progress (or a killed one)
_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{12}$")


def temp_name(path: str) -> str:
    """The temporary name an atomic commit writes before renaming over `path`."""
    return f"{path}{_TEMP_MARK}{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    """True for a file name of exactly the form an atomic commit writes before its rename."""
    return _TEMP_NAME.search(name.rsplit("/", 1)[-1]) is not None


def _modified(info: dict):
    """What a listing says about when a file was written (local mtime, object-store date or ETag)."""
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created"):
        if info.get(key):
            return info[key]
    return None


def file_stamp(info: dict) -> str:
    """"<size>:<modified>" from an fsspec info: changes whenever the file is rewritten."""
    return f"{info.get('size')}:{_modified(info)}"


def url_to_fs(url: str):
    """(filesystem, path) for a URL; storage options come from the environment (never logged)."""
    return _url_to_fs(url)


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping its scheme."""
    out = url.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def split_protocol(url: str) -> tuple[str, str]:
    if "://" in url:
        proto, rest = url.split("://", 1)
        return proto + "://", rest
    return "", url


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def size(url: str) -> int | None:
    fs, path = url_to_fs(url)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open `url` for writing; the file appears under its name only if the block succeeds."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = temp_name(path)
        try:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # Object stores upload on close: without autocommit=False a failed block would still
        # publish a partial object.
        fh = fs.open(path, mode, autocommit=False)
        try:
            yield fh
        except BaseException:
            fh.discard()
            raise
        fh.close()  # uploads the last part
        fh.commit()  # publishes the object


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as fh:
        fh.write(data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")


def remove(url: str) -> None:
    """Delete one file; a missing one is not an error."""
    fs, path = url_to_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def read_json(url: str, default: Any = None) -> Any:
    """Parse a JSON file; `default` when it does not exist."""
    try:
        return orjson.loads(read_bytes(url))
    except FileNotFoundError:
        return default


def sha256_of(url: str, block: int = 8 << 20) -> str:
    fs, path = url_to_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Input listing


@dataclass(frozen=True)
class InputFile:
    """One input file of a source: where it is, where it sits under the source root, what it is."""

    url: str
    rel_path: str
    size: int
    checksum: str | None  # "sha256:<hex>", "md5:<hex>" or "etag:<value>" when the store gives one
    version: str  # what identifies this version of the file (checksum, else size+mtime)

    def to_json(self) -> dict:
        return asdict(self)


def _checksum(info: dict) -> str | None:
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return "sha256:" + lfs["sha256"]
    for key in ("sha256", "SHA256", "ChecksumSHA256"):
        if info.get(key):
            return "sha256:" + str(info[key])
    for key in ("md5", "md5Hash", "MD5"):
        if info.get(key):
            return "md5:" + str(info[key])
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    return None


def _version(info: dict, checksum: str | None) -> str:
    if checksum:
        return checksum
    return f"size:{info.get('size')}:mtime:{_modified(info)}"


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard component."""
    proto, path = split_protocol(pattern)
    parts = path.split("/")
    fixed: list[str] = []
    for p in parts:
        if any(c in p for c in _GLOB_CHARS):
            break
        fixed.append(p)
    else:  # no wildcard: the root is the file's directory
        fixed = parts[:-1]
    return proto + "/".join(fixed)


def _info_to_input(fs, proto: str, root_path: str, info: dict) -> InputFile:
    path = info["name"]
    rel = posixpath.relpath(path, root_path) if root_path else path
    checksum = _checksum(info)
    url = path if not proto or proto == "file://" else fs.unstrip_protocol(path)
    size = info.get("size")
    return InputFile(url=url, rel_path=rel, size=-1 if size is None else int(size), checksum=checksum,
                     version=_version(info, checksum))


def expand_urls(patterns: list[str]) -> list[InputFile]:
    """List the files that URLs/globs name, sorted by relative path (deterministic order).

    Raises FileNotFoundError naming the pattern when one matches nothing.
    """
    out: dict[str, InputFile] = {}  # by URL
    for pattern in patterns:
        proto, _ = split_protocol(pattern)
        fs, path = url_to_fs(pattern)
        _, root_path = url_to_fs(glob_root(pattern)) if glob_root(pattern) else (fs, "")
        if any(c in path for c in _GLOB_CHARS):
            found = fs.glob(path, detail=True)
            infos = [i for i in found.values() if i.get("type", "file") == "file"]
            # Some listings (http directory pages) carry no size or version: ask each file.
            infos = [fs.info(i["name"]) if i.get("size") is None else i for i in infos]
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{pattern}: no such file") from None
            infos = [info] if info.get("type", "file") == "file" else []
            if info.get("type") == "directory":
                raise FileNotFoundError(f"{pattern}: is a directory; use a glob such as {pattern.rstrip('/')}/**")
        if not infos:
            raise FileNotFoundError(f"{pattern}: matches no file")
        for info in infos:
            f = _info_to_input(fs, proto, root_path, info)
            out.setdefault(f.url, f)  # overlapping globs: one file once; two files, one rel_path: both
    return sorted(out.values(), key=lambda f: (f.rel_path, f.url))


def expand_url_list(list_url: str, match: str | None) -> list[InputFile]:
    """Inputs named one per line in a text file (RedPajama-1T's urls.txt style)."""
    text = read_bytes(list_url).decode("utf-8")
    urls = [u.strip() for u in text.splitlines() if u.strip() and not u.lstrip().startswith("#")]
    if match:
        urls = [u for u in urls if fnmatch.fnmatchcase(u, match)]
    if not urls:
        raise FileNotFoundError(f"{list_url}: lists no URL" + (f" matching {match!r}" if match else ""))
    root = posixpath.commonpath([split_protocol(u)[1].rsplit("/", 1)[0] for u in urls]) if len(urls) > 1 \
        else split_protocol(urls[0])[1].rsplit("/", 1)[0]
    out = []
    for u in sorted(set(urls)):
        rel = posixpath.relpath(split_protocol(u)[1], root)
        out.append(InputFile(url=u, rel_path=rel, size=-1, checksum=None, version=f"url:{u}"))
    return out


def fsspec_open(url: str, mode: str = "rb", **kw):
    return fsspec.open(url, mode, **kw)
