"""The runner end to end, through the CLI on the sample: determinism, retries, kill and resume.

Each test starts `tinyprep run` in its own process (with its own embedded Ray), as a user does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, kill_run_when, outputs, tinyprep, tmpfs

RECIPE = str(ROOT / "recipes" / "sample.yaml")
pytestmark = pytest.mark.slow


def _records(run: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "tasks" / stage).rglob("*.json"))]


def test_reference_run_accounts_for_every_document(reference, sample_dir):
    run, proc, digest = reference
    planted = json.loads((sample_dir / "planted.json").read_text())
    stats = json.loads((run / "stats" / "ingest.json").read_text())["stats"]["sources"]
    assert set(stats) == {"slimpajama", "starcoderdata"}
    for name, c in stats.items():
        for node in [c, *c["subsets"].values()]:
            assert node["read"] == node["kept"] + sum(node["filtered"].values()) + sum(node["unreadable"].values())
        # what the shards hold is what the stats say was kept
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "docs" / name).rglob("*.parquet"))
        assert rows == c["kept"] > 0
    slim = stats["slimpajama"]
    assert slim["read"] == planted["counts"]["rows"]["slimpajama"]
    assert slim["filtered"]["selection"] == planted["github_rows"]
    assert slim["subsets"]["RedPajamaGithub"]["kept"] == 0
    assert slim["filtered"]["short"] >= len(planted["short_documents"])
    assert slim["unreadable"] == {}
    # every task left a completion record; every input was copied into raw/
    assert len(_records(run, "ingest")) == json.loads((run / "stats" / "ingest.json").read_text())["tasks"]
    assert len(list((run / "raw").rglob("*.*"))) == len(_records(run, "download"))
    # the summary table and the run log
    assert "slimpajama" in proc.stdout and "starcoderdata" in proc.stdout and "RedPajamaWikipedia" in proc.stdout
    logs = list((run / "logs").glob("*-run.log"))
    assert logs and "ingest" in logs[0].read_text()
    assert (run / "recipe.yaml").exists()


def test_one_worker_gives_byte_identical_outputs(reference, workdir, tmp_path):
    _, _, expected = reference
    r = tinyprep("run", RECIPE, "--output", str(tmp_path / "w1"), "--workers", "1", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert outputs(tmp_path / "w1") == expected


def test_injected_failures_are_retried_and_change_nothing(reference, workdir, tmp_path):
    _, _, expected = reference
    faults = ";".join([
        "ingest:slimpajama/*chunk1*:raise:2",          # raises twice, then succeeds
        "ingest:starcoderdata/python/*:exit:1",        # the worker process dies once
        "download:starcoderdata/*:exit-late:1",        # dies after committing, before its record
        "ingest:slimpajama/*chunk2*:raise-late:1",
    ])
    r = tinyprep("run", RECIPE, "--output", str(tmp_path / "f"), "--workers", "2",
                 "--set", "ray.retry_backoff_s=0.1", cwd=workdir, env={"TINYPREP_FAULTS": faults})
    assert r.returncode == 0, r.stderr
    assert "injected fault" in r.stderr and "retrying" in r.stderr
    assert outputs(tmp_path / "f") == expected
    attempts = {rec["task"]: rec["attempt"] for rec in _records(tmp_path / "f", "ingest")}
    assert all(a == 2 for t, a in attempts.items() if "chunk1" in t)
    assert all(a == 1 for t, a in attempts.items() if t.startswith("starcoderdata/python/"))


def test_permanent_failure_fails_the_stage_and_a_rerun_completes(reference, workdir, tmp_path):
    _, _, expected = reference
    run = tmp_path / "p"
    r = tinyprep("run", RECIPE, "--output", str(run), "--workers", "2", "--set", "ray.task_retries=1",
                 "--set", "ray.retry_backoff_s=0.1", cwd=workdir,
                 env={"TINYPREP_FAULTS": "ingest:starcoderdata/json/*:raise:*"})
    assert r.returncode == 1
    assert "stage ingest failed" in r.stderr and "starcoderdata/json/" in r.stderr
    assert "injected fault" in r.stderr
    # the other tasks finished and were recorded; the rerun only does the failed ones
    done = _records(run, "ingest")
    assert done and not any(rec["task"].startswith("starcoderdata/json/") for rec in done)
    r2 = tinyprep("run", RECIPE, "--output", str(run), "--workers", "2", cwd=workdir)
    assert r2.returncode == 0, r2.stderr
    assert f"{len(done)} already done" in r2.stderr
    assert outputs(run) == expected


def test_killed_run_resumes_to_byte_identical_outputs(reference, workdir, tmp_path):
    _, _, expected = reference
    run = tmp_path / "k"
    # the stage is under way: some ingest tasks done, the hung one not
    kill_run_when(lambda: len(_records(run, "ingest")) >= 3, "run", RECIPE, "--output", str(run), "--workers", "2",
                  cwd=workdir, faults="ingest:slimpajama/*example_train_1.*:hang")
    partial = {r["task"] for r in _records(run, "ingest")}
    assert not any("example_train_1." in t for t in partial)
    r = tinyprep("run", RECIPE, "--output", str(run), "--workers", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert outputs(run) == expected
    assert not list(run.rglob("*.tmp-*"))


def test_bad_input_beyond_the_allowance_fails_with_a_summary(workdir, tmp_path):
    import zstandard

    src = tmp_path / "bad"
    src.mkdir()
    good = b'{"text": "' + b"word " * 60 + b'"}\n'
    (src / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good + b'{"text": broken\n' + good))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: bad\noutput: {tmp_path / 'run'}\nstages: [ingest]\n"
                      f"sources:\n  - name: web\n    urls: ['{src}/*.jsonl.zst']\n")
    r = tinyprep("run", str(recipe), cwd=workdir)
    assert r.returncode == 1
    assert "1 bad input(s), the recipe allows 0" in r.stderr
    assert "a.jsonl.zst:2: bad_json" in r.stderr
    r = tinyprep("run", str(recipe), "--set", "ingest.max_errors=1", cwd=workdir)
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "run" / "stats" / "ingest.json").read_text())["stats"]["sources"]["web"]
    assert (stats["read"], stats["kept"], stats["unreadable"]) == (3, 2, {"bad_json": 1})


def test_recipe_errors_exit_2_without_traceback(workdir):
    r = tinyprep("run", RECIPE, "--set", "sources[1].weight=0", cwd=workdir)
    assert r.returncode == 2
    assert "sources[1].weight: must be > 0" in r.stderr and "Traceback" not in r.stderr


def test_missing_inputs_are_named(workdir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: m\noutput: {tmp_path / 'run'}\nstages: [download, ingest]\nsources:\n  - name: web\n"
                      f"    urls: ['{tmp_path}/nothing/*.jsonl']\n")
    r = tinyprep("run", str(recipe), cwd=workdir)
    # the preflight finds it before any stage (and before Ray starts)
    assert r.returncode == 1 and "error: source web: " in r.stderr and "nothing/*.jsonl: matches no file" in r.stderr
    assert "embedded local Ray" not in r.stderr


def test_a_copied_run_directory_resumes_in_place(reference, workdir, tmp_path):
    """Completion records name their outputs relative to the run: a copy regenerates what it lacks
    (and only that), instead of trusting the original's files."""
    import shutil

    src, _, expected = reference
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True, copy_function=shutil.copy2)  # mtimes kept: inputs unchanged
    shard = sorted((copy / "shards").rglob("*.bin"))[0]
    shard.unlink()
    import time

    started = time.time()
    r = tinyprep("run", RECIPE, "--output", str(copy), "--workers", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert outputs(copy) == expected
    redone = sorted(str(p.relative_to(copy / "tasks")) for p in (copy / "tasks").rglob("*.json")
                    if p.stat().st_mtime >= started)
    assert redone and all(p.startswith(("tokenize/train/", "tokenize/validation/", "mix/")) for p in redone), redone


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MB tmpfs: the sample's run (about 19 MB) fills it in the middle of the flow."""
    with tmpfs(tmp_path / "disk", "9m") as mnt:
        yield mnt


def test_a_full_disk_fails_with_one_line_and_the_run_resumes(reference, workdir, small_disk):
    _, _, expected = reference
    run = small_disk / "run"
    r = tinyprep("run", RECIPE, "--output", str(run), "--workers", "2", "--set", "ray.task_retries=1",
                 "--set", "ray.retry_backoff_s=0.1", cwd=workdir)
    assert r.returncode == 1 and "No space left on device" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Logging error" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")], r.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = tinyprep("run", RECIPE, "--output", str(run), "--workers", "2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert outputs(run) == expected


def test_a_remote_run_log_is_uploaded_after_each_stage_not_only_at_the_end():
    """An object store has no append: the run log goes up after each stage, so a driver killed in a
    later stage leaves what was logged before."""
    import logging
    import os

    from pipeline import storage
    from pipeline.layout import RunDir
    from pipeline.runner import _RunLog

    run = RunDir("memory://runlog-test/run")
    runlog = _RunLog(run)
    try:
        logging.getLogger("tinyprep").warning("ingest done in 1s")
        runlog.sync()
        (url,) = storage.url_to_fs(run.url)[0].glob("/runlog-test/run/logs/*-run.log")
        assert b"ingest done in 1s" in storage.read_bytes(f"memory://{url}")
        logging.getLogger("tinyprep").warning("dedup done in 2s")
    finally:
        runlog.close()
    text = storage.read_bytes(f"memory://{url}")
    assert b"ingest done in 1s" in text and b"dedup done in 2s" in text
    assert not os.path.exists(runlog.local)
