"""Benchmark: pipeline.tokenize.encoder.Encoder against SentencePiece's batched encode, same ids.

    python tests/benchmarks/bench_encoder.py [--mb 8] [--hostile-mb 2] [--vocab 32000]
        [--batch 256] [--runs 3] [--synthetic] [--only LABELS] [--always-segment]
        [--profile tottime] [--json]

Corpora (pipeline/tools/realtext.py: real text of this machine, never repeated):

* prose: ``--mb`` MB of English from /usr/share/doc, Perl manuals and pydoc topics
  (``make_prose``), documents of about 4.5 KB;
* code: ``--mb`` MB, C headers from /usr/include and Python sources from /usr/lib/python3*
  alternating, one file a document; also ``c`` and ``python`` alone (``--mb`` MB each);
* hostile (``--hostile-mb`` MB each, where segments should not pay and the encoder must fall back
  to plain batched encode): ``base64`` blobs, random ``unicode`` code points, ``cjk`` (Zipf draws
  from 3,500 Han characters with clause punctuation: no spaces), ``minjs`` (minified JS-like
  code: short identifiers, hex, no whitespace);
* with ``--synthetic``, the older corpora made from the stdlib's docstrings (``stdlib_prose``,
  10% of words replaced by invented ones) and its ``.py`` sources (``stdlib_code``).

The model: BPE with Llama-2's settings (byte fallback, split digits, identity normalization,
dummy prefix, whitespace-only pieces), ``--vocab`` pieces, trained (one thread) on held-back
text: the prose, C and Python that come after the measured documents (6 + 2 + 2 MB).

Per corpus, on the same documents in batches of ``--batch`` (measured interleaved, best of
``--runs``; speeds are tokens per CPU-second of this process, i.e. per core):

* floor: ``sp.encode(batch, num_threads=1)``, SentencePiece's batched encoding on one thread;
* floor_array: the floor, its id lists then converted to one array (``encoder.ids_array``, the
  fastest conversion found, which ``encode_to_array`` uses too), the output of
  ``encode_to_array``: the baseline of ``ours (cold)`` where both return arrays;
* tinyllama: TinyLlama's ``prepare_slimpajama`` loop: per document ``sp.encode(text)``, then
  ``np.array(ids, dtype=uint16)`` appended to a packing buffer;
* ours (cold): a new ``Encoder(model)`` (one thread, default cache), ``encode_to_array(batch)``
  on each batch: the cache starts empty in every pass and fills during it;
* ours lists (cold): the same with ``encode(batch)``, whose output (id lists) is the floor's;
  ``encode_to_array`` also converts plain SentencePiece output to one array, which costs
  about 18 ns a token (a lot next to SentencePiece's 30-40 ns on byte-fallback text);
* ours (warm): a second ``encode_to_array`` pass with the same Encoder (every segment seen).

``--always-segment`` turns the per-sub-batch decision off (every sub-batch through the segment
cache): what the fallback saves on the hostile corpora.

Every run's ids are checked equal to the floor's (``np.array_equal`` on all ids and on the
per-document lengths). Also reported, from an untimed streaming pass of a new Encoder (each
batch's output checked then dropped): the cache hit rate of that cold pass, the share of
documents sent to plain encode, the cache's entries and estimated bytes, the RSS it holds
afterwards and the peak RSS during the pass. ``--profile`` prints a cProfile of one cold pass.
Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import string
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA_SETTINGS = {"model_type": "bpe", "byte_fallback": True, "split_digits": True,
                      "normalization_rule_name": "identity", "add_dummy_prefix": True,
                      "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True}

EXTRAS = ["café", "naïve", "Zürich", "“quoted”", "— dash", "Ελληνικά κείμενα", "日本語のテキスト",
          "don’t", "中文文本", "😀 🎉", "e\u0301te\u0301 a\u0300 Mu\u0308nchen", "Привет, мир", "١٢٣"]
SYLLABLES = ["ka", "lo", "mir", "an", "tel", "ros", "vi", "dun", "sha", "ber", "qui", "zo", "ex",
             "pra", "nol", "ith", "gar", "mel", "to", "ven", "ul", "dre", "sik", "o", "y"]
TLDS = ["com", "org", "net", "io", "de", "co.uk"]


# ---------------------------------------------------------------------------------------------
# corpora


def docstring_paragraphs() -> list[str]:
    """Distinct paragraphs of the stdlib's triple-quoted strings (docstrings, mostly; tests
    included; sorted walk), dedented, that look like prose (mostly letters and spaces)."""
    import inspect
    import re

    triple = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, out = set(), []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts):
            continue
        try:
            src = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in triple.finditer(src):
            doc = inspect.cleandoc(m.group(1) or m.group(2) or "")
            for para in doc.split("\n\n"):
                if len(para) > 30 and para not in seen:
                    letters = sum(c.isalpha() or c == " " for c in para)
                    if letters > 0.8 * len(para):
                        seen.add(para)
                        out.append(para)
    return out


def novel_word(rng: random.Random, word: str, pool: list[str]) -> str:
    """A word unlikely to have been seen: what makes web text's vocabulary keep growing."""
    r = rng.random()
    if r < 0.3:  # a made-up name
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        return name.capitalize() if rng.random() < 0.7 else name
    if r < 0.5:  # numbers, dates, amounts
        return rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 7))),
                           f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                           f"{rng.random() * 1000:.{rng.randint(1, 4)}f}",
                           f"${rng.randint(1, 999)},{rng.randint(0, 999):03d}",
                           f"{rng.randint(1, 99)}%"])
    if r < 0.75 and len(word) > 3:  # a typo
        i = rng.randrange(1, len(word) - 1)
        op = rng.random()
        if op < 0.33:
            return word[:i] + word[i + 1:]
        if op < 0.66:
            return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
        return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]
    if r < 0.9:  # compounds
        return rng.choice(pool) + rng.choice(["-", "/", "_", ""]) + word
    name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
    return rng.choice([f"https://www.{name}.{rng.choice(TLDS)}/{word.strip('.,;:')}",
                       f"{word.strip('.,;:').lower()}@{name}.{rng.choice(TLDS)}"])


