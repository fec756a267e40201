"""The mixture stream: sample i of the global stream, and each rank's part of each global batch.

Global sample i is a pure function of (mixture, global batch size, i):

1. batch b = i // B; the allocation (mixing.py) says which source position i % B of batch b holds
   and k, how many samples of that source came before it in the stream;
2. epoch e = k // n_s and position p = k % n_s, with n_s the source's samples per epoch;
3. the epoch's permutation (permutation.py, keyed by the mixture seed, the source and e) maps p to
   j: the source's sample j, the seq_len + 1 tokens starting at token j * seq_len of the source's
   stream (its train shards concatenated in manifest order, across document boundaries);
4. the shard and offset come from one cumulative token count per shard (shards.py).

Nothing per sample or per document is stored, so start-up and memory do not grow with the corpus,
there is no pause between epochs, and the resume state is one integer: samples consumed (a
multiple of B). Rank r of W takes the contiguous slice [r B / W, (r + 1) B / W) of every global
batch, so a batch's contents do not depend on W; a run can resume on another world size.

On a GPU the trainer takes its batches from `prefetch()`: one background thread reads a couple of
batches ahead into a bounded queue, in the same order, while `samples` advances only as the
training step takes each one; on a CPU, where the step keeps every core busy, the same iterator
reads in next(). There is no torch DataLoader with worker processes: the loader spends about 2 ms
of CPU per million tokens handed out (tests/benchmarks/bench_loader.py), mostly in os.preadv and
numpy, which release the GIL, so one thread keeps ahead of any training step; worker processes
would add a copy of every batch through shared memory, their own shard file handles (which cannot
cross a spawn or forkserver start) and a second resume position running ahead of the trainer's.

Every batch's token ids are checked as they are read, before the model sees them (`first_bad_row`):
an id outside the tokenizer's vocabulary (manifest.json `tokenizer.vocab_size`; torch would stop
with an IndexError deep in the embedding) and a window of seq_len + 1 zeros both stop with
FormatError naming the shard and the token offset. All zeros is what a zeroed, hole-punched or
half-copied file reads as; id 0 is `<unk>` for SentencePiece tokenizers, and no real text is a
whole window of one token, so it is refused rather than trained on. Damage that leaves some ids in
each window is not detected here (the shards' sha256 are: `tinyprep verify`). The check is one max
per row over a staging buffer of several batches (STAGE_BYTES, so that numpy's call overhead is paid
once for them): about 5% of the loader's CPU time at 8 x 2049 tokens a batch
(tests/benchmarks/bench_loader.py), microseconds against a training step.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..formats import FormatError
from ..formats.manifest import Manifest, Mixture
from .mixing import MixtureSchedule
from .permutation import FeistelPermutation, derive_keys
from .shards import ShardSet, SourceStream

INDEX_CHUNK = 4096  # samples whose indices are computed at once (amortizes numpy call overhead)
STAGE_BYTES = 512 << 10  # rows read (and their ids checked) before batches are handed out: fits L2
PREFETCH_DEPTH = 2  # batches the prefetch thread reads ahead of the training step
QUEUE_POLL_S = 1.0  # how often a consumer waiting for a batch checks that the prefetch thread lives
_FIELDS = ("source", "epoch", "position", "sample")


@dataclass(frozen=True)
class SampleRefs:
    """Where samples come from: source number, epoch, position in the epoch, permuted sample
    index j (tokens [j seq_len, j seq_len + seq_len + 1) of the source stream)."""

    source: np.ndarray
    epoch: np.ndarray
    position: np.ndarray
    sample: np.ndarray


@dataclass
class Batch:
    """One rank's part of global batch `index`: tokens (rows, seq_len + 1) as int64, and the
    source of each row; wait_s: how long the consumer waited for it (set by `Prefetch`)."""

    index: int
    tokens: torch.Tensor
    sources: np.ndarray
    wait_s: float = 0.0


class MixtureIndex:
    """Index math of the global stream (no I/O): sample i -> source, epoch, permuted sample."""

    def __init__(self, mixture: Mixture, global_batch: int):
        self.mixture = mixture
        self.seq_len = mixture.seq_len
        self.global_batch = int(global_batch)
        self.names = [s.name for s in mixture.sources]
        self.per_epoch = np.array([s.samples_per_epoch for s in mixture.sources], dtype=np.int64)
        self.schedule = MixtureSchedule([s.samples for s in mixture.sources], self.global_batch)
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def permutation(self, source: int, epoch: int) -> FeistelPermutation:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            keys = derive_keys("tinyprep-epoch", self.mixture.seed, self.names[source], epoch)
            perm = self._perms[key] = FeistelPermutation(int(self.per_epoch[source]), keys)
        return perm

    def refs(self, start: int, stop: int) -> SampleRefs:
        """Global samples [start, stop)."""
        src, k = self.schedule.assign(start, stop)
        n = self.per_epoch[src]
        epoch, pos = np.divmod(k, n)
        sample = np.empty_like(pos)
        for s in np.unique(src).tolist():
            sel = src == s
            for e in np.unique(epoch[sel]).tolist():
                m = sel & (epoch == e)
                sample[m] = self.permutation(s, e)(pos[m])
        return SampleRefs(src, epoch, pos, sample)

    def consumed(self, samples: int) -> dict[str, dict[str, float]]:
        """Per source after `samples` global samples: samples, tokens (seq_len each) and epochs."""
        counts = self.schedule.counts_before(samples)
        return {name: {"samples": int(c), "tokens": int(c) * self.seq_len, "epochs": float(c) / float(n)}
                for name, c, n in zip(self.names, counts, self.per_epoch)}


# -- the plan: everything the stream is a function of (checkpoints keep it; resuming compares it) --

PLAN_VERSION = 1
_PLAN_KEYS = {"version": int, "seq_len": int, "seed": int, "global_batch": int, "token_budget": int,
              "total_samples": int, "sources": list}
_PLAN_SOURCE_KEYS = {"name": str, "weight": (int, float), "samples": int, "samples_per_epoch": int, "shards": int,
                     "tokens": int, "shards_sha256": str}


def plan_record(manifest: Manifest, mixture: Mixture, global_batch: int) -> dict:
    """What the sample stream of (mixture, global batch) is a function of, for meta.json: the
    stream-defining fields of mixture.json, the train shards' checksums of each source (as one
    digest) and the global batch; token_budget and the weights are kept to say why samples moved."""
    checksums = {e.path: e.bin_sha256 for e in manifest.shards if e.split == "train"}
    sources = []
    for s in mixture.sources:
        digest = hashlib.sha256("\n".join(checksums.get(p, "") for p in s.shards).encode()).hexdigest()
        sources.append({"name": s.name, "weight": s.weight, "samples": s.samples,
                        "samples_per_epoch": s.samples_per_epoch, "shards": len(s.shards),
                        "tokens": s.available_tokens, "shards_sha256": digest})
    return {"version": PLAN_VERSION, "seq_len": mixture.seq_len, "seed": mixture.seed,
            "global_batch": int(global_batch), "token_budget": mixture.token_budget,
            "total_samples": mixture.total_samples, "sources": sources}


def _typed(obj, keys: dict) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(obj.get(k), t) and not isinstance(obj.get(k), bool) for k, t in keys.items())


def is_plan_record(rec) -> bool:
    """A well-formed plan record of this version (meta.json's `plan`, a loader state's)."""
    return (_typed(rec, _PLAN_KEYS) and rec["version"] == PLAN_VERSION and bool(rec["sources"])
            and all(_typed(s, _PLAN_SOURCE_KEYS) for s in rec["sources"]))


def _shares(rec: dict) -> list[int]:
    """Each source's share of a global batch as mixing.py allocates it (in 1/PERIOD samples): the
    planned counts matter to the stream only through these (a plan of no sample has none)."""
    planned = [s["samples"] for s in rec["sources"]]
    return MixtureSchedule(planned, rec["global_batch"]).units if sum(planned) > 0 else []


def _shards_phrase(a: dict, b: dict) -> str:
    if (a["shards"], a["tokens"]) == (b["shards"], b["tokens"]):
        return f"source {a['name']!r} train shards have other contents ({a['shards']:,} shards, {a['tokens']:,} tokens)"
    return (f"source {a['name']!r} train shards {a['shards']:,} ({a['tokens']:,} tokens) -> "
            f"{b['shards']:,} ({b['tokens']:,} tokens)")


def plan_changes(saved: dict, current: dict) -> list[str]:
    """The changes from the plan a checkpoint was trained on (`saved`) to this run's (`current`)
    that alter the sample stream, one phrase each ("source 'web' samples 70 -> 88, source 'code'
    samples 30 -> 37 (mix.token_budget 3,200 -> 4,000)"); empty when every sample to come is the same."""
    out = []
    for key, name in (("seq_len", "mix.seq_len"), ("seed", "mix.seed"), ("global_batch", "train.global_batch")):
        if saved[key] != current[key]:
            out.append(f"{name} {saved[key]:,} -> {current[key]:,}")
    names = ([s["name"] for s in saved["sources"]], [s["name"] for s in current["sources"]])
    if names[0] != names[1]:
        return out + [f"sources {names[0]} -> {names[1]}"]
    pairs = list(zip(saved["sources"], current["sources"]))
    for a, b in pairs:
        if a["shards_sha256"] != b["shards_sha256"] or a["tokens"] != b["tokens"]:
            out.append(_shards_phrase(a, b))  # samples_per_epoch follows from tokens and seq_len
    moved = [(a, b) for a, b in pairs if a["samples"] != b["samples"]]
    if moved and saved["global_batch"] == current["global_batch"] and _shares(saved) != _shares(current):
        phrases = [f"source {a['name']!r} samples {a['samples']:,} -> {b['samples']:,}" +
                   (f" (weight {a['weight']:.6g} -> {b['weight']:.6g})" if a["weight"] != b["weight"] else "")
                   for a, b in moved]
        if saved["token_budget"] != current["token_budget"]:
            phrases[-1] += f" (mix.token_budget {saved['token_budget']:,} -> {current['token_budget']:,})"
        elif all(a["weight"] == b["weight"] for a, b in moved):
            phrases[-1] += " (mix.token_budget or the weights changed?)"
        out.append(", ".join(phrases))
    return out


def first_bad_row(rows: np.ndarray, vocab_size: int, hi: np.ndarray | None = None) -> int:
    """-1 when every row (a token window) holds ids in [0, vocab_size) and is not all zeros, else the
    first row that is not. The common case is a max per row (into `hi` if given: scratch of len(rows)
    and the rows' dtype) and one max of those maxima minus one, taken unsigned: an all-zero row's
    wraps around to the largest value, so a single comparison catches both (numpy's call overhead,
    not the arithmetic, is the cost at small batches)."""
    hi = np.maximum.reduce(rows, 1, out=hi)
    wrapped = hi.view(np.dtype(f"u{hi.dtype.itemsize}"))
    np.subtract(wrapped, 1, out=wrapped)
    signed = rows.dtype.kind == "i"
    if int(np.maximum.reduce(wrapped, None)) < vocab_size - 1 and not (
            signed and int(np.minimum.reduce(rows, None)) < 0):
        return -1
    top = rows.max(axis=1).tolist()
    low = rows.min(axis=1).tolist() if signed else [0] * len(top)
    return next(i for i, (a, b) in enumerate(zip(low, top)) if b == 0 or b >= vocab_size or a < 0)


def window_error(stream: SourceStream, start: int, row: np.ndarray, vocab_size: int) -> FormatError:
    """The error for a window that first_bad_row refused: the shard file and the token offset."""
    outside = np.flatnonzero((row >= vocab_size) | (row < 0))
    if outside.size:
        col = int(outside[0])
        path, offset = stream.where(start + col)
        what = (f"token id {int(row[col])} is outside the tokenizer's vocabulary of {vocab_size:,} ids "
                "(manifest.json tokenizer.vocab_size): the shard is damaged or comes from another tokenizer")
    else:
        path, offset = stream.where(start)
        what = (f"the {row.size:,} tokens from here are all 0 (a zeroed or hole-punched file?); "
                "tinyprep verify compares the shards with their checksums")
    return FormatError(f"{path}: token offset {offset:,}: {what}")


def check_world(global_batch: int, world: int, micro_batch: int) -> int:
    """Micro-batches per step of each rank; ValueError unless the global batch splits evenly."""
    if global_batch % world:
        raise ValueError(f"train.global_batch {global_batch} is not divisible by the world size {world} "
                         f"(every rank takes global_batch / world samples of each batch)")
    local = global_batch // world
    if local % micro_batch:
        raise ValueError(f"train.micro_batch {micro_batch} does not divide the {local} samples per rank "
                         f"(global_batch {global_batch} / world size {world})")
    return local // micro_batch


class MixtureLoader:
    """Rank `rank` of `world`: its rows of every global batch, from `samples` consumed onwards."""

    def __init__(self, run_url: str, manifest: Manifest, mixture: Mixture, global_batch: int,
                 rank: int = 0, world: int = 1, samples: int = 0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        if samples % global_batch:
            raise ValueError(f"resume position {samples} is not a multiple of the global batch {global_batch}")
        self.index = MixtureIndex(mixture, global_batch)
        self.seq_len = mixture.seq_len
        self.window = self.seq_len + 1
        self.rank, self.world = rank, world
        self.local = global_batch // world
        self.samples = samples
        self._prefetch = None  # weak reference to the running Prefetch, if any
        entries, self.streams = [], []
        by_path = {e.path: e for e in manifest.shards if e.split == "train"}
        for src in mixture.sources:
            try:
                shard_entries = [by_path[p] for p in src.shards]
            except KeyError as e:
                raise FormatError(f"mixture.json: source {src.name!r} lists shard {e.args[0]!r}, which is not a "
                                  "train shard of manifest.json") from None
            self.streams.append((len(entries), [e.tokens for e in shard_entries]))
            entries.extend(shard_entries)
        self.shards = ShardSet(run_url, entries)
        self.streams = [SourceStream(self.shards, first, tokens) for first, tokens in self.streams]
        for src, stream in zip(mixture.sources, self.streams):
            if stream.tokens != src.available_tokens:
                raise FormatError(f"mixture.json: source {src.name!r}: available_tokens {src.available_tokens:,} "
                                  f"!= {stream.tokens:,} in its shards")
        self.dtype = self.shards.dtype
        self.manifest = manifest
        self.vocab_size = manifest.tokenizer.vocab_size

    # -- state: one integer -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position (samples consumed) and the plan it is a position in (for a trainer of
        one's own that checkpoints the loader as a Stateful)."""
        return {"samples": self.samples, "global_batch": self.index.global_batch,
                "fingerprint": self.index.mixture.fingerprint,
                "plan": plan_record(self.manifest, self.index.mixture, self.index.global_batch)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the state's position; ValueError naming what changed when the state comes
        from a plan whose samples to come differ (a state without a plan: its fingerprint)."""
        if state.get("plan") is not None:
            changes = plan_changes(state["plan"], plan_record(self.manifest, self.index.mixture,
                                                              self.index.global_batch))
            if changes:
                raise ValueError("loader state comes from a different plan: " + "; ".join(changes))
        elif state["fingerprint"] != self.index.mixture.fingerprint:
            raise ValueError("loader state comes from another mixture")
        if state["global_batch"] != self.index.global_batch:
            raise ValueError(f"loader state has global batch {state['global_batch']}, this run "
                             f"{self.index.global_batch}")
        self.samples = int(state["samples"])

    # -- reading ---------------------------------------------------------------------------------
    def rows(self, batch: int) -> tuple[int, int]:
        """This rank's global sample range in global batch `batch`."""
        start = batch * self.index.global_batch + self.rank * self.local
        return start, start + self.local

    def _locate(self, refs: SampleRefs) -> tuple[np.ndarray, np.ndarray]:
        """Shard number and token offset of each window; shard -1 marks a window that spans shards
        (its offset is then the offset in the source stream)."""
        shard = np.empty(refs.sample.size, dtype=np.int64)
        offset = np.empty(refs.sample.size, dtype=np.int64)
        for s in np.unique(refs.source).tolist():
            m = refs.source == s
            starts = refs.sample[m] * self.seq_len
            sh, off, inside = self.streams[s].locate(starts, self.window)
            shard[m] = np.where(inside, sh, -1)
            offset[m] = np.where(inside, off, starts)
        return shard, offset

    def batches(self, start_batch: int | None = None, stop_batch: int | None = None, stride: int = 1):
        """This rank's part of global batches start_batch, start_batch + stride, ... (< stop_batch).

        Index math runs about INDEX_CHUNK samples ahead, vectorized; then each row is one pread
        into a staging buffer of up to STAGE_BYTES (whole batches, at least one), whose token ids
        are checked at once (first_bad_row), and each batch is one conversion to a new int64 tensor.
        A bad window raises FormatError where its batch would come, after the batches before it."""
        gb = self.index.global_batch
        b = self.samples // gb if start_batch is None else start_batch
        per_chunk = max(1, INDEX_CHUNK // gb)
        mine = self.rank * self.local + np.arange(self.local)
        row_bytes = self.window * self.dtype.itemsize
        group = max(1, min(per_chunk, STAGE_BYTES // (self.local * row_bytes)))  # batches per staging fill
        stage = np.empty((group * self.local, self.window), dtype=self.dtype)
        row_max = np.empty(group * self.local, dtype=self.dtype)  # first_bad_row's scratch
        views = [memoryview(row).cast("B") for row in stage]
        fds, open_fd, preadv = self.shards.fds, self.shards.open, os.preadv
        while stop_batch is None or b < stop_batch:
            todo = np.arange(per_chunk) * stride + b
            if stop_batch is not None:
                todo = todo[todo < stop_batch]
                if not todo.size:
                    return
            if stride == 1:  # one contiguous range of global samples
                refs = self.index.refs(int(todo[0]) * gb, (int(todo[-1]) + 1) * gb)
                rows = ((todo - todo[0])[:, None] * gb + mine).reshape(-1)
                refs = SampleRefs(*(getattr(refs, f)[rows] for f in _FIELDS))
            else:
                parts = [self.index.refs(int(x) * gb + int(mine[0]), int(x) * gb + int(mine[-1]) + 1) for x in todo]
                refs = SampleRefs(*(np.concatenate([getattr(r, f) for r in parts]) for f in _FIELDS))
            shard, offset = self._locate(refs)
            shards, byte_offsets = shard.tolist(), (offset * self.dtype.itemsize).tolist()
            xs = todo.tolist()
            for g in range(0, len(xs), group):
                first = g * self.local  # row of refs in stage[0]
                n = min(group, len(xs) - g) * self.local
                r = first
                for j, view in enumerate(views[:n]):
                    sh = shards[r]
                    if sh < 0:  # the window spans shard ends
                        self.streams[int(refs.source[r])].read(int(offset[r]), stage[j])
                    else:
                        fd = fds.get(sh)
                        if preadv(open_fd(sh) if fd is None else fd, [view], byte_offsets[r]) != row_bytes:
                            self.shards.short_read(sh, byte_offsets[r])
                    r += 1
                bad = first_bad_row(stage[:n], self.vocab_size, row_max[:n])
                for k in range((n if bad < 0 else bad) // self.local):  # the batches before a bad one first
                    part = stage[k * self.local:(k + 1) * self.local]
                    lo = first + k * self.local
                    yield Batch(xs[g + k], torch.from_numpy(part.astype(np.int64)), refs.source[lo:lo + self.local])
                if bad >= 0:
                    r = first + bad
                    raise window_error(self.streams[int(refs.source[r])], int(refs.sample[r]) * self.seq_len,
                                       stage[bad], self.vocab_size)
            b = int(todo[-1]) + stride

    def __iter__(self):
        """Batches from the current position on; `samples` advances as each one is handed out."""
        for batch in self.batches():
            self.samples = (batch.index + 1) * self.index.global_batch
            yield batch

    def prefetch(self, depth: int | None = None, device: torch.device | None = None,
                 stop_batch: int | None = None) -> Prefetch:
        """The batches of `iter(self)` as the training step takes them (see Prefetch): read `depth`
        batches ahead by a background thread, or in next() with depth 0. None: PREFETCH_DEPTH for a
        CUDA device (pinned memory), 0 otherwise (a CPU step keeps every core busy, so a thread
        would only take turns with it). One reader at a time: one started earlier is closed first."""
        cuda = device is not None and torch.device(device).type == "cuda"
        if depth is None:
            depth = PREFETCH_DEPTH if cuda else 0
        self.close_prefetch()
        p = Prefetch(self, depth, pin_memory=cuda, stop_batch=stop_batch)
        self._prefetch = weakref.ref(p)  # not a strong one: dropping the iterator stops its thread
        return p

    def close_prefetch(self) -> None:
        p = self._prefetch() if self._prefetch is not None else None
        self._prefetch = None
        if p is not None:
            p.close()

    def close(self) -> None:
        """Stop the prefetch thread (if any), then close the shard files it was reading."""
        self.close_prefetch()
        self.shards.close()


_END = object()  # the last item when batches() ends


class Prefetch:
    """A loader's batches, read ahead by one background thread into a queue of `depth` batches
    (depth 0: read in next(), no thread), and the time the consumer waited for them.

    The order is that of iterating the loader, and so is the resume position: the thread never
    touches `loader.samples`, which advances as the consumer takes each batch, so a checkpoint
    saved after step N resumes at batch N + 1 whatever was read ahead. The thread spends its time
    in os.preadv and numpy (both release the GIL), and with `pin_memory` copies each batch into
    page-locked memory so that the trainer's `.to(device, non_blocking=True)` is asynchronous. An
    error in the thread (a FormatError naming the shard and offset of a bad window) is raised by
    `next()` at the batch where it occurred, after the good batches before it.

    close() (also on garbage collection, and `with` exit) stops the thread: it sets the flag the
    thread checks between batches and empties the queue, which frees a thread blocked on a full
    one (it blocks without a timeout: a thread that woke up to poll would take the GIL, and on a
    busy machine the training step's next turn with it, at random times). wait_s is the
    consumer's total time blocked in next(), each Batch.wait_s its own share: the trainer's signal
    that training waits on data (it should stay near 0 with the thread)."""

    def __init__(self, loader: MixtureLoader, depth: int = PREFETCH_DEPTH, pin_memory: bool = False,
                 stop_batch: int | None = None):
        if depth < 0:
            raise ValueError(f"prefetch depth {depth} must be 0 (no thread) or more")
        self.loader = loader
        self.global_batch = loader.index.global_batch
        self.wait_s = 0.0
        self.taken = 0
        self._done = False
        self._source = loader.batches(loader.samples // self.global_batch, stop_batch)
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self.thread = None
        if depth:
            device = torch.cuda.current_device() if pin_memory and torch.cuda.is_available() else None
            # the thread gets what it needs, not self: dropping the last reference to this object
            # collects it, and __del__ stops the thread
            self.thread = threading.Thread(target=_produce, args=(self._source, self._queue, self._stop, device),
                                           name="tinyprep-prefetch", daemon=True)
            self.thread.start()

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        item = self._get()
        waited = time.perf_counter() - t0
        self.wait_s += waited
        if item is _END or isinstance(item, BaseException):
            self._done = True
            if self.thread is not None:
                self.thread.join()
            if item is _END:
                raise StopIteration
            raise item
        item.wait_s = waited
        self.taken += 1
        self.loader.samples = (item.index + 1) * self.global_batch
        return item

    def _get(self):
        if self.thread is None:
            try:
                return next(self._source)
            except StopIteration:
                return _END
            except Exception as e:  # noqa: BLE001 - raised by __next__, as the thread's are
                return e
        while True:
            try:
                return self._queue.get(timeout=QUEUE_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive():  # it ends with an item unless closed: a last look
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        return RuntimeError("the prefetch thread ended without handing out its last item")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait (up to `timeout` s) until it has ended; batches read ahead are
        dropped, and `loader.samples` stays at the last batch taken."""
        self._done = True
        self._stop.set()
        _drain(self._queue)  # a producer blocked on a full queue sees the flag at once
        if self.thread is None:
            self._source.close()
        elif self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:  # no join here: the flag and an empty queue end the thread shortly
            stop.set()
            _drain(self._queue)


def _drain(q: queue.Queue) -> None:
    with q.mutex:  # no exception handling: this also runs from __del__ at interpreter exit
        q.queue.clear()
        q.not_full.notify_all()


def _produce(source, out: queue.Queue, stop: threading.Event, device: int | None) -> None:
    """The prefetch thread: batches (pinned if `device` is set) into `out`, then _END or the error."""
    last = _END
    try:
        if device is not None:
            torch.cuda.set_device(device)
        for batch in source:
            if stop.is_set():
                return
            if device is not None:
                batch.tokens = batch.tokens.pin_memory()
            if not _put(out, batch, stop):
                return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        last = e
    finally:
        source.close()
    _put(out, last, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Hand `item` over unless closed; False when closed. A put blocked on a full queue is freed by
    close() emptying it (nothing else puts), and the flag is checked again after it."""
    if stop.is_set():
        return False
    out.put(item)
    return not stop.is_set()


class HoldoutSet:
    """The validation samples: per source, the first `per_source` windows of seq_len + 1 tokens of
    its validation stream (its validation shards in manifest order), every seq_len tokens."""

    def __init__(self, run_url: str, manifest: Manifest, mixture: Mixture, per_source: int):
        self.seq_len = mixture.seq_len
        self.vocab_size = manifest.tokenizer.vocab_size
        self.names: list[str] = []
        entries, spans = [], []
        for src in mixture.sources:
            shard_entries = manifest.shards_of(src.name, "validation")
            total = sum(e.tokens for e in shard_entries)
            n = min(per_source, max(total - 1, 0) // self.seq_len)
            if n:
                self.names.append(src.name)
                spans.append((len(entries), [e.tokens for e in shard_entries], n))
                entries.extend(shard_entries)
        self.shards = ShardSet(run_url, entries) if entries else None
        self.streams = [SourceStream(self.shards, first, tokens) for first, tokens, _ in spans]
        # (source number in self.names, window index) of every validation sample, in order
        self.items = [(s, j) for s, (_, _, n) in enumerate(spans) for j in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def read(self, items: list[tuple[int, int]]) -> torch.Tensor:
        buf = np.empty((len(items), self.seq_len + 1), dtype=self.shards.dtype if self.shards else np.uint16)
        for row, (s, j) in enumerate(items):
            self.streams[s].read(j * self.seq_len, buf[row])
        bad = first_bad_row(buf, self.vocab_size) if len(items) else -1
        if bad >= 0:
            s, j = items[bad]
            raise window_error(self.streams[s], j * self.seq_len, buf[bad], self.vocab_size)
        return torch.from_numpy(buf.astype(np.int64))
