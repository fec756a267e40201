"""The sample viewer: random documents decoded from a run's shards, or from one shard file.

`tinyprep inspect RUN [--source S] [--split train] [--n 5] [--seed K]` draws, per source, n
distinct documents uniformly from the split's shards (manifest order; the draw is a pure function
of seed and source) and decodes them with the run's tokenizer (checked against the manifest's
sha256). `tinyprep inspect FILE.bin` does the same inside one file: a Megatron `.bin` (with its
`.idx`: exact document boundaries) or a LITPKDS chunk (boundaries at the separator token, BOS or
EOS as the export wrote it; the first and last documents may continue in the neighbouring
chunks). The tokenizer of a single file is `--tokenizer`, else that of the run directory the
file sits in (the nearest parent with a manifest.json).

Every sample gives its place (file, document index, token range), its token count, whether it
starts with BOS / ends with EOS, its first and last pieces (the token boundaries), and its text:
the tokens without BOS/EOS, decoded, which equals the ingested document's text.
"""

from __future__ import annotations

import os
import posixpath
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import storage
from ..formats import FormatError, litpkds
from ..formats.manifest import Manifest, load_manifest, shard_prefix
from ..formats.megatron import read_index
from ..layout import as_run

SPLITS = ("train", "validation")
EXPORT_INFO = "tinyprep-export.json"  # written next to LITPKDS chunks by `tinyprep export`


class InspectError(Exception):
    """Nothing to inspect, or no way to decode it; the message says what to pass."""


@dataclass
class Sample:
    file: str  # shard prefix relative to the run, or the file's URL
    format: str  # "megatron" | "litpkds"
    index: int  # document index inside the file
    docs_in_file: int
    start: int  # token offset of the document in the file's token stream
    end: int
    bos: bool  # starts with the BOS token
    eos: bool  # ends with the EOS token
    text: str  # decoded without BOS/EOS
    head: list[str] = field(default_factory=list)  # first pieces
    tail: list[str] = field(default_factory=list)  # last pieces (empty when head shows them all)
    source: str | None = None
    split: str | None = None
    partial: str | None = None  # LITPKDS: "continues from the previous chunk" / "may continue in the next chunk"

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


# ---------------------------------------------------------------------------------------------
# Tokenizer


class _Decoder:
    def __init__(self, model: bytes, pieces: int):
        from ..tokenize.tokenizer import load_processor

        self.sp = load_processor(model)
        self.bos, self.eos = int(self.sp.bos_id()), int(self.sp.eos_id())
        self.pieces = pieces

    def sample(self, tokens: np.ndarray, **where) -> Sample:
        ids = [int(t) for t in tokens]
        bos = bool(ids) and ids[0] == self.bos
        eos = bool(ids) and ids[-1] == self.eos and len(ids) > int(bos)
        body = ids[int(bos):len(ids) - int(eos)]
        k = self.pieces
        head = [self.sp.id_to_piece(i) for i in ids[:k]] if k else []
        tail = [self.sp.id_to_piece(i) for i in ids[max(k, len(ids) - k):]] if k else []
        return Sample(text=self.sp.decode(body), bos=bos, eos=eos, head=head, tail=tail, **where)


def _run_decoder(run_url: str, manifest: Manifest, tokenizer: str | None, pieces: int) -> _Decoder:
    from ..tokenize.tokenizer import TokenizerMismatch, run_tokenizer

    try:  # --tokenizer, else the manifest's path, else the run's copy in RUN/assets/
        model, url = run_tokenizer(run_url, manifest, tokenizer, hint="; pass --tokenizer PATH (the model it used)")
    except TokenizerMismatch as e:
        raise InspectError(str(e)) from None
    try:
        return _Decoder(model, pieces)
    except FormatError as e:
        raise InspectError(f"{url}: {e}") from None


def _draw(total: int, n: int, seed: int, key: str) -> np.ndarray:
    """n distinct indices in [0, total), sorted: a pure function of (seed, key)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(key.encode())])
    return np.sort(rng.choice(total, size=min(n, total), replace=False)) if total else np.zeros(0, np.int64)


def _read_tokens(url: str, dtype: np.dtype, start: int, count: int) -> np.ndarray:
    """Tokens [start, start + count) of a .bin, read with one ranged read (local or remote)."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        fh.seek(start * dtype.itemsize)
        data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise InspectError(f"{url}: truncated (tokens {start}..{start + count} are past its end)")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<"))


