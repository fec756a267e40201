"""The encode phase and the manifest: documents in, Megatron shards and RUN/manifest.json out.

One encode task per group and split reads the group's documents in order, drops validation
documents (train) and train documents whose text is a holdout text (`duplicate_holdout`),
encodes batches of `batch_docs` documents (`encode_batch`) and writes
`RUN/shards/<source>/<split>/<group:06d>-<part:04d>.bin/.idx` through a `ShardSink`, a new part
starting at the first document boundary past `shard_mb`. Its shard list goes to
`RUN/tokenize/parts/<split>/<source>/<group:06d>.json`; `write_run_manifest` (the stage's
finish) gathers those lists into manifest.json and removes shard files it no longer lists.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import asdict
from itertools import chain

import numpy as np
import pyarrow as pa

from .. import storage
from ..formats.manifest import ShardEntry, make_manifest, write_manifest
from ..formats.megatron import MegatronWriter
from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from .docs import iter_batches, removed_ids
from .encoder import Encoder, with_bos_eos
from .errors import TokenizeError
from .holdout import holdout_mask, load_index, member, sha256_texts
from .tokenizer import load_checked, tokenizer_info


class ShardSink:
    """Documents in, shards of about target_bytes out: a part closes at the first document
    boundary at or past the target, so the cut depends on the documents only."""

    def __init__(self, run: RunDir, source: str, split: str, group: int, dtype: np.dtype, target_bytes: float):
        self.run, self.source, self.split, self.group = run, source, split, group
        self.dtype = dtype
        self.target = max(int(target_bytes), 1)
        self.entries: list[dict] = []
        self.writer: MegatronWriter | None = None

    def _path(self) -> str:
        part = len(self.entries)
        if part > 9999:
            raise TokenizeError(f"{self.source}/{self.split} group {self.group}: more than 10,000 shards; "
                                f"raise tokenize.shard_mb")
        return RunDir.shard_path(self.source, self.split, self.group, part)

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        item = self.dtype.itemsize
        start_doc, start_tok = 0, 0
        while start_doc < len(lengths):
            if self.writer is None:
                self.path = self._path()
                self.writer = MegatronWriter(self.run.relative(self.path), self.dtype)
            room = self.target - self.writer.bin_bytes  # bytes until this part is full
            ends = np.cumsum(lengths[start_doc:]) * item
            cut = int(np.searchsorted(ends, room, side="left"))  # first doc whose end reaches the target
            if cut >= len(ends):  # the rest fits
                self.writer.add_documents(flat[start_tok:], lengths[start_doc:])
                return
            n_tok = int(ends[cut]) // item
            self.writer.add_documents(flat[start_tok:start_tok + n_tok], lengths[start_doc:start_doc + cut + 1])
            self._close()
            start_doc += cut + 1
            start_tok += n_tok

    def _close(self) -> None:
        meta = self.writer.close()
        self.entries.append(asdict(ShardEntry(path=self.path, source=self.source, split=self.split,
                                              docs=meta["docs"], tokens=meta["tokens"], dtype=self.dtype.name,
                                              bin_sha256=meta["bin_sha256"], idx_sha256=meta["idx_sha256"],
                                              bin_bytes=meta["bin_bytes"])))
        self.writer = None

    def close(self) -> list[dict]:
        if self.writer is not None and self.writer.docs:
            self._close()
        elif self.writer is not None:
            self.writer.abort()
            self.writer = None
        return self.entries

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def encode_batch(sp, texts: list[str], bos: bool, eos: bool, dtype: np.dtype, threads: int,
                 encoder: Encoder | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SentencePiece ids of a batch of documents, flat (dtype) with each document's length.

    With an `Encoder` (encoder.py: exact, with a per-worker segment cache) the ids are the same
    as SentencePiece's, faster; without one, plain batched SentencePiece.
    """
    if encoder is not None:
        flat, lengths = encoder.encode_to_array(texts)
        flat, lengths = with_bos_eos(flat, lengths, sp.bos_id() if bos else None, sp.eos_id() if eos else None)
        return flat.astype(dtype, copy=False), lengths
    ids = sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=threads)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


_ENCODERS: dict[tuple[str, int, int], Encoder] = {}


