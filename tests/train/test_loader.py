"""The mixture stream (pipeline/train/loader.py, mixing.py, permutation.py, shards.py)."""

from __future__ import annotations

import dataclasses
import threading
import time
import tracemalloc

import numpy as np
import pytest
import synthetic
import torch

from pipeline.formats import FormatError
from pipeline.formats.manifest import ManifestError, load_plan
from pipeline.formats.megatron import MegatronReader, MegatronWriter
from pipeline.train.loader import MixtureIndex, MixtureLoader, check_world
from pipeline.train.mixing import PERIOD, MixtureSchedule
from pipeline.train.permutation import FeistelPermutation, derive_keys

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _docs(rng, n_docs, lo, hi, mean_len):
    """Documents whose ids lie in [lo, hi): the tokens of a row tell which source it came from."""
    out = []
    for n in rng.integers(2, 2 * mean_len, size=n_docs).tolist():
        out.append(np.concatenate([[synthetic.BOS], rng.integers(lo, hi, size=n)]))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three sources in disjoint id ranges; source b has tiny shards (windows cross shard ends)
    and an empty shard in the middle of its stream."""
    d = str(tmp_path_factory.mktemp("loader_run"))
    rng = np.random.default_rng(0)
    sources = {
        "a": {"train": [_docs(rng, 40, 100, 200, 30) for _ in range(3)], "validation": [_docs(rng, 5, 100, 200, 30)]},
        "b": {"train": [_docs(rng, 3, 200, 300, 10), [], _docs(rng, 2, 200, 300, 10), _docs(rng, 30, 200, 300, 20)],
              "validation": [_docs(rng, 5, 200, 300, 30)]},
        "c": {"train": [_docs(rng, 20, 300, 400, 30)], "validation": []},
    }
    synthetic.write_run(d, sources, {"a": 0.5, "b": 0.3, "c": 0.2}, seq_len=SEQ, vocab=512,
                        token_budget=SEQ * 600)
    return d


def _stream(run_dir, mixture, s):
    return np.concatenate([np.asarray(MegatronReader(f"{run_dir}/{p}").tokens) for p in mixture.sources[s].shards])


def _source_of(row: np.ndarray) -> int:
    body = row[row != synthetic.BOS]
    assert body.size, "a window of separators only"
    src = np.unique(body // 100) - 1
    assert src.size == 1, f"tokens of several sources in one sample: {row}"
    return int(src[0])


# -- permutation ----------------------------------------------------------------------------------

def test_feistel_is_a_bijection_for_every_size():
    keys = derive_keys("t", 0)
    for n in list(range(1, 130)) + [1000, 4097, 65536, 100_003]:
        image = FeistelPermutation(n, keys)(np.arange(n))
        assert image.min() >= 0 and image.max() < n
        assert np.unique(image).size == n, n


def test_feistel_epochs_differ_and_scatter():
    n = 10_000
    a = FeistelPermutation(n, derive_keys("seed", 42, "src", 0))(np.arange(n))
    b = FeistelPermutation(n, derive_keys("seed", 42, "src", 1))(np.arange(n))
    assert (a != b).mean() > 0.99
    # not a near-identity: consecutive positions land far apart
    assert np.median(np.abs(np.diff(a))) > n / 10
    # a huge domain (a 3T-token source) costs nothing to set up and stays in range
    big = 1_464_843_750
    img = FeistelPermutation(big, derive_keys(1))(np.arange(big - 5000, big))
    assert img.max() < big and np.unique(img).size == 5000


# -- allocation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("planned,batch", [
    ([693584, 306416], 1024),   # TinyLlama's weights
    ([2, 1], 8),
    ([5, 3, 2], 8),
    ([38, 236, 302, 1, 58, 3496, 19], 1),
    ([10**9, 3 * 10**8, 7, 123457], 64),
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 5),
])
def test_every_batch_holds_floor_or_ceil_of_its_share(planned, batch):
    sch = MixtureSchedule(planned, batch)
    total = sum(planned)
    x = np.array(planned) * batch / total
    for b0 in (0, 12345, PERIOD - 3, 10 * PERIOD + 17):
        src, k = sch.assign(b0 * batch, (b0 + 40) * batch)
        counts = np.zeros((40, len(planned)), int)
        np.add.at(counts, (np.arange(src.size) // batch, src), 1)
        assert (counts >= np.floor(x)).all() and (counts <= np.ceil(x)).all()
        for i in range(40):
            assert counts[i].tolist() == sch.batch_counts(b0 + i).tolist()
        # prefix counts: O(1) formula == what the stream holds, and within a sample of the share
        before = sch.counts_before_batch(b0)
        cum = before + np.cumsum(counts, axis=0)
        share = np.array(sch.units) / PERIOD
        n_batches = b0 + 1 + np.arange(40)
        assert (np.abs(cum - n_batches[:, None] * share) < 1).all()
        assert (np.abs(cum - n_batches[:, None] * x) < 1 + (b0 + 40) / PERIOD).all()
        # k is the ordinal of the sample within its own source's stream
        for s in range(len(planned)):
            ks = k[src == s]
            assert (ks == before[s] + np.arange(ks.size)).all()


def test_allocation_interleaves_sources_within_a_batch():
    sch = MixtureSchedule([1, 1], 8)
    assert sch.batch_order(0).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    order = MixtureSchedule([3, 1], 8).batch_order(5).tolist()
    assert order.count(1) == 2 and order[:4].count(1) == 1  # each half of the batch gets one


# -- the loader over real shards ------------------------------------------------------------------

def test_rows_are_windows_of_the_source_streams(run):
    manifest, mixture = load_plan(run)
    streams = [_stream(run, mixture, s) for s in range(3)]
    loader = MixtureLoader(run, manifest, mixture, global_batch=8)
    index = MixtureIndex(mixture, 8)
    spanning = 0
    for batch in loader.batches(0, 40):
        refs = index.refs(batch.index * 8, batch.index * 8 + 8)
        assert batch.tokens.shape == (8, SEQ + 1)
        for row, s, j in zip(batch.tokens.numpy(), refs.source, refs.sample):
            assert (row == streams[s][j * SEQ:j * SEQ + SEQ + 1]).all()  # never padding: real tokens only
            assert _source_of(row) == s
        spanning += sum(loader.streams[s].locate(np.array([j * SEQ]), SEQ + 1)[2][0] == 0
                        for s, j in zip(refs.source, refs.sample))
    assert spanning > 0  # some windows crossed a shard end (and the empty shard)


def test_realized_proportions_equal_the_plan_every_batch(run):
    manifest, mixture = load_plan(run)
    planned = np.array([s.samples for s in mixture.sources])
    x = planned * 8 / planned.sum()
    loader = MixtureLoader(run, manifest, mixture, global_batch=8)
    for batch in loader.batches(0, 60):
        realized = np.bincount([_source_of(r) for r in batch.tokens.numpy()], minlength=3)
        assert realized.tolist() == loader.index.schedule.batch_counts(batch.index).tolist()
        assert (realized >= np.floor(x)).all() and (realized <= np.ceil(x)).all()


def test_every_sample_of_an_epoch_is_seen_once_across_ranks(run):
    """Two ranks, many epochs of the smallest source: within each epoch of each source every
    sample index appears exactly once, and each epoch has a fresh order."""
    manifest, mixture = load_plan(run)
    per_epoch = [s.samples_per_epoch for s in mixture.sources]
    index = MixtureIndex(mixture, 8)
    n_batches = 3 * max(per_epoch) // 2 + 8
    streams = [_stream(run, mixture, s) for s in range(3)]
    seen = {}  # (source, epoch) -> [(position in the epoch, sample index)]
    for rank in range(2):
        loader = MixtureLoader(run, manifest, mixture, global_batch=8, rank=rank, world=2)
        for batch in loader.batches(0, n_batches):
            start = batch.index * 8 + rank * 4
            refs = index.refs(start, start + 4)
            for row, s, e, p, j in zip(batch.tokens.numpy(), refs.source, refs.epoch, refs.position, refs.sample):
                assert (row == streams[s][j * SEQ:j * SEQ + SEQ + 1]).all()
                seen.setdefault((int(s), int(e)), []).append((int(p), int(j)))
    complete = 0
    for (s, e), items in seen.items():
        positions = sorted(p for p, _ in items)
        assert positions == list(range(len(positions)))  # the epoch walked from its start, no gap
        samples = [j for _, j in items]
        assert len(set(samples)) == len(samples)  # no repeat inside an epoch
        if len(samples) == per_epoch[s]:
            assert sorted(samples) == list(range(per_epoch[s]))  # none skipped
            complete += 1
    assert complete >= 4
    orders = {e: [j for _, j in sorted(seen[(2, e)])] for e in (0, 1) if len(seen.get((2, e), ())) == per_epoch[2]}
    assert len(orders) == 2 and orders[0] != orders[1]


def test_global_batch_does_not_depend_on_ranks_or_prefetch(run):
    manifest, mixture = load_plan(run)
    whole = [b.tokens for b in MixtureLoader(run, manifest, mixture, 8).batches(0, 12)]
    for world in (2, 4, 8):
        parts = [list(MixtureLoader(run, manifest, mixture, 8, rank=r, world=world).batches(0, 12))
                 for r in range(world)]
        for i in range(12):
            assert (np.concatenate([p[i].tokens for p in parts]) == whole[i].numpy()).all()
    loader = MixtureLoader(run, manifest, mixture, 8, samples=3 * 8)
    with loader.prefetch(depth=2) as batches:
        got = [next(batches) for _ in range(6)]
    assert [b.index for b in got] == list(range(3, 9))
    for b in got:
        assert (b.tokens == whole[b.index]).all()


def test_resume_is_one_integer(run):
    manifest, mixture = load_plan(run)
    a = MixtureLoader(run, manifest, mixture, 8)
    it = iter(a)
    first = [next(it).tokens for _ in range(5)]
    state = a.state_dict()
    assert state["samples"] == 40
    rest = [next(it).tokens for _ in range(4)]
    b = MixtureLoader(run, manifest, mixture, 8)
    b.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(rest, (bt.tokens for bt, _ in zip(b, range(4)))))
    assert len(first) == 5
    with pytest.raises(ValueError, match="another mixture"):  # a state without a plan record
        b.load_state_dict({k: v for k, v in state.items() if k != "plan"} | {"fingerprint": "0" * 64})
    # another token budget keeps the fingerprint but moves every source's share of a batch
    moved = dataclasses.replace(mixture, sources=[dataclasses.replace(s, samples=s.samples + 7 * i)
                                                  for i, s in enumerate(mixture.sources)])
    assert moved.fingerprint == mixture.fingerprint
    with pytest.raises(ValueError, match=r"different plan: source '\w+' samples \d+ -> \d+"):
        MixtureLoader(run, manifest, moved, 8).load_state_dict(state)


# -- prefetch --------------------------------------------------------------------------------------

def _same(a, b) -> None:
    assert a.index == b.index
    assert (a.tokens == b.tokens).all() and a.tokens.dtype == b.tokens.dtype
    assert (a.sources == b.sources).all()


def _wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("start,rank,world,depth", [(0, 0, 1, 3), (5, 0, 1, 3), (7, 1, 2, 3), (5, 0, 1, 0)])
def test_prefetch_hands_out_the_batches_of_plain_iteration(run, start, rank, world, depth):
    """Same batches (index, tokens, sources) as iterating the loader, from the start and from a
    resume position; `samples` counts the batches taken, not those the thread read ahead."""
    manifest, mixture = load_plan(run)
    plain = MixtureLoader(run, manifest, mixture, 8, rank, world, samples=start * 8)
    expected = [b for b, _ in zip(plain, range(40))]
    loader = MixtureLoader(run, manifest, mixture, 8, rank, world, samples=start * 8)
    ahead = (lambda: batches._queue.full()) if depth else (lambda: True)
    with loader.prefetch(depth=depth) as batches:
        assert (batches.thread is not None) == (depth > 0)
        _wait_until(ahead)  # a thread is `depth` batches ahead, none taken
        assert loader.samples == start * 8
        waits = []
        for k, want in enumerate(expected, 1):
            batch = next(batches)
            _same(batch, want)
            waits.append(batch.wait_s)
            _wait_until(ahead)
            assert loader.samples == (start + k) * 8
        assert batches.taken == 40
        assert batches.wait_s == pytest.approx(sum(waits), rel=1e-9) and batches.wait_s > 0
    # a bounded range ends like batches(): StopIteration after the last one, thread gone
    loader = MixtureLoader(run, manifest, mixture, 8, rank, world, samples=start * 8)
    batches = loader.prefetch(depth=depth, stop_batch=start + 9)
    got = list(batches)
    assert [b.index for b in got] == list(range(start, start + 9))
    for a, b in zip(got, expected):
        _same(a, b)
    assert loader.samples == (start + 9) * 8 and not (depth and batches.thread.is_alive())
    assert batches.wait_s >= sum(b.wait_s for b in got)  # and the wait for the end


def test_prefetch_depth_follows_the_device(run):
    """A thread (pinned memory where CUDA is there) for a CUDA device; on a CPU, where the step
    keeps the cores busy, the batches are read in next()."""
    manifest, mixture = load_plan(run)
    loader = MixtureLoader(run, manifest, mixture, 8)
    assert loader.prefetch(device=torch.device("cpu")).thread is None
    assert loader.prefetch().thread is None
    on_gpu = loader.prefetch(device="cuda")
    assert on_gpu.thread is not None and next(on_gpu).index == 0
    assert next(on_gpu).tokens.is_pinned() == torch.cuda.is_available()
    loader.close()
    assert not on_gpu.thread.is_alive()


def test_a_checkpoint_after_prefetch_resumes_at_the_next_batch(run):
    manifest, mixture = load_plan(run)
    whole = list(MixtureLoader(run, manifest, mixture, 8).batches(0, 20))
    a = MixtureLoader(run, manifest, mixture, 8)
    batches = a.prefetch(depth=4)
    for _ in range(6):
        next(batches)
    _wait_until(batches._queue.full)  # batches 6..9 read, not taken
    state = a.state_dict()
    a.close()
    assert state["samples"] == 6 * 8 and not batches.thread.is_alive() and not a.shards.fds
    b = MixtureLoader(run, manifest, mixture, 8)
    b.load_state_dict(state)
    with b.prefetch() as rest:
        for want in whole[6:]:
            _same(next(rest), want)


def _corrupt_window_of_batch(run_dir: str, k: int, global_batch: int = 8):
    """Write an id outside the vocabulary in the middle of a window that batch k holds and no
    earlier batch does; the (path, token offset) the error must name."""
    manifest, mixture = load_plan(run_dir)
    loader = MixtureLoader(run_dir, manifest, mixture, global_batch)
    earlier = loader.index.refs(0, k * global_batch)
    refs = loader.index.refs(k * global_batch, (k + 1) * global_batch)
    s, j = next((s, j) for s, j in zip(refs.source.tolist(), refs.sample.tolist())
                if not ((earlier.source == s) & (earlier.sample == j)).any())
    path, offset = loader.streams[s].where(j * SEQ + SEQ // 2)  # inside window j only
    loader.close()
    with open(path, "r+b") as fh:
        fh.seek(offset * 2)
        fh.write(np.array([65535], dtype="<u2").tobytes())
    return path, offset


@pytest.mark.parametrize("prefetch", [None, 0, 2])
def test_a_bad_window_stops_at_its_own_batch(run, tmp_path, prefetch):
    """Batch 5 holds a window with an id outside the vocabulary: batches 0-4 (read and checked in
    the same staging buffer) come out, then FormatError names the shard and offset, also when the
    thread read it long before."""
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    path, offset = _corrupt_window_of_batch(str(bad), 5)
    manifest, mixture = load_plan(run)
    good = list(MixtureLoader(run, manifest, mixture, 8).batches(0, 5))
    loader = MixtureLoader(str(bad), manifest, mixture, 8)
    batches = iter(loader) if prefetch is None else loader.prefetch(depth=prefetch)
    if prefetch:
        _wait_until(lambda: not batches.thread.is_alive() or batches._queue.full())
    for want in good:
        _same(next(batches), want)
    assert loader.samples == 5 * 8
    with pytest.raises(FormatError, match=f"{path}: token offset {offset:,}: token id 65535 is outside"):
        next(batches)
    assert loader.samples == 5 * 8
    if prefetch is not None:
        assert not (prefetch and batches.thread.is_alive())
        with pytest.raises(StopIteration):
            next(batches)


def test_prefetch_stops_on_close_collection_and_errors(run):
    manifest, mixture = load_plan(run)
    loader = MixtureLoader(run, manifest, mixture, 8)
    # close() mid-stream, with the thread blocked on a full queue
    batches = loader.prefetch(depth=2)
    next(batches)
    _wait_until(batches._queue.full)
    t0 = time.perf_counter()
    batches.close()
    assert time.perf_counter() - t0 < 1.0
    assert not batches.thread.is_alive() and loader.samples == 8
    with pytest.raises(StopIteration):
        next(batches)
    # dropped without close(): garbage collection stops the thread
    import gc

    batches = loader.prefetch(depth=2)
    next(batches)
    thread = batches.thread
    del batches
    gc.collect()
    thread.join(2.0)
    assert not thread.is_alive() and loader.samples == 16
    # an exception in the training loop, under `with`
    with pytest.raises(ZeroDivisionError), loader.prefetch(depth=2) as batches:
        for batch in batches:
            if batch.index == 4:
                raise ZeroDivisionError
    assert not batches.thread.is_alive() and loader.samples == 5 * 8
    # a new prefetch stops the one before; loader.close() stops the current one, then closes shards
    first = loader.prefetch(depth=2)
    second = loader.prefetch(depth=2)
    assert not first.thread.is_alive() and next(second).index == 5
    loader.close()
    assert not second.thread.is_alive() and not loader.shards.fds
    assert not [t for t in threading.enumerate() if t.name == "tinyprep-prefetch"]
    with pytest.raises(ValueError, match="depth -1"):
        loader.prefetch(depth=-1)


def test_world_must_divide_the_global_batch():
    assert check_world(1024, 8, 8) == 16
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        check_world(8, 3, 1)
    with pytest.raises(ValueError, match="micro_batch 3"):
        check_world(8, 2, 3)


# -- bad input --------------------------------------------------------------------------------------

def test_fingerprint_mismatch_is_a_clear_error(run, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    synthetic.rewrite_json(str(bad / "mixture.json"), lambda m: m.update(fingerprint="ab" * 32))
    with pytest.raises(ManifestError, match="fingerprint: does not match the shards"):
        load_plan(str(bad))


def test_a_shard_that_changed_since_the_manifest_is_refused(run, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    manifest, mixture = load_plan(str(bad))
    prefix = bad / mixture.sources[0].shards[0]
    with MegatronWriter(str(prefix), np.uint16) as w:  # same name, fewer tokens
        w.add_document(np.array([1, 150, 151]))
    loader = MixtureLoader(str(bad), manifest, mixture, 8)
    with pytest.raises(FormatError, match="shards changed since the manifest"):
        for _ in loader.batches(0, 30):
            pass


# -- scale: a 3T-token plan ------------------------------------------------------------------------

def test_startup_and_memory_do_not_grow_with_the_corpus(tmp_path):
    """A manifest describing 3T tokens (TinyLlama's sources, 2^27-token shards): the loader starts,
    computes the indices of its first batches and resumes deep into the run quickly and in little
    memory, without opening a shard. (tests/benchmarks/bench_loader.py reports the figures.)"""
    run_dir = str(tmp_path / "run3t")
    n_shards = synthetic.write_described_run(
        run_dir, {"slimpajama": 2_100_000_000_000, "starcoderdata": 930_000_000_000},
        {"slimpajama": 0.693584, "starcoderdata": 0.306416}, seq_len=2048, shard_tokens=1 << 27,
        token_budget=3_000_000_000_000)
    assert n_shards > 22_000
    tracemalloc.start()
    t0 = time.process_time()  # CPU seconds: what the loader costs, whatever else the machine runs
    manifest, mixture = load_plan(run_dir)
    loader = MixtureLoader(run_dir, manifest, mixture, global_batch=1024, rank=3, world=8,
                           samples=1_000_000 * 1024)
    refs = loader.index.refs(1_000_000 * 1024, 1_000_004 * 1024)
    loader._locate(refs)
    later = loader.index.refs(4_000_000_000, 4_000_004_096)  # past the plan: later epochs
    elapsed = time.process_time() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert mixture.total_samples > 1_400_000_000
    assert refs.position.min() > 100_000_000 and later.epoch.min() >= 2
    assert elapsed < 10, elapsed  # about 0.5 CPU-s (with tracemalloc: a few) on the development VM
    assert peak < 200 * 2**20, peak
    assert not loader.shards.fds  # nothing opened