def make_prose(mb: float, novel: float, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paras = docstring_paragraphs()
    words = [w for p in paras[:2000] for w in p.split() if w.isalpha()]
    target = int(mb * 1e6)
    docs, size = [], 0
    while size < target:
        k = max(1, min(80, int(rng.lognormvariate(2.3, 0.9))))
        text = "\n\n".join(rng.choice(paras) for _ in range(k))
        if novel > 0:
            parts = text.split(" ")
            n = len(parts)
            for i in rng.sample(range(n), int(n * novel + rng.random())):
                w = parts[i]
                if w and "\n" not in w:
                    parts[i] = novel_word(rng, w, words)
            text = " ".join(parts)
        if rng.random() < 0.33:
            pos = rng.randrange(len(text))
            text = text[:pos] + " " + rng.choice(EXTRAS) + " " + text[pos:]
        docs.append(text)
        size += len(text.encode("utf-8"))
    return docs


def make_code(mb: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    target = int(mb * 1e6)
    docs, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            docs.append(text)
            size += len(text.encode("utf-8"))
        if size >= target:
            break
    return docs


def _split(docs: list[str], mb: float) -> tuple[list[str], list[str]]:
    """(the first documents up to mb MB, the rest)."""
    n = 0
    for i, d in enumerate(docs):
        n += len(d.encode("utf-8"))
        if n >= mb * 1e6:
            return docs[:i + 1], docs[i + 1:]
    return docs, []


def real_corpora(mb: float) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """({label: measured documents}, held-back prose, held-back code) from realtext."""
    from pipeline.tools import realtext

    prose, prose_rest = _split(realtext.make_prose(mb + 6.5), mb)
    c, c_rest = _split(realtext.make_code(mb + 2.5), mb)  # the sorted walk starts in /usr/include
    py_all = realtext.make_code(mb + 2.5, languages=("python",))
    py, py_rest = _split(py_all, mb)
    half_c, half_py = _split(c, mb / 2)[0], _split(py, mb / 2)[0]
    code = [d for pair in zip(half_c, half_py) for d in pair]
    n = min(len(half_c), len(half_py))
    code += half_c[n:] + half_py[n:]  # alternating, then the rest of the longer one
    return {"prose": prose, "code": code, "c": c, "python": py}, prose_rest, c_rest + py_rest


def make_hostile(kind: str, mb: float, seed: int = 0) -> list[str]:
    """Documents of about 4.5 KB of text on which segments do not repeat or are very short."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < mb * 1e6:
        n = int(rng.lognormvariate(8.2, 0.6))  # ~4.5 KB
        if kind == "base64":
            raw = base64.b64encode(rng.randbytes(n * 3 // 4)).decode()
            t = "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))
        elif kind == "unicode":
            cps = []
            while len(cps) < n // 2:
                c = rng.randrange(0x20, 0x30000)
                if 0xD800 <= c < 0xE000:
                    continue
                cps.append(chr(c) if rng.random() > 0.1 else " ")
            t = "".join(cps)
        elif kind == "cjk":
            # Zipf-like draws from 3,500 Han characters (every fifth from U+4E00), clause punctuation
            pool = [chr(0x4E00 + i * 5) for i in range(3500)]
            w = [1 / (i + 1) for i in range(3500)]
            chars = rng.choices(pool, weights=w, k=n // 3)
            for i in range(0, len(chars), rng.randint(8, 20)):
                chars[i] = rng.choice("，。、；：")
            t = "".join(chars)
        elif kind == "minjs":
            def ident():
                return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$") for _ in range(rng.randint(1, 3)))
            parts = []
            while sum(map(len, parts)) < n:
                r = rng.random()
                a, b, c = ident(), ident(), ident()
                if r < 0.3:
                    parts.append(f"var {a}={b}({c},{rng.randint(0, 99999)});")
                elif r < 0.5:
                    parts.append(f"function {a}({b},{c}){{return {b}.{ident()}+{c}*0x{rng.randrange(1 << 24):x}}}")
                elif r < 0.7:
                    parts.append(f'{a}["{ident()}{ident()}"]={b}?{c}:"{rng.randbytes(6).hex()}";')
                else:
                    parts.append(f"if({a}<{rng.random():.5f}&&{b}!=={c}){a}={b}||{{}};")
            t = "".join(parts)
        docs.append(t)
        size += len(t.encode())
    return docs


HOSTILE = ("base64", "unicode", "cjk", "minjs")


def train_model(prose: list[str], code: list[str], vocab: int, out_dir: str,
                budget_s: float = 60.0) -> dict:
    import sentencepiece as spm

    def take(docs, nbytes):
        out, n = [], 0
        for d in docs:
            out.append(d)
            n += len(d)
            if n >= nbytes:
                break
        return out

    text = "\n".join(take(prose, 6_000_000) + take(code, 4_000_000))
    path = os.path.join(out_dir, "train.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    while True:
        prefix = os.path.join(out_dir, f"bench{vocab}")
        t0 = time.perf_counter()
        spm.SentencePieceTrainer.train(input=path, model_prefix=prefix, vocab_size=vocab,
                                       num_threads=1, character_coverage=0.9999, minloglevel=2,
                                       max_sentence_length=1 << 16, **LLAMA_SETTINGS)
        took = time.perf_counter() - t0
        if took < budget_s or vocab <= 4000:
            return {"model": prefix + ".model", "vocab": vocab, "train_s": round(took, 1),
                    "train_mb": round(len(text.encode("utf-8")) / 1e6, 1)}
        vocab //= 2


# ---------------------------------------------------------------------------------------------
# measurements


def _status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def floor_pass(sp, batches):
    ids, lens = [], []
    for b in batches:
        out = sp.encode(b, num_threads=1)
        lens.append(np.fromiter(map(len, out), dtype=np.int64, count=len(out)))
        ids.append(out)
    return ids, lens


def floor_array_pass(sp, batches, dtype):
    """The floor, then its ids as one array and lengths (what encode_to_array returns)."""
    from pipeline.tokenize.encoder import ids_array

    ids, lens = [], []
    for b in batches:
        out = sp.encode(b, num_threads=1)
        n = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
        ids.append(ids_array(out, np.dtype(dtype)))
        lens.append(n)
    return np.concatenate(ids), np.concatenate(lens)


def tinyllama_pass(sp, batches, dtype):
    """prepare_slimpajama: per document tokenizer.encode, np.array(ids), builder.add_array."""
    chunk = np.empty(1 << 22, dtype=dtype)
    chunks, pos, lens = [], 0, []
    for b in batches:
        for text in b:
            arr = np.array(sp.encode(text), dtype=dtype)
            lens.append(len(arr))
            while len(arr):
                n = min(len(arr), len(chunk) - pos)
                chunk[pos:pos + n] = arr[:n]
                pos += n
                arr = arr[n:]
                if pos == len(chunk):
                    chunks.append(chunk)
                    chunk, pos = np.empty(1 << 22, dtype=dtype), 0
    chunks.append(chunk[:pos])
    return np.concatenate(chunks), np.asarray(lens, dtype=np.int64)


def ours_pass(enc, batches):
    ids, lens = [], []
    for b in batches:
        i, n = enc.encode_to_array(b)
        ids.append(i)
        lens.append(n)
    return ids, lens


def ours_lists_pass(enc, batches):
    return [enc.encode(b) for b in batches]


def bench_corpus(label: str, docs: list[str], model: str, batch: int, runs: int,
                 profile: str | None) -> dict:
    import sentencepiece as spm

    from pipeline.tokenize.encoder import Encoder

    sp = spm.SentencePieceProcessor(model_file=model)
    dtype = Encoder(model).dtype
    batches = [docs[i:i + batch] for i in range(0, len(docs), batch)]
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)

    # reference ids (untimed), to check every run against
    ref_lists, _ = floor_pass(sp, batches)
    ref_lens = np.fromiter((len(x) for b in ref_lists for x in b), dtype=np.int64)
    ref = np.fromiter((i for b in ref_lists for x in b for i in x), dtype=dtype,
                      count=int(ref_lens.sum()))
    del ref_lists
    tokens = len(ref)

    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(ours_pass, Encoder(model), batches)
        print(f"--- cProfile of ours (cold), {label}")
        pstats.Stats(prof).sort_stats(profile).print_stats(25)

    # memory (untimed): a fresh Encoder streams every batch; each output is checked, dropped
    gc.collect()
    rss0 = _status("VmRSS")
    peak_ok = _reset_peak()
    enc = Encoder(model)
    off = 0
    for b in batches:
        ids, lens = enc.encode_to_array(b)
        assert np.array_equal(ids, ref[off:off + len(ids)]), "ids differ from SentencePiece"
        off += len(ids)
    assert off == tokens
    peak = _status("VmHWM") if peak_ok else 0
    del ids, lens
    gc.collect()
    held = _status("VmRSS") - rss0
    stats = enc.stats()
    mem = {"cache_entries": stats["entries"],
           "cache_approx_mb": round(stats["approx_bytes"] / 1e6, 1),
           "rss_held_by_cache_mb": round(held / 1e6, 1),
           "peak_rss_delta_mb": round((peak - rss0) / 1e6, 1) if peak else None}
    del enc

    best: dict[str, float] = {}
    for _ in range(runs):
        # floor
        gc.collect()
        t0 = time.process_time()
        out, lens = floor_pass(sp, batches)
        t = time.process_time() - t0
        got = np.fromiter((i for b in out for x in b for i in x), dtype=dtype, count=tokens)
        assert np.array_equal(got, ref) and np.array_equal(np.concatenate(lens), ref_lens)
        del out, got
        best["floor"] = min(best.get("floor", 1e9), t)
        # floor, output as one array
        gc.collect()
        t0 = time.process_time()
        got, lens = floor_array_pass(sp, batches, dtype)
        t = time.process_time() - t0
        assert np.array_equal(got, ref) and np.array_equal(lens, ref_lens)
        del got
        best["floor_array"] = min(best.get("floor_array", 1e9), t)
        # tinyllama
        gc.collect()
        t0 = time.process_time()
        got, lens = tinyllama_pass(sp, batches, dtype)
        t = time.process_time() - t0
        assert np.array_equal(got, ref) and np.array_equal(lens, ref_lens)
        del got
        best["tinyllama"] = min(best.get("tinyllama", 1e9), t)
        # ours: a new Encoder (cold cache), then a second pass with it (warm)
        gc.collect()
        enc = Encoder(model)
        for mode in ("ours_cold", "ours_warm"):
            t0 = time.process_time()
            ids, lens = ours_pass(enc, batches)
            t = time.process_time() - t0
            assert np.array_equal(np.concatenate(ids), ref), "ids differ from SentencePiece"
            assert np.array_equal(np.concatenate(lens), ref_lens)
            del ids, lens
            best[mode] = min(best.get(mode, 1e9), t)
        del enc
        gc.collect()
        enc = Encoder(model)
        t0 = time.process_time()
        out = ours_lists_pass(enc, batches)
        t = time.process_time() - t0
        got = np.fromiter((i for b in out for x in b for i in x), dtype=dtype, count=tokens)
        assert np.array_equal(got, ref), "ids differ from SentencePiece"
        del out, got, enc
        best["ours_lists_cold"] = min(best.get("ours_lists_cold", 1e9), t)
    speeds = {k: tokens / v for k, v in best.items()}
    return {
        "docs": len(docs), "text_mb": round(text_bytes / 1e6, 1), "tokens": tokens,
        "batch": batch,
        "tokens_per_s_per_core": {k: round(v) for k, v in speeds.items()},
        "ratio_to_floor": {k: round(v / speeds["floor"], 2) for k, v in speeds.items()},
        "hit_rate": round(stats["hit_rate"], 4),
        "plain_docs_share": round(stats["plain_docs"] / max(stats["docs"], 1), 3),
        "segments": stats["segments"], "misses": stats["misses"],
        "long_segments": stats["long_segments"], "evictions": stats["evictions"],
        "memory": mem, "identical_ids": True,
    }


def distinct_share(docs: list[str], model: str) -> float:
    """Distinct segments / segments: the miss rate of an unbounded cache on these documents."""
    from pipeline.tokenize.encoder import Encoder

    enc = Encoder(model)
    seen, total = set(), 0
    for d in docs:
        s = enc.segments(d)
        total += len(s)
        seen.update(s)
    return len(seen) / max(total, 1)


def run_benchmark(mb: float = 8, hostile_mb: float = 2, vocab: int = 32000, batch: int = 256,
                  runs: int = 3, synthetic: bool = False, profile: str | None = None,
                  only: list[str] | None = None) -> dict:
    import sentencepiece as spm

    t0 = time.perf_counter()
    corpora, prose_rest, code_rest = real_corpora(mb)
    for kind in HOSTILE:
        corpora[kind] = make_hostile(kind, hostile_mb)
    if synthetic:
        corpora["stdlib_prose"] = make_prose(mb, 0.10)
        corpora["stdlib_code"] = make_code(mb)
    if only:
        corpora = {k: v for k, v in corpora.items() if k in only}
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench_encoder_") as tmp:
        model = train_model(prose_rest, code_rest, vocab, tmp)
        results = {"python_version": sys.version.split()[0], "sentencepiece": spm.__version__,
                   "model": {k: v for k, v in model.items() if k != "model"},
                   "corpus_build_s": round(build_s, 1), "runs": runs, "corpora": list(corpora)}
        for label, docs in corpora.items():
            r = bench_corpus(label, docs, model["model"], batch, runs, profile)
            r["distinct_segment_share"] = round(distinct_share(docs, model["model"]), 4)
            results[label] = r
            print(f"{label}: ratio to the floor {r['ratio_to_floor']}", file=sys.stderr, flush=True)
    return results


def print_table(res: dict):
    m = res["model"]
    print(f"model: BPE vocab {m['vocab']} (Llama-2 settings), trained on {m['train_mb']} MB in "
          f"{m['train_s']} s; python {res['python_version']}, sentencepiece {res['sentencepiece']}")
    for label in res["corpora"]:
        r = res[label]
        print(f"\n{label}: {r['docs']} docs, {r['text_mb']} MB, {r['tokens']:,} tokens; "
              f"distinct segments {r['distinct_segment_share']:.1%} of {r['segments']:,}; "
              f"cold-pass hit rate {r['hit_rate']:.1%}; long segments {r['long_segments']:,}; "
              f"plain-encoded documents {r['plain_docs_share']:.1%}")
        print(f"{'':24}{'Mtokens/s per core':>20}{'ratio':>8}")
        for k, name in (("floor", "floor sp.encode(batch)"), ("floor_array", "floor, as one array"),
                        ("tinyllama", "TinyLlama per-doc"),
                        ("ours_cold", "ours, cold cache"), ("ours_lists_cold", "ours lists, cold"),
                        ("ours_warm", "ours, warm cache")):
            print(f"{name:24}{r['tokens_per_s_per_core'][k] / 1e6:>20.2f}{r['ratio_to_floor'][k]:>8.2f}")
        mm = r["memory"]
        print(f"cache after one pass: {mm['cache_entries']:,} entries, ~{mm['cache_approx_mb']} MB "
              f"(estimate); RSS held {mm['rss_held_by_cache_mb']} MB, peak RSS delta "
              f"{mm['peak_rss_delta_mb']} MB (streaming the batches, outputs dropped)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8, help="MB of each real corpus")
    ap.add_argument("--hostile-mb", type=float, default=2, help="MB of each hostile corpus")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=256, help="documents per encode call")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="also the stdlib docstring corpora")
    ap.add_argument("--only", default=None, help="comma-separated corpus labels to measure")
    ap.add_argument("--always-segment", action="store_true",
                    help="never send a sub-batch to plain encode (what the per-batch decision saves)")
    ap.add_argument("--profile", default=None, help="pstats sort key: profile one cold pass")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.always_segment:
        from pipeline.tokenize import encoder as encmod

        encmod._PROBE_RATIO = float("inf")
        encmod._NOVEL_BATCHES = 1 << 60
    only = a.only.split(",") if a.only else None
    res = run_benchmark(a.mb, a.hostile_mb, a.vocab, a.batch, a.runs, a.synthetic, a.profile, only)
    print_table(res)
    if a.json:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
