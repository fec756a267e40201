"""A trained checkpoint as a Hugging Face Llama (`tinyprep export-model RUN --format hf`).

What is exported: one complete checkpoint of RUN/<train.dir>/checkpoints (the newest usable one,
as resuming would choose it, or `--step N`), by default into RUN/<train.dir>/export/hf-step-N:

    model.safetensors        the weights, fp32 (or bf16), under LlamaForCausalLM's names
    config.json              LlamaConfig: the checkpoint's model shape (meta.json), its padded vocabulary
    generation_config.json   BOS/EOS of the run's tokenizer
    tokenizer.model          the run's SentencePiece model (the one manifest.json was tokenized with)
    tokenizer_config.json, special_tokens_map.json
    tinyprep-export.json     where it came from: run step, checkpoint, model config, tokenizer hash

Loading: the model state is read from the DCP checkpoint in this one process, on CPU, without a
process group, whatever world size wrote it (DCP reassembles full tensors from the shards); the
optimizer state is not read.

Names and RoPE: `tok_emb` -> `model.embed_tokens`, `layers.N.attn.wq|wk|wv|wo` ->
`model.layers.N.self_attn.q_proj|k_proj|v_proj|o_proj`, `mlp.w1|w3|w2` -> `mlp.gate_proj|up_proj|
down_proj`, `attn_norm|mlp_norm` -> `input_layernorm|post_attention_layernorm`, `norm` ->
`model.norm`, `output` -> `lm_head`. The trainer rotates interleaved pairs (x[2i], x[2i+1]) of a
head (model.apply_rope) where Hugging Face rotates halves (x[i], x[i + head_dim/2], its
`rotate_half`), so the rows of wq and wk are permuted per head: row 2i + j of a head moves to
i + j * head_dim/2 (the permutation of Meta's weights in Hugging Face's convert_llama_weights_to_hf).
Attention scores are dot products of q and k, unchanged when both are permuted alike; v and wo are
not touched, so the exported model computes the same logits.

Tokenizer: `tokenizer_class` is PreTrainedTokenizerFast, which transformers 5 builds from the
SentencePiece model itself (its normalizer, dummy prefix and byte fallback), so `AutoTokenizer`
gives the SentencePiece model's ids, leading spaces included (its LlamaTokenizer collapses a
leading space into the dummy prefix); it adds BOS when the run's documents start with one
(manifest `bos`). As with any Hugging Face tokenizer, `<s>` written in the text is read as the
special token. No tokenizer.json is written (transformers before 5 needs one for that class).

The safetensors file is written here (an 8-byte header length, a JSON header, the raw tensors,
byte for byte what the format specifies), so exporting needs only torch; the same checkpoint gives
the same bytes. Files are written under temporary names and renamed, config.json last: an
interrupted export has no config.json and loads nowhere. Nothing is ever deleted; an output
directory that already holds files is refused unless `force`, which replaces only the files an
export writes.
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import orjson
import torch

from .. import storage
from ..formats import FormatError
from ..formats.manifest import Manifest, read_manifest
from ..layout import RunDirError, as_run
from . import checkpoint
from .checkpoint import CheckpointError, CheckpointInfo
from .model import Llama, LlamaConfig

log = logging.getLogger("tinyprep")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_INFO = "tinyprep-export.json"
MODEL_FILE = "model.safetensors"
_MODEL_KEY = "app.model."  # DCP's flattened key of a model tensor: {"app": {"model": {name: ...}}}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class ModelExportError(Exception):
    """An export that cannot be done; the message names the file or option. `code` is the exit
    code: 2 when there is nothing to export as asked (no checkpoint, no such step, an output
    directory in use, no tokenizer with the manifest's hash), 1 when a file is damaged or unreadable."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Which checkpoint


def find_checkpoint(root: Path, step: int | None = None) -> CheckpointInfo:
    """The checkpoint of `step` under root, or the newest usable one (damaged newer ones skipped,
    with a warning): the same checks as resuming (meta.json, DCP metadata, file sizes)."""
    if step is not None:
        path = checkpoint.step_dir(root, step)
        if not path.is_dir():
            have = [str(c.step) for c in checkpoint.complete_checkpoints(root)]
            raise ModelExportError(f"{path}: no checkpoint of step {step} (complete checkpoints: "
                                   f"{', '.join(have) if have else 'none'})", 2)
        try:
            info = checkpoint.read_info(path)
            checkpoint.check_files(path)
        except CheckpointError as e:
            raise ModelExportError(f"{path}: {e}") from None
        return info
    found, damaged = checkpoint.resumable(root)
    if found is None:
        if damaged:
            (path, why), more = damaged[0], len(damaged) - 1
            raise ModelExportError(f"{path}: damaged checkpoint ({why})" + (f", and {more} more" if more else "") +
                                   "; no usable checkpoint to export")
        raise ModelExportError(f"{root}: no complete checkpoint to export (train first, or name the "
                               "run's train.dir with --train-dir)", 2)
    for path, why in damaged:
        log.warning(f"export-model: checkpoint {path} is damaged ({why}); exporting {found.path} instead")
    return found


def checkpoint_config(info: CheckpointInfo) -> LlamaConfig:
    """The model shape the checkpoint was trained with (meta.json `model`)."""
    known = {f.name for f in fields(LlamaConfig)}
    model = info.meta["model"]
    unknown = sorted(set(model) - known)
    if unknown:
        raise ModelExportError(f"{info.path / 'meta.json'}: model has unknown keys {unknown}")
    try:
        return LlamaConfig(**model)
    except (TypeError, ValueError) as e:
        raise ModelExportError(f"{info.path / 'meta.json'}: model: {e}") from None


# ---------------------------------------------------------------------------------------------
# Loading the model state without a process group


def load_model_state(info: CheckpointInfo, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint's model as a full fp32 CPU tensor, by the trainer's names
    (`tok_emb.weight`, `layers.0.attn.wq.weight`, ...), read in this process without a process
    group whatever world size saved it. Raises ModelExportError when a tensor is missing or has
    another shape than the config gives."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama(cfg).named_parameters()}
    try:
        saved = dcp.FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - unpickling junk raises anything
        raise ModelExportError(f"{info.path}/.metadata: unreadable ({type(e).__name__})") from None
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        meta = saved.get(_MODEL_KEY + name)
        size = tuple(getattr(meta, "size", ()) or ())
        if meta is None or size != shape:
            what = "missing" if meta is None else f"of shape {list(size)}, the model needs {list(shape)}"
            raise ModelExportError(f"{info.path}: model tensor {name} is {what}")
        state[name] = torch.empty(shape, dtype=meta.properties.dtype)
    nested = {"app": {"model": state}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        try:
            dcp.load(nested, storage_reader=dcp.FileSystemReader(str(info.path)), no_dist=True)
        except Exception as e:  # noqa: BLE001 - DCP wraps read errors in CheckpointException
            text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelExportError(f"{info.path}: cannot read the model state ({text[:200]})") from None
    return {name: t.float() for name, t in nested["app"]["model"].items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face names, RoPE layout, config


def rope_interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The rows of a q or k projection (n_heads * head_dim, dim) reordered per head from the
    interleaved RoPE layout (pairs at rows 2i, 2i+1) to the half-split one (rows i, i + head_dim/2)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    """The trainer's state dict under LlamaForCausalLM's names, q/k rows in the half-split RoPE
    layout, in `dtype`."""
    out = {}
    for name, t in state.items():
        if name in _TOP_NAMES:
            key = _TOP_NAMES[name]
        else:
            _, layer, rest = name.split(".", 2)  # layers.N.<rest>
            key = f"model.layers.{layer}.{_BLOCK_NAMES[rest]}"
            if rest == "attn.wq.weight":
                t = rope_interleaved_to_half(t, cfg.n_head)
            elif rest == "attn.wk.weight":
                t = rope_interleaved_to_half(t, cfg.n_kv_head)
        out[key] = t.to(dtype).contiguous()
    return out


def hf_config(cfg: LlamaConfig, bos_id: int | None, eos_id: int | None, dtype: torch.dtype) -> dict:
    """config.json of LlamaForCausalLM (the keys transformers 4.45 to 5 read)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": _HF_DTYPE_NAMES[dtype],
    }


def generation_config(bos_id: int | None, eos_id: int | None) -> dict:
    return {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id}


# ---------------------------------------------------------------------------------------------
# Tokenizer


def run_tokenizer(run_url: str, manifest: Manifest, path: str | None = None) -> tuple[bytes, str]:
    """(model bytes, where they were read) of the run's tokenizer (tokenize/tokenizer.py's
    run_tokenizer: `path`, the manifest's path, RUN/assets; checked by sha256)."""
    from ..tokenize.tokenizer import TokenizerMismatch
    from ..tokenize.tokenizer import run_tokenizer as resolve

    try:
        return resolve(run_url, manifest, path, hint="; pass --tokenizer PATH (the model the run was tokenized with)")
    except TokenizerMismatch as e:
        raise ModelExportError(str(e), 2) from None


def tokenizer_files(model: bytes, manifest: Manifest, max_len: int) -> dict[str, bytes]:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    from ..tokenize.tokenizer import load_processor

    try:
        sp = load_processor(model)
    except FormatError as e:
        raise ModelExportError(f"tokenizer: {e}") from None

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.vocab_size() else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "pad_token": None,
        "add_bos_token": bool(manifest.bos) and special["bos_token"] is not None, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_len,
    }
    return {"tokenizer.model": model, "tokenizer_config.json": _json(config),
            "special_tokens_map.json": _json({k: v for k, v in special.items() if v is not None})}


# ---------------------------------------------------------------------------------------------
# Writing


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=False).encode() + b"\n"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (a view of its storage)."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file: u64 little-endian header size, a JSON header (dtype, shape and byte
    range of every tensor, by name), padded with spaces to 8 bytes, then the tensors' bytes
    (little-endian, row-major) in name order. Written to a temporary name, then renamed."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name here")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with storage.atomic_open(str(path)) as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for name in names:
            fh.write(_tensor_bytes(tensors[name]))


