"""Benchmark: the trainer's mixture loader against a TinyLlama-style PackedDataset, and its start-up
on a 3T-token plan.

    python tests/benchmarks/bench_loader.py [--mtokens 200] [--seconds 3] [--runs 3] [--json]
        [--step-ms 5] [--steps 200] [--tiny-steps 20]

Builds a run of `--mtokens` million random uint16 tokens in two sources (weights 0.693584 /
0.306416 as TinyLlama, documents of about 1,000 tokens starting with BOS, Megatron shards of 2^24
tokens), plans it with the mix stage (seq_len 2048), exports the same train tokens as TinyLlama
LITPKDS chunks (`tinyprep export --format litgpt`: 2049 x 1024-token chunks), reads every file once
(page cache), then measures in this process, one thread (`torch.set_num_threads(1)`):

* memmap: sequential reads of 8 x 2049 tokens from one memory-mapped shard, converted to an int64
  tensor: the floor of any loader's work (no shuffling, no mixing);
* packed: a PackedDataset written here from TinyLlama's description (lit_gpt/packed_dataset.py):
  per source, files sorted then shuffled with the seed, 8 chunks memory-mapped at a time, a random
  permutation of their 2049-token blocks, one block per `__next__` as an int64 tensor; a
  CombinedDataset drawing the source of every sample at random with the weights; a torch
  DataLoader(batch_size=8) collating the samples;
* mixture: `MixtureLoader` (global batch 8, one rank), which the trainer iterates: exact per-batch
  proportions, a fresh permutation of every source each epoch, int64 tensors of 8 x 2049 tokens.

Throughput is tokens handed out per CPU-second of this process (`time.process_time`), i.e. per
core; best of `--runs` runs of about `--seconds` each. Then, in a fresh process each, start-up on a
synthetic plan describing 3.03T tokens (TinyLlama's two sources, 2^27-token shards: 22,579 shards,
no shard on disk) and a 3T-token budget: time and memory to load and check manifest.json and
mixture.json, build the loader at step 1,000,000 of 8 ranks and compute the first batch's indices.

Last, whether the training step waits on data: a loop of steps that each take the rank's batch
(`next()`) and run a step on it, reading in the step (plain iteration) or from a prefetch thread
two batches ahead (`MixtureLoader.prefetch(2)`, the trainer's iterator on a GPU); the share of
the loop's wall time spent in `next()`, and the batches' crc32 in order, which must be identical.
Two steps: `--step-ms` of sleep, the host waiting on a device, with rank 0 of 8 at TinyLlama's
global batch 1024 (128 x 2049 tokens a step), and the trainer's step on the `tiny` model on this
CPU with the sample recipe's shape (seq_len 512, global batch 8, micro-batch 4, a 4,000-id
vocabulary) on a 3M-token run: a step that keeps the core busy, where the trainer reads in next().
No GPU part: the trainer's GPU step time and MFU are not measured here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py, the tests' run builder

WEIGHTS = {"slimpajama": 0.693584, "starcoderdata": 0.306416}
SEQ_LEN, BATCH = 2048, 8


# -- the run -----------------------------------------------------------------------------------------

def build_run(run_dir: str, mtokens: float, seed: int = 0, vocab: int = 32000, seq_len: int = SEQ_LEN) -> dict:
    """Shards of random tokens (documents of ~1,000 tokens) for two sources, manifest, mixture."""
    import synthetic

    from pipeline import storage
    from pipeline.formats.manifest import ShardEntry, TokenizerInfo, make_manifest
    from pipeline.formats.megatron import MegatronWriter

    rng = np.random.default_rng(seed)
    entries = []
    shard_tokens = 1 << 24
    for name, w in WEIGHTS.items():
        total = int(mtokens * 1e6 * w)
        for split, n_tokens in (("train", total), ("validation", 100_000)):
            i, left = 0, n_tokens
            while left > 0:
                size = min(shard_tokens, left)
                lengths = rng.integers(500, 1500, size=size // 1000 + 2)
                lengths = lengths[np.cumsum(lengths) <= size]
                lengths = np.append(lengths, size - lengths.sum()) if lengths.sum() < size else lengths
                tokens = rng.integers(3, vocab, size=size, dtype=np.uint16)
                tokens[np.cumsum(lengths) - lengths] = synthetic.BOS
                path = f"shards/{name}/{split}/{i:05d}"
                with MegatronWriter(storage.join(run_dir, path), np.uint16) as wr:
                    wr.add_documents(tokens, lengths)
                    info = wr.close()
                entries.append(ShardEntry(path=path, source=name, split=split, docs=info["docs"],
                                          tokens=info["tokens"], dtype="uint16", bin_sha256=info["bin_sha256"],
                                          idx_sha256=info["idx_sha256"], bin_bytes=info["bin_bytes"]))
                left -= size
                i += 1
    import hashlib

    tok = TokenizerInfo(path="synthetic.model", sha256=hashlib.sha256(b"synthetic").hexdigest(), vocab_size=vocab,
                        bos_id=1, eos_id=2)
    synthetic.plan(run_dir, make_manifest(tok, True, False, "uint16", entries), WEIGHTS, seq_len)
    return {"shards": len(entries), "train_tokens": sum(e.tokens for e in entries if e.split == "train")}


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(16 << 20):
                pass


# -- TinyLlama-style PackedDataset, from its description ------------------------------------------------

HDR_SIZE = 24


class PackedDataset:
    """lit_gpt/packed_dataset.py's reading scheme: n_chunks memory-mapped chunk files at a time, a
    random permutation of their blocks of block_size tokens, one block per sample."""

    def __init__(self, filenames: list[str], n_chunks: int, block_size: int, seed: int, shuffle: bool = True):
        self.filenames, self.n_chunks, self.block_size = filenames, n_chunks, block_size
        self.seed, self.shuffle = seed, shuffle

    def __iter__(self):
        return PackedDatasetIterator(self.filenames, self.n_chunks, self.block_size, self.seed, self.shuffle)


class PackedDatasetIterator:
    def __init__(self, filenames, n_chunks, block_size, seed, shuffle):
        from pipeline.formats.litpkds import DTYPE_CODES, HEADER

        self.filenames, self.n_chunks, self.block_size, self.shuffle = filenames, n_chunks, block_size, shuffle
        self.rng = np.random.default_rng(seed) if shuffle else None
        with open(filenames[0], "rb") as fh:
            _, _, code, chunk_size = HEADER.unpack(fh.read(HEADER.size))
        self.dtype, self.chunk_size = DTYPE_CODES[code], chunk_size
        self.n_blocks = chunk_size // block_size
        self.file_idx = 0
        self.buffers: list = []
        self.load_n_chunks()

    def load_n_chunks(self):
        if self.file_idx + self.n_chunks > len(self.filenames):
            self.file_idx = 0  # wrap
        self.buffers = [np.memmap(f, mode="r", order="C", offset=HDR_SIZE)
                        for f in self.filenames[self.file_idx:self.file_idx + self.n_chunks]]
        self.file_idx += self.n_chunks
        n_all = len(self.buffers) * self.n_blocks
        self.block_idxs = self.rng.permutation(n_all) if self.shuffle else range(n_all)
        self.curr_idx = 0

    def __next__(self):
        import torch

        if self.curr_idx >= len(self.block_idxs):
            self.load_n_chunks()
        block_idx = self.block_idxs[self.curr_idx]
        chunk_id = block_idx // self.n_blocks
        buffer = self.buffers[chunk_id]
        elem_id = (block_idx % self.n_blocks) * self.block_size
        offset = np.dtype(self.dtype).itemsize * elem_id
        arr = np.frombuffer(buffer, dtype=self.dtype, count=self.block_size, offset=offset)
        self.curr_idx += 1
        return torch.from_numpy(arr.astype(np.int64))


class CombinedDataset:
    """TinyLlama's mixing: the source of every sample drawn at random with the weights."""

    def __init__(self, datasets, seed, weights):
        self.datasets, self.seed, self.weights = datasets, seed, weights

    def __iter__(self):
        iterators = [iter(d) for d in self.datasets]
        rng = random.Random(self.seed)
        while True:
            (it,) = rng.choices(iterators, weights=self.weights, k=1)
            yield next(it)


