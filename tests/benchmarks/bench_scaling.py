"""Benchmark: parallel efficiency of the pipeline from 1 to 2 workers on this machine.

    python tests/benchmarks/bench_scaling.py [--mb 160] [--files 16] [--runs 2] [--json]

Builds a SlimPajama-like corpus (`bench_ingest.generate_corpus`), then runs `tinyprep run` on it
with `--workers 1` and `--workers 2` (each its own process and embedded Ray), alternating, and
reads each stage's wall time from the run's `stats/timeline.json` (Ray start-up excluded, the
driver's planning and merging included). Parallel efficiency = T1 / (2 x T2); 1.0 is perfect.
The outputs of the two runs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import generate_corpus  # noqa: E402


def _digest(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run / "docs").rglob("*.parquet")):
        h.update(p.relative_to(run).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _run(corpus: Path, out: Path, workers: int) -> dict[str, float]:
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(
        f"name: scaling\noutput: {out}\nstages: [ingest]\n"
        f"sources:\n  - name: slimpajama\n    urls: ['{corpus}/chunk*/*.jsonl.zst']\n"
        "    metadata: [meta.redpajama_set_name]\n    subset: meta.redpajama_set_name\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--workers", str(workers)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    timeline = json.loads((out / "stats" / "timeline.json").read_text())
    return {t["stage"]: t["wall_s"] for t in timeline}


def run_benchmark(mb: float = 160, files: int = 16, runs: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = generate_corpus(tmp / "corpus", mb=mb, files=files)
        best: dict[int, float] = {}
        digests: dict[int, str] = {}
        for i in range(runs):
            for workers in (1, 2):
                out = tmp / f"run-{workers}-{i}"
                t = _run(tmp / "corpus", out, workers)["ingest"]
                best[workers] = min(best.get(workers, t), t)
                digests[workers] = _digest(out)
        return {
            "corpus_mb": info["text_bytes"] / 1e6, "files": files, "docs": info["docs"], "cpus": os.cpu_count(),
            "t1_s": best[1], "t2_s": best[2], "speedup": best[1] / best[2],
            "efficiency": best[1] / (2 * best[2]), "identical_outputs": digests[1] == digests[2],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=160)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run_benchmark(a.mb, a.files, a.runs)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"ingest of {res['corpus_mb']:.1f} MB in {res['files']} files ({res['docs']} docs), "
              f"{res['cpus']} CPUs, best of {a.runs}")
        print(f"1 worker {res['t1_s']:.2f} s, 2 workers {res['t2_s']:.2f} s: speedup {res['speedup']:.2f}x, "
              f"parallel efficiency {res['efficiency']:.2f}; outputs identical: {res['identical_outputs']}")
    return 0 if res["identical_outputs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