def _megatron_samples(prefix_url: str, label: str, picks: np.ndarray, decoder: _Decoder, **where) -> list[Sample]:
    try:
        dtype, lengths, pointers = read_index(prefix_url)
    except FormatError as e:
        raise InspectError(str(e)) from None
    out = []
    for i in picks.tolist():
        start = int(pointers[i]) // dtype.itemsize
        tokens = _read_tokens(prefix_url + ".bin", dtype, start, int(lengths[i]))
        out.append(decoder.sample(tokens, file=label, format="megatron", index=i, docs_in_file=len(lengths),
                                  start=start, end=start + int(lengths[i]), **where))
    return out


# ---------------------------------------------------------------------------------------------
# A run directory


def inspect_run(run_url: str, source: str | None = None, split: str = "train", n: int = 5, seed: int = 0,
                tokenizer: str | None = None, pieces: int = 8) -> list[Sample]:
    """n random documents per source (or of `source`) of a split, decoded from the run's shards."""
    try:
        manifest = load_manifest(run_url)
    except FormatError as e:
        raise InspectError(f"{e} (inspect needs a tokenized run, or a FILE.bin)") from None
    if source is not None and source not in manifest.sources:
        raise InspectError(f"--source {source}: not in {as_run(run_url).manifest} "
                           f"(sources: {', '.join(manifest.sources)})")
    decoder = _run_decoder(run_url, manifest, tokenizer, pieces)
    out: list[Sample] = []
    for src in [source] if source else list(manifest.sources):
        shards = manifest.shards_of(src, split)
        counts = np.array([s.docs for s in shards], dtype=np.int64)
        starts = np.cumsum(counts) - counts
        picks = _draw(int(counts.sum()), n, seed, f"{src}/{split}")
        which = np.searchsorted(starts, picks, side="right") - 1
        for k in np.unique(which).tolist():
            shard = shards[k]
            out += _megatron_samples(shard_prefix(run_url, shard), shard.path, picks[which == k] - starts[k],
                                     decoder, source=src, split=split)
    return out


# ---------------------------------------------------------------------------------------------
# One file


def _parent(url: str) -> str | None:
    proto, path = storage.split_protocol(url)
    parent = posixpath.dirname(path.rstrip("/"))
    return None if parent == path.rstrip("/") or not parent else proto + parent


def _find_run(file_url: str) -> str | None:
    """The nearest parent directory of a file that holds a manifest.json."""
    d = _parent(file_url)
    while d:
        if storage.exists(as_run(d).manifest):
            return d
        d = _parent(d)
    return None


def _file_decoder(url: str, tokenizer: str | None, pieces: int) -> tuple[_Decoder, str | None, Manifest | None]:
    run = _find_run(url)
    manifest = None
    if run is not None:
        try:
            manifest = load_manifest(run)
        except FormatError:
            manifest = None
    if manifest is not None and tokenizer is None:
        return _run_decoder(run, manifest, None, pieces), run, manifest
    if tokenizer is None:
        raise InspectError(f"{url}: no run directory around it to take the tokenizer from; "
                           f"pass --tokenizer PATH (the tokenizer.model that made it)")
    try:
        return _Decoder(storage.read_bytes(tokenizer), pieces), run, manifest
    except FileNotFoundError:
        raise InspectError(f"--tokenizer {tokenizer}: no such file") from None
    except FormatError as e:
        raise InspectError(f"--tokenizer {tokenizer}: {e}") from None


def _is_litpkds(url: str) -> bool:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read(len(litpkds.MAGIC)) == litpkds.MAGIC


