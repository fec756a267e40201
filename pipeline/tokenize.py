"""Tokenize + pack: SentencePiece over the ingested documents into Megatron `.bin`/`.idx` shards.

The stage runs in phases (see `runner.run_stage`); everything it writes besides the shards and
`manifest.json` lives under `RUN/tokenize/`:

1. `tokenizer` (only when the recipe gives `tokenizer.train` and the model file does not exist,
   or this stage trained it before): one task trains a SentencePiece BPE model from the run's
   documents (`train_tokenizer`, deterministic) and stores it at `tokenizer.model`
   (default `RUN/tokenizer.model`).
2. `holdout`: one task per docs file. A document goes to the validation split when
   `mix64(id ^ mix64(holdout_seed)) < holdout_fraction * 2**64`, a pure function of its stable id.
   The task writes the file's validation documents with the SHA-256 of their UTF-8 text to
   `RUN/tokenize/holdout/<source>/<rel>.parquet` (and the file's train/validation text bytes
   in its metadata).
3. `group`: one task merges the holdout digests into `RUN/tokenize/holdout.sha256` (sorted,
   32 bytes each) and cuts each source's files, in sorted order, into groups of about
   `shard_mb` of tokens (`RUN/tokenize/groups.json`), estimating each source's text bytes per
   token by encoding its first 256 KB of documents.
4. `encode`: one task per group and split. It reads the group's documents in order, drops
   validation documents (train) and train documents whose text hash is a holdout text
   (`duplicate_holdout`), encodes batches of `batch_docs` documents with
   `sp.encode(texts, add_bos, add_eos, num_threads=cpus_per_task)`, and writes
   `RUN/shards/<source>/<split>/<group:06d>-<part:04d>.bin/.idx`, a new part starting at the
   first document boundary past `shard_mb`.

`finish` writes `RUN/manifest.json` (pipeline/formats/manifest.py) from the tasks' shard lists
and removes shard files of earlier configurations that the manifest no longer lists.

Every output is a function of the documents, the tokenizer and the recipe only (groups are
cut by bytes, parts by tokens), so shards and manifest are byte-identical whatever the number of
workers, retries or kills. Accounting, per source (`stats.sources.<source>`):
`read = train.docs + validation.docs + removed.dedup + removed.duplicate_holdout`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from itertools import chain
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .encoder import Encoder, with_bos_eos
from .formats import FormatError
from .formats.manifest import ShardEntry, TokenizerInfo, make_manifest, write_manifest
from .formats.megatron import MegatronWriter, check_vocab_fits, dtype_for_vocab
from .layout import RUN_TOKENIZER, DocsFile, RunDir, as_run
from .recipe import Recipe, TokenizerTrainConfig
from .stage import Stage, StageFailed, Task, TaskResult, fingerprint

STAGE = "tokenize"
HOLDOUT_INDEX = "holdout.sha256"  # under RUN/tokenize/
GROUPS = "groups.json"
GROUP_FILL = 0.9  # groups aim at 90% of shard_mb of estimated tokens: most become one shard, few a tail
ESTIMATE_SAMPLE_BYTES = 1 << 18  # text per source encoded to estimate its bytes per token
_MASK64 = (1 << 64) - 1

HOLDOUT_SCHEMA = pa.schema([
    pa.field("id", pa.uint64(), nullable=False),
    pa.field("text", pa.large_string(), nullable=False),
    pa.field("sha256", pa.binary(32), nullable=False),
])


class TokenizeError(StageFailed):
    """The tokenize stage cannot run with this recipe or run directory (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Document ids, holdout, dedup


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64).copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def holdout_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the documents that go to the validation split (a pure function of id and seed)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    salt = _mix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    threshold = np.uint64(min(int(fraction * 2.0**64), _MASK64))
    return _mix64(ids ^ salt) < threshold


