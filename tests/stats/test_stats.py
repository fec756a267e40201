"""pipeline/stats: mergeable histograms, the stats document of a run and `tinyprep stats`.

The numbers of the session's reference run (recipes/sample.yaml, 2 workers) are checked against
what the run's files say directly: completion records, docs parquet, dedup removal lists, and the
shards read with the spec reader of test_formats.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, tinyprep
from spec_readers import spec_read_megatron

from pipeline.dedup import cluster_bucket
from pipeline.stats import merge_all, merge_counts
from pipeline.stats.histogram import EDGES, LengthStats, bin_range, histogram
from pipeline.stats.summary import (
    FORMAT,
    VERSION,
    SummaryError,
    collect,
    deterministic_part,
    dumps,
    slimpajama_dedup_rate,
)

RECIPE = str(ROOT / "recipes" / "sample.yaml")
STAGES = ("download", "ingest", "dedup", "tokenize", "mix")


# --- mergeable histograms -------------------------------------------------------------------


def test_length_histograms_merge_exactly_in_any_order():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 40, 500), rng.lognormal(7, 1.5, 5000).astype(np.int64) + 1])
    whole = LengthStats.of(values)
    assert whole.count == len(values) and whole.sum == int(values.sum()) and sum(whole.bins.values()) == len(values)
    parts = [LengthStats.of(p) for p in np.array_split(rng.permutation(values), 37)] + [LengthStats()]
    for seed in range(5):  # any order, any grouping
        random.Random(seed).shuffle(parts)
        left = parts[0]
        for p in parts[1:]:
            left = left.merge(p)
        right = parts[-1]
        for p in reversed(parts[:-1]):
            right = p.merge(right)
        assert left == right == whole
        assert left.to_json() == whole.to_json()
    # the histogram dicts merge like every other counter
    assert merge_all(p.bins for p in parts) == whole.bins
    # bins: exact below 16, then 2**(1/8) wide (integer edges); quantiles land in the right bin
    assert list(EDGES[:17]) == list(range(17))
    assert all(hi - lo <= 0.0906 * lo + 1 for lo, hi in map(bin_range, whole.bins) if lo >= 16)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        exact = np.sort(values)[max(0, int(np.ceil(q * len(values))) - 1)]
        assert abs(whole.quantile(q) - exact) <= 0.1 * exact + 1
    small = LengthStats.of(np.arange(1, 11))
    assert small.quantile(0.5) == 5 and small.quantile(1.0) == 10 and small.quantile(0.0) == 1
    assert histogram(np.array([0, 15, 16, 17, 18])) == {"0000000000": 1, "0000000015": 1, "0000000016": 2,
                                                        "0000000018": 1}  # [16, 18), [18, 20)


def test_stage_stats_are_the_merge_of_the_task_records_in_any_order(reference):
    run = reference[0]
    for stage in STAGES:
        records = [json.loads(p.read_text()) for p in sorted((run / "tasks" / stage).rglob("*.json"))]
        merged = json.loads((run / "stats" / f"{stage}.json").read_text())["stats"]
        assert records and merge_all(r["stats"] for r in records) == merged
        for seed in range(3):
            random.Random(seed).shuffle(records)
            assert merge_all(r["stats"] for r in records) == merged
        half = len(records) // 2  # merging partial merges gives the same numbers
        assert merge_counts(merge_all(r["stats"] for r in records[:half]),
                            merge_all(r["stats"] for r in records[half:])) == merged


# --- the stats document on the sample --------------------------------------------------------


def _shard_counts(run: Path) -> dict:
    """Per (source, split): documents, tokens and document lengths read straight from the shards."""
    manifest = json.loads((run / "manifest.json").read_text())
    out: dict = {}
    for s in manifest["shards"]:
        docs = spec_read_megatron(run / s["path"])
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        c = out.setdefault((s["source"], s["split"]), {"docs": 0, "tokens": 0, "lengths": []})
        c["docs"] += len(docs)
        c["tokens"] += int(lengths.sum())
        c["lengths"].append(lengths)
    return out


def test_sample_numbers_follow_the_accounting_identity_and_the_shards(reference):
    run = reference[0]
    summary = collect(str(run))
    assert summary["format"] == FORMAT and summary["version"] == VERSION
    assert summary["missing"] == [] and summary["problems"] == []
    assert all(summary["stages"][s]["status"] == "done" for s in STAGES)
    shards = _shard_counts(run)
    mixture = json.loads((run / "mixture.json").read_text())
    for name, node in summary["sources"].items():
        d = node["docs"]
        # the identity, from the stages' counts
        assert d["read"] == (d["kept"] + d["filtered_total"] + d["unreadable_total"] + d["duplicate_exact"]
                             + d["duplicate_fuzzy"] + d["duplicate_holdout"])
        assert node["accounting"]["holds"] and node["accounting"]["kept_after"] == "tokenize"
        assert all(c["ok"] for c in node["checks"]) and len(node["checks"]) >= 8
        # ... and from the files: ingested rows, dedup removal lists, documents in the shards
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "docs" / name).rglob("*.parquet"))
        assert d["ingested"] == rows == d["read"] - d["filtered_total"] - d["unreadable_total"]
        reasons = [r for p in (run / "dedup" / "removed" / name).rglob("*.parquet")
                   for r in pq.read_table(p, columns=["reason"]).column("reason").to_pylist()]
        assert (d["duplicate_exact"], d["duplicate_fuzzy"]) == (reasons.count("exact"), reasons.count("fuzzy"))
        for split in ("train", "validation"):
            direct = shards[(name, split)]
            assert d[split] == direct["docs"] and node["tokens"][split] == direct["tokens"]
            assert node["lengths"][split] == LengthStats.of(np.concatenate(direct["lengths"])).to_json()
        assert d["kept"] == shards[(name, "train")]["docs"] + shards[(name, "validation")]["docs"]
        # every subset accounts for its documents through dedup, and the subsets sum to the source
        for sub, sn in node["subsets"].items():
            sd = sn["docs"]
            assert sd["read"] == (sd["kept"] + sd["filtered_total"] + sd["unreadable_total"]
                                  + sd["duplicate_exact"] + sd["duplicate_fuzzy"]), sub
            assert sn["accounting"]["holds"] and sn["tokens"]["estimated"]
        for key in ("read", "filtered_total", "duplicate_exact", "duplicate_fuzzy"):
            assert sum(sn["docs"][key] for sn in node["subsets"].values()) == d[key]
        assert sum(sn["docs"]["kept"] for sn in node["subsets"].values()) == d["kept"] + d["duplicate_holdout"]
        # the mixture: target and realized shares, epochs
        m = next(s for s in mixture["sources"] if s["name"] == name)
        assert node["mixture"]["weight"] == m["weight"] and node["mixture"]["epochs"] == round(m["epochs"], 6)
        assert node["mixture"]["realized_share"] == round(m["samples"] / mixture["total_samples"], 6)
        assert abs(node["mixture"]["realized_share"] - m["weight"]) < 1e-3
    slim = summary["sources"]["slimpajama"]
    assert slim["subsets"]["RedPajamaGithub"]["docs"]["kept"] == 0
    assert slim["subsets"]["RedPajamaCommonCrawl"]["dedup"]["slimpajama_bytes_rate"] == 0.638
    assert slimpajama_dedup_rate("RedPajamaArXiv") == 0.0006 and slimpajama_dedup_rate("python") is None
    # dedup clusters: every removed document belongs to a cluster of at least 2
    dd = summary["dedup"]
    removed = sum(n["docs"]["duplicate_exact"] + n["docs"]["duplicate_fuzzy"] for n in summary["sources"].values())
    assert dd["ran"] and 0 < dd["clusters_total"] <= removed
    assert (sum(r["clusters"] * (r["min_size"] - 1) for r in dd["clusters"]) <= removed
            <= sum(r["clusters"] * (r["max_size"] - 1) for r in dd["clusters"]))
    for r in dd["clusters"]:  # the bins are dedup's
        assert cluster_bucket(r["min_size"]) == cluster_bucket(r["max_size"]) != cluster_bucket(r["max_size"] + 1)
        assert int(cluster_bucket(r["min_size"])) == r["min_size"]
    assert [s["path"] for s in summary["shards"]] == [s["path"] for s in
                                                      json.loads((run / "manifest.json").read_text())["shards"]]
    assert [e["stage"] for e in summary["timeline"]["runs"]] == list(STAGES)
    assert dumps(collect(str(run))) == dumps(summary)  # collecting twice gives the same bytes


@pytest.fixture(scope="module")
def one_worker(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "w1"
    r = tinyprep("run", RECIPE, "--output", str(out), "--workers", "1", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_one_and_two_workers_give_equal_stats(reference, one_worker, workdir):
    two = json.loads(tinyprep("stats", str(reference[0]), "--json", cwd=workdir).stdout)
    one = json.loads(tinyprep("stats", str(one_worker), "--json", cwd=workdir).stdout)
    assert deterministic_part(one) == deterministic_part(two)
    assert one["run"] != two["run"] and len(one["timeline"]["runs"]) == len(two["timeline"]["runs"])


def test_stats_command_prints_the_tables_and_writes_the_json(reference, workdir, tmp_path):
    run = reference[0]
    r = tinyprep("stats", str(run), "-o", str(tmp_path / "stats.json"), "--check", cwd=workdir)
    assert r.returncode == 0, r.stderr
    for heading in ("documents per source and subset", "mixture:", "document length in tokens", "dedup clusters",
                    "stages", "RedPajamaCommonCrawl", "python", "epochs"):
        assert heading in r.stdout, heading
    assert "missing" not in r.stdout and "problem" not in r.stdout
    assert deterministic_part(json.loads((tmp_path / "stats.json").read_text())) == deterministic_part(
        collect(str(run)))
    # `tinyprep run` ended with the documents and the mixture tables
    out = reference[1].stdout
    assert "documents per source and subset" in out and out.rstrip().splitlines()[0].startswith("documents")
    assert "realized share" in out and out.index("mixture:") > out.index("RedPajamaWikipedia")


# --- partial and remote runs -----------------------------------------------------------------


def _partial_copy(run: Path, dest: Path, stats: tuple[str, ...]) -> Path:
    dest.mkdir(parents=True)
    shutil.copy(run / "recipe.yaml", dest / "recipe.yaml")
    (dest / "stats").mkdir()
    for stage in stats:
        shutil.copy(run / "stats" / f"{stage}.json", dest / "stats" / f"{stage}.json")
    return dest


def test_a_partial_run_shows_what_exists_and_what_is_missing(reference, workdir, tmp_path):
    run = reference[0]
    part = _partial_copy(run, tmp_path / "part", ("download", "ingest", "dedup"))
    # tokenize was interrupted: some completion records, no stats/tokenize.json, no manifest
    shutil.copytree(run / "tasks" / "tokenize" / "holdout", part / "tasks" / "tokenize" / "holdout")
    s = collect(str(part))
    assert [s["stages"][x]["status"] for x in STAGES] == ["done", "done", "done", "incomplete", "missing"]
    assert s["stages"]["tokenize"]["records"] > 0
    assert any("tokenize" in m for m in s["missing"]) and any("manifest.json" in m for m in s["missing"])
    assert any("mixture.json" in m for m in s["missing"]) and s["problems"] == []
    for node in s["sources"].values():
        assert node["accounting"]["holds"] and node["accounting"]["kept_after"] == "dedup"
        assert node["docs"]["duplicate_holdout"] is None and node["tokens"]["total"] is None
        assert node["mixture"] is None and node["lengths"] is None
    assert s["mixture"] is None and s["shards"] == [] and s["dedup"]["ran"]
    r = tinyprep("stats", str(part), cwd=workdir)
    assert r.returncode == 0 and "missing: stage tokenize" in r.stdout and "incomplete" in r.stdout
    r = tinyprep("stats", str(part), "--check", cwd=workdir)
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    # a run with only the ingest stage's stats, and directories that are not runs
    only = collect(str(_partial_copy(run, tmp_path / "ingest-only", ("ingest",))))
    assert only["sources"]["slimpajama"]["accounting"]["kept_after"] == "ingest"
    assert only["sources"]["slimpajama"]["accounting"]["holds"]
    assert only["dedup"] == {"ran": False, "clusters": [], "clusters_total": None}
    with pytest.raises(SummaryError, match="not a run directory"):
        collect(str(tmp_path))
    r = tinyprep("stats", str(tmp_path / "nothing-here"), cwd=workdir)
    assert r.returncode == 1 and "no such run directory" in r.stderr and "Traceback" not in r.stderr


def test_damaged_shards_and_disagreeing_counts_are_problems(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run, ignore=shutil.ignore_patterns("raw", "docs", "dedup", "tasks"))
    manifest = json.loads((run / "manifest.json").read_text())
    victim = run / (manifest["shards"][0]["path"] + ".bin")
    victim.write_bytes(victim.read_bytes()[:-2])
    stats = json.loads((run / "stats" / "tokenize.json").read_text())
    stats["stats"]["sources"]["starcoderdata"]["train"]["docs"] += 1
    (run / "stats" / "tokenize.json").write_text(json.dumps(stats))
    s = collect(str(run))
    assert any(str(victim) in p for p in s["problems"])
    assert any("starcoderdata: manifest train docs = tokenize train docs" in p for p in s["problems"])
    assert not s["sources"]["starcoderdata"]["accounting"]["holds"] and not s["totals"]["accounting"]["holds"]


def test_a_remote_run_directory_gives_the_same_document(reference):
    run = reference[0]
    fs = fsspec.filesystem("memory")
    for p in run.rglob("*"):
        rel = p.relative_to(run)
        if p.is_file() and (rel.parts[0] in ("stats", "shards") or rel.as_posix() in ("recipe.yaml", "manifest.json",
                                                                                      "mixture.json")):
            fs.pipe(f"/remote-run/{rel.as_posix()}", p.read_bytes())
    try:
        remote = collect("memory://remote-run")
        assert remote["run"] == "memory://remote-run"
        assert deterministic_part(remote) == deterministic_part(collect(str(run)))
    finally:
        fs.rm("/remote-run", recursive=True)
