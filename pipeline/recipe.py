"""The typed recipe: load a YAML file once, validate it, and pass the result down.

Errors never surface as tracebacks: `RecipeError` is one line naming the file and the key path
(`recipes/x.yaml: sources[1].weight: must be > 0`), and the line for what YAML itself refuses.

A recipe is untrusted input. Its YAML may hold only plain values (mappings with string keys,
lists, strings, 64-bit integers, finite numbers, booleans, null): tags (`!!set`,
`!!python/...`, `!!binary`), duplicate keys, non-string keys, NaN/infinity and alias bombs are
refused. Paths meant to be inside the run (`train.dir`) must stay there, and `filters[].class`
may only name a datatrove filter class (`filter_class`), so a recipe cannot run arbitrary code.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .layout import RUN_ENTRIES, RunDirError, contained
from .plainyaml import PlainYamlError, fmt_loc, load_plain_yaml, plain_copy
from .stage import STAGES


class RecipeError(Exception):
    """A recipe that cannot be used; the message names the file and the key path."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(_Model):
    address: str | None = Field(
        None, description="Ray cluster address; null = RAY_ADDRESS if set, else an embedded local Ray"
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the embedded local Ray (default: all)")
    task_retries: int = Field(3, ge=0, description="retries of a task that raised or whose worker died")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    retry_backoff_max_s: float = Field(60.0, ge=0)
    log_every_s: float = Field(10.0, gt=0, description="progress log period when stdout is not a terminal")


class DownloadConfig(_Model):
    retries: int = Field(5, ge=0, description="reconnects per file inside one task (resuming where it stopped)")
    block_mb: int = Field(8, gt=0, description="read size per request")
    verify_checksum: bool = True


class IngestConfig(_Model):
    max_errors: int | None = Field(
        0, ge=0, description="unreadable records/files tolerated per run before the stage fails (null: any)"
    )
    max_document_bytes: int = Field(
        16 << 20, gt=0, description="larger documents are dropped (filtered: too_large) and reported"
    )
    parquet_compression: Literal["zstd", "lz4_raw", "snappy", "none"] = Field(
        "zstd", description="codec of the documents parquet (the encoding only: the documents and shards are the same)"
    )
    parquet_compression_level: int | None = Field(
        None, ge=-131072, le=22, description="zstd level (negative: faster, larger); null: Arrow's default, 1"
    )
    rows_per_group: int = Field(4096, gt=0, description="documents per row group of the output parquet")
    split_row_groups: int = Field(
        0, ge=0, description="split a parquet input into tasks of this many row groups (0: one task per file)"
    )
    report_issues: int = Field(50, ge=0, description="bad records listed per task (all are counted)")
    on_unknown_key: Literal["error", "warn"] = Field(
        "error", description="a select.include/exclude or subset key found in no record of an input: "
                             "fail the stage (error) or log it (warn)")

    @model_validator(mode="after")
    def _level_is_zstd(self) -> "IngestConfig":
        if self.parquet_compression_level is not None and self.parquet_compression != "zstd":
            raise ValueError(f"parquet_compression_level is a zstd level; parquet_compression is "
                             f"{self.parquet_compression!r}")
        return self


FILTER_ALLOW_ENV = "TINYPREP_FILTER_ALLOW"


def _env_allows(path: str) -> bool:
    """Whether TINYPREP_FILTER_ALLOW (comma-separated globs of dotted paths) lists path."""
    patterns = [p.strip() for p in os.environ.get(FILTER_ALLOW_ENV, "").split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def filter_class(path: str) -> type:
    """The filter class `filters[].class` names, or ValueError; nothing it names is called.

    Allowed: a concrete subclass of datatrove's BaseFilter that is defined under `datatrove.`, or
    one whose dotted path TINYPREP_FILTER_ALLOW lists (`mypkg.filters.*`). The environment, not
    the recipe, extends the list: a recipe alone can only reach datatrove's own filters. The
    path is checked before anything is imported, since importing a module runs its code.
    """
    trusted = path.startswith("datatrove.")
    if not trusted and not _env_allows(path):
        raise ValueError(f"{path!r} is not a datatrove filter class (datatrove.pipeline.filters.*); "
                         f"other classes only when {FILTER_ALLOW_ENV} lists them")
    try:
        from datatrove.pipeline.filters.base_filter import BaseFilter
    except ImportError as e:
        raise ValueError(f"{path!r}: filters need datatrove ({e})") from None
    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - a module's import can fail with anything; report it as one line
        text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{path!r} cannot be imported: {text}") from None
    if not (isinstance(obj, type) and issubclass(obj, BaseFilter)):
        raise ValueError(f"{path!r} is not a datatrove filter class (a subclass of BaseFilter)")
    if inspect.isabstract(obj):
        raise ValueError(f"{path!r} is abstract: name a concrete filter")
    if trusted and not obj.__module__.startswith("datatrove.") and not _env_allows(path):
        raise ValueError(f"{path!r} is defined in {obj.__module__}, not in datatrove; "
                         f"list it in {FILTER_ALLOW_ENV} to allow it")
    return obj


class FilterSpec(_Model):
    """A datatrove filter block: import path and constructor arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    class_: str = Field(alias="class", pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_")
    @classmethod
    def _a_filter_class(cls, v: str) -> str:
        filter_class(v)
        return v

    @field_validator("args")
    @classmethod
    def _args_fit(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        path = info.data.get("class_")
        if path is None:  # the class was refused; its error says why
            return v
        klass = filter_class(path)
        try:
            sig = inspect.signature(klass)
        except (TypeError, ValueError):  # no signature to check against: the filter checks its arguments
            return v
        try:
            sig.bind(**v)
        except TypeError as e:
            raise ValueError(f"{klass.__name__}: {e}") from None
        return v


class SelectConfig(_Model):
    include: dict[str, list[str]] = Field(
        default_factory=dict, description="keep only records whose field (dotted path) equals one of the values"
    )
    exclude: dict[str, list[str]] = Field(
        default_factory=dict, description="drop records whose field equals one of the values"
    )
    dirs: list[str] | None = Field(
        None, description="exact first-level directory names under the source root (Starcoder languages)"
    )


class SourceConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    urls: list[str] = Field(default_factory=list, description="fsspec URLs or globs")
    url_list: str | None = Field(None, description="a text file (any fsspec URL) listing input URLs, one a line")
    url_list_match: str | None = Field(None, description="keep only listed URLs matching this glob")
    format: Literal["auto", "jsonl", "jsonl.zst", "jsonl.gz", "parquet"] = "auto"
    download: bool = Field(False, description="copy into RUN/raw first (else read in place)")
    text_field: str = "text"
    metadata: list[str] = Field(default_factory=list, description="fields (dotted paths) to keep")
    subset: str | None = Field(
        None, description="what stats are grouped by: a field path, or 'dir' (first directory level)"
    )
    select: SelectConfig = SelectConfig()
    normalize: Literal["nfc", "none"] = "nfc"
    min_chars: int | None = Field(
        200, ge=0, description="SlimPajama's short-document filter on normalized text; null disables"
    )
    filters: list[FilterSpec] = Field(default_factory=list)
    weight: float | None = Field(None, gt=0, description="mixture weight (recorded for the mix stage)")
    size_gb: float | None = Field(
        None, gt=0, description="expected input size in GB; `tinyprep plan` uses it when the inputs cannot be listed")

    @field_validator("urls")
    @classmethod
    def _urls_not_empty(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.strip():
                raise ValueError("must not contain an empty URL")
        return v

    @field_validator("url_list")
    @classmethod
    def _url_list_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (null: no list)")
        return v

    @model_validator(mode="after")
    def _has_inputs(self) -> "SourceConfig":
        if not self.urls and not self.url_list:
            raise ValueError("needs urls or url_list")
        return self


class TokenizerTrainConfig(_Model):
    """Train a SentencePiece BPE tokenizer (Llama-2-like settings) from the run's own documents."""

    vocab_size: int = Field(32000, ge=300, description="pieces, including 256 byte-fallback pieces and <unk> <s> </s>")
    max_mb: int = Field(1024, gt=0, description="MB of text sampled (by document hash) for training")
    seed: int = Field(0, description="seed of the document sample and of SentencePiece")
    character_coverage: float = Field(0.99995, gt=0, le=1, description="characters covered by pieces (Llama-2: 0.99995)")


class TokenizerRef(_Model):
    model: str | None = Field(
        None, description="SentencePiece tokenizer.model (Llama-2's, or one from train-tokenizer); "
                          "null with `train`: RUN/tokenizer.model")
    train: TokenizerTrainConfig | None = Field(
        None, description="when the model file does not exist, the tokenize stage trains it from the run's documents")

    @field_validator("model")
    @classmethod
    def _absolute_model(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty (null with `train`: train one into the run)")
        # the tokenize tasks may run in another working directory (Ray workers)
        if v is None or "://" in v or os.path.isabs(v):
            return v
        return str(Path(v).expanduser().resolve())

    @model_validator(mode="after")
    def _model_or_train(self) -> "TokenizerRef":
        if self.model is None and self.train is None:
            raise ValueError("needs model (a tokenizer.model file) or train (settings to train one)")
        return self


class DedupConfig(_Model):
    """Global exact and fuzzy (MinHash LSH) deduplication across all sources."""

    exact: bool = Field(True, description="drop exact duplicates of the normalized text")
    fuzzy: bool = Field(True, description="drop near duplicates (MinHash LSH + connected components)")
    priority: list[str] = Field(
        default_factory=list, description="source names, most preferred first: the survivor of a cluster"
    )
    shingle: Literal["chars", "words"] = Field("chars", description="character or word n-gram shingles")
    shingle_size: int = Field(13, gt=0, description="SlimPajama: 13 characters; datatrove: 5 words")
    normalize: Literal["slimpajama", "none"] = Field(
        "slimpajama", description="lowercase, strip punctuation, collapse whitespace before shingling"
    )
    permutations: int = Field(128, gt=0)
    bands: int | Literal["auto"] = Field(
        "auto", description="LSH bands; auto: chosen with rows so that 98% of the pairs at the threshold "
                            "are candidates (pipeline/dedup/banding.py); SlimPajama: 9")
    rows: int | Literal["auto"] = Field("auto", description="rows per band (auto: see bands); SlimPajama: 13")
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of a duplicate")
    verify: bool = Field(True, description="check candidate pairs with the exact shingle Jaccard")
    partitions: int = Field(16, gt=0, description="hash-range partitions per band (the shuffle's width)")
    seed: int = 1
    max_task_memory_mb: int = Field(2048, gt=0, description="memory bound of one dedup task")

    @model_validator(mode="after")
    def _bands_fit(self) -> "DedupConfig":
        if self.bands == "auto" or self.rows == "auto":
            from .dedup.banding import auto_banding

            bands, rows = auto_banding(self.threshold, self.permutations,
                                       None if self.bands == "auto" else self.bands,
                                       None if self.rows == "auto" else self.rows)
            object.__setattr__(self, "bands", bands)  # resolved once: the run records the numbers
            object.__setattr__(self, "rows", rows)
        if self.bands < 1 or self.rows < 1:
            raise ValueError("bands and rows must be >= 1")
        if self.bands * self.rows > self.permutations:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) must be <= permutations ({self.permutations})")
        return self


class TokenizeConfig(_Model):
    """Tokenize with SentencePiece and pack into Megatron .bin/.idx shards."""

    bos: bool = Field(True, description="prepend BOS to every document (TinyLlama: BOS as the separator)")
    eos: bool = Field(False, description="append EOS to every document")
    shard_mb: float = Field(256, gt=0, description="target size of a .bin shard (a shard closes at the first "
                                                   "document boundary past it)")
    dtype: Literal["auto", "uint16", "int32"] = Field(
        "auto", description="token dtype of the shards; auto: uint16 below 65,500 pieces, else int32")
    holdout_fraction: float = Field(
        0.0017, ge=0, lt=1, description="validation holdout by document-id hash (SlimPajama: 0.17%)"
    )
    holdout_seed: int = 0
    dedup_holdout: bool = Field(True, description="drop train documents whose text equals a holdout document")
    cpus_per_task: int = Field(1, gt=0, description="CPUs (encoding threads) each tokenize task gets")
    batch_docs: int = Field(1024, gt=0, description="documents per encoding batch")
    cache_entries: int = Field(
        1_000_000, ge=0, description="segment cache of the exact fast encoder per worker (about 170 bytes an "
                                     "entry); 0: plain SentencePiece batches. Never changes the ids")


class MixConfig(_Model):
    """Turn source weights and a token budget into the plan the loader follows."""

    token_budget: int | None = Field(None, gt=0, description="training tokens (TinyLlama: 3e12); null: one epoch")
    weights: Literal["explicit", "proportional"] = Field(
        "explicit", description="explicit: sources[].weight; proportional: by available tokens"
    )
    seq_len: int = Field(2048, gt=0, description="tokens per sample; the loader reads seq_len + 1")
    seed: int = 42
    max_epochs: float = Field(4.0, gt=0, description="warn when a source would repeat more often than this")


class TrainConfig(_Model):
    """The bundled trainer (`tinyprep train`): a Llama under FSDP2 that streams RUN/mixture.json.

    Defaults are TinyLlama's run: tinyllama-1.1b, 1024 samples of 2048 tokens per step, AdamW
    lr 4e-4 (betas 0.9/0.95, weight decay 0.1), 2000 warmup steps, cosine to 4e-5, clip 1.0.
    """

    model: str = Field("tinyllama-1.1b", description="model config: tinyllama-1.1b, llama-12m or tiny")
    model_args: dict[str, int | float] = Field(
        default_factory=dict, description="overrides of the model config (n_layer, dim, n_head, ...)")
    global_batch: int = Field(1024, gt=0, description="samples (of seq_len tokens) per optimizer step, all ranks")
    micro_batch: int = Field(8, gt=0, description="samples per forward/backward on one rank")
    max_steps: int | None = Field(None, gt=0, description="null: the plan's total_samples // global_batch")
    lr: float = Field(4e-4, gt=0)
    min_lr: float = Field(4e-5, ge=0, description="the cosine schedule's floor")
    warmup_steps: int = Field(2000, ge=0)
    decay_steps: int | None = Field(None, gt=0, description="cosine length in steps; null: max_steps")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null: no clipping")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 mixed precision (fp32 master weights and reductions) on GPU, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")
    compile: bool = Field(False, description="torch.compile each block")
    doc_mask: bool = Field(False, description="attend only within a document (needs tokenize.bos or tokenize.eos)")
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="how doc_mask is applied: flex (FlexAttention's block-sparse kernel, compiled; CUDA "
        "only), sdpa (a dense seq_len^2 mask, no flash kernel); auto: flex on CUDA, sdpa on CPU")
    eval_every: int = Field(1000, ge=0, description="steps between validation losses on the holdout (0: never)")
    eval_samples: int = Field(64, ge=0, description="holdout samples per source in a validation")
    log_every: int = Field(10, gt=0, description="steps between metrics lines (console and RUN/<dir>/metrics.jsonl)")
    checkpoint_every: int = Field(1000, ge=0, description="steps between DCP checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="most recent checkpoints kept")
    nproc: int | None = Field(None, gt=0, description="processes on this machine; null: one per GPU, or 1 on CPU")
    prefetch: int | None = Field(
        None, ge=0, description="batches a thread reads ahead of the step; null: 2 on GPU (pinned memory), 0 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(1337, description="seed of the weight initialization")
    peak_flops: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device for MFU; null: by GPU name (bf16 dense; metrics.py's table)")
    dir: str = Field("train", description="where checkpoints and metrics go, relative to the run directory")

    @field_validator("dir")
    @classmethod
    def _dir_inside_run(cls, v: str) -> str:
        try:
            contained(v, "train.dir")
        except RunDirError as e:
            raise ValueError(str(e).removeprefix("train.dir: ")) from None
        # another entry of the run would mix checkpoints with its files, and --fresh deletes
        # <dir>/checkpoints: RUN/docs/checkpoints is the docs of a source named "checkpoints"
        top = v.split("/", 1)[0]
        if top != "train" and top in RUN_ENTRIES:
            raise ValueError(f"{v!r} is inside the run's own {top!r}; choose a directory of its own")
        return v


class Recipe(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    output: str = Field(description="run directory (any fsspec URL)")
    stages: list[Literal[tuple(STAGES)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(STAGES), description="stages to run, in flow order (default: all)")
    sources: list[SourceConfig] = Field(min_length=1)
    ray: RayConfig = RayConfig()
    download: DownloadConfig = DownloadConfig()
    ingest: IngestConfig = IngestConfig()
    dedup: DedupConfig = Field(default_factory=DedupConfig)  # built on use: auto banding imports dedup
    tokenizer: TokenizerRef | None = None
    tokenize: TokenizeConfig = TokenizeConfig()
    mix: MixConfig = MixConfig()
    train: TrainConfig = TrainConfig()

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a stage twice")
        if v != sorted(v, key=list(STAGES).index):
            raise ValueError(f"stages must follow the flow order {list(STAGES)}")
        return v

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"source name {s.name!r} is used twice")
            seen.add(s.name)
        return v

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading

MAX_RECIPE_BYTES = 4 << 20  # recipes are a few KB; long input lists belong in `url_list`


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


_MESSAGES = {
    "greater_than": lambda c: f"must be > {_num(c['gt'])}",
    "greater_than_equal": lambda c: f"must be >= {_num(c['ge'])}",
    "missing": lambda c: "is required",
    "extra_forbidden": lambda c: "is not a known key",
    "too_short": lambda c: f"must have at least {c.get('min_length', 1)} item(s)",
    "string_pattern_mismatch": lambda c: f"must match {c['pattern']}",
}


def _format_errors(path: str, err: ValidationError) -> str:
    """Every problem of the recipe, in one line: `path: key.path: message; other.key: message`."""
    parts = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        make = _MESSAGES.get(e["type"])
        msg = make(e.get("ctx", {})) if make else e["msg"]
        if e["type"] == "literal_error":
            got = repr(e["input"])
            msg = f"{msg} (got {got if len(got) <= 60 else got[:60] + '...'})"  # a hostile value stays short
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{fmt_loc(loc)}: {' '.join(msg.split())}")
    return f"{path}: " + "; ".join(parts)


_SET_KEY = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set key.path[1].x=value` (value parsed as YAML) to the raw recipe dict."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts: list[str | int] = []
    for name, idx in _SET_KEY.findall(key.strip()):
        parts.append(int(idx) if idx else (int(name) if name.isdigit() else name))
    if not parts:
        raise RecipeError(f"--set {assignment!r}: empty key")
    try:
        value = load_plain_yaml(raw, f"--set {key}", marks=False)
    except PlainYamlError as e:
        raise RecipeError(str(e)) from None
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        try:
            if isinstance(p, int):
                node = node[p]
            else:
                node = node.setdefault(p, [] if isinstance(nxt, int) else {})
        except (IndexError, KeyError, TypeError, AttributeError):
            raise RecipeError(f"--set {key}: {fmt_loc(tuple(parts[: i + 1]))} does not exist") from None
    last = parts[-1]
    try:
        node[last] = value
    except (IndexError, TypeError):
        raise RecipeError(f"--set {key}: {fmt_loc(tuple(parts))} does not exist") from None


def _resolve_local(url: str, base: Path) -> str:
    """Make relative local paths absolute (relative to the working directory)."""
    if "://" in url or url.startswith("/") or not url.strip():  # an empty one is refused, not made the cwd
        return url
    return str(base.resolve() / url)


def parse_recipe(data: Any, path: str = "<recipe>", overrides: list[str] = (), output: str | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        data = plain_copy(data, path)  # a deep copy, of plain values only
    except PlainYamlError as e:
        raise RecipeError(str(e)) from None
    for o in overrides:
        apply_override(data, o)
    if output is not None:
        data["output"] = output
    base = Path(os.getcwd())
    if isinstance(data.get("output"), str):
        data["output"] = _resolve_local(data["output"], base)
    for src in data.get("sources") or []:
        if isinstance(src, dict) and isinstance(src.get("urls"), list):
            src["urls"] = [_resolve_local(u, base) if isinstance(u, str) else u for u in src["urls"]]
        if isinstance(src, dict) and isinstance(src.get("url_list"), str):
            src["url_list"] = _resolve_local(src["url_list"], base)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(path, e)) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), output: str | None = None) -> Recipe:
    """Read, override (`--set`), resolve local paths and validate a recipe file."""
    p = str(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the recipe: {e.strerror}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe "
                          f"(long input lists belong in sources[].url_list)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = load_plain_yaml(text, p)
    except PlainYamlError as e:
        raise RecipeError(str(e)) from None
    return parse_recipe(data, p, overrides, output)
