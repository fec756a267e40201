"""Exact, faster SentencePiece encoding: split documents into independent segments, cache them.

``Encoder(model).encode(texts)`` returns exactly ``SentencePieceProcessor.encode(texts)``'s ids
(no BOS/EOS; ``with_bos_eos`` adds them), faster on natural text: each document is cut into
segments whose encodings cannot influence one another (before whitespace that follows a
non-space, around control characters no piece contains, and between characters that no piece
holds side by side: letters and punctuation, digits), every distinct segment is encoded once by
SentencePiece (a copy of the model without dummy prefix) and its ids are reused from a bounded
per-process cache. Models for which that is not provably exact (``fast_path_supported``: not
BPE, a normalization rule, user-defined or UNUSED pieces, ...) go to SentencePiece's batched
encode, and so do sub-batches of text on which segments do not pay (random, base64, minified).

Why this is exact, which models fall back, and how the cache is bounded (about 170 bytes an
entry): ENCODER.md, next to this file. Change the code and that document together. Reading the
model is spmodel.py's; where text may be cut (the rules and the segmenting regex), cuts.py's.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import struct
import time
from collections import Counter
from itertools import chain
from operator import itemgetter
from sys import getsizeof

import numpy as np
import sentencepiece as spm

from .cuts import WS, cut_plan, fast_path_supported, segmenter
from .spmodel import NO_DUMMY_PREFIX, model_bytes, model_info

__all__ = ["WS", "Encoder", "fast_path_supported", "ids_array", "model_info", "with_bos_eos"]

log = logging.getLogger("tinyprep")

_logged: set[tuple[str, str]] = set()


# ----------------------------------------------------------------------------------------------


class Encoder:
    """Exact drop-in for SentencePieceProcessor.encode over batches.

    ``encode(texts)`` == ``SentencePieceProcessor(model_file=model_path).encode(texts)`` for every
    list of strings. ``fast`` says whether the segment cache is used for this model; when it is
    not, ``why_not`` says why (logged once per process and model) and batches go to
    SentencePiece's batched encoder. ``threads`` is passed to SentencePiece's batched calls
    (cache misses, fallback). ``dtype``: uint16 up to 65,536 pieces, else int32. No BOS/EOS
    (``with_bos_eos`` adds them to ``encode_to_array``'s output). Not thread-safe: one Encoder
    per thread or process.
    """

    fast: bool
    why_not: str | None

    def __init__(self, model_path: str | bytes, *, cache_entries: int = 1_000_000,
                 max_segment_chars: int = 64, threads: int = 1):
        if cache_entries < 0 or max_segment_chars < 0 or threads < 1:
            raise ValueError("cache_entries and max_segment_chars must be >= 0, threads >= 1")
        # a path, or the model's bytes (then named by their hash in messages)
        self.model_path = (str(model_path) if isinstance(model_path, (str, os.PathLike))
                           else "sha256:" + hashlib.sha256(model_bytes(model_path)).hexdigest()[:16])
        self._setup(model_bytes(model_path), cache_entries, max_segment_chars, threads)

    def _setup(self, model: bytes, cache_entries: int, max_segment_chars: int, threads: int):
        self._model = model
        self.cache_entries = cache_entries
        self.max_segment_chars = max_segment_chars
        self.threads = threads
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        vocab = self._sp.get_piece_size()
        self.dtype = np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)
        self._itemsize = self.dtype.itemsize
        self.fast, self.why_not, plan = cut_plan(model_info(model))
        self._cache: dict[str, bytes] = {}
        self._freq: Counter = Counter()
        self._bytes = 0
        self._since_aging = self._batches_since_aging = 0
        self._stats = {"docs": 0, "tokens": 0, "segments": 0, "hits": 0, "misses": 0,
                       "long_segments": 0, "evictions": 0, "fallback_docs": 0, "plain_docs": 0,
                       "probes": 0}
        self._pays = True  # the last decision of _segments_pay
        self._probe_in = 0  # sub-batches until the next probe
        self._probe_every = 1
        self._probe_ratio = 0.0
        self._novel = 0  # sub-batches in a row with mostly missed segments
        self._hold = 0  # sub-batches still to encode plainly because of them
        self._hold_next = _HOLD_MIN
        if self.fast:
            self._raw = spm.SentencePieceProcessor(model_proto=model + NO_DUMMY_PREFIX)
            self._prefix = plan["prefix"]
            self.cut_chars = plan["cut_chars"]
            self.groups = plan["groups"]
            self._findall = segmenter(self.cut_chars, self.groups)
            self._sep = self._sep_id = None
            for c in self.cut_chars:  # "\n" first where it is one
                ids = self._raw.encode(c)
                if len(ids) == 1:
                    self._sep, self._sep_id = c, ids[0]
                    break
        else:
            self._raw = None
            key = (getattr(self, "model_path", ""), self.why_not or "")
            if key not in _logged:
                _logged.add(key)
                log.info("tokenizer %s: the segment cache is not exact for this model (%s); "
                         "using SentencePiece's batched encode", key[0] or "(model)", self.why_not)

    # Pickling (Ray): the model travels, the cache does not.
    def __getstate__(self):
        return {"model": self._model, "model_path": self.model_path,
                "cache_entries": self.cache_entries, "max_segment_chars": self.max_segment_chars,
                "threads": self.threads}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._setup(state["model"], state["cache_entries"], state["max_segment_chars"],
                    state["threads"])

    # ------------------------------------------------------------------------------------------

    def segments(self, text: str) -> list[str]:
        """The independent segments of one document (fast path), as cache keys: a document's
        ids are the concatenation of ``raw.encode(segment)`` over them (``raw``: the model
        without dummy prefix). The dummy prefix is the leading space of the first one."""
        if not self.fast:
            raise ValueError(f"no segmentation: {self.why_not}")
        if self._prefix:
            return self._findall(" " + text) if text else []
        return self._findall(text)

    def _encode_bytes(self, texts: list[str], nchars: int) -> list[bytes]:
        """Each document's ids as packed bytes of ``dtype`` (fast path); ``nchars``: the
        documents' characters (counts sub-batches of mostly new segments, _NOVEL_SHARE)."""
        findall = self._findall
        if self._prefix:
            frags = [findall(" " + t) if t else [] for t in texts]
        else:
            frags = [findall(t) for t in texts]
        cache = self._cache
        uniq = set(chain.from_iterable(frags))
        missing = uniq.difference(cache)
        transient: list[str] = []
        if missing:
            transient = self._fill(list(missing))
            if sum(map(len, missing)) > _NOVEL_SHARE * nchars:
                self._novel += 1
            else:
                self._novel = 0
                self._hold_next = _HOLD_MIN
        else:
            self._novel = 0
        freq = self._freq
        freq.update(uniq)
        self._since_aging += len(uniq)
        self._batches_since_aging += 1
        # itemgetter(*keys)(cache) looks the keys up in C (a tuple; a bare value for one key)
        out = [b"".join(itemgetter(*f)(cache)) if len(f) > 1 else cache[f[0]] if f else b""
               for f in frags]
        st = self._stats
        n = sum(map(len, frags))
        st["segments"] += n
        st["misses"] += len(missing)
        st["hits"] += n - len(missing)
        if transient:
            st["long_segments"] += len(transient)
            for k in transient:
                self._bytes -= getsizeof(k) + getsizeof(cache.pop(k))
                del freq[k]
        if len(cache) > self.cache_entries:
            # this batch's occurrence counts break ties (a batch that alone overflows the cache)
            self._evict(Counter(chain.from_iterable(frags)))
        return out

    def _fill(self, keys: list[str]) -> list[str]:
        """Encode segments not in the cache; insert them. Returns the ones to drop after use.

        SentencePiece's per-string cost is several microseconds, so segments are encoded in
        groups of ``_GROUP`` joined by a separator ``sep`` (a cut character: it cannot merge
        with anything and is one id), each followed by it: "a␤b␤c␤". The group's ids are the
        segments' ids each followed by ``sep_id``, which no other segment produces (segments
        other than runs of cut characters contain none). Runs of cut characters are encoded
        one by one."""
        sep, sep_id, dtype = self._sep, self._sep_id, self.dtype
        if sep is None:
            joinable, single = [], keys
        else:
            cut = self.cut_chars
            single = [k for k in keys if k[0] in cut]
            joinable = [k for k in keys if k[0] not in cut] if single else keys
        keys = joinable + single
        g = _GROUP
        texts = [sep.join(joinable[i:i + g]) + sep for i in range(0, len(joinable), g)]
        lists = self._raw.encode(texts + single, num_threads=self.threads)
        lens = list(map(len, lists))
        flat = ids_array(lists, dtype)
        n_join = sum(lens[:len(texts)])
        # end (exclusive) of each key's ids in flat: the separators, then the single ones
        ends = np.flatnonzero(flat[:n_join] == sep_id) if texts else np.empty(0, np.int64)
        if len(ends) != len(joinable):  # cannot happen (see ENCODER.md); stay exact
            return self._fill_one_by_one(keys)
        starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else ends
        if single:
            e1 = n_join + np.cumsum(np.asarray(lens[len(texts):], dtype=np.int64))
            starts = np.concatenate((starts, [n_join], e1[:-1]))
            ends = np.concatenate((ends, e1))
        buf = flat.tobytes()
        w = self._itemsize
        vals = [buf[s:e] for s, e in zip((starts * w).tolist(), (ends * w).tolist())]
        self._cache.update(zip(keys, vals))
        self._bytes += sum(map(getsizeof, keys)) + sum(map(getsizeof, vals))
        limit = self.max_segment_chars
        return [k for k in keys if len(k) > limit]

    def _fill_one_by_one(self, keys: list[str]) -> list[str]:
        lists = self._raw.encode(keys, num_threads=self.threads)
        vals = [np.asarray(x, dtype=self.dtype).tobytes() for x in lists]
        self._cache.update(zip(keys, vals))
        self._bytes += sum(map(getsizeof, keys)) + sum(map(getsizeof, vals))
        limit = self.max_segment_chars
        return [k for k in keys if len(k) > limit]

    def _evict(self, batch_counts: Counter):
        """Keep the segments seen in the most batches, down to 3/4 of the limit (ties: the most
        frequent in the current batch, then the shorter).

        Counts are halved once at least 32 batches and 8 x cache_entries sightings have passed
        since the last halving (TinyLFU-style aging), so segments that stop occurring leave."""
        cache, freq = self._cache, self._freq
        target = (self.cache_entries * 3) // 4
        self._stats["evictions"] += 1
        if target <= 0:
            cache.clear()
            freq.clear()
            self._bytes = 0
            return
        counts = np.fromiter(freq.values(), dtype=np.int64, count=len(freq))
        k = len(counts) - target
        thr = int(np.partition(counts, k)[k])
        keep = [key for key, c in freq.items() if c > thr]
        if len(keep) < target:
            ties = [key for key, c in freq.items() if c == thr]
            if len(ties) > target - len(keep):
                ties.sort(key=lambda key: (-batch_counts[key], len(key)))
            keep += ties[:target - len(keep)]
        self._cache = {key: cache[key] for key in keep}
        if self._since_aging >= 8 * self.cache_entries and self._batches_since_aging >= 32:
            self._since_aging = self._batches_since_aging = 0
            self._freq = Counter({key: freq[key] >> 1 for key in keep})
        else:
            self._freq = Counter({key: freq[key] for key in keep})
        self._bytes = sum(map(getsizeof, keep)) + sum(map(getsizeof, self._cache.values()))

    # ------------------------------------------------------------------------------------------

    def _plain(self, texts: list) -> list[list[int]]:
        self._stats["fallback_docs"] += len(texts)
        return self._sp.encode(texts, num_threads=self.threads)

    def _parts(self, texts: list) -> list[tuple[bool, list]] | None:
        """The batch in sub-batches of about _CHUNK_CHARS characters (they bound the memory of
        the segment lists), each as (True, packed bytes per document) from the segment cache or
        (False, id lists) from plain batched SentencePiece where segments do not pay (see
        ``_segments_pay``). None where SentencePiece itself must answer: not a fast model, or
        input that is not all str (bytes, None) or not encodable (lone surrogates), where it
        either encodes (bytes) or raises its own error."""
        if not self.fast:
            return None
        try:
            out = []
            for chunk, nchars in _chunks(texts):
                if self._segments_pay(chunk, nchars):
                    out.append((True, self._encode_bytes(chunk, nchars)))
                else:
                    self._stats["plain_docs"] += len(chunk)
                    out.append((False, self._sp.encode(chunk, num_threads=self.threads)))
            return out
        except TypeError:
            return None

    def _segments_pay(self, chunk: list, nchars: int) -> bool:
        """Whether this sub-batch goes through the segment cache (True) or to plain batched
        SentencePiece. Segments do not pay on text whose segments are very short or do not
        repeat (base64, random or unsegmented scripts, minified code): there the cache's cost
        per segment exceeds SentencePiece's per character. Decided by timing both on a sample
        of the sub-batch (1/64 of it, _PROBE_MIN to _PROBE_CHARS characters; sub-batches under
        4 x _PROBE_MIN keep the last decision), and by the share of characters in segments the
        cache missed, which stays high on text that never repeats;
        probes back off to every _PROBE_MAX-th sub-batch while the decision holds (segments
        that keep missing send _HOLD_MIN to _HOLD_MAX sub-batches to plain encoding). Either
        answer gives the same ids: only speed depends on it."""
        if self._novel >= _NOVEL_BATCHES:  # segments keep missing: plain for a while
            self._novel = 0
            self._hold = self._hold_next
            self._hold_next = min(2 * self._hold_next, _HOLD_MAX)
        if self._hold > 0:
            self._hold -= 1
            return False
        if self._probe_in > 0:
            self._probe_in -= 1
            return self._pays
        if nchars < 4 * _PROBE_MIN:  # too little text to time a sample of it
            return self._pays
        sample = _sample(chunk, min(_PROBE_CHARS, max(_PROBE_MIN, nchars // 64)))
        ratio = self._probe(sample)
        first = not self._stats["probes"]
        if not first and (ratio < _PROBE_RATIO) != self._pays:  # a change: when a second timing agrees
            again = self._probe(sample)
            ratio = max(ratio, again) if not self._pays else min(ratio, again)
        self._probe_ratio = ratio
        pays = ratio < _PROBE_RATIO
        self._stats["probes"] += 1
        if pays == self._pays or first:
            self._probe_every = min(2 * self._probe_every, _PROBE_MAX)
        else:
            self._probe_every = 2
        self._pays = pays
        self._probe_in = self._probe_every - 1
        return pays

    def _probe(self, sample: str) -> float:
        """CPU time of segmenting ``sample`` and looking its segments up, over that of encoding it
        with SentencePiece. A quarter of it is segmented (the cost is linear in the text; where
        segments do not pay it is up to 10 times SentencePiece's, so the probe stays cheap
        there). The garbage collector is held off: a collection inside the few milliseconds
        timed would decide the sub-batch."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.process_time()
            self._sp.encode(sample)
            t1 = time.process_time()
            part = sample[:len(sample) // 4]
            get = self._cache.get
            for k in self._findall(" " + part):
                get(k)
            t2 = time.process_time()
        finally:
            if enabled:
                gc.enable()
        return (t2 - t1) * len(sample) / max(len(part), 1) / max(t1 - t0, 1e-9)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids exactly as ``SentencePieceProcessor.encode(texts)`` (no BOS/EOS)."""
        texts = list(texts)
        st = self._stats
        parts = self._parts(texts)
        if parts is None:
            out = self._plain(texts)
        else:
            dt = self.dtype
            out = []
            for fast, part in parts:
                out += [np.frombuffer(b, dtype=dt).tolist() for b in part] if fast else part
        st["tokens"] += sum(map(len, out))
        st["docs"] += len(texts)
        return out

    def encode_to_array(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated, as ``dtype``; ids per document, int64), without Python int lists
        on the fast path. The array is writable and owns its memory."""
        texts = list(texts)
        st = self._stats
        parts = self._parts(texts)
        if parts is None:
            parts = [(False, self._plain(texts))]
        ids, lengths = [], []
        for fast, part in parts:
            if fast:
                n = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
                n //= self._itemsize
                ids.append(np.frombuffer(bytearray().join(part), dtype=self.dtype))
            else:
                n = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
                ids.append(ids_array(part, self.dtype))
            lengths.append(n)
        if not ids:
            ids, lengths = np.zeros(0, dtype=self.dtype), np.zeros(0, dtype=np.int64)
        elif len(ids) == 1:
            ids, lengths = ids[0], lengths[0]
        else:
            ids, lengths = np.concatenate(ids), np.concatenate(lengths)
        st["docs"] += len(texts)
        st["tokens"] += len(ids)
        return ids, lengths

    def stats(self) -> dict:
        """Counters since creation: docs, tokens, segments (fast path), hits and misses (distinct
        segments per batch that SentencePiece encoded), hit_rate, long_segments (over
        max_segment_chars, never cached), evictions, fallback_docs (documents encoded by plain
        SentencePiece because the fast path is off), plain_docs (documents of sub-batches sent
        to plain SentencePiece because segments did not pay there), probes (timed samples
        behind that decision), entries and approx_bytes of the cache
        (``sys.getsizeof`` of its keys, values and two dicts; the allocator adds some)."""
        st = dict(self._stats)
        st["fast"] = self.fast
        st["hit_rate"] = st["hits"] / st["segments"] if st["segments"] else 0.0
        st["entries"] = len(self._cache)
        st["approx_bytes"] = self._bytes + getsizeof(self._cache) + getsizeof(self._freq)
        return st


# Segments per SentencePiece call when filling the cache (see Encoder._fill).
def ids_array(lists: list[list[int]], dtype: np.dtype) -> np.ndarray:
    """SentencePiece's id lists as one writable array of `dtype` (uint16 or int32). Long lists are
    packed by struct, one C call each (about 10 ns a token on the development VM, against 17 for
    np.fromiter over a chain, which stays the way for short lists, where a call per list costs more)."""
    n = sum(map(len, lists))
    if n < 64 * len(lists):
        return np.fromiter(chain.from_iterable(lists), dtype=dtype, count=n)
    code, pack = _STRUCT_CODES[dtype.char], struct.pack
    return np.frombuffer(bytearray().join([pack(f"={len(x)}{code}", *x) for x in lists]), dtype=dtype)


_STRUCT_CODES = {"H": "H", "i": "i"}  # numpy's dtype char -> struct's, native byte order both
_GROUP = 64
# Characters of text per internal sub-batch: its segment strings take about 6 bytes per
# character while it is encoded (a batch's counts and frequency updates are per sub-batch).
_CHUNK_CHARS = 1 << 21
# Encoder._segments_pay: the sample's size (at most, at least), the most sub-batches between
# probes, the largest cost of segmenting and looking up the sample as a share of encoding it
# with SentencePiece, and how many sub-batches in a row with more than _NOVEL_SHARE of their
# characters in missed segments make the next probe choose plain encoding.
_PROBE_CHARS = 4096
_PROBE_MIN = 1024
_PROBE_MAX = 16
_PROBE_RATIO = 0.45
_NOVEL_SHARE = 0.8
_NOVEL_BATCHES = 3
# ... and then how many sub-batches are encoded plainly (doubling while it recurs)
_HOLD_MIN = 4
_HOLD_MAX = 64


def _chunks(texts: list):
    """(sub-batch, its characters): consecutive documents, a sub-batch closing once it holds
    _CHUNK_CHARS characters."""
    start = size = 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= _CHUNK_CHARS:
            yield texts[start:i + 1], size
            start, size = i + 1, 0
    if start < len(texts):
        yield texts[start:], size


def _sample(chunk: list, n: int) -> str:
    """About n characters from the start of a sub-batch's documents (whole documents, the last
    one cut)."""
    out, size = [], 0
    for t in chunk:
        out.append(t[:n - size])
        size += len(out[-1])
        if size >= n:
            break
    return " ".join(out)


def with_bos_eos(ids: np.ndarray, lengths: np.ndarray, bos_id: int | None = None,
                 eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``encode_to_array``'s output with BOS before and/or EOS after every document, as
    ``sp.encode(texts, add_bos=True, add_eos=True)`` places them (vectorized; same dtype)."""
    extra = (bos_id is not None) + (eos_id is not None)
    if not extra:
        return ids, lengths
    lengths = np.asarray(lengths, dtype=np.int64) + extra
    out = np.empty(len(ids) + extra * len(lengths), dtype=ids.dtype)
    ends = np.cumsum(lengths)
    body = np.ones(len(out), dtype=bool)
    if bos_id is not None:
        out[ends - lengths] = bos_id
        body[ends - lengths] = False
    if eos_id is not None:
        out[ends - 1] = eos_id
        body[ends - 1] = False
    out[body] = ids
    return out, lengths
