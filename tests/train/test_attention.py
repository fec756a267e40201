"""Document masking in the Llama (pipeline/train/model.py): the dense SDPA mask and FlexAttention's
BlockMask, against per-document references, each other and plain causal attention.

The trainer's semantics: with document ids a token attends only to earlier tokens of its own
document, and positions are the row's (a packed document keeps the RoPE positions of its place in
the row; they do not restart at 0). So the reference for a packed document is that document's
tokens alone through the same layers, causal, with the RoPE tables sliced at its place in the row.

PyTorch's FlexAttention has no backward on CPU: the flex tests here run forward passes (no_grad);
tests/benchmarks/gpu_check_attention.py compares the compiled CUDA kernel, gradients included.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from pipeline.recipe import RecipeError, parse_recipe
from pipeline.train.model import Llama, attention_kind, document_mask, model_config
from pipeline.train.trainer import document_ids

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
BOS = 1


def _tiny(max_seq_len: int = 64) -> Llama:
    m = Llama(model_config("tiny", vocab_size=200, max_seq_len=max_seq_len))
    m.init_weights(3)
    return m.eval()


def _packed(lengths: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Rows of documents of the given lengths, each starting with BOS (every row the same length)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        docs = [torch.randint(3, 200, (n,), generator=g) for n in row]
        for d in docs:
            d[0] = BOS
        rows.append(torch.cat(docs))
    return torch.stack(rows)


def _alone_at_its_positions(m: Llama, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of one document on its own, causal, with the RoPE positions start, start + 1, ..."""
    end = start + tokens.shape[-1]
    cos, sin = m.rope_cos[start:end], m.rope_sin[start:end]
    x = m.tok_emb(tokens[None])
    for layer in m.layers:
        x = layer(x, cos, sin, None)
    return m.output(m.norm(x))[0]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_packed_document_equals_the_document_alone_at_its_positions(attention):
    m = _tiny()
    m.attention = attention
    lengths = [[17, 9, 14], [5, 30, 5]]
    tokens = _packed(lengths)
    ids = document_ids(tokens, bos_id=BOS, eos_id=None)
    with torch.no_grad():
        packed = m(tokens, ids)
        plain = m(tokens)
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = _alone_at_its_positions(m, tokens[r, start:start + n], start)
                torch.testing.assert_close(packed[r, start:start + n], alone, rtol=1e-5, atol=1e-5)
                if start:  # without the mask the later documents see the earlier ones
                    assert not torch.allclose(plain[r, start:start + n], alone, atol=1e-3)
                start += n


def test_flex_equals_sdpa_on_random_inputs():
    """Rows longer than FlexAttention's 128-position blocks, so that some blocks are skipped, some
    fully kept and some masked inside; grouped-query attention (4 heads over 2 KV groups)."""
    m = _tiny(max_seq_len=320)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, 200, (3, 300), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.02] = BOS  # ~6 documents per row
    tokens[1, 128] = BOS  # a document boundary on a block boundary
    ids = document_ids(tokens, bos_id=BOS, eos_id=None)
    attn = m.layers[0].attn
    x = torch.randn(3, 300, 64, generator=g)
    cos, sin = m.rope_cos[:300], m.rope_sin[:300]
    with torch.no_grad():
        dense, blocks = document_mask(ids, "sdpa"), document_mask(ids, "flex")
        assert isinstance(blocks, BlockMask) and dense.shape == (3, 1, 300, 300)
        torch.testing.assert_close(attn(x, cos, sin, blocks), attn(x, cos, sin, dense), rtol=1e-5, atol=1e-5)
        m.attention = "flex"
        flex = m(tokens, ids)
        m.attention = "sdpa"
        sdpa = m(tokens, ids)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_the_block_mask_is_the_dense_mask_and_skips_other_documents_blocks():
    tokens = _packed([[128, 128, 44], [300]])
    ids = document_ids(tokens, bos_id=BOS, eos_id=None)
    blocks = document_mask(ids, "flex")
    dense = document_mask(ids, "sdpa")
    assert torch.equal(create_mask(blocks.mask_mod, 2, 1, 300, 300, device="cpu"), dense)
    kept = blocks.kv_num_blocks + blocks.full_kv_num_blocks  # KV blocks visited per query block
    assert kept[0, 0].tolist() == [1, 1, 1]  # row 0: each 128-block sees only its own document
    assert kept[1, 0].tolist() == [1, 2, 3]  # row 1, one document: causal
    # the second query block's first KV block lies below the diagonal: kept whole, no mask_mod
    # (the last query block ends at 300 inside its block: all its blocks are partial)
    assert blocks.full_kv_num_blocks[1, 0].tolist()[:2] == [0, 1]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_row_of_one_document_equals_plain_causal_attention(attention):
    m = _tiny()
    m.attention = attention
    tokens = _packed([[40], [40]], seed=3)
    tokens[1, 0] = 7  # a row that starts mid-document (no BOS) is one document too
    ids = document_ids(tokens, bos_id=BOS, eos_id=None)
    assert ids[0].eq(1).all() and ids[1].eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, ids), m(tokens), rtol=1e-5, atol=1e-5)


