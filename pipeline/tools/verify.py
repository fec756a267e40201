"""`tinyprep verify`: check a run's shards, tokenizer and mixture against its manifest.

Every shard of RUN/manifest.json: present, sizes, Megatron headers, document and token counts,
checksums (unless --no-checksums); the tokenizer (the recipe's model file, or `--tokenizer`)
must hash to the manifest's; mixture.json, when present, must agree with the manifest. Every
problem is listed, one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import storage
from ..formats import FormatError
from ..formats.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    load_mixture,
    shard_prefix,
)
from ..formats.megatron import MegatronReader
from ..layout import as_run
from ..tokenize.tokenizer import (
    TokenizerMismatch,
    check_manifest_tokenizer,
    manifest_tokenizer_url,
    recipe_tokenizer_url,
)


class VerifyError(Exception):
    """A run whose shards do not match its manifest; `problems` lists each one."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class VerifyReport:
    shards: int = 0
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    tokenizer: str = ""
    mixture: bool = False
    problems: list[str] = field(default_factory=list)


def verify_run(run_url: str, tokenizer: str | None = None, checksums: bool = True) -> VerifyReport:
    """Check every shard of RUN/manifest.json (presence, sizes, headers, counts, checksums), the
    tokenizer (the recipe's model file, or `tokenizer`, must hash to the manifest's) and
    mixture.json when present. Raises VerifyError listing every problem, one line each."""
    report = VerifyReport()
    try:
        manifest = load_manifest(run_url)
    except FormatError as e:
        raise VerifyError([f"manifest: {e}"]) from None
    problems = report.problems
    _verify_tokenizer(run_url, manifest, tokenizer, report)
    for shard in manifest.shards:
        report.shards += 1
        problems += _verify_shard(run_url, manifest, shard, checksums)
        report.docs += shard.docs
        report.tokens += shard.tokens
        report.bytes += shard.bin_bytes
    if storage.exists(as_run(run_url).mixture):
        try:
            load_mixture(run_url)
            report.mixture = True
        except FormatError as e:
            problems.append(f"mixture: {e}")
    if problems:
        raise VerifyError(problems)
    return report


def _verify_tokenizer(run_url: str, manifest: Manifest, tokenizer: str | None, report: VerifyReport) -> None:
    url = tokenizer or recipe_tokenizer_url(run_url) or manifest_tokenizer_url(run_url, manifest)
    report.tokenizer = url
    try:
        check_manifest_tokenizer(url, run_url, manifest)
    except TokenizerMismatch as e:
        report.problems.append(f"tokenizer: {e}")


def _verify_shard(run_url: str, manifest: Manifest, shard, checksums: bool) -> list[str]:
    try:
        prefix = shard_prefix(run_url, shard)
    except ManifestError as e:
        return [f"{shard.path}: {e}"]
    bin_url, idx_url = prefix + ".bin", prefix + ".idx"
    missing = [u for u in (bin_url, idx_url) if storage.size(u) is None]
    if missing:
        return [f"{u}: missing shard file" for u in missing]
    size = storage.size(bin_url)
    if size != shard.bin_bytes:
        kind = "truncated" if size < shard.bin_bytes else "size mismatch"
        return [f"{bin_url}: {kind}: {size} bytes, manifest.json says {shard.bin_bytes}"]
    try:
        reader = MegatronReader(prefix)
    except FormatError as e:
        return [f"bad shard: {e}"]
    out = []
    if reader.dtype.name != shard.dtype:
        out.append(f"{idx_url}: dtype {reader.dtype.name}, manifest.json says {shard.dtype}")
    if reader.num_docs != shard.docs or reader.num_tokens != shard.tokens:
        out.append(f"{idx_url}: counts differ: {reader.num_docs} docs / {reader.num_tokens} tokens, "
                   f"manifest.json says {shard.docs} / {shard.tokens}")
    if checksums:
        if reader.num_tokens and int(reader.tokens.max()) >= manifest.tokenizer.vocab_size:
            out.append(f"{bin_url}: token id {int(reader.tokens.max())} is outside the vocabulary "
                       f"({manifest.tokenizer.vocab_size})")
        if storage.sha256_of(bin_url) != shard.bin_sha256:
            out.append(f"{bin_url}: checksum mismatch (sha256 differs from manifest.json)")
        if storage.sha256_of(idx_url) != shard.idx_sha256:
            out.append(f"{idx_url}: checksum mismatch (sha256 differs from manifest.json)")
    return out
