"""The run's tokenizer, in one place: which model file, loading it, training it, checking it.

- Which file: `tokenizer_url` (the recipe's `tokenizer.model`, else the one the tokenize stage
  trains at `RunDir.trained_tokenizer`), `tokenizer_manifest_path` (what manifest.json records),
  `manifest_tokenizer_url` (that record, resolved against the run) and `recipe_tokenizer_url`
  (what the run's resolved recipe, RUN/recipe.yaml, names).
- Loading: `load_processor` (a SentencePiece processor from model bytes), `load_checked` (the
  recipe's model, unchanged since the stage was planned, as tasks read it: from the run's copy).
- Shipping: `copy_tokenizer_asset` (the driver copies the recipe's model into the run, at
  `RunDir.assets(ASSET_TOKENIZER)`, so that a task on a node without the driver's filesystem
  reads it from the run's storage; a model the stage trains is in the run already).
- Checking: `tokenizer_info` (hash, vocabulary, BOS/EOS the recipe asks for, a token dtype the
  vocabulary fits), `preflight_tokenizer` (the same, in seconds, before any stage runs: for
  `tinyprep validate` and the start of `tinyprep run`) and `check_manifest_tokenizer` (the
  model manifest.json was tokenized with: used by mix, `tinyprep verify` and `tinyprep inspect`).
- Training: `train_tokenizer` (SentencePiece BPE with Llama-2's settings, deterministic), used by
  the tokenize stage's `tokenizer` phase and `tinyprep train-tokenizer`.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from typing import Iterator

import numpy as np
import orjson
import pyarrow.parquet as pq
import yaml

from .. import storage
from ..formats import FormatError
from ..formats.manifest import Manifest, TokenizerInfo
from ..formats.megatron import check_vocab_fits, dtype_for_vocab
from ..hashing import MASK64, splitmix64
from ..layout import RUN_TOKENIZER, RunDir, as_run
from ..recipe import Recipe, TokenizerTrainConfig
from .docs import iter_batches
from .errors import TokenizeError

# ---------------------------------------------------------------------------------------------
# Which model file


def tokenizer_url(recipe: Recipe, run: RunDir) -> str:
    """The recipe's tokenizer model: `tokenizer.model`, else the one trained into the run."""
    if recipe.tokenizer is None:
        raise TokenizeError("tokenizer: the tokenize stage needs tokenizer.model (or tokenizer.train)")
    return recipe.tokenizer.model or run.trained_tokenizer


def tokenizer_manifest_path(recipe: Recipe) -> str:
    """What manifest.json records: the recipe's model path, or `tokenizer.model` (run-relative)."""
    return recipe.tokenizer.model or RUN_TOKENIZER


def manifest_tokenizer_url(run: RunDir | str, manifest: Manifest) -> str:
    """The tokenizer manifest.json records, as a URL (a run-relative path is under the run)."""
    path = manifest.tokenizer.path
    return path if "://" in path or posixpath.isabs(path) else as_run(run).relative(path)


def recipe_tokenizer_url(run: RunDir | str) -> str | None:
    """The tokenizer model the run's resolved recipe (RUN/recipe.yaml) names, None if it names none."""
    run = as_run(run)
    try:
        data = yaml.safe_load(storage.read_bytes(run.recipe))
    except (FileNotFoundError, yaml.YAMLError):
        return None
    tok = (data or {}).get("tokenizer") if isinstance(data, dict) else None
    if not isinstance(tok, dict):
        return None
    if tok.get("model"):
        return str(tok["model"])
    return run.trained_tokenizer if tok.get("train") else None


# ---------------------------------------------------------------------------------------------
# Loading and checking


MAX_MODEL_BYTES = 2 << 30  # protobuf refuses messages past 2 GiB: no SentencePiece model is larger
_NO_TRAIN_HINT = " (give tokenizer.train to train one from the run's documents)"


def load_processor(model: bytes):
    """A SentencePieceProcessor of the model's bytes (FormatError if they are not a model)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError with C++ text
        text = " ".join(str(e).split())
        if "ParseFromArray" in text:  # the C++ source line says nothing to a user
            text = "the bytes do not parse as a SentencePiece ModelProto"
        raise FormatError(f"not a SentencePiece model: {text}") from None
    return sp


def read_model(url: str, hint: str = "") -> bytes:
    """The bytes of the tokenizer model file at url, or a one-line TokenizeError naming it.

    Only a regular file is read (a directory, a device or a FIFO is refused before opening it:
    /dev/zero would never end), and none larger than any SentencePiece model can be.
    """
    fs, path = storage.url_to_fs(url)
    try:
        if fs.isdir(path):
            raise TokenizeError(f"tokenizer.model: {url}: is a directory, not a tokenizer.model file")
        if not fs.exists(path):
            raise FileNotFoundError(path)
        if not fs.isfile(path):
            raise TokenizeError(f"tokenizer.model: {url}: not a regular file")
        if int(fs.size(path) or 0) > MAX_MODEL_BYTES:
            raise TokenizeError(f"tokenizer.model: {url}: larger than {MAX_MODEL_BYTES >> 30} GiB: "
                                f"not a SentencePiece model")
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise TokenizeError(f"tokenizer.model: {url}: no such file{hint}") from None
    except PermissionError as e:
        raise TokenizeError(f"tokenizer.model: {url}: cannot be read ({e.strerror or 'permission denied'})") from None


def tokenizer_info(recipe: Recipe, run: RunDir) -> tuple[TokenizerInfo, np.dtype]:
    """Hash, vocabulary, special ids and token dtype of the recipe's tokenizer (clear errors)."""
    url = tokenizer_url(recipe, run)
    model = read_model(url, "" if recipe.tokenizer.train else _NO_TRAIN_HINT)
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