def removed_ids(run: RunDir | str, source: str, rel_path: str) -> np.ndarray:
    """Ids (sorted uint64) of the documents of `RUN/docs/<source>/<rel_path>` that dedup removed.

    The one place where the tokenize stage learns about deduplication: the holdout and encode
    phases drop these ids before anything else, and the holdout phase counts them as
    `removed.dedup`. Without `RUN/dedup/` it is empty; with it, the dedup stage's removal list
    of the file (`pipeline.dedup.removed_ids`) must exist (`_removal_versions` checks at plan time).
    """
    run = as_run(run)
    if not storage.exists(run.dedup()):
        return np.zeros(0, dtype=np.uint64)
    from .dedup import removed_ids as dedup_removed_ids

    try:
        return np.sort(np.asarray(dedup_removed_ids(run, source, rel_path), dtype=np.uint64))
    except FileNotFoundError:
        raise TokenizeError(f"{run.dedup()}: no removal list for docs/{source}/{rel_path}; "
                            f"finish the dedup stage (or remove RUN/dedup to tokenize without it)") from None


def _removal_versions(run: RunDir, files: dict[str, list["DocsFile"]]) -> dict[str, str]:
    """Version (size, mtime) of each docs file's dedup removal list, '' without RUN/dedup/.

    Part of the holdout tasks' fingerprints: new removal lists redo everything after them."""
    keys = [f"{f.source}/{f.rel}" for fs in files.values() for f in fs]
    if not storage.exists(run.dedup()):
        return {k: "" for k in keys}
    root_url = run.dedup("removed")
    found = dict(run.find(root_url))
    out = {}
    for k in keys:
        info = found.get(k if k.endswith(".parquet") else k + ".parquet")
        if info is None:
            raise TokenizeError(f"{root_url}: no removal list for docs/{k}; finish the dedup stage "
                                f"(or remove {run.dedup()} to tokenize without it)")
        out[k] = storage.file_stamp(info)
    return out


def _sha256_texts(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


def _member(sorted_index: np.ndarray, digests: np.ndarray) -> np.ndarray:
    """digests (S32) found in the sorted index (S32)."""
    if not len(sorted_index) or not len(digests):
        return np.zeros(len(digests), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_index, digests), len(sorted_index) - 1)
    return sorted_index[pos] == digests


# ---------------------------------------------------------------------------------------------
# Docs files


def _all_docs_files(recipe: Recipe, run: RunDir) -> dict[str, list[DocsFile]]:
    files = {s.name: run.docs_files(s.name) for s in recipe.sources}
    if not any(files.values()):
        raise TokenizeError(f"{run.docs_root()}: no ingested documents; run the ingest stage first")
    return files


