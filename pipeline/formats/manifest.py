"""`RUN/manifest.json` (what the shards hold) and `RUN/mixture.json` (the plan the loader follows).

Both are versioned JSON, written with sorted keys (byte-identical for the same content) and
validated on load: unknown format or version, missing or mistyped keys, inconsistent counts and
paths that escape the run directory raise `ManifestError("<file>: <key>: <reason>")`.

manifest.json, version 1:

    {"format": "tinyprep-manifest", "version": 1,
     "tokenizer": {"path", "sha256" (of the .model file), "vocab_size", "bos_id", "eos_id"},
     "bos": bool, "eos": bool, "dtype": "uint16",
     "shards": [{"path": "shards/<source>/<split>/<name>" (prefix relative to the run directory;
                 <path>.bin and <path>.idx), "source", "split": "train"|"validation", "docs",
                 "tokens", "dtype", "bin_sha256", "idx_sha256", "bin_bytes"}]  sorted by (source, split, path),
     "sources": {<source>: {"train": {"docs", "tokens", "shards"}, "validation": {...}}}}

mixture.json, version 1:

    {"format": "tinyprep-mixture", "version": 1, "seq_len", "seed", "token_budget",
     "weights": "explicit"|"proportional", "manifest_sha256" (of manifest.json's bytes),
     "fingerprint" (mixture_fingerprint below),
     "sources": [{"name", "weight" (normalized, sums to 1), "available_tokens" (train),
                  "samples_per_epoch" = (available_tokens - 1) // seq_len, "samples",
                  "epochs" = samples / samples_per_epoch, "tokens" = samples * seq_len,
                  "shards": [train shard paths, manifest order]}],
     "total_samples", "warnings": [str]}

Sample j of a source is the seq_len + 1 tokens of the source's train stream (its train shards'
tokens concatenated in manifest order) starting at token j * seq_len, 0 <= j < samples_per_epoch.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from .. import storage
from ..layout import MANIFEST_NAME, MIXTURE_NAME, RunDir, RunDirError, as_run, contained
from . import FormatError

MANIFEST_FORMAT = "tinyprep-manifest"
MIXTURE_FORMAT = "tinyprep-mixture"
MANIFEST_VERSION = 1
MIXTURE_VERSION = 1
SPLITS = ("train", "validation")
TOKEN_DTYPES = ("uint8", "uint16", "int16", "int32", "int64")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(FormatError):
    """A manifest.json or mixture.json that cannot be used; names the file and the key."""


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int


@dataclass(frozen=True)
class ShardEntry:
    path: str  # prefix relative to the run directory; <path>.bin / <path>.idx
    source: str
    split: str
    docs: int
    tokens: int
    dtype: str
    bin_sha256: str
    idx_sha256: str
    bin_bytes: int


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    bos: bool
    eos: bool
    dtype: str
    shards: list[ShardEntry]
    sources: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def shards_of(self, source: str, split: str = "train") -> list[ShardEntry]:
        """A source's shards of one split, in manifest order (the order of its token stream)."""
        return [s for s in self.shards if s.source == source and s.split == split]

    def to_json(self) -> dict:
        return {
            "format": self.format, "version": self.version, "tokenizer": asdict(self.tokenizer),
            "bos": self.bos, "eos": self.eos, "dtype": self.dtype,
            "shards": [asdict(s) for s in self.shards], "sources": self.sources,
        }


def source_totals(shards: list[ShardEntry]) -> dict[str, dict[str, dict[str, int]]]:
    """The manifest's `sources` section: docs, tokens and shard count per source and split."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for s in shards:
        per = out.setdefault(s.source, {sp: {"docs": 0, "tokens": 0, "shards": 0} for sp in SPLITS})
        per[s.split]["docs"] += s.docs
        per[s.split]["tokens"] += s.tokens
        per[s.split]["shards"] += 1
    return {k: out[k] for k in sorted(out)}


def make_manifest(tokenizer: TokenizerInfo, bos: bool, eos: bool, dtype: str, shards: list[ShardEntry]) -> Manifest:
    ordered = sorted(shards, key=lambda s: (s.source, s.split, s.path))
    return Manifest(tokenizer, bos, eos, dtype, ordered, source_totals(ordered))


def dumps(obj: Any) -> bytes:
    """The bytes we write for a JSON document: sorted keys, 2-space indent, final newline."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def write_manifest(run: RunDir | str, manifest: Manifest) -> bytes:
    """Validate and write RUN/manifest.json atomically; return its bytes."""
    url = as_run(run).manifest
    data = dumps(manifest.to_json())
    parse_manifest(orjson.loads(data), url)  # never write an invalid one
    storage.write_bytes(url, data)
    return data