def preflight_tokenizer(recipe: Recipe, stages: list[str] | None = None) -> str | None:
    """None when the recipe's tokenizer can serve its tokenize and mix stages, else one line why.

    Seconds, before any stage runs, instead of a failure after download, ingest and dedup: the
    model file exists, is a regular file holding a SentencePiece model, has the BOS/EOS pieces
    `tokenize.bos`/`eos` ask for and a vocabulary `tokenize.dtype` holds (`tokenizer_info`, what
    the stage itself checks); or, with no file, `tokenizer.train` is set and tokenize runs (it
    trains one) with a vocabulary the dtype holds. Messages name `tokenizer.model` (or the key
    at fault) and the path. `stages`: those about to run (default: the recipe's); without
    tokenize or mix no tokenizer is needed and nothing is read.
    """
    wanted = set(stages or recipe.stages)
    if not wanted & {"tokenize", "mix"}:
        return None
    if recipe.tokenizer is None:
        return "tokenizer: the tokenize and mix stages need tokenizer.model (or tokenizer.train)"
    run = RunDir(recipe.output)
    url = tokenizer_url(recipe, run)
    train = recipe.tokenizer.train
    try:
        if not storage.exists(url):
            if train is None:
                return f"tokenizer.model: {url}: no such file{_NO_TRAIN_HINT}"
            if "tokenize" not in wanted:
                return f"tokenizer.model: {url}: no such file (the tokenize stage trains it: run it first)"
            return _trained_fits(recipe)
        tokenizer_info(recipe, run)
    except TokenizeError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - fsspec backends fail in their own ways: one line, never a traceback
        text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        return f"tokenizer.model: {url}: cannot be read ({type(e).__name__}{': ' + text if text else ''})"
    return None


def _trained_fits(recipe: Recipe) -> str | None:
    """Whether the tokenizer tokenize will train fits tokenize.dtype (it always has BOS and EOS:
    LLAMA2_TRAINER_SETTINGS gives <s> id 1 and </s> id 2)."""
    vocab = recipe.tokenizer.train.vocab_size
    if recipe.tokenize.dtype == "auto":
        return None
    try:
        check_vocab_fits(np.dtype(recipe.tokenize.dtype), vocab, "tokenize.dtype")
    except FormatError as e:
        return f"{e} (tokenizer.train.vocab_size {vocab})"
    return None


ASSET_TOKENIZER = "tokenizer.model"  # the recipe's model, copied into RUN/assets/ for the workers


def copy_tokenizer_asset(recipe: Recipe, run: RunDir, stages: list[str] | None = None) -> str | None:
    """Copy the recipe's `tokenizer.model` into the run (RUN/assets/tokenizer.model) for the tasks;
    the copy's URL, or None when there is nothing to copy (no tokenize or mix stage, no model
    path, a model the stage trains, or no file yet). The driver calls it at the start of a run:
    workers on other nodes need not see the driver's path. The copy is rewritten only when its
    bytes differ, so a rerun with the same model writes nothing."""
    wanted = set(stages or recipe.stages)
    tok = recipe.tokenizer
    if not wanted & {"tokenize", "mix"} or tok is None or not tok.model or not storage.exists(tok.model):
        return None
    model = read_model(tok.model)
    dest = run.assets(ASSET_TOKENIZER)
    try:
        same = storage.read_bytes(dest) == model
    except FileNotFoundError:
        same = False
    if not same:
        storage.write_bytes(dest, model)
    return dest


def _task_model(recipe: Recipe, run: RunDir, sha256: str) -> bytes:
    """The model bytes a task uses: the run's copy of the recipe's model when it is the planned one,
    else the recipe's path (a stage run without `run_recipe`, which makes no copy), else the run's
    trained model."""
    if recipe.tokenizer is not None and recipe.tokenizer.model:
        try:
            model = storage.read_bytes(run.assets(ASSET_TOKENIZER))
            if hashlib.sha256(model).hexdigest() == sha256:
                return model
        except FileNotFoundError:
            pass
    url = tokenizer_url(recipe, run)
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise TokenizeError(f"tokenizer.model: {url}: no such file on this node, and no copy at "
                            f"{run.assets(ASSET_TOKENIZER)} (the run copies it there when it starts)") from None