def _write(path: Path, data: bytes) -> None:
    storage.write_bytes(str(path), data)


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ModelExportError(f"{out}: exists and is not a directory (--out)", 2)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelExportError(f"{out}: already holds files (an earlier export?); choose another --out, "
                               "or --force to replace the files an export writes", 2)


# ---------------------------------------------------------------------------------------------
# The export


def _local_dir(url: str, what: str) -> Path:
    fs, path = storage.url_to_fs(url)
    if not storage.is_local(fs):
        raise ModelExportError(f"{url}: {what} must be a local (or mounted) directory", 2)
    return Path(path)


def export_hf(run_url: str, out: str | None = None, step: int | None = None, dtype: str = "fp32",
              train_dir: str = "train", tokenizer: str | None = None, force: bool = False) -> dict:
    """Export a checkpoint of the run as a Hugging Face Llama directory; return the summary that
    is also written to OUT/tinyprep-export.json."""
    if dtype not in DTYPES:
        raise ModelExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}", 2)
    run = as_run(run_url)
    try:
        train_root = _local_dir(run.train(train_dir), "the run's train directory")
    except RunDirError as e:
        raise ModelExportError(str(e).replace("train.dir", "--train-dir", 1), 2) from None
    info = find_checkpoint(train_root / "checkpoints", step)
    try:
        manifest, _ = read_manifest(run_url)
    except FormatError as e:
        raise ModelExportError(str(e)) from None
    cfg = checkpoint_config(info)
    tok = manifest.tokenizer
    if cfg.vocab_size < tok.vocab_size:
        raise ModelExportError(f"{info.path}: the model's vocabulary ({cfg.vocab_size}) is smaller than the "
                               f"tokenizer's ({tok.vocab_size}) in {run.manifest}")
    model_bytes, tokenizer_url = run_tokenizer(run_url, manifest, tokenizer)
    files = tokenizer_files(model_bytes, manifest, cfg.max_seq_len)
    out_dir = Path(out) if out else train_root / "export" / f"hf-step-{info.step}"
    _check_out_dir(out_dir, force)

    torch_dtype = DTYPES[dtype]
    weights = hf_state_dict(load_model_state(info, cfg), cfg, torch_dtype)
    bos = tok.bos_id if tok.bos_id >= 0 else None
    eos = tok.eos_id if tok.eos_id >= 0 else None
    summary = {"format": "tinyprep-hf-export", "version": 1, "step": info.step,
               "checkpoint": f"{train_dir}/checkpoints/{info.path.name}", "model": asdict(cfg),
               "model_name": info.meta.get("model_name"), "world": info.meta["world"], "dtype": dtype,
               "tokenizer": {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
               "parameters": sum(t.numel() for t in weights.values())}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / MODEL_FILE, weights)
    del weights
    for name, data in files.items():
        _write(out_dir / name, data)
    _write(out_dir / "generation_config.json", _json(generation_config(bos, eos)))
    _write(out_dir / EXPORT_INFO, orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    _write(out_dir / "config.json", _json(hf_config(cfg, bos, eos, torch_dtype)))  # last: the export is complete
    return {**summary, "out": str(out_dir), "tokenizer_read": tokenizer_url}