def worker_encoder(recipe: Recipe, sp, sha256: str) -> Encoder | None:
    """The worker process's encoder for this tokenizer: its cache lives as long as the worker."""
    cfg = recipe.tokenize
    if cfg.cache_entries == 0:
        return None
    key = (sha256, cfg.cache_entries, cfg.cpus_per_task)
    enc = _ENCODERS.get(key)
    if enc is None:
        _ENCODERS.clear()  # one tokenizer's cache at a time bounds the memory
        enc = _ENCODERS[key] = Encoder(sp.serialized_model_proto(), cache_entries=cfg.cache_entries,
                                       threads=cfg.cpus_per_task)
    return enc if enc.fast else None


def run_encode(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    p = task.payload
    cfg = recipe.tokenize
    split = p["split"]
    dtype = np.dtype(p["dtype"])
    sp = load_checked(recipe, run, p["tokenizer_sha256"])
    encoder = worker_encoder(recipe, sp, p["tokenizer_sha256"])
    index = load_index(run) if split == "train" and cfg.dedup_holdout else np.zeros(0, "S32")
    sink = ShardSink(run, task.source, split, p["group"], dtype, cfg.shard_mb * (1 << 20))
    docs = tokens = dup = 0
    try:
        for texts in _group_texts(p["files"], split, task.source, recipe, run):
            if len(index):
                hit = member(index, sha256_texts(texts))
                if hit.any():
                    dup += int(hit.sum())
                    texts = [t for t, h in zip(texts, hit) if not h]
            if not texts:
                continue
            flat, lengths = encode_batch(sp, texts, cfg.bos, cfg.eos, dtype, cfg.cpus_per_task, encoder)
            sink.add(flat, lengths)
            docs += len(texts)
            tokens += int(flat.size)
        entries = sink.close()
    except BaseException:
        sink.abort()
        raise
    storage.write_json(p["parts"], {"task": task.id, "fingerprint": task.fingerprint, "shards": entries})
    node: dict = {split: {"docs": docs, "tokens": tokens}}
    if split == "train":
        node["removed"] = {"duplicate_holdout": dup}
    outputs = [run.relative(e["path"]) + ext for e in entries for ext in (".bin", ".idx")]
    return TaskResult(outputs=outputs + [p["parts"]], stats={"sources": {task.source: node}}, docs=docs,
                      bytes=task.size)


def _group_texts(files: list[dict], split: str, source: str, recipe: Recipe, run: RunDir) -> Iterator[list[str]]:
    """Batches of the texts of a group's documents of one split, in file and row order."""
    cfg = recipe.tokenize
    for f in files:
        if split == "validation":
            for b in iter_batches(f["holdout"], ["text"], cfg.batch_docs):
                yield b.column(0).to_pylist()
            continue
        removed = removed_ids(run, source, f["rel"])
        for b in iter_batches(f["url"], ["id", "text"], cfg.batch_docs):
            ids = b.column(0).to_numpy()
            keep = ~holdout_mask(ids, cfg.holdout_fraction, cfg.holdout_seed)
            if len(removed):
                keep &= ~np.isin(ids, removed)
            col = b.column(1)
            yield (col if keep.all() else col.filter(pa.array(keep))).to_pylist()


# ---------------------------------------------------------------------------------------------
# The manifest (the stage's finish)


def write_run_manifest(recipe: Recipe, run: RunDir, records: list[dict]) -> None:
    """RUN/manifest.json from the encode tasks' shard lists; drop shard files it does not list."""
    info, dtype = tokenizer_info(recipe, run)
    shards: list[ShardEntry] = []
    for rec in records:
        if not rec["task"].startswith(("train/", "validation/")):
            continue
        parts_url = next(o for o in rec["outputs"] if o.endswith(".json"))
        parts = storage.read_json(parts_url)
        if not parts or parts.get("fingerprint") != rec["fingerprint"]:
            raise TokenizeError(f"{parts_url}: missing or from another run of task {rec['task']}")
        shards += [ShardEntry(**e) for e in parts["shards"]]
    manifest = make_manifest(info, recipe.tokenize.bos, recipe.tokenize.eos, dtype.name, shards)
    write_manifest(run, manifest)
    _remove_stale_shards(run, {s.path for s in shards})


def _remove_stale_shards(run: RunDir, keep: set[str]) -> None:
    """Shard files of an earlier configuration (other groups or parts) that the manifest dropped."""
    fs, root = storage.url_to_fs(run.url)
    shards_root = storage.url_to_fs(run.shards_root)[1]
    try:
        found = fs.find(shards_root)
    except FileNotFoundError:
        return
    for path in found:
        rel = posixpath.relpath(path, root)
        stem, ext = posixpath.splitext(rel)
        if ext in (".bin", ".idx") and stem not in keep:
            fs.rm(path)