def packed_loader(chunk_dir: str, seed: int = 42):
    import torch

    datasets = []
    for prefix in ("train_slimpajama", "train_starcoder"):
        files = sorted(glob.glob(os.path.join(chunk_dir, f"{prefix}*")))
        random.Random(seed).shuffle(files)
        datasets.append(PackedDataset(files, n_chunks=8, block_size=SEQ_LEN + 1, seed=seed, shuffle=True))

    class Combined(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(CombinedDataset(datasets, seed, list(WEIGHTS.values())))

    return torch.utils.data.DataLoader(Combined(), batch_size=BATCH, shuffle=False, num_workers=0)


# -- measurements ------------------------------------------------------------------------------------

def measure(make_iter, seconds: float, runs: int) -> float:
    """Best tokens per CPU-second over `runs` runs of about `seconds` each."""
    best = 0.0
    for _ in range(runs):
        it = make_iter()
        next(it)  # start-up apart
        tokens, t0 = 0, time.process_time()
        while True:
            for _ in range(200):
                tokens += next(it).numel()
            spent = time.process_time() - t0
            if spent >= seconds:
                break
        best = max(best, tokens / spent)
    return best


def memmap_batches(run_dir: str):
    import torch

    from pipeline.formats.megatron import MegatronReader

    tokens = MegatronReader(os.path.join(run_dir, "shards/slimpajama/train/00000")).tokens
    n = BATCH * (SEQ_LEN + 1)
    pos = 0
    while True:
        if pos + n > tokens.size:
            pos = 0
        yield torch.from_numpy(np.asarray(tokens[pos:pos + n]).astype(np.int64).reshape(BATCH, SEQ_LEN + 1))
        pos += n


def mixture_batches(run_dir: str):
    from pipeline.formats.manifest import load_plan
    from pipeline.train.loader import MixtureLoader

    manifest, mixture = load_plan(run_dir)
    for batch in MixtureLoader(run_dir, manifest, mixture, global_batch=BATCH):
        yield batch.tokens


# -- does the training step wait on data? -------------------------------------------------------------

def step_wait(run_dir: str, global_batch: int, rank: int, world: int, step, steps: int, prefetch: bool) -> dict:
    """`steps` training steps that each take the rank's batch and run step(batch): the share of the
    loop's wall time spent in next() waiting for the batch, plain iteration (the batch is read
    inside the step) or a prefetch thread; and the batches' crc32 in order."""
    import zlib

    from pipeline.formats.manifest import load_plan
    from pipeline.train.loader import PREFETCH_DEPTH, MixtureLoader

    manifest, mixture = load_plan(run_dir)
    loader = MixtureLoader(run_dir, manifest, mixture, global_batch, rank, world)
    batches = loader.prefetch(PREFETCH_DEPTH) if prefetch else iter(loader)
    waits, sums, hashing = [], [], 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        w0 = time.perf_counter()
        batch = next(batches)
        w1 = time.perf_counter()
        sums.append((batch.index, zlib.crc32(batch.tokens.numpy()), zlib.crc32(batch.sources.tobytes())))
        hashing += time.perf_counter() - w1  # the check, not part of the step
        waits.append(w1 - w0)
        step(batch)
    wall = time.perf_counter() - t0 - hashing
    assert loader.samples == steps * global_batch
    loader.close()
    return {"wall_s": wall, "wait_s": sum(waits), "wait_fraction": sum(waits) / wall, "first_wait_s": waits[0],
            "later_wait_fraction": sum(waits[1:]) / (wall - waits[0]), "max_later_wait_ms": 1e3 * max(waits[1:]),
            "median_wait_ms": 1e3 * float(np.median(waits[1:])),
            "sums": sums}


def sleep_step(ms: float):
    """A step whose host thread waits on the device for `ms` (a GPU step, GIL released)."""
    return lambda batch: time.sleep(ms / 1e3)


def tiny_step(vocab: int, seq_len: int, micro_batch: int = 4):
    """The trainer's step on the `tiny` model on this CPU: forward and backward per micro-batch,
    clip, AdamW (one process, no FSDP)."""
    import torch

    from pipeline.train.model import Llama, model_config
    from pipeline.train.trainer import lm_loss

    model = Llama(model_config("tiny", vocab_size=vocab, max_seq_len=seq_len))
    model.init_weights(1337)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)

    def step(batch) -> None:
        n = batch.tokens.shape[0] // micro_batch
        for i in range(n):
            (lm_loss(model, batch.tokens[i * micro_batch:(i + 1) * micro_batch]) / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compare_wait(run_dir: str, global_batch: int, rank: int, world: int, make_step, steps: int) -> dict:
    """Plain iteration then prefetch, each with a fresh step; the batch sequences must be identical."""
    plain = step_wait(run_dir, global_batch, rank, world, make_step(), steps, prefetch=False)
    ahead = step_wait(run_dir, global_batch, rank, world, make_step(), steps, prefetch=True)
    same = plain.pop("sums") == ahead.pop("sums")
    if not same:
        raise SystemExit("prefetch handed out other batches than plain iteration")
    return {"plain": plain, "prefetch": ahead, "identical_batches": same, "steps": steps}


STARTUP = r"""
import json, sys, time
import numpy, orjson, torch  # imports apart
sys.path.insert(0, sys.argv[2])
from pipeline.formats.manifest import load_plan
from pipeline.train.loader import MixtureLoader

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

trace = sys.argv[3] == "trace"
if trace:
    import tracemalloc
    tracemalloc.start()
rss0 = rss_mb()
c0 = time.process_time()
t0 = time.perf_counter()
manifest, mixture = load_plan(sys.argv[1])
t1 = time.perf_counter()
loader = MixtureLoader(sys.argv[1], manifest, mixture, global_batch=1024, rank=3, world=8, samples=1_000_000 * 1024)
start, stop = loader.rows(1_000_000)
loader._locate(loader.index.refs(start, stop))
t2 = time.perf_counter()
out = {"startup_s": t2 - t0, "startup_cpu_s": time.process_time() - c0, "plan_s": t1 - t0, "loader_s": t2 - t1, "rss_growth_mb": rss_mb() - rss0,
       "total_samples": mixture.total_samples, "shards": len(manifest.shards)}
if trace:
    out["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
print(json.dumps(out))
"""


def startup_3t(tmp: str) -> dict:
    """Best of 3 fresh processes for the time; a 4th under tracemalloc for Python's peak memory."""
    import synthetic

    run = os.path.join(tmp, "plan3t")
    synthetic.write_described_run(run, {"slimpajama": 2_100_000_000_000, "starcoderdata": 930_000_000_000},
                                  WEIGHTS, seq_len=SEQ_LEN, shard_tokens=1 << 27, token_budget=3_000_000_000_000)

    def once(mode: str) -> dict:
        return json.loads(subprocess.run([sys.executable, "-c", STARTUP, run, str(ROOT), mode], capture_output=True,
                                         text=True, check=True).stdout)

    best = min((once("time") for _ in range(3)), key=lambda r: r["startup_s"])
    best["python_peak_mb"] = once("trace")["python_peak_mb"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mtokens", type=float, default=200, help="million tokens in the run (both sources)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step-ms", type=float, default=5.0, help="the fixed step of the wait measurement")
    ap.add_argument("--steps", type=int, default=200, help="steps of the fixed-step wait measurement")
    ap.add_argument("--tiny-steps", type=int, default=20, help="steps of the tiny model in the wait measurement")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from pipeline.tools.export import export_litgpt

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        run = os.path.join(tmp, "run")
        t = time.perf_counter()
        info = build_run(run, args.mtokens)
        chunks = os.path.join(tmp, "litgpt")
        export_litgpt(run, chunks)
        warm(glob.glob(os.path.join(run, "shards/*/train/*.bin")) + glob.glob(os.path.join(chunks, "*.bin")))
        setup_s = time.perf_counter() - t

        results = {
            "memmap": measure(lambda: memmap_batches(run), args.seconds, args.runs),
            "packed": measure(lambda: iter(packed_loader(chunks)), args.seconds, args.runs),
            "mixture": measure(lambda: mixture_batches(run), args.seconds, args.runs),
        }
        # TinyLlama's shape: rank 0 of 8 at global batch 1024 reads 128 x 2049 tokens a step
        fixed = compare_wait(run, 1024, 0, 8, lambda: sleep_step(args.step_ms), args.steps)
        # the sample recipe's shape: seq_len 512, global batch 8, vocabulary 4,000, the tiny model
        small = os.path.join(tmp, "small")
        build_run(small, 3, seed=1, vocab=4000, seq_len=512)
        warm(glob.glob(os.path.join(small, "shards/*/train/*.bin")))
        tiny = compare_wait(small, 8, 0, 1, lambda: tiny_step(4000, 512), args.tiny_steps)
        start = startup_3t(tmp)

    out = {"tokens_per_cpu_s": results, "mixture_vs_packed": results["mixture"] / results["packed"],
           "startup_3t": start, "step_wait": {"fixed_step": {"step_ms": args.step_ms, **fixed}, "tiny_model": tiny},
           "run": info, "setup_s": setup_s, "cpu": os.cpu_count(),
           "batch": f"{BATCH} x {SEQ_LEN + 1}"}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"run: {info['train_tokens'] / 1e6:,.0f}M train tokens in {info['shards']} shards (setup {setup_s:.1f} s); "
          f"batches of {BATCH} x {SEQ_LEN + 1} int64, one thread")
    print(f"{'loader':<44}{'M tokens / CPU-s':>18}")
    names = {"memmap": "sequential memmap read (floor)",
             "packed": "TinyLlama-style PackedDataset + DataLoader(8)",
             "mixture": "MixtureLoader (exact mix, per-epoch perms)"}
    for k, v in results.items():
        print(f"{names[k]:<44}{v / 1e6:>18,.1f}")
    print(f"mixture / packed: {out['mixture_vs_packed']:.2f}x")
    s = start
    print(f"3T-token plan ({s['shards']:,} shards, {s['total_samples']:,} samples): start-up {s['startup_s']:.3f} s "
          f"({s['startup_cpu_s']:.3f} CPU-s; manifest + mixture {s['plan_s']:.3f} s, loader + first batch {s['loader_s']:.3f} s), "
          f"Python peak {s['python_peak_mb']:.0f} MB, RSS growth {s['rss_growth_mb']:.0f} MB")
    print("training loop's wall time spent waiting for the batch, after the first batch (median, max of one wait):")
    for label, r in ((f"{args.step_ms:g} ms step, rank 0 of 8, 128 x 2049 tokens", fixed),
                     ("tiny model's step, 8 x 513 tokens (sample recipe)", tiny)):
        p, a = r["plain"], r["prefetch"]
        print(f"  {label}, {r['steps']} steps of {1e3 * p['wall_s'] / r['steps']:.1f} ms "
              f"(prefetch {1e3 * a['wall_s'] / r['steps']:.1f} ms): "
              f"plain {100 * p['later_wait_fraction']:.2f}% ({p['median_wait_ms']:.3f}, {p['max_later_wait_ms']:.2f} ms), "
              f"prefetch {100 * a['later_wait_fraction']:.3f}% ({a['median_wait_ms']:.3f}, {a['max_later_wait_ms']:.2f} ms; "
              f"first batch {1e3 * a['first_wait_s']:.1f} ms); batches identical: {r['identical_batches']}")


if __name__ == "__main__":
    main()
