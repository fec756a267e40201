"""Benchmark: the driver's work on an object store with many inputs: listing, planning, resuming.

    python tests/benchmarks/bench_driver.py [--n 100000] [--rtt-ms 0,20] [--get-max 2000] [--json]

Against moto's S3 server on loopback (its own process, so that it does not share the driver's
GIL), with N small input objects and, for the resume, N completion records:

- `list`: `inputs.list_inputs` of a glob over the N inputs (listing, then the cached listing
  written to RUN/inputs/), and again from the cache;
- `plan`: the download stage's plan of the N inputs (from the cached listing);
- `resume`: the runner's `_existing_records` (one listing of RUN/tasks/download/, then each
  record from the stage's index, RUN/tasks/download.index.json.zst, or read by a thread pool
  where the index lacks it) against the baseline, the serial loop it replaced (one GET after the
  other, as in commit 385fddd), on the same records in the same run: `resume_pool_s` without an
  index (a stage that was interrupted), `resume_index_s` with it (a stage that finished).

Real S3 answers a GET in about 10-30 ms where moto on loopback answers in about 1 ms of its own
CPU; `--rtt-ms` adds a simulated round trip to every request (an awaited sleep in the client's
`before-send` hook, so concurrent requests overlap their waits as they would on a network). The
two ways that make one GET per record (the serial baseline and the thread pool) are measured on
the first `--get-max` records and scaled to N: the listing of all N records (measured once, the
same for both) plus the GETs times N / get-max; the output says so. The resume with the index is
measured on all N (its listing included). Objects
are loaded into moto's backend directly (an HTTP PUT costs moto about 5 ms of CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# moto's server in its own process, which also loads objects straight into its backend on request
# (an HTTP PUT costs moto ~5 ms of CPU: 200,000 of them would be most of the benchmark)
_SERVER = r"""
import pickle, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
print("ready", flush=True)
for line in sys.stdin:
    with open(line.strip(), "rb") as fh:
        items = pickle.load(fh)
    for path, data in items.items():
        bucket, key = path.split("/", 1)
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, "us-east-1")
        backend.put_object(bucket, key, data)
    print("ok", flush=True)
"""


class Moto:
    """moto's S3 server on loopback, in a subprocess; `load` puts many objects without HTTP."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(tmp / "moto.log", "wb"), text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("moto server did not start")
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}

    def load(self, items: dict[str, bytes]) -> None:
        path = self.tmp / "load.pkl"
        with open(path, "wb") as fh:
            pickle.dump(items, fh)
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise SystemExit("moto server failed to load objects")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def baseline_load_records(run, stage: str, tasks, present: set[str]) -> dict[str, dict]:
    """The runner's record reading before this change (commit 385fddd), after its listing of the
    records (`present`, the same listing as now): one GET after the other."""
    from pipeline import storage

    local = False
    done: dict[str, dict] = {}
    for t in tasks:
        url = run.record(stage, t.id)
        _, path = storage.url_to_fs(url)
        if path not in present:
            continue
        try:
            rec = storage.read_json(url)
        except (orjson.JSONDecodeError, OSError):
            continue
        if not rec or rec.get("fingerprint") != t.fingerprint:
            continue
        rec["outputs"] = [run.relative(o) for o in rec.get("outputs", [])]
        if local and not all(os.path.exists(storage.url_to_fs(o)[1]) for o in rec["outputs"]):
            continue
        done[t.id] = rec
    return done


