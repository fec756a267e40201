"""Document-masked attention on a GPU: FlexAttention (compiled, BlockMask) against SDPA (dense mask).

The CPU tests (tests/train/test_attention.py) cover the masks and eager FlexAttention's forward; what
only a CUDA device can check is the compiled kernel, its backward and what it saves. For one
TinyLlama-sized block (d_model 2048, 32 heads over 4 KV groups, MLP 5632) in bf16, on rows of
--seq-len tokens holding --docs documents each, this script

  1. runs forward + backward with each attention and compares the output, the input gradient and
     every parameter gradient with an fp32 SDPA reference: flex must be as accurate as SDPA in bf16
     (relative error within 2x SDPA's, plus 2e-3);
  2. times forward + backward of the block (CUDA events, after warm-up) and its peak memory, and
     the time to build each mask (once per micro-batch in training, shared by all layers);
  3. checks that a new micro-batch (other document ids, same shape) reuses the compiled kernels
     (no recompilation), for flex alone and inside a torch.compile'd block (train.compile).

    PYTHONPATH=. python tests/benchmarks/gpu_check_attention.py [--batch 4] [--seq-len 2048] [--docs 6]

Exit status 0 when every check passed, 1 when one failed; without a CUDA device it says so and
exits 0. `--cpu-forward-only` runs the comparisons' forward part on CPU with small sizes and eager
FlexAttention (PyTorch has no FlexAttention backward on CPU): it checks the script, not the kernel.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.train.model import CONFIGS, Block, Llama, document_mask

TOLERANCE_FACTOR, TOLERANCE_SLACK = 2.0, 2e-3


def document_ids(batch: int, seq_len: int, docs: int, seed: int) -> torch.Tensor:
    """(batch, seq_len) document numbers: docs documents per row, cut at random places."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq_len - 1, generator=g)[:docs - 1] + 1
        starts = torch.zeros(seq_len, dtype=torch.long)
        starts[cuts] = 1
        rows.append(torch.cumsum(starts, 0))
    return torch.stack(rows)


def make_block(cfg, device: torch.device) -> tuple[Block, torch.Tensor, torch.Tensor]:
    """One block with TinyLlama's initialization (fp32) and the RoPE tables."""
    one = replace(cfg, n_layer=1, vocab_size=64)  # the block only: a token table of no size
    model = Llama(one)
    model.init_weights(1337)
    block = model.layers[0].to(device)
    return block, model.rope_cos.to(device), model.rope_sin.to(device)


def run(block, x, cos, sin, mask, grad_out, backward: bool) -> dict[str, torch.Tensor]:
    """The block's output and (with backward) the gradients of <output, grad_out>."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        y = block(x, cos, sin, mask)
    out = {"output": y.detach().float()}
    if backward:
        y.backward(grad_out)
        out["input grad"] = x.grad.float()
        out.update({f"{n} grad": p.grad.float() for n, p in block.named_parameters()})
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare(args, device: torch.device, dtype: torch.dtype, backward: bool) -> bool:
    cfg = replace(CONFIGS["tinyllama-1.1b"], max_seq_len=args.seq_len)
    block32, cos32, sin32 = make_block(cfg, device)
    block = copy.deepcopy(block32).to(dtype)
    cos, sin = cos32.to(dtype), sin32.to(dtype)  # FSDP2's bf16 policy casts the forward inputs too
    g = torch.Generator(device=device).manual_seed(0)
    x32 = torch.randn(args.batch, args.seq_len, cfg.dim, device=device, generator=g)
    grad32 = torch.randn(x32.shape, device=device, generator=g)
    ids = document_ids(args.batch, args.seq_len, args.docs, seed=1).to(device)
    dense, blocks = document_mask(ids, "sdpa"), document_mask(ids, "flex")

    want = run(block32, x32, cos32, sin32, dense, grad32, backward)
    sdpa = run(block, x32.to(dtype), cos, sin, dense, grad32.to(dtype), backward)
    flex = run(block, x32.to(dtype), cos, sin, blocks, grad32.to(dtype), backward)
    ok = True
    print(f"\naccuracy against fp32 SDPA ({args.batch} x {args.seq_len} tokens, {args.docs} documents per row, "
          f"{str(dtype).removeprefix('torch.')}): relative error, and flex - sdpa max |diff|")
    for name in want:
        e_sdpa, e_flex = relative_error(sdpa[name], want[name]), relative_error(flex[name], want[name])
        diff = float((flex[name] - sdpa[name]).abs().max())
        good = e_flex <= TOLERANCE_FACTOR * e_sdpa + TOLERANCE_SLACK
        ok &= good
        print(f"  {name:<26} sdpa {e_sdpa:.2e}  flex {e_flex:.2e}  max|flex-sdpa| {diff:.2e}"
              + ("" if good else "  <-- FAIL"))
    return ok


def mask_bytes(mask) -> int:
    """Storage of a dense mask, or of a BlockMask's block tables."""
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    return sum(t.numel() * t.element_size() for t in mask.as_tuple() if isinstance(t, torch.Tensor))