def _read_table(url: str, columns: list[str]) -> pa.Table:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _iter_batches(url: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as fh:
        yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_url(recipe: Recipe, run: RunDir) -> str:
    if recipe.tokenizer is None:
        raise TokenizeError("tokenizer: the tokenize stage needs tokenizer.model (or tokenizer.train)")
    return recipe.tokenizer.model or run.trained_tokenizer


def tokenizer_manifest_path(recipe: Recipe) -> str:
    """What manifest.json records: the recipe's model path, or `tokenizer.model` (run-relative)."""
    return recipe.tokenizer.model or RUN_TOKENIZER


def load_processor(model: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with C++ text
        raise FormatError(f"not a SentencePiece model: {e}") from None
    return sp


def tokenizer_info(recipe: Recipe, run: RunDir) -> tuple[TokenizerInfo, np.dtype]:
    """Hash, vocabulary, special ids and token dtype of the recipe's tokenizer (clear errors)."""
    url = tokenizer_url(recipe, run)
    try:
        model = storage.read_bytes(url)
    except FileNotFoundError:
        hint = "" if recipe.tokenizer.train else " (give tokenizer.train to train one from the run's documents)"
        raise TokenizeError(f"tokenizer.model: {url}: no such file{hint}") from None
    try:
        sp = load_processor(model)
    except FormatError as e:
        raise TokenizeError(f"tokenizer.model: {url}: {e}") from None
    info = TokenizerInfo(path=tokenizer_manifest_path(recipe), sha256=hashlib.sha256(model).hexdigest(),
                         vocab_size=int(sp.vocab_size()), bos_id=int(sp.bos_id()), eos_id=int(sp.eos_id()))
    cfg = recipe.tokenize
    if cfg.bos and info.bos_id < 0:
        raise TokenizeError(f"tokenize.bos: the tokenizer {url} has no BOS piece")
    if cfg.eos and info.eos_id < 0:
        raise TokenizeError(f"tokenize.eos: the tokenizer {url} has no EOS piece")
    dtype = dtype_for_vocab(info.vocab_size) if cfg.dtype == "auto" else np.dtype(cfg.dtype)
    try:
        check_vocab_fits(dtype, info.vocab_size, "tokenize.dtype")
    except FormatError as e:
        raise TokenizeError(f"{e} (tokenizer {url})") from None
    return info, dtype


def _needs_training(recipe: Recipe, run: RunDir) -> bool:
    tok = recipe.tokenizer
    if tok is None or tok.train is None:
        return False
    if not storage.exists(tokenizer_url(recipe, run)):
        return True
    # trained by this stage before: keep it current with the documents (skipped when unchanged)
    return storage.exists(run.record(STAGE, "tokenizer"))


# ---------------------------------------------------------------------------------------------
# Training a tokenizer (also `tinyprep train-tokenizer`)


LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
    max_sentencepiece_length=16, max_sentence_length=16384,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    # determinism: every sentence, in input order, one thread
    shuffle_input_sentence=False, input_sentence_size=0, num_threads=1,
)


def _doc_texts(url: str) -> tuple[Iterator[list[str]], int]:
    """Batches of document texts from one input, and an estimate of its text bytes."""
    lower = url.lower()
    if lower.endswith(".parquet"):
        fs, path = storage.url_to_fs(url)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            names = meta.schema.names
            column = "text" if "text" in names else "content" if "content" in names else None
            if column is None:
                raise FormatError(f"{url}: no 'text' or 'content' column")
            i = names.index(column)
            est = sum(meta.row_group(g).column(i).total_uncompressed_size for g in range(meta.num_row_groups))

        def batches() -> Iterator[list[str]]:
            for b in _iter_batches(url, [column], 4096):
                yield [t for t in b.column(0).to_pylist() if t]
        return batches(), est
    size = storage.size(url) or 0
    if lower.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")):
        def jsonl() -> Iterator[list[str]]:
            comp = "zstd" if lower.endswith(".zst") else "gzip" if lower.endswith(".gz") else None
            with storage.fsspec_open(url, "rb", compression=comp) as fh:
                out = []
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        raise FormatError(f"{url}:{n}: not valid JSON") from None
                    text = rec.get("text", rec.get("content")) if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise FormatError(f"{url}:{n}: no string 'text' or 'content' field")
                    out.append(text)
                    if len(out) >= 4096:
                        yield out
                        out = []
                if out:
                    yield out
        return jsonl(), size * (4 if lower.endswith((".gz", ".zst")) else 1)

    def plain() -> Iterator[list[str]]:
        with storage.fsspec_open(url, "rb") as fh:
            try:
                yield [fh.read().decode("utf-8")]
            except UnicodeDecodeError as e:
                raise FormatError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return plain(), size


def training_inputs(inputs: list[str]) -> list[str]:
    """Expand run directories (-> their docs parquet) and globs into a sorted file list."""
    out: list[str] = []
    for inp in inputs:
        run = RunDir(inp)
        fs, path = storage.url_to_fs(run.docs_root())
        if fs.isdir(path):
            found = run.all_docs_files()
            if not found:
                raise FormatError(f"{run.docs_root()}: no docs parquet files (run the ingest stage first)")
            out += [f.url for f in found]
            continue
        try:
            out += [f.url for f in storage.expand_urls([inp])]
        except FileNotFoundError as e:
            raise FormatError(str(e)) from None
    return out


def _sentences(files: list[str], max_bytes: int, seed: int, stats: dict) -> Iterator[str]:
    """Lines of the documents, a deterministic document sample of about max_bytes if larger."""
    sources = [(f, *_doc_texts(f)) for f in files]
    total = sum(est for _, _, est in sources)
    fraction = min(1.0, max_bytes / total) if total else 1.0
    threshold = min(int(fraction * 2.0**64), _MASK64)
    taken = 0
    for file_no, (_, batches, _) in enumerate(sources):
        row = 0
        for texts in batches:
            keys = (np.uint64(file_no) << np.uint64(40)) + np.arange(row, row + len(texts), dtype=np.uint64)
            keep = np.ones(len(texts), dtype=bool) if fraction >= 1 else (
                _mix64(keys ^ np.uint64(seed & _MASK64)) < np.uint64(threshold))
            row += len(texts)
            for text, k in zip(texts, keep):
                if not k:
                    continue
                stats["documents"] += 1
                for line in text.split("\n"):
                    if line.strip():
                        stats["sentences"] += 1
                        taken += len(line)
                        yield line
                if taken >= max_bytes:
                    return


def train_tokenizer(inputs: list[str], out_path: str, vocab_size: int = 32000, max_bytes: int = 1 << 30,
                    seed: int = 0, character_coverage: float = 0.99995) -> dict:
    """Train a SentencePiece BPE model with Llama-2-like settings; write it to out_path atomically.

    inputs: run directories (their RUN/docs parquet), parquet files (a `text` or `content`
    column), JSON lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`; field `text` or `content`) or plain
    text files; globs are expanded. Each non-blank line of a document is one training sentence.
    Settings as Llama-2's tokenizer: BPE, byte fallback, digits split, identity normalization,
    dummy prefix, whitespace kept, <unk>=0 <s>=1 </s>=2, no pad. Deterministic: inputs in sorted
    order, a document sample by hash when they hold more than max_bytes, no shuffling, one thread,
    fixed seed: the same inputs give the same model bytes. Returns {path, sha256, vocab_size,
    documents, sentences}.
    """
    import sentencepiece as spm

    files = training_inputs(inputs)
    if not files:
        raise FormatError("train-tokenizer: no input files")
    stats = {"documents": 0, "sentences": 0}
    model = io.BytesIO()
    spm.set_random_generator_seed(seed + 1)  # 0 would mean "random"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(files, max_bytes, seed, stats), model_writer=model,
            vocab_size=vocab_size, character_coverage=character_coverage, minloglevel=2,
            **LLAMA2_TRAINER_SETTINGS)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if "Vocabulary size is too high" in msg or "vocab_size" in msg.lower():
            raise FormatError(f"train-tokenizer: vocab_size {vocab_size} is too large for "
                              f"{stats['sentences']} sentences of input ({msg})") from None
        raise FormatError(f"train-tokenizer: SentencePiece failed: {msg}") from None
    data = model.getvalue()
    if not stats["sentences"]:
        raise FormatError("train-tokenizer: the inputs hold no text")
    storage.write_bytes(out_path, data)
    return {"path": out_path, "sha256": hashlib.sha256(data).hexdigest(), "vocab_size": vocab_size, **stats}