def _set_rtt(fs, ms: float) -> None:
    """Every request of fs's client waits `ms` before it is sent (an awaited sleep: concurrent
    requests overlap their waits, as on a network)."""
    events = fs.s3.meta.events
    old = getattr(fs, "_bench_rtt", None)
    if old is not None:
        events.unregister("before-send.s3", old)
        fs._bench_rtt = None
    if ms > 0:
        async def wait(**_):
            await asyncio.sleep(ms / 1000)

        events.register("before-send.s3", wait)
        fs._bench_rtt = wait


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_benchmark(n: int, rtts: list[float], get_max: int) -> dict:
    from pipeline import storage
    from pipeline.download import DownloadStage
    from pipeline.inputs import list_inputs
    from pipeline.layout import RunDir
    from pipeline.recipe import parse_recipe
    from pipeline.runner import (
        _existing_records,
        _list_records,
        _load_records,
        _write_record_index,
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-driver-"))
    moto = Moto(tmp)
    os.environ.update(moto.env)
    try:
        fs, _ = storage.url_to_fs("s3://corpus")
        t0 = time.perf_counter()
        moto.load({f"corpus/web/{i // 1000:03d}/part-{i:06d}.jsonl": b'{"text": "x"}\n' for i in range(n)})
        moto.load({"runs/.keep": b""})
        setup_inputs = time.perf_counter() - t0
        recipe = parse_recipe({"name": "bench", "output": "s3://runs/bench", "stages": ["download"],
                               "sources": [{"name": "web", "urls": ["s3://corpus/web/*/*.jsonl"], "download": True}]})
        run = RunDir(recipe.output)
        src = recipe.sources[0]
        out: dict = {"n": n, "setup_inputs_s": round(setup_inputs, 1), "rtt": {}}
        # the completion records of a finished download stage (what a resume reads)
        storage.write_json(run.inputs_listing("web"), {})  # forces a fresh listing below
        _, files = _timed(list_inputs, src, run)
        tasks = DownloadStage().plan(recipe, run)
        assert len(tasks) == n, len(tasks)
        t0 = time.perf_counter()
        records = {t.id: {"stage": "download", "task": t.id, "fingerprint": t.fingerprint, "outputs": [f"raw/{t.id}"],
                          "stats": {"sources": {"web": {"files": 1, "bytes": 14}}}, "issues": [], "docs": 0,
                          "bytes": 14, "errors": 0, "attempt": 0, "seconds": 0.01, "node": "n", "node_id": "x",
                          "pid": 1} for t in tasks}
        moto.load({storage.url_to_fs(run.record("download", tid))[1]: orjson.dumps(rec)
                   for tid, rec in records.items()})
        out["setup_records_s"] = round(time.perf_counter() - t0, 1)
        for rtt in rtts:
            _set_rtt(fs, rtt)
            r: dict = {}
            storage.write_json(run.inputs_listing("web"), {})
            r["list_s"], files = _timed(list_inputs, src, run)
            assert len(files) == n
            r["list_cached_s"], _ = _timed(list_inputs, src, run)
            r["plan_s"], tasks = _timed(DownloadStage().plan, recipe, run)
            # one listing of the records (the same before and after), then the records: one GET
            # each (serial before, concurrent now; measured on m records, scaled to n) or the index
            storage.remove(run.record_index("download"))
            t_list, present = _timed(_list_records, run, "download")
            assert len(present) == n
            m = min(n, get_max)
            t_pool, (done, misses) = _timed(_load_records, run, "download", tasks[:m], present)
            assert len(done) == m and misses == m, (len(done), misses)
            t_base, base = _timed(baseline_load_records, run, "download", tasks[:m], set(present))
            assert base == done
            _write_record_index(run, "download", records, present)  # what the stage's end writes
            r["resume_index_s"], (done, misses) = _timed(_existing_records, run, "download", tasks)
            assert len(done) == n and misses == 0, (len(done), misses)
            storage.remove(run.record_index("download"))
            r["records_listing_s"] = t_list
            r["get_records"] = m
            r["baseline_resume_s"] = t_list + t_base * n / m
            r["resume_pool_s"] = t_list + t_pool * n / m
            r["speedup_pool"] = r["baseline_resume_s"] / r["resume_pool_s"]
            r["speedup_index"] = r["baseline_resume_s"] / r["resume_index_s"]
            out["rtt"][f"{rtt:g}ms"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        _set_rtt(fs, 0)
        return out
    finally:
        moto.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="input objects and completion records")
    ap.add_argument("--rtt-ms", default="0,20", help="simulated round trips per request, comma separated")
    ap.add_argument("--get-max", type=int, default=2000,
                    help="records read one GET each, serially and by the thread pool (scaled to N when fewer)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run_benchmark(args.n, [float(x) for x in args.rtt_ms.split(",")], args.get_max)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"N = {res['n']:,} inputs and completion records on moto's S3 (setup: {res['setup_inputs_s']} s inputs, "
          f"{res['setup_records_s']} s records)")
    for rtt, r in res["rtt"].items():
        scaled = "" if r["get_records"] == res["n"] else f" (measured on {r['get_records']:,}, scaled)"
        print(f"rtt {rtt:>5}: list {r['list_s']:.1f} s (cached {r['list_cached_s']:.2f} s), plan {r['plan_s']:.2f} s; "
              f"resume: serial {r['baseline_resume_s']:.1f} s, thread pool {r['resume_pool_s']:.1f} s{scaled} "
              f"({r['speedup_pool']:.1f}x), index {r['resume_index_s']:.2f} s ({r['speedup_index']:.0f}x); "
              f"listing the records alone {r['records_listing_s']:.2f} s")


if __name__ == "__main__":
    main()