def test_documents_split_at_eos_are_masked_the_same_way():
    m = _tiny()
    m.attention = "flex"
    tokens = _packed([[12, 20, 8]], seed=4)
    tokens[tokens == BOS] = 5
    tokens[0, [11, 31]] = 2  # EOS ends the first two documents
    ids = document_ids(tokens, bos_id=None, eos_id=2)
    with torch.no_grad():
        packed = m(tokens, ids)
        for start, n in ((0, 12), (12, 20), (32, 8)):
            alone = _alone_at_its_positions(m, tokens[0, start:start + n], start)
            torch.testing.assert_close(packed[0, start:start + n], alone, rtol=1e-5, atol=1e-5)


def test_attention_choice():
    assert attention_kind("auto", "cuda", doc_mask=True) == "flex"
    assert attention_kind("auto", torch.device("cuda", 1), doc_mask=False) == "sdpa"
    assert attention_kind("auto", "cpu", doc_mask=True) == "sdpa"  # the same losses as before on CPU
    assert attention_kind("sdpa", "cuda", doc_mask=True) == "sdpa"
    assert attention_kind("flex", "cuda", doc_mask=True) == "flex"
    with pytest.raises(ValueError, match="flex attention cannot train on CPU"):
        attention_kind("flex", "cpu", doc_mask=True)
    with pytest.raises(ValueError, match="unknown attention 'xformers'"):
        attention_kind("xformers", "cuda", doc_mask=True)


def test_recipe_key():
    base = {"name": "r", "output": "/tmp/r", "sources": [{"name": "a", "urls": ["x"]}]}
    assert parse_recipe(base).train.attention == "auto"
    assert parse_recipe({**base, "train": {"attention": "flex"}}).train.attention == "flex"
    with pytest.raises(RecipeError, match="train.attention"):
        parse_recipe({**base, "train": {"attention": "xformers"}})


def test_the_block_mask_passes_through_fsdp_and_its_bf16_input_casting(tmp_path):
    """The trainer's model: FSDP2 per block and at the root, bf16 parameters (its forward-input
    cast walks the BlockMask), activation checkpointing; flex gives sdpa's logits."""
    from pipeline.train.distributed import launch
    from pipeline.train.parallelize import build_model

    out = str(tmp_path / "logits.pt")
    tokens = _packed([[100, 90, 110], [300]], seed=6)
    ids = document_ids(tokens, bos_id=BOS, eos_id=None)

    def worker(env, out):
        cfg = model_config("tiny", vocab_size=200, max_seq_len=300)
        logits = {}
        for bf16 in (False, True):
            m = build_model(cfg, env.device, env.world, seed=3, bf16=bf16, activation_checkpointing=True)
            with torch.no_grad():
                for kind in ("sdpa", "flex"):
                    m.attention = kind
                    logits[bf16, kind] = m(tokens, ids).float()
        torch.save(logits, out)

    launch(worker, (out,), 1, "cpu")  # one rank, in this process
    logits = torch.load(out)
    with torch.no_grad():
        plain = _tiny(max_seq_len=300)(tokens, ids)  # the same initialization, without FSDP
    torch.testing.assert_close(logits[False, "sdpa"], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[False, "flex"], plain, rtol=1e-5, atol=1e-5)
    flex, sdpa = logits[True, "flex"], logits[True, "sdpa"]
    assert ((flex - sdpa).norm() / sdpa.norm()).item() < 1e-2  # bf16 rounding, not another mask
    assert ((flex - plain).norm() / plain.norm()).item() < 2e-2
