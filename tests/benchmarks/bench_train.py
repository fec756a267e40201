"""Benchmark: training throughput of the bundled trainer (`tinyprep train`'s Trainer, FSDP2).

    python tests/benchmarks/bench_train.py [--device auto|cpu|cuda] [--model M] [--seq N]
        [--micro-batch N] [--nproc N] [--warmup N] [--steps N] [--rounds N] [--compile] [--ac]

A run of random synthetic tokens (tests/synthetic.py: one source, Megatron shards, a mixture
planned by the mix stage) is checked by the trainer's own `prepare`, then every rank builds the
trainer's `Trainer` (parallelize.build_model: meta device, FSDP2, bf16 on GPU; AdamW; the mixture
loader) and runs its step: the next batch from the loader, `forward_backward`, `clip_gradients`,
the optimizer's step. A few warmup steps (compilation, allocator), then timed steps.

* GPU (default when torch sees one): tinyllama-1.1b, seq 2048, bf16, micro-batch 8 per GPU,
  FSDP2 over every visible GPU (one process each), optional `--compile` and `--ac` (activation
  checkpointing). Tokens/s per GPU (wall time between CUDA synchronizations) and MFU
  (metrics.peak_flops, LlamaConfig.flops_per_token: torchtitan's formula), beside TinyLlama's
  published 24k tokens/s per A100-40G at 56% MFU.
* CPU: llama-12m, seq 256, micro-batch 8, one process, one thread. Tokens per CPU-second of this
  process (`time.process_time`, i.e. per core), and the same for a baseline measured in the same
  process on the same batches: transformers' LlamaForCausalLM of the same shape (parameter counts
  checked equal), fp32, eager SDPA, a plain step (forward, cross-entropy, backward, the same
  gradient clipping, torch AdamW with the same settings). The two alternate in `--rounds` rounds
  so that a change in the machine's load falls on both.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py, the tests' run builder

VOCAB = 32000
# TinyLlama's README: 1.1B, seq 2048, 16 A100-40G, "24k tokens/second/A100, 56% model flops utilization"
TINYLLAMA = {"tokens_per_s_per_gpu": 24_000, "mfu": 0.56, "gpu": "A100-40G"}
DEFAULTS = {  # device -> model, seq, micro-batch, warmup, timed steps per round, rounds
    "cuda": {"model": "tinyllama-1.1b", "seq": 2048, "micro_batch": 8, "warmup": 3, "steps": 10, "rounds": 1},
    "cpu": {"model": "llama-12m", "seq": 256, "micro_batch": 8, "warmup": 1, "steps": 3, "rounds": 2},
}


def build_run(run_dir: str, tokens: int, seq: int, seed: int = 0) -> None:
    """One source of random tokens (documents of ~1,000 tokens starting with BOS), planned."""
    import synthetic

    rng = np.random.default_rng(seed)
    docs = synthetic.documents(rng, tokens // 1000 + 1, VOCAB, 1000, kind="random")
    half = len(docs) // 2
    synthetic.write_run(run_dir, {"web": {"train": [docs[:half], docs[half:]]}}, {"web": 1.0}, seq_len=seq,
                        vocab=VOCAB)


def make_plan(run_dir: str, args, device: str, nproc: int):
    from pipeline.recipe import parse_recipe
    from pipeline.train.trainer import prepare

    recipe = parse_recipe({
        "name": "bench-train", "output": run_dir,
        "sources": [{"name": "web", "urls": ["unused"], "weight": 1.0}],
        "mix": {"seq_len": args.seq, "seed": 42, "token_budget": None},
        "train": {"model": args.model, "global_batch": args.micro_batch * nproc, "micro_batch": args.micro_batch,
                  "max_steps": args.warmup + args.steps * args.rounds, "warmup_steps": 0, "eval_every": 0,
                  "checkpoint_every": 0, "log_every": 1_000_000, "device": device, "nproc": nproc,
                  "compile": args.compile, "activation_checkpointing": args.ac},
    })
    return prepare(recipe, nproc)


def trainer_step(trainer, batches) -> None:
    """One optimizer step as Trainer.fit takes it (its loader, micro-batches, clipping, AdamW)."""
    trainer.train_step(next(batches).tokens)


class Baseline:
    """transformers' LlamaForCausalLM of the plan's shape, trained by a plain eager step."""

    def __init__(self, plan):
        import torch
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        m, cfg = plan.model, plan.cfg
        hf = HFConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.mlp_dim,
                      num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.n_kv_head,
                      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_base,
                      tie_word_embeddings=False, attn_implementation="sdpa")
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(hf)
        self.params = sum(p.numel() for p in self.model.parameters())
        if self.params != m.num_params():
            raise SystemExit(f"baseline shape differs: {self.params:,} parameters, trainer {m.num_params():,}")
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.grad_clip, self.micro_batch = cfg.grad_clip, cfg.micro_batch

    def step(self, batches) -> None:
        import torch
        import torch.nn.functional as F

        tokens = next(batches).tokens
        accum = len(tokens) // self.micro_batch
        for i in range(accum):
            part = tokens[i * self.micro_batch:(i + 1) * self.micro_batch]
            logits = self.model(input_ids=part[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _rank(env, plan, args, out_path: str) -> None:
    import torch

    from pipeline.train.loader import MixtureLoader
    from pipeline.train.metrics import peak_flops
    from pipeline.train.trainer import Trainer

    cuda = env.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(env.device)

    trainer = Trainer(env, plan)
    baseline = base_loader = base_batches = None
    try:
        if not cuda and env.world == 1:
            baseline = Baseline(plan)
            base_loader = MixtureLoader(plan.run_url, plan.manifest, plan.mixture, plan.cfg.global_batch)
            base_batches = iter(base_loader)
        batches = iter(trainer.loader)
        t = time.perf_counter()
        for _ in range(args.warmup):
            trainer_step(trainer, batches)
            if baseline:
                baseline.step(base_batches)
        sync()
        warmup_s = time.perf_counter() - t
        timed = {"trainer": [0.0, 0.0], "baseline": [0.0, 0.0]}  # CPU-s, wall-s
        for _ in range(args.rounds):
            for name, step, it in (("trainer", lambda b: trainer_step(trainer, b), batches),
                                   ("baseline", baseline.step if baseline else None, base_batches)):
                if step is None:
                    continue
                sync()
                c, w = time.process_time(), time.perf_counter()
                for _ in range(args.steps):
                    step(it)
                sync()
                timed[name][0] += time.process_time() - c
                timed[name][1] += time.perf_counter() - w
        if not env.is_main:
            return
        m = plan.model
        tokens = args.steps * args.rounds * plan.cfg.global_batch * plan.mixture.seq_len  # all ranks
        flops_per_token = m.flops_per_token(plan.mixture.seq_len)
        result = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(env.device) if cuda else "cpu", "world": env.world,
            "model": plan.cfg.model, "params": m.num_params(), "seq_len": plan.mixture.seq_len,
            "micro_batch": plan.cfg.micro_batch, "global_batch": plan.cfg.global_batch,
            "precision": "bf16" if trainer.bf16 else "fp32", "compile": plan.cfg.compile,
            "activation_checkpointing": plan.cfg.activation_checkpointing,
            "warmup_steps": args.warmup, "timed_steps": args.steps * args.rounds, "warmup_s": round(warmup_s, 2),
            "flops_per_token": flops_per_token,
        }
        per_device = tokens / timed["trainer"][1] / env.world
        result.update({"step_s": timed["trainer"][1] / (args.steps * args.rounds),
                       "tokens_per_s_per_device": per_device})
        if cuda:
            peak = peak_flops(env.device, args.peak_flops)
            result.update({
                "peak_flops": peak, "mfu": flops_per_token * per_device / peak if peak else None,
                "max_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30,
                "tinyllama": TINYLLAMA,
            })
        else:
            result["threads"] = torch.get_num_threads()
        if baseline:
            ours, base = tokens / timed["trainer"][0], tokens / timed["baseline"][0]
            result.update({
                "step_cpu_s": timed["trainer"][0] / (args.steps * args.rounds),
                "tokens_per_cpu_s": ours, "flops_per_cpu_s": flops_per_token * ours,
                "baseline_tokens_per_cpu_s": base, "ratio": ours / base,
                "baseline_tokens_per_s": tokens / timed["baseline"][1],
                "baseline": "transformers LlamaForCausalLM, eager, sdpa attention, fp32, AdamW",
            })
        Path(out_path).write_text(json.dumps(result))
    finally:
        trainer.close()
        if base_loader is not None:
            base_loader.shards.close()


def report(r: dict) -> None:
    shape = (f"{r['model']} ({r['params'] / 1e6:,.1f}M parameters), seq {r['seq_len']}, micro-batch "
             f"{r['micro_batch']}, {r['precision']}, compile {r['compile']}, activation checkpointing "
             f"{r['activation_checkpointing']}")
    print(f"{shape}; {r['timed_steps']} timed steps after {r['warmup_steps']} warmup ({r['warmup_s']:.1f} s)")
    if r["device"] != "cpu":
        ref = r["tinyllama"]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (set --peak-flops)"
        print(f"{r['world']} x {r['device']}: {r['tokens_per_s_per_device']:,.0f} tokens/s per GPU, MFU {mfu}, "
              f"{r['step_s']:.3f} s per step, peak memory {r['max_memory_gib']:.1f} GiB")
        print(f"TinyLlama (published): {ref['tokens_per_s_per_gpu']:,} tokens/s per {ref['gpu']}, "
              f"MFU {100 * ref['mfu']:.0f}%")
    elif "ratio" in r:
        print(f"CPU, {r['threads']} thread(s): tinyprep Trainer {r['tokens_per_cpu_s']:,.0f} tokens per CPU-s "
              f"({r['step_cpu_s']:.2f} CPU-s per step, {r['flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-s); "
              f"transformers LlamaForCausalLM {r['baseline_tokens_per_cpu_s']:,.0f}; ratio {r['ratio']:.2f}x")
    else:
        print(f"{r['world']} CPU rank(s), {r['threads']} thread(s) each: {r['tokens_per_s_per_device']:,.0f} tokens/s "
              f"per rank (wall, no baseline)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--model")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--nproc", type=int, help="ranks (default: every visible GPU, or 1 on CPU: the baseline "
                    "runs only with one CPU rank)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--steps", type=int, help="timed steps per round")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s of one GPU (default: by name)")
    args = ap.parse_args()

    from pipeline.train.distributed import DeviceError, launch, pick_device

    try:
        device = pick_device(args.device)
    except DeviceError as e:
        raise SystemExit(f"error: {e}") from None
    for key, value in DEFAULTS[device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if device == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank: tokens per CPU-second is per core
        nproc = args.nproc or 1
    else:
        import torch

        nproc = args.nproc or torch.cuda.device_count()
    tokens = (args.warmup + args.steps * args.rounds) * 2 * args.micro_batch * nproc * (args.seq + 1)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        run_dir = os.path.join(tmp, "run")
        build_run(run_dir, int(tokens * 1.2) + 10_000, args.seq)
        plan = make_plan(run_dir, args, device, nproc)
        out = os.path.join(tmp, "result.json")
        launch(_rank, (plan, args, out), plan.nproc, plan.device)
        result = json.loads(Path(out).read_text())
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