def _train_config_inputs(cfg: TokenizerTrainConfig) -> dict:
    return {"vocab_size": cfg.vocab_size, "max_bytes": cfg.max_mb << 20, "seed": cfg.seed,
            "character_coverage": cfg.character_coverage}


# ---------------------------------------------------------------------------------------------
# Phases and plans


def _holdout_settings(recipe: Recipe) -> dict:
    c = recipe.tokenize
    return {"fraction": c.holdout_fraction, "seed": c.holdout_seed}


def _holdout_url(run: RunDir, f: DocsFile) -> str:
    return run.tokenize("holdout", f.source, f.rel)


def _holdout_fingerprints(recipe: Recipe, run: RunDir, files: dict[str, list[DocsFile]]) -> dict[str, str]:
    settings = _holdout_settings(recipe)
    removals = _removal_versions(run, files)
    return {f"holdout/{f.source}/{f.rel}": fingerprint(STAGE, "holdout", f.version, settings,
                                                       removals[f"{f.source}/{f.rel}"])
            for fs in files.values() for f in fs}


def _group_fingerprint(recipe: Recipe, holdout_fps: dict[str, str], itemsize: int, tokenizer: str) -> str:
    return fingerprint(STAGE, "group", sorted(holdout_fps.items()), recipe.tokenize.shard_mb, itemsize,
                       recipe.tokenize.dedup_holdout, tokenizer)