def inspect_file(url: str, n: int = 5, seed: int = 0, tokenizer: str | None = None, pieces: int = 8) -> list[Sample]:
    """n random documents of one shard file: Megatron `.bin` (+ `.idx`) or a LITPKDS chunk."""
    if "://" not in url:
        url = os.path.abspath(url)
    if url.endswith(".idx"):
        url = url[:-4] + ".bin"
    if not storage.exists(url):
        raise InspectError(f"{url}: no such file")
    decoder, run, manifest = _file_decoder(url, tokenizer, pieces)
    if _is_litpkds(url):
        return _litpkds_samples(url, n, seed, decoder)
    prefix = url[:-4] if url.endswith(".bin") else url
    where: dict = {}
    if manifest is not None:
        rel = posixpath.relpath(storage.split_protocol(prefix)[1], storage.split_protocol(run)[1])
        entry = next((s for s in manifest.shards if s.path == rel), None)
        if entry is not None:
            where = {"source": entry.source, "split": entry.split}
    try:
        docs = len(read_index(prefix)[1])
    except FormatError as e:
        raise InspectError(f"{e} (neither a LITPKDS chunk nor a Megatron shard)") from None
    return _megatron_samples(prefix, url, _draw(docs, n, seed, posixpath.basename(prefix)), decoder, **where)


def _litpkds_samples(url: str, n: int, seed: int, decoder: _Decoder) -> list[Sample]:
    try:
        _, _, tokens = litpkds.read_chunk(url)
    except FormatError as e:
        raise InspectError(str(e)) from None
    parent = _parent(url)
    info = storage.read_json(storage.join(parent, EXPORT_INFO)) if parent else None
    sep = int(info["separator"]) if isinstance(info, dict) and "separator" in info else decoder.bos
    at = np.flatnonzero(tokens == sep)
    eos_mode = sep == decoder.eos  # EOS ends a document; otherwise the separator (BOS) starts one
    if eos_mode:
        starts = np.concatenate([[0], at + 1])
        starts = starts[starts < len(tokens)]
    else:
        starts = at if len(at) and at[0] == 0 else np.concatenate([[0], at])
    ends = np.append(starts[1:], len(tokens))
    docs = len(starts)
    out = []
    for i in _draw(docs, n, seed, posixpath.basename(url)).tolist():
        s, e = int(starts[i]), int(ends[i])
        notes = []  # a chunk is cut anywhere: its first and last documents may be pieces
        if i == 0:
            notes.append("may begin in the previous chunk" if eos_mode else
                         "begins in the previous chunk" if tokens[0] != sep else "")
        if i == docs - 1:
            notes.append("continues in the next chunk" if eos_mode and tokens[-1] != sep else
                         "" if eos_mode else "may continue in the next chunk")
        partial = "; ".join(x for x in notes if x) or None
        out.append(decoder.sample(tokens[s:e], file=url, format="litpkds", index=i, docs_in_file=docs,
                                  start=s, end=e, partial=partial))
    return out


# ---------------------------------------------------------------------------------------------
# Text


# Characters a terminal acts on instead of showing: C0 controls but newline and tab (ESC starts
# OSC / CSI sequences that set titles, move the cursor or write to the clipboard), DEL, C1 controls,
# and the bidi overrides that reorder what is shown. Documents are untrusted input.
_UNSAFE = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}
_UNSAFE.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control and bidi characters shown as escapes."""
    return text.translate(_UNSAFE)


def render(samples: list[Sample], max_chars: int = 2000) -> str:
    """The samples as text: a header line per document, its token boundaries, then its text.
    Everything that comes from the data is passed through `printable`."""
    lines = []
    for s in samples:
        where = " · ".join(x for x in (s.source, s.split) if x)
        lines.append("━" * 100)
        lines.append(f"{printable(where) + ' · ' if where else ''}{printable(s.file)} · document {s.index:,} of {s.docs_in_file:,} "
                     f"({s.format})")
        marks = ", ".join(["starts with BOS" if s.bos else "no BOS", "ends with EOS" if s.eos else "no EOS"]
                          + ([s.partial] if s.partial else []))
        lines.append(f"{s.tokens:,} tokens at [{s.start:,}, {s.end:,}) of the file; {marks}; "
                     f"{len(s.text):,} characters")
        if s.head:
            gap = " │ … │ " if s.tokens > len(s.head) + len(s.tail) else " │ "
            shown = " │ ".join(s.head) + (gap + " │ ".join(s.tail) if s.tail else "")
            lines.append(f"tokens: │ {printable(shown)} │")
        lines.append("─" * 100)
        text = s.text if not max_chars or len(s.text) <= max_chars else (
            s.text[:max_chars] + f"\n… ({len(s.text) - max_chars:,} more characters; --max-chars 0 shows all)")
        lines.append(printable(text))
    return "\n".join(lines)