def timed(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """Milliseconds per call and peak memory (GiB) above what was allocated before."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated(device) - base) / 2**30


def benchmark(args, device: torch.device, dtype: torch.dtype) -> None:
    cfg = replace(CONFIGS["tinyllama-1.1b"], max_seq_len=args.seq_len)
    block32, cos, sin = make_block(cfg, device)
    block = block32.to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    x = torch.randn(args.batch, args.seq_len, cfg.dim, device=device, dtype=dtype)
    ids = document_ids(args.batch, args.seq_len, args.docs, seed=2).to(device)

    def step(mask):
        block.zero_grad(set_to_none=True)
        block(x, cos, sin, mask).float().pow(2).mean().backward()

    print(f"\nspeed and memory: forward + backward of one block, {args.iters} iterations")
    for kind in ("sdpa", "flex"):
        ms_mask, _ = timed(lambda k=kind: document_mask(ids, k), device, args.iters)
        mask = document_mask(ids, kind)
        ms, gib = timed(lambda m=mask: step(m), device, args.iters)
        print(f"  {kind:<5} {ms:8.2f} ms/step  peak +{gib:6.2f} GiB   mask build {ms_mask:6.2f} ms, "
              f"{mask_bytes(mask) / 2**20:8.3f} MiB")
    ms, gib = timed(lambda: step(None), device, args.iters)
    print(f"  plain causal SDPA, no documents (the bound to approach): {ms:8.2f} ms/step  peak +{gib:6.2f} GiB")


def no_recompilation(args, device: torch.device, dtype: torch.dtype) -> bool:
    """A second micro-batch with other document ids must reuse the compiled mask builder and kernel."""
    ok = recompiles_not(args, device, dtype, "flex", compile_block=False)
    return recompiles_not(args, device, dtype, "flex in a compiled block", compile_block=True) and ok


def recompiles_not(args, device: torch.device, dtype: torch.dtype, label: str, compile_block: bool) -> bool:
    import torch._dynamo

    torch._dynamo.reset()
    cfg = replace(CONFIGS["tinyllama-1.1b"], max_seq_len=args.seq_len)
    block, cos, sin = make_block(cfg, device)
    block = block.to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if compile_block:
        block.compile(fullgraph=True)
    x = torch.randn(args.batch, args.seq_len, cfg.dim, device=device, dtype=dtype)

    def step(seed):
        mask = document_mask(document_ids(args.batch, args.seq_len, args.docs, seed).to(device), "flex")
        block(x, cos, sin, mask).float().pow(2).mean().backward()

    t = time.perf_counter()
    try:
        step(10)
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t
        torch._dynamo.config.error_on_recompile = True
        step(11)
        step(12)
        print(f"  {label:<26} compiled in {first:5.1f} s; other document ids: no recompilation")
        return True
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        print(f"  {label:<26} FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
        return False
    finally:
        torch._dynamo.config.error_on_recompile = False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--docs", type=int, default=6, help="documents per row")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-forward-only", action="store_true",
                   help="check the script on CPU: the bf16 forward comparison only, small sizes")
    args = p.parse_args(argv)
    if args.cpu_forward_only:
        args.batch, args.seq_len = min(args.batch, 2), min(args.seq_len, 256)
        torch.manual_seed(0)
        ok = compare(args, torch.device("cpu"), torch.bfloat16, backward=False)
        print("\nCPU forward check " + ("passed" if ok else "FAILED"))
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("gpu_check_attention: no CUDA device here: nothing to check (run it on a GPU machine; "
              "--cpu-forward-only checks the script itself)")
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    ok = compare(args, device, torch.bfloat16, backward=True)
    benchmark(args, device, torch.bfloat16)
    print("\nrecompilation")
    ok &= no_recompilation(args, device, torch.bfloat16)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
