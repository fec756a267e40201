"""Benchmark: the tokenizing rates `tinyprep plan` assumes, on real text with a cold cache.

    python tests/benchmarks/bench_plan_rates.py [--mb 20] [--code-mb 20] [--runs 2] [--json]

A plan for SlimPajama and Starcoderdata needs the rate on text whose vocabulary keeps growing:
real files of this machine, never generated and never repeated (`bench_encoder.py` measures the
encoder on the same kind of text, in more detail).

The corpora come from `pipeline/tools/realtext.py` (the plan measures on the same kind of text).

The model: BPE with Llama-2's settings trained on part of both corpora (`bench_encoder`'s
`train_model`). Per corpus, interleaved, best of ``--runs``, tokens per CPU-second:

* floor: ``sp.encode(batch, num_threads=1)`` (plain SentencePiece: no cache);
* ours (cold): a new `Encoder` per pass, so that its segment cache starts empty.

The ids are checked equal to SentencePiece's. Also reported: the cold pass's cache hit rate
and bytes per token. `pipeline/tools/plan.py` quotes these figures (TOKENIZE_RATES).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


def bench(label: str, docs: list[str], model: str, batch: int, runs: int) -> dict:
    import sentencepiece as spm
    from bench_encoder import floor_pass, ours_pass

    from pipeline.tokenize.encoder import Encoder

    sp = spm.SentencePieceProcessor(model_file=model)
    batches = [docs[i:i + batch] for i in range(0, len(docs), batch)]
    ref, _ = floor_pass(sp, batches)
    ref_flat = [i for b in ref for x in b for i in x]
    tokens, text_bytes = len(ref_flat), sum(len(d.encode()) for d in docs)
    best = {"floor": 0.0, "cold": 0.0}
    hit_rate = 0.0
    for _ in range(runs):
        t0 = time.process_time()
        floor_pass(sp, batches)
        best["floor"] = max(best["floor"], tokens / (time.process_time() - t0))
        enc = Encoder(model)
        t0 = time.process_time()
        ids, _ = ours_pass(enc, batches)
        best["cold"] = max(best["cold"], tokens / (time.process_time() - t0))
        hit_rate = enc.stats()["hit_rate"]
        assert np.array_equal(np.concatenate(ids), np.asarray(ref_flat, dtype=ids[0].dtype)), label
    return {"corpus": label, "documents": len(docs), "mb": round(text_bytes / 1e6, 1), "tokens": tokens,
            "bytes_per_token": round(text_bytes / tokens, 3), "floor_tokens_s": round(best["floor"]),
            "cold_tokens_s": round(best["cold"]), "cold_vs_floor": round(best["cold"] / best["floor"], 2),
            "cold_hit_rate": round(hit_rate, 3)}


def main(argv=None) -> dict:
    from bench_encoder import train_model

    from pipeline.tools.realtext import make_code, make_prose

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="MB of prose")
    ap.add_argument("--code-mb", type=float, default=20.0, help="MB of code")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    prose, code = make_prose(a.mb), make_code(a.code_mb)
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        model = train_model(prose, code, a.vocab, tmp)
        res = {"model": {k: v for k, v in model.items() if k != "model"},
               "prose": bench("prose", prose, model["model"], a.batch, a.runs),
               "code": bench("code", code, model["model"], a.batch, a.runs),
               "date": time.strftime("%Y-%m-%d"), "cpu": os.cpu_count()}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k in ("prose", "code"):
            r = res[k]
            print(f"{k:<6} {r['mb']:>6} MB {r['tokens'] / 1e6:>6.2f}M tokens  {r['bytes_per_token']:.2f} B/token  "
                  f"floor {r['floor_tokens_s'] / 1e6:.2f}M/s  ours cold {r['cold_tokens_s'] / 1e6:.2f}M/s "
                  f"({r['cold_vs_floor']:.2f}x)  hit rate {r['cold_hit_rate']:.1%}")
        print("model:", res["model"])
    return res


if __name__ == "__main__":
    main()