def _size_of(version: str) -> int:
    head = version.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def _encode_tasks(recipe: Recipe, run: RunDir, files: dict[str, list[DocsFile]], holdout_fps: dict[str, str],
                  info: TokenizerInfo, dtype: np.dtype) -> list[Task]:
    groups = storage.read_json(run.tokenize(GROUPS))
    group_fp = _group_fingerprint(recipe, holdout_fps, dtype.itemsize, info.sha256)
    if not groups or groups.get("fingerprint") != group_fp:
        raise TokenizeError(f"{run.tokenize(GROUPS)}: missing or stale (the group phase did not run)")
    cfg = recipe.tokenize
    by_rel = {(f.source, f.rel): f for fs in files.values() for f in fs}
    settings = {"bos": cfg.bos, "eos": cfg.eos, "dtype": dtype.name, "shard_mb": cfg.shard_mb,
                "tokenizer": info.sha256, "holdout": _holdout_settings(recipe), "dedup_holdout": cfg.dedup_holdout}
    out = []
    for split in ("train", "validation"):
        for source in sorted(groups[split]):
            for g, group in enumerate(groups[split][source]):
                members = [by_rel[(source, rel)] for rel, _ in group]
                task_id = f"{split}/{source}/{g:06d}"
                fp = fingerprint(STAGE, "encode", split, [holdout_fps[f"holdout/{source}/{f.rel}"] for f in members],
                                 settings, group_fp if split == "train" else None)
                out.append(Task(STAGE, task_id, source, fp, size=sum(b for _, b in group), payload={
                    "split": split, "group": g, "dtype": dtype.name, "tokenizer_sha256": info.sha256,
                    "files": [{"rel": f.rel, "url": f.url, "holdout": _holdout_url(run, f)} for f in members],
                    "parts": run.tokenize("parts", split, source, f"{g:06d}.json"),
                }))
    return out


# ---------------------------------------------------------------------------------------------
# Tasks


