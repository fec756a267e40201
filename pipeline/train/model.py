"""A Llama decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), read top to bottom.

Configs: `tinyllama-1.1b` (TinyLlama's tiny_LLaMA_1b: 22 layers, d_model 2048, 32 heads, 4 KV
groups, MLP 5632, vocab 32000, untied output head) and small ones for tests and the sample run.

Initialization follows TinyLlama (lit_gpt/model.py `_init_weights`, from GPT-NeoX): embeddings and
linear weights ~ N(0, sqrt(2 / (5 d))); the residual output projections (attention `wo`, MLP `w2`)
~ N(0, 1 / sqrt(d) / n_layer); norm weights 1. Every tensor is drawn from a generator seeded by
(seed, parameter name) over its full shape, so a model starts the same on any number of ranks
(sharded parameters copy their own slice of the full draw).

Document masking (`doc_mask`): a token attends to the earlier tokens of its own document only.
Positions stay the row's: a packed document keeps the RoPE positions of its place in the row (they
do not restart at 0), which, RoPE being relative, gives the document's attention alone up to
rounding. Two ways to apply the mask, chosen by `Llama.attention`:

    sdpa  a dense (B, 1, T, T) boolean mask for scaled_dot_product_attention: any device, but T^2
          memory per row and no flash kernel (the default, and the only way on CPU)
    flex  a BlockMask for FlexAttention, built once per forward from the document ids and shared
          by every layer: blocks of 128 x 128 positions wholly outside the mask are skipped, and on
          CUDA the kernel is torch.compile'd (once per process, as torchtitan does). PyTorch has no
          FlexAttention backward on CPU: there it serves forward passes only (validation, tests).

Without document ids attention is plain causal SDPA (its flash kernel on GPU) either way.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

ATTENTION = ("sdpa", "flex")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    n_layer: int = 22
    dim: int = 2048
    n_head: int = 32
    n_kv_head: int = 4
    mlp_dim: int = 5632
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if (self.dim // self.n_head) % 2:
            raise ValueError(f"head_dim {self.dim // self.n_head} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def num_params(self, embeddings: bool = True) -> int:
        d, kv = self.dim, self.n_kv_head * self.head_dim
        per_layer = d * d + 2 * d * kv + d * d + 3 * d * self.mlp_dim + 2 * d
        n = self.n_layer * per_layer + d + self.vocab_size * d  # + final norm + output head
        return n + (self.vocab_size * d if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> int:
        """torchtitan's estimate: 6 (N - N_embedding) + 12 layers heads head_dim seq_len."""
        return 6 * self.num_params(embeddings=False) + 12 * self.n_layer * self.n_head * self.head_dim * seq_len


CONFIGS: dict[str, LlamaConfig] = {
    "tinyllama-1.1b": LlamaConfig(),
    # ~12M parameters with a 32k vocabulary: a short CPU run that still learns something.
    "llama-12m": LlamaConfig(n_layer=4, dim=256, n_head=8, n_kv_head=2, mlp_dim=688),
    # The smallest useful shape: the sample run and the tests.
    "tiny": LlamaConfig(n_layer=2, dim=64, n_head=4, n_kv_head=2, mlp_dim=176),
}


def model_config(name: str, vocab_size: int | None = None, max_seq_len: int | None = None,
                 **overrides) -> LlamaConfig:
    """A named config, with the data's vocabulary (padded to a multiple of 64) and sequence length."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(CONFIGS)})")
    cfg = replace(CONFIGS[name], **overrides)
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=-(-vocab_size // 64) * 64)
    if max_seq_len is not None:
        cfg = replace(cfg, max_seq_len=max_seq_len)
    return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(cfg: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim))
    t = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (T, head_dim / 2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of every head; x is (B, heads, T, head_dim)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def attention_kind(choice: str, device: torch.device | str, doc_mask: bool) -> str:
    """The attention for a document mask: "auto" is flex with doc_mask on CUDA, sdpa otherwise.
    ValueError for flex on a device where FlexAttention cannot train (no backward on CPU)."""
    device_type = torch.device(device).type
    if choice == "auto":
        return "flex" if doc_mask and device_type == "cuda" else "sdpa"
    if choice not in ATTENTION:
        raise ValueError(f"unknown attention {choice!r} (known: auto, {', '.join(ATTENTION)})")
    if choice == "flex" and device_type == "cpu":
        raise ValueError("flex attention cannot train on CPU (PyTorch's FlexAttention has no CPU backward); "
                         "use sdpa or auto")
    return choice


@functools.cache
def _compiled(fn):
    """fn under torch.compile, made once per process: every layer and micro-batch shares one
    compiled kernel (recompiled only for a new shape)."""
    return torch.compile(fn)


def document_mask(doc_ids: torch.Tensor, kind: str = "sdpa") -> torch.Tensor | BlockMask:
    """The mask of "attend to earlier tokens of the same document" for document ids (B, T):
    dense (B, 1, T, T) booleans for sdpa, a BlockMask (B, 1, T, T) for flex."""
    b, t = doc_ids.shape
    if kind == "sdpa":
        causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
    if kind != "flex":
        raise ValueError(f"unknown attention {kind!r} (known: {', '.join(ATTENTION)})")

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    build = _compiled(create_block_mask) if doc_ids.is_cuda else create_block_mask
    return build(same_document_causal, b, None, t, t, device=doc_ids.device)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
        """mask: None (causal), a dense boolean mask (SDPA) or a BlockMask (FlexAttention)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif isinstance(mask, BlockMask):
            flex = _compiled(flex_attention) if q.is_cuda else flex_attention
            y = flex(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)  # down (residual output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    checkpoint = False  # activation checkpointing: recompute this block's activations in backward

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask=None):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask)

    def _forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    attention = "sdpa"  # how a document mask is applied: "sdpa" (dense mask) or "flex" (BlockMask)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T). With doc_ids (B, T), a token attends only to
        earlier tokens of its own document (block-diagonal causal mask, built once for all layers);
        positions are the row's either way (see the module doc)."""
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        mask = None if doc_ids is None else document_mask(doc_ids, self.attention)
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.output(self.norm(x))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """TinyLlama's initialization, identical whatever the sharding (see the module doc)."""
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        d = self.cfg.dim
        std = math.sqrt(2.0 / 5 / d)
        std_out = 1 / math.sqrt(d) / self.cfg.n_layer
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                full = torch.ones(p.shape)
            else:
                g = torch.Generator().manual_seed(_param_seed(seed, name))
                s = std_out if name.endswith(("attn.wo.weight", "mlp.w2.weight")) else std
                full = torch.empty(p.shape).normal_(0.0, s, generator=g)
            _copy_full(p, full)


def _param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1


def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, plain or sharded (a DTensor: its local slice only)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(local.to_local())
    else:
        p.copy_(full.to(p.device, p.dtype))
