"""The Llama model (pipeline/train/model.py), the lr schedule and the document ids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.train.model import (
    CONFIGS,
    Llama,
    LlamaConfig,
    apply_rope,
    model_config,
    rope_tables,
)
from pipeline.train.schedule import learning_rate
from pipeline.train.trainer import document_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**kw) -> Llama:
    torch.manual_seed(0)
    m = Llama(model_config("tiny", vocab_size=200, max_seq_len=64, **kw))
    m.init_weights(3)
    return m


def test_tinyllama_config_is_the_1_1b_model():
    cfg = CONFIGS["tinyllama-1.1b"]
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.n_kv_head, cfg.mlp_dim, cfg.vocab_size) == (22, 2048, 32, 4, 5632, 32000)
    with torch.device("meta"):
        model = Llama(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params() == 1_100_048_384
    assert model.layers[0].attn.wk.weight.shape == (256, 2048)  # 4 KV groups of head_dim 64
    # torchtitan's estimate: 6 (N - N_emb) + 12 L H d T
    assert cfg.flops_per_token(2048) == 6 * (n - 32000 * 2048) + 12 * 22 * 32 * 64 * 2048


def test_vocabulary_comes_from_the_data_padded_to_64():
    assert model_config("tiny", vocab_size=32000).vocab_size == 32000
    assert model_config("tiny", vocab_size=300).vocab_size == 320
    with pytest.raises(ValueError, match="unknown model"):
        model_config("gpt-5")
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        LlamaConfig(n_head=6, n_kv_head=4, dim=96)


def test_initialization_follows_tinyllama_and_is_reproducible():
    cfg = LlamaConfig(vocab_size=512, n_layer=4, dim=256, n_head=8, n_kv_head=2, mlp_dim=512, max_seq_len=32)
    a, b = Llama(cfg), Llama(cfg)
    a.init_weights(7)
    b.init_weights(7)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    std = math.sqrt(2 / 5 / 256)
    assert a.tok_emb.weight.std().item() == pytest.approx(std, rel=0.02)
    assert a.layers[1].attn.wq.weight.std().item() == pytest.approx(std, rel=0.03)
    out_std = 1 / math.sqrt(256) / 4
    assert a.layers[1].attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert a.layers[2].mlp.w2.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert torch.equal(a.norm.weight, torch.ones(256))
    c = Llama(cfg)
    c.init_weights(8)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_causal_no_position_sees_the_future():
    m = _tiny()
    x = torch.randint(0, 200, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 200, (2, 15))
    with torch.no_grad():
        assert torch.allclose(m(x)[:, :25], m(y)[:, :25], atol=1e-5)
        assert not torch.allclose(m(x)[:, 25:], m(y)[:, 25:], atol=1e-3)


def test_grouped_query_attention_matches_repeated_kv_heads():
    m = _tiny()
    attn = m.layers[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = m.rope_cos[:10], m.rope_sin[:10]
    with torch.no_grad():
        got = attn(x, cos, sin, None)
        q = attn.wq(x).view(2, 10, 4, 16).transpose(1, 2)
        k = attn.wk(x).view(2, 10, 2, 16).transpose(1, 2)
        v = attn.wv(x).view(2, 10, 2, 16).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # head h uses KV group h // 2
        scores = (q @ k.transpose(-1, -2)) / 4.0
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
        want = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64))
    assert torch.allclose(got, want, atol=1e-5)


def test_rope_rotates_pairs_and_keeps_norms():
    cfg = model_config("tiny", max_seq_len=16)
    cos, sin = rope_tables(cfg)
    x = torch.randn(1, 1, 16, cfg.head_dim)
    r = apply_rope(x, cos, sin)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(r[..., 0, :], x[..., 0, :])  # position 0: no rotation
    # relative: <R_m q, R_n k> depends on m - n only
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    qs = apply_rope(q.expand(1, 1, 16, -1), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 16, -1), cos, sin)[0, 0]
    assert torch.allclose(qs[5] @ ks[2], qs[12] @ ks[9], atol=1e-4)


def test_rmsnorm():
    m = _tiny()
    x = torch.randn(3, 64) * 5
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(m.norm(x), want, atol=1e-5)


def test_document_mask_isolates_documents():
    """With document ids, a packed document's logits equal those of the document alone (RoPE is
    relative, and no attention crosses the boundary); without them they differ."""
    m = _tiny()
    a, b = torch.randint(3, 200, (1, 24)), torch.randint(3, 200, (1, 16))
    a[0, 0] = b[0, 0] = 1  # BOS starts each document
    packed = torch.cat([a, b], dim=1)
    ids = document_ids(packed, bos_id=1, eos_id=None)
    assert ids[0, :24].eq(1).all() and ids[0, 24:].eq(2).all()
    with torch.no_grad():
        alone = m(b)
        masked = m(packed, ids)[:, 24:]
        plain = m(packed)[:, 24:]
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(plain, alone, atol=1e-3)


def test_document_ids_from_eos():
    x = torch.tensor([[5, 6, 2, 7, 8, 2, 9]])
    assert document_ids(x, bos_id=None, eos_id=2).tolist() == [[0, 0, 0, 1, 1, 1, 2]]


def test_the_model_learns_a_pattern():
    m = _tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = (torch.arange(33).repeat(8, 1) * 7 + torch.arange(8)[:, None] * 3) % 200
    losses = []
    for _ in range(30):
        logits = m(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2


def test_schedule_warmup_cosine_floor():
    lr, lo = 4e-4, 4e-5
    assert learning_rate(0, lr, lo, 2000, 10000) == pytest.approx(lr / 2000)
    assert learning_rate(1999, lr, lo, 2000, 10000) == pytest.approx(lr)
    assert learning_rate(2000, lr, lo, 2000, 10000) == pytest.approx(lr)
    assert learning_rate(6000, lr, lo, 2000, 10000) == pytest.approx((lr + lo) / 2)
    assert learning_rate(10000, lr, lo, 2000, 10000) == lo
    assert learning_rate(20000, lr, lo, 2000, 10000) == lo
    values = [learning_rate(s, lr, lo, 2000, 10000) for s in range(2000, 10000, 97)]
    assert all(a >= b for a, b in zip(values, values[1:]))
