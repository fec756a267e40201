"""Exports of a tokenized run.

litgpt export (`tinyprep export RUN --format litgpt -o DIR`): per source, the source's shards
of one split (train by default), concatenated in manifest order (documents already carry the
recipe's BOS/EOS), are cut into LITPKDS chunks of `chunk_size` tokens named
`{prefix}_{counter:010d}.bin` that TinyLlama's `lit_gpt/packed_dataset.py` reads unchanged.
Prefixes: `<split>_<name>` where name is the source name, except TinyLlama's own names for its
sources (`starcoderdata` -> `starcoder`), so the tinyllama recipe gives `train_slimpajama_*` and
`train_starcoder_*`; `--prefix SOURCE=PREFIX` overrides.

The last partial chunk of each source is dropped (at most chunk_size - 1 tokens per source, listed
as `tokens_dropped` in `DIR/tinyprep-export.json`): TinyLlama's loader reads every file as full
chunks, so a partial chunk would have to be padded, and padding must never reach training
(TinyLlama issue #83: its padded remainder chunks taught the model to emit `<s>`). No exported
chunk holds a padding token.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .. import storage
from ..formats import FormatError
from ..formats.litpkds import DEFAULT_CHUNK_SIZE, ChunkWriter
from ..formats.manifest import (
    read_manifest,
    shard_prefix,
)
from ..formats.megatron import MegatronReader
from ..layout import as_run

TINYLLAMA_NAMES = {"slimpajama": "slimpajama", "starcoderdata": "starcoder"}
EXPORT_INFO = "tinyprep-export.json"
_STEP_TOKENS = 1 << 24  # tokens copied per step (bounded memory whatever the shard size)


class ExportError(Exception):
    """An export that cannot be done; the message names the file or option."""


def default_prefix(source: str, split: str = "train") -> str:
    return f"{split}_{TINYLLAMA_NAMES.get(source, source)}"


def parse_prefixes(items: list[str]) -> dict[str, str]:
    """`SOURCE=PREFIX` options -> {source: prefix}."""
    out = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            raise ExportError(f"--prefix {item!r}: expected SOURCE=PREFIX")
        src, prefix = item.split("=", 1)
        if "/" in prefix or "*" in prefix:
            raise ExportError(f"--prefix {item!r}: a prefix is a file name start, without '/' or '*'")
        out[src] = prefix
    return out


def export_litgpt(run_url: str, out_url: str, chunk_size: int = DEFAULT_CHUNK_SIZE, split: str = "train",
                  prefixes: dict[str, str] | None = None, force: bool = False) -> dict:
    """Write LITPKDS chunks of every source; return (and write to DIR/tinyprep-export.json) a summary."""
    if chunk_size <= 0:
        raise ExportError(f"--chunk-size must be > 0, got {chunk_size}")
    try:
        manifest, manifest_bytes = read_manifest(run_url)
    except FormatError as e:
        raise ExportError(str(e)) from None
    prefixes = dict(prefixes or {})
    unknown = sorted(set(prefixes) - set(manifest.sources))
    if unknown:
        raise ExportError(f"--prefix: no source {unknown} in {as_run(run_url).manifest} "
                          f"(sources: {sorted(manifest.sources)})")
    names = {s: prefixes.get(s, default_prefix(s, split)) for s in manifest.sources}
    if len(set(names.values())) != len(names):
        raise ExportError(f"two sources would share a prefix: {names}")
    _check_out_dir(out_url, list(names.values()), force)
    sep = manifest.tokenizer.bos_id if manifest.bos or not manifest.eos else manifest.tokenizer.eos_id
    summary: dict = {"format": "tinyprep-litgpt-export", "version": 1, "chunk_size": chunk_size,
                     "dtype": manifest.dtype, "split": split, "separator": sep,
                     "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                     "last_chunk": "dropped", "sources": {}}
    for source in sorted(manifest.sources):
        writer = ChunkWriter(out_url, names[source], chunk_size, manifest.dtype, sep)
        for shard in manifest.shards_of(source, split):
            try:
                reader = MegatronReader(shard_prefix(run_url, shard))
            except FormatError as e:
                raise ExportError(f"{e} (run `tinyprep verify {run_url}`)") from None
            if reader.num_tokens != shard.tokens:
                raise ExportError(f"{reader.bin_url}: {reader.num_tokens} tokens, manifest.json says {shard.tokens}")
            for start in range(0, reader.num_tokens, _STEP_TOKENS):
                writer.add(np.asarray(reader.tokens[start:start + _STEP_TOKENS]))
        dropped = writer.close()
        summary["sources"][source] = {"prefix": names[source], "chunks": len(writer.files),
                                      "tokens_written": writer.tokens_written, "tokens_dropped": dropped,
                                      "files": writer.files}
    storage.write_json(storage.join(out_url, EXPORT_INFO), summary)
    return summary


def _check_out_dir(out_url: str, prefixes: list[str], force: bool) -> None:
    """Chunks of an earlier export would be globbed with the new ones: refuse, or remove them (--force)."""
    fs, path = storage.url_to_fs(out_url)
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return
    stale = sorted(n for n in names for p in prefixes if n.startswith(p + "_") and n.endswith(".bin"))
    if stale and not force:
        raise ExportError(f"{out_url}: holds {len(stale)} chunk file(s) of an earlier export ({stale[0]}, ...); "
                          f"use --force to replace them")
    for n in stale:
        fs.rm(f"{path.rstrip('/')}/{n}")