def load_checked(recipe: Recipe, run: RunDir, sha256: str):
    """The recipe's tokenizer, loaded, if its bytes still hash to sha256 (that of the plan)."""
    model = _task_model(recipe, run, sha256)
    if hashlib.sha256(model).hexdigest() != sha256:
        raise TokenizeError(f"{tokenizer_url(recipe, run)}: the tokenizer changed while the stage ran")
    return load_processor(model)


class TokenizerMismatch(Exception):
    """A tokenizer file is missing, or is not the model manifest.json was tokenized with."""


def check_manifest_tokenizer(url: str, run: RunDir | str, manifest: Manifest, role: str = "tokenizer",
                             hint: str = "") -> bytes:
    """The model bytes at url, if they are those the run's manifest.json was tokenized with.

    Else TokenizerMismatch, whose message names the file, the manifest, the tokenizer it records
    and both hashes; `role` says whose tokenizer url is ("recipe's tokenizer"), `hint` what to do.
    """
    expected = manifest.tokenizer
    manifest_url = as_run(run).manifest
    try:
        model = storage.read_bytes(url)
    except FileNotFoundError:
        raise TokenizerMismatch(f"{url}: no such file ({manifest_url} was tokenized with {expected.path}, "
                                f"sha256 {expected.sha256[:12]}){hint}") from None
    digest = hashlib.sha256(model).hexdigest()
    if digest != expected.sha256:
        raise TokenizerMismatch(f"{manifest_url}: tokenized with {expected.path} (sha256 {expected.sha256[:12]}), "
                                f"but the {role} {url} has sha256 {digest[:12]}{hint}")
    return model


def run_tokenizer(run: RunDir | str, manifest: Manifest, path: str | None = None, hint: str = "") -> tuple[bytes, str]:
    """(model bytes, where they were read) of the tokenizer manifest.json was tokenized with, for
    the tools that read a run (inspect, export-model): `path` if given, else the path the manifest
    records (the driver's: it may not exist on this machine), else the run's own copy in
    RUN/assets/. Whichever is read must hash to the manifest's sha256; else TokenizerMismatch (a
    file of other bytes says more than a missing one)."""
    if path is not None:
        candidates = [path]
    else:
        candidates = [manifest_tokenizer_url(run, manifest), as_run(run).assets(ASSET_TOKENIZER)]
    errors = []
    for url in candidates:
        try:
            return check_manifest_tokenizer(url, run, manifest, hint=hint), url
        except TokenizerMismatch as e:
            errors.append((not storage.exists(url), e))
    raise min(errors, key=lambda item: item[0])[1]


# ---------------------------------------------------------------------------------------------
# Training (the stage's `tokenizer` phase and `tinyprep train-tokenizer`)


LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
    max_sentencepiece_length=16, max_sentence_length=16384,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    # determinism: every sentence, in input order, one thread
    shuffle_input_sentence=False, input_sentence_size=0, num_threads=1,
)


def train_config_inputs(cfg: TokenizerTrainConfig) -> dict:
    """`train_tokenizer`'s keyword arguments for the recipe's `tokenizer.train`."""
    return {"vocab_size": cfg.vocab_size, "max_bytes": cfg.max_mb << 20, "seed": cfg.seed,
            "character_coverage": cfg.character_coverage}


def _parquet_texts(url: str) -> tuple[Iterator[list[str]], int]:
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
        for b in iter_batches(url, [column], 4096):
            yield [t for t in b.column(0).to_pylist() if t]
    return batches(), est


def _jsonl_texts(url: str) -> Iterator[list[str]]:
    lower = url.lower()
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


def _plain_text(url: str) -> Iterator[list[str]]:
    with storage.fsspec_open(url, "rb") as fh:
        try:
            yield [fh.read().decode("utf-8")]
        except UnicodeDecodeError as e:
            raise FormatError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _doc_texts(url: str) -> tuple[Iterator[list[str]], int]:
    """Batches of document texts from one input, and an estimate of its text bytes."""
    lower = url.lower()
    if lower.endswith(".parquet"):
        return _parquet_texts(url)
    size = storage.size(url) or 0
    if lower.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")):
        return _jsonl_texts(url), size * (4 if lower.endswith((".gz", ".zst")) else 1)
    return _plain_text(url), size


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
    threshold = min(int(fraction * 2.0**64), MASK64)
    taken = 0
    for file_no, (_, batches, _) in enumerate(sources):
        row = 0
        for texts in batches:
            keys = (np.uint64(file_no) << np.uint64(40)) + np.arange(row, row + len(texts), dtype=np.uint64)
            keep = np.ones(len(texts), dtype=bool) if fraction >= 1 else (
                splitmix64(keys ^ np.uint64(seed & MASK64)) < np.uint64(threshold))
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