# ---------------------------------------------------------------------------------------------
# Validation helpers


def safe_relative_path(path: Any, where: str) -> str:
    """A path relative to the run directory that stays inside it (layout.contained), else ManifestError."""
    try:
        return contained(path, where)
    except RunDirError as e:
        raise ManifestError(str(e)) from None


def _get(obj: dict, key: str, typ, where: str):
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: must be an object")
    if key not in obj:
        raise ManifestError(f"{where}.{key}: is required")
    v = obj[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if bool not in types and isinstance(v, bool):
        raise ManifestError(f"{where}.{key}: must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
    if not isinstance(v, types):
        raise ManifestError(f"{where}.{key}: must be {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}")
    return v


def _count(obj: dict, key: str, where: str) -> int:
    v = _get(obj, key, int, where)
    if v < 0:
        raise ManifestError(f"{where}.{key}: must be >= 0, got {v}")
    return v


def _hex(obj: dict, key: str, where: str) -> str:
    v = _get(obj, key, str, where)
    if not _HEX64.match(v):
        raise ManifestError(f"{where}.{key}: must be a sha256 hex digest, got {v!r}")
    return v


def _header(data: Any, fmt: str, version: int, name: str) -> None:
    if not isinstance(data, dict):
        raise ManifestError(f"{name}: must be a JSON object")
    if data.get("format") != fmt:
        raise ManifestError(f"{name}: format: expected {fmt!r}, got {data.get('format')!r}")
    if data.get("version") != version:
        raise ManifestError(f"{name}: version: unsupported version {data.get('version')!r} "
                            f"(this tinyprep reads version {version})")


def _read(url: str, hint: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise ManifestError(f"{url}: missing; {hint}") from None


def _parse_json(raw: bytes, url: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ManifestError(f"{url}: not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# manifest.json


def parse_manifest(data: Any, name: str = MANIFEST_NAME) -> Manifest:
    """Validate a parsed manifest.json; ManifestError names the key that is wrong."""
    from .megatron import check_vocab_fits

    _header(data, MANIFEST_FORMAT, MANIFEST_VERSION, name)
    tok = _get(data, "tokenizer", dict, name)
    tw = f"{name}: tokenizer"
    tokenizer = TokenizerInfo(
        path=_get(tok, "path", str, tw), sha256=_hex(tok, "sha256", tw), vocab_size=_count(tok, "vocab_size", tw),
        bos_id=_get(tok, "bos_id", int, tw), eos_id=_get(tok, "eos_id", int, tw))
    if tokenizer.vocab_size == 0:
        raise ManifestError(f"{tw}.vocab_size: must be > 0")
    dtype = _get(data, "dtype", str, name)
    if dtype not in TOKEN_DTYPES:
        raise ManifestError(f"{name}: dtype: {dtype!r} is not a token dtype {TOKEN_DTYPES}")
    try:
        check_vocab_fits(dtype, tokenizer.vocab_size, f"{name}: dtype")
    except FormatError as e:
        raise ManifestError(str(e)) from None
    shards: list[ShardEntry] = []
    seen: set[str] = set()
    for i, s in enumerate(_get(data, "shards", list, name)):
        w = f"{name}: shards[{i}]"
        path = safe_relative_path(_get(s, "path", str, w), f"{w}.path")
        if path in seen:
            raise ManifestError(f"{w}.path: {path!r} is listed twice")
        seen.add(path)
        split = _get(s, "split", str, w)
        if split not in SPLITS:
            raise ManifestError(f"{w}.split: must be one of {SPLITS}, got {split!r}")
        entry = ShardEntry(path=path, source=_get(s, "source", str, w), split=split, docs=_count(s, "docs", w),
                           tokens=_count(s, "tokens", w), dtype=_get(s, "dtype", str, w),
                           bin_sha256=_hex(s, "bin_sha256", w), idx_sha256=_hex(s, "idx_sha256", w),
                           bin_bytes=_count(s, "bin_bytes", w))
        if entry.dtype != dtype:
            raise ManifestError(f"{w}.dtype: {entry.dtype!r} differs from the manifest's dtype {dtype!r}")
        if entry.bin_bytes != entry.tokens * np.dtype(dtype).itemsize:
            raise ManifestError(f"{w}.bin_bytes: {entry.bin_bytes} is not tokens x {np.dtype(dtype).itemsize}")
        shards.append(entry)
    keys = [(s.source, s.split, s.path) for s in shards]
    if keys != sorted(keys):
        raise ManifestError(f"{name}: shards: must be sorted by (source, split, path)")
    sources = _get(data, "sources", dict, name)
    if sources != source_totals(shards):
        raise ManifestError(f"{name}: sources: the per-source totals do not match the shard list")
    return Manifest(tokenizer, _get(data, "bos", bool, name), _get(data, "eos", bool, name), dtype, shards,
                    source_totals(shards))


def read_manifest(run: RunDir | str) -> tuple[Manifest, bytes]:
    """RUN/manifest.json validated, and its bytes (what a mixture's manifest_sha256 is taken of)."""
    url = as_run(run).manifest
    raw = _read(url, "run the tokenize stage first")
    return parse_manifest(_parse_json(raw, url), url), raw


def load_manifest(run: RunDir | str) -> Manifest:
    """Read and validate RUN/manifest.json."""
    return read_manifest(run)[0]


def shard_prefix(run: RunDir | str, shard: ShardEntry | str) -> str:
    """The URL of a shard's prefix (append .bin / .idx) inside the run directory."""
    path = shard.path if isinstance(shard, ShardEntry) else shard
    return as_run(run).relative(safe_relative_path(path, "shard path"))


# ---------------------------------------------------------------------------------------------
# mixture.json


@dataclass(frozen=True)
class MixtureSource:
    name: str
    weight: float
    available_tokens: int
    samples_per_epoch: int
    samples: int
    epochs: float
    tokens: int
    shards: list[str]


@dataclass
class Mixture:
    seq_len: int
    seed: int
    token_budget: int
    weights: str
    manifest_sha256: str
    fingerprint: str
    sources: list[MixtureSource]
    total_samples: int
    warnings: list[str] = field(default_factory=list)
    format: str = MIXTURE_FORMAT
    version: int = MIXTURE_VERSION

    def source(self, name: str) -> MixtureSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict:
        d = asdict(self)
        return {"format": d.pop("format"), "version": d.pop("version"), **d}


def samples_per_epoch(available_tokens: int, seq_len: int) -> int:
    """Samples of seq_len + 1 tokens starting every seq_len tokens that fit the stream."""
    return max(available_tokens - 1, 0) // seq_len


def mixture_fingerprint(train_bin_sha256: list[str], weights: dict[str, float], seq_len: int, seed: int) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no spaces) of
    {"seed": seed, "seq_len": seq_len, "train_bin_sha256": [the train shards' bin_sha256 in
    manifest order], "weights": {source: normalized weight}}."""
    doc = {"seed": int(seed), "seq_len": int(seq_len), "train_bin_sha256": list(train_bin_sha256),
           "weights": {k: float(v) for k, v in weights.items()}}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def manifest_fingerprint(manifest: Manifest, weights: dict[str, float], seq_len: int, seed: int) -> str:
    """mixture_fingerprint over the manifest's train shards (all sources, manifest order)."""
    train = [s.bin_sha256 for s in manifest.shards if s.split == "train" and s.source in weights]
    return mixture_fingerprint(train, weights, seq_len, seed)


def write_mixture(run: RunDir | str, mixture: Mixture) -> bytes:
    url = as_run(run).mixture
    data = dumps(mixture.to_json())
    parse_mixture(orjson.loads(data), url)
    storage.write_bytes(url, data)
    return data


def parse_mixture(data: Any, name: str = MIXTURE_NAME) -> Mixture:
    """Validate a parsed mixture.json on its own (the arithmetic of every source)."""
    _header(data, MIXTURE_FORMAT, MIXTURE_VERSION, name)
    seq_len = _count(data, "seq_len", name)
    if seq_len == 0:
        raise ManifestError(f"{name}: seq_len: must be > 0")
    weights_mode = _get(data, "weights", str, name)
    if weights_mode not in ("explicit", "proportional"):
        raise ManifestError(f"{name}: weights: must be 'explicit' or 'proportional', got {weights_mode!r}")
    token_budget = _count(data, "token_budget", name)
    total = _count(data, "total_samples", name)
    sources: list[MixtureSource] = []
    for i, s in enumerate(_get(data, "sources", list, name)):
        w = f"{name}: sources[{i}]"
        src = MixtureSource(
            name=_get(s, "name", str, w), weight=float(_get(s, "weight", (int, float), w)),
            available_tokens=_count(s, "available_tokens", w), samples_per_epoch=_count(s, "samples_per_epoch", w),
            samples=_count(s, "samples", w), epochs=float(_get(s, "epochs", (int, float), w)),
            tokens=_count(s, "tokens", w),
            shards=[safe_relative_path(p, f"{w}.shards[{j}]") for j, p in enumerate(_get(s, "shards", list, w))])
        if not 0 <= src.weight <= 1:
            raise ManifestError(f"{w}.weight: must be in [0, 1], got {src.weight}")
        if src.samples_per_epoch != samples_per_epoch(src.available_tokens, seq_len):
            raise ManifestError(f"{w}.samples_per_epoch: {src.samples_per_epoch} != (available_tokens - 1) // seq_len")
        if src.tokens != src.samples * seq_len:
            raise ManifestError(f"{w}.tokens: {src.tokens} != samples x seq_len")
        if src.samples and not src.samples_per_epoch:
            raise ManifestError(f"{w}.samples: {src.samples} planned from a source with no sample")
        expect_epochs = src.samples / src.samples_per_epoch if src.samples_per_epoch else 0.0
        if not math.isclose(src.epochs, expect_epochs, rel_tol=1e-9, abs_tol=1e-12):
            raise ManifestError(f"{w}.epochs: {src.epochs} != samples / samples_per_epoch ({expect_epochs})")
        sources.append(src)
    if not sources:
        raise ManifestError(f"{name}: sources: must list at least one source")
    if len({s.name for s in sources}) != len(sources):
        raise ManifestError(f"{name}: sources: a source is listed twice")
    if not math.isclose(sum(s.weight for s in sources), 1.0, rel_tol=0, abs_tol=1e-9):
        raise ManifestError(f"{name}: sources: weights sum to {sum(s.weight for s in sources)}, not 1")
    if sum(s.samples for s in sources) != total:
        raise ManifestError(f"{name}: total_samples: {total} != the sum of the sources' samples")
    if total != -(-token_budget // seq_len):
        raise ManifestError(f"{name}: total_samples: {total} != ceil(token_budget / seq_len)")
    warnings = _get(data, "warnings", list, name)
    if not all(isinstance(x, str) for x in warnings):
        raise ManifestError(f"{name}: warnings: must be a list of strings")
    return Mixture(seq_len=seq_len, seed=_get(data, "seed", int, name), token_budget=token_budget,
                   weights=weights_mode, manifest_sha256=_hex(data, "manifest_sha256", name),
                   fingerprint=_hex(data, "fingerprint", name), sources=sources, total_samples=total,
                   warnings=list(warnings))


def check_mixture_against_manifest(mixture: Mixture, manifest: Manifest, manifest_bytes: bytes,
                                   name: str = MIXTURE_NAME) -> None:
    """The mixture was planned from exactly these shards: hash, fingerprint and shard lists agree."""
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest != mixture.manifest_sha256:
        raise ManifestError(f"{name}: manifest_sha256: manifest.json changed since the mixture was planned "
                            f"(rerun the mix stage)")
    weights = {s.name: s.weight for s in mixture.sources}
    for s in mixture.sources:
        if s.name not in manifest.sources:
            raise ManifestError(f"{name}: sources: {s.name!r} is not in manifest.json")
        if s.shards != [e.path for e in manifest.shards_of(s.name, "train")]:
            raise ManifestError(f"{name}: sources: {s.name!r}: shards differ from manifest.json's train shards")
        if s.available_tokens != manifest.sources[s.name]["train"]["tokens"]:
            raise ManifestError(f"{name}: sources: {s.name!r}: available_tokens differ from manifest.json")
    if manifest_fingerprint(manifest, weights, mixture.seq_len, mixture.seed) != mixture.fingerprint:
        raise ManifestError(f"{name}: fingerprint: does not match the shards, weights, seq_len and seed")


def _read_mixture(run: RunDir | str) -> Mixture:
    url = as_run(run).mixture
    return parse_mixture(_parse_json(_read(url, "run the mix stage first"), url), url)


def load_mixture(run: RunDir | str, check_manifest: bool = True) -> Mixture:
    """Read and validate RUN/mixture.json; with check_manifest, also against RUN/manifest.json."""
    mixture = _read_mixture(run)
    if check_manifest:
        manifest, raw = read_manifest(run)
        check_mixture_against_manifest(mixture, manifest, raw, as_run(run).mixture)
    return mixture


def load_plan(run: RunDir | str) -> tuple[Manifest, Mixture]:
    """manifest.json and mixture.json of a run, each validated, and the mixture checked against the
    manifest (its hash, the shard lists and the fingerprint over the train shards' checksums):
    ManifestError (a FormatError) names the file and what disagrees."""
    manifest, raw = read_manifest(run)
    mixture = _read_mixture(run)
    check_mixture_against_manifest(mixture, manifest, raw, as_run(run).mixture)
    return manifest, mixture