def _run_holdout(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    p = task.payload
    table = _read_table(p["docs"], ["id", "text"])
    read = table.num_rows
    ids = table.column("id").to_numpy()
    removed = removed_ids(run, task.source, p["rel"])
    alive = ~np.isin(ids, removed) if len(removed) else np.ones(read, dtype=bool)
    held = alive & holdout_mask(ids, recipe.tokenize.holdout_fraction, recipe.tokenize.holdout_seed)
    train = alive & ~held
    text_bytes = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
    val = table.filter(pa.array(held))
    texts = val.column("text").to_pylist()
    out = pa.table({"id": val.column("id"), "text": val.column("text").cast(pa.large_string()),
                    "sha256": pa.array(list(_sha256_texts(texts)), type=pa.binary(32))},
                   schema=HOLDOUT_SCHEMA)
    out = out.replace_schema_metadata({
        "tinyprep.train_text_bytes": str(int(text_bytes[train].sum())),
        "tinyprep.validation_text_bytes": str(int(text_bytes[held].sum())),
    })
    with storage.atomic_open(p["out"]) as fh:
        pq.write_table(out, fh, compression="zstd")
    stats = {"sources": {task.source: {"read": read, "removed": {"dedup": int(read - alive.sum())}}}}
    return TaskResult(outputs=[p["out"]], stats=stats, docs=read, bytes=int(text_bytes.sum()))


def _load_checked(recipe: Recipe, run: RunDir, sha256: str):
    model = storage.read_bytes(tokenizer_url(recipe, run))
    if hashlib.sha256(model).hexdigest() != sha256:
        raise TokenizeError(f"{tokenizer_url(recipe, run)}: the tokenizer changed while the stage ran")
    return load_processor(model)


def _bytes_per_token(sp, urls: list[str], recipe: Recipe) -> float:
    """UTF-8 bytes per token of the source's first documents (ESTIMATE_SAMPLE_BYTES of text)."""
    texts: list[str] = []
    nbytes = 0
    for url in urls:
        for b in _iter_batches(url, ["text"], 256):
            for t in b.column(0).to_pylist():
                texts.append(t)
                nbytes += len(t.encode("utf-8"))
                if nbytes >= ESTIMATE_SAMPLE_BYTES:
                    break
            if nbytes >= ESTIMATE_SAMPLE_BYTES:
                break
        if nbytes >= ESTIMATE_SAMPLE_BYTES:
            break
    tokens = sum(map(len, sp.encode(texts, add_bos=recipe.tokenize.bos, add_eos=recipe.tokenize.eos,
                                    num_threads=recipe.tokenize.cpus_per_task))) if texts else 0
    return round(nbytes / tokens, 6) if tokens else 4.0


def _cut_groups(items: list[tuple[str, int]], target: float) -> list[list[tuple[str, int]]]:
    """Consecutive items, a group closing once its bytes reach target (every group non-empty)."""
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    acc = 0
    for rel, nbytes in items:
        current.append((rel, nbytes))
        acc += nbytes
        if acc >= target:
            groups.append(current)
            current, acc = [], 0
    if current:
        groups.append(current)
    return groups


def _run_group(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    inputs = task.payload["inputs"]

    def read(inp: dict) -> tuple[np.ndarray, int, int]:
        fs, path = storage.url_to_fs(inp["holdout"])
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=["sha256"])
        meta = t.schema.metadata or {}
        digests = np.array(t.column("sha256").to_pylist(), dtype="S32") if t.num_rows else np.zeros(0, "S32")
        return (digests, int(meta[b"tinyprep.train_text_bytes"]), int(meta[b"tinyprep.validation_text_bytes"]))

    with ThreadPoolExecutor(16) as pool:  # many small reads: overlap their latency
        results = list(pool.map(read, inputs))
    digests = np.unique(np.concatenate([r[0] for r in results])) if results else np.zeros(0, "S32")
    sp = _load_checked(recipe, run, task.payload["tokenizer_sha256"])
    target_tokens = GROUP_FILL * recipe.tokenize.shard_mb * (1 << 20) / task.payload["itemsize"]
    first_files: dict[str, list[str]] = {}
    for inp in inputs:
        first_files.setdefault(inp["source"], []).append(inp["url"])
    per_token = {s: _bytes_per_token(sp, urls, recipe) for s, urls in sorted(first_files.items())}
    train: dict[str, list] = {}
    validation: dict[str, list] = {}
    for inp, (_, tb, vb) in zip(inputs, results):
        train.setdefault(inp["source"], []).append((inp["rel"], tb))
        if vb:
            validation.setdefault(inp["source"], []).append((inp["rel"], vb))
    groups = {
        "fingerprint": task.fingerprint,
        "text_bytes_per_token": per_token,
        "train": {s: _cut_groups(items, target_tokens * per_token[s]) for s, items in sorted(train.items())},
        "validation": {s: _cut_groups(items, target_tokens * per_token[s]) for s, items in sorted(validation.items())},
    }
    index_url = run.tokenize(HOLDOUT_INDEX)
    storage.write_bytes(index_url, digests.tobytes())
    groups_url = run.tokenize(GROUPS)
    storage.write_json(groups_url, groups)
    return TaskResult(outputs=[index_url, groups_url], stats={"holdout_texts": int(len(digests))})


class _ShardSink:
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

    With an `Encoder` (pipeline/encoder.py: exact, with a per-worker segment cache) the ids are
    the same as SentencePiece's, faster; without one, plain batched SentencePiece.
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


def _encoder(recipe: Recipe, sp, sha256: str) -> Encoder | None:
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


def _load_index(run: RunDir) -> np.ndarray:
    url = run.tokenize(HOLDOUT_INDEX)
    raw = storage.read_bytes(url)
    if len(raw) % 32:
        raise FormatError(f"{url}: size {len(raw)} is not a multiple of 32")
    return np.frombuffer(raw, dtype="S32")


def _run_encode(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    p = task.payload
    cfg = recipe.tokenize
    split = p["split"]
    dtype = np.dtype(p["dtype"])
    sp = _load_checked(recipe, run, p["tokenizer_sha256"])
    encoder = _encoder(recipe, sp, p["tokenizer_sha256"])
    index = _load_index(run) if split == "train" and cfg.dedup_holdout else np.zeros(0, "S32")
    sink = _ShardSink(run, task.source, split, p["group"], dtype, cfg.shard_mb * (1 << 20))
    docs = tokens = dup = 0
    try:
        for texts in _group_texts(p["files"], split, task.source, recipe, run):
            if len(index):
                hit = _member(index, _sha256_texts(texts))
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
            for b in _iter_batches(f["holdout"], ["text"], cfg.batch_docs):
                yield b.column(0).to_pylist()
            continue
        removed = removed_ids(run, source, f["rel"])
        for b in _iter_batches(f["url"], ["id", "text"], cfg.batch_docs):
            ids = b.column(0).to_numpy()
            keep = ~holdout_mask(ids, cfg.holdout_fraction, cfg.holdout_seed)
            if len(removed):
                keep &= ~np.isin(ids, removed)
            col = b.column(1)
            yield (col if keep.all() else col.filter(pa.array(keep))).to_pylist()


# ---------------------------------------------------------------------------------------------
# finish: the manifest


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


class TokenizeStage(Stage):
    name = STAGE

    def phases(self, recipe: Recipe, run: RunDir) -> Iterator[str]:
        if _needs_training(recipe, run):
            yield "tokenizer"
        yield from ("holdout", "group", "encode")

    def cpus_per_task(self, recipe: Recipe) -> int:
        return recipe.tokenize.cpus_per_task

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None) -> list[Task]:
        files = _all_docs_files(recipe, run)
        if phase == "tokenizer":
            cfg = recipe.tokenizer.train
            versions = [(f.source, f.rel, f.version) for fs in files.values() for f in fs]
            url = tokenizer_url(recipe, run)
            return [Task(STAGE, "tokenizer", "", fingerprint(STAGE, "tokenizer", versions, _train_config_inputs(cfg), url),
                         payload={"out": url, "train": _train_config_inputs(cfg),
                                  "inputs": [f.url for fs in files.values() for f in fs]})]
        info, dtype = tokenizer_info(recipe, run)  # a missing or unusable tokenizer fails before any work
        fps = _holdout_fingerprints(recipe, run, files)
        if phase == "holdout":
            return [Task(STAGE, f"holdout/{f.source}/{f.rel}", f.source, fps[f"holdout/{f.source}/{f.rel}"],
                         size=_size_of(f.version),
                         payload={"docs": f.url, "rel": f.rel, "out": _holdout_url(run, f)})
                    for fs in files.values() for f in fs]
        if phase == "group":
            inputs = [{"source": f.source, "rel": f.rel, "url": f.url, "holdout": _holdout_url(run, f)}
                      for fs in files.values() for f in fs]
            return [Task(STAGE, "group", "", _group_fingerprint(recipe, fps, dtype.itemsize, info.sha256),
                         payload={"inputs": inputs, "itemsize": dtype.itemsize, "tokenizer_sha256": info.sha256})]
        if phase == "encode":
            return _encode_tasks(recipe, run, files, fps, info, dtype)
        raise ValueError(f"unknown tokenize phase {phase!r}")

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        if task.id == "tokenizer":
            p = task.payload
            info = train_tokenizer(p["inputs"], p["out"], **{k: v for k, v in p["train"].items()})
            return TaskResult(outputs=[p["out"]], stats={"tokenizer": {"trained_documents": info["documents"],
                                                                        "trained_sentences": info["sentences"]}})
        if task.id.startswith("holdout/"):
            return _run_holdout(task, recipe, run)
        if task.id == "group":
            return _run_group(task, recipe, run)
        return _run_encode(task, recipe, run)

    def finish(self, recipe: Recipe, run: RunDir, records: list[dict]) -> None:
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


stage = TokenizeStage()
