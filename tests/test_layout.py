"""The run directory's layout (RunDir) and the storage conventions it relies on."""

from __future__ import annotations

import os

from pipeline import storage
from pipeline.layout import RunDir, as_run


def test_paths_are_under_the_run(tmp_path):
    run = RunDir(str(tmp_path) + "/")
    assert run.url == str(tmp_path)
    assert run.raw("web", "a/b.jsonl.zst") == f"{tmp_path}/raw/web/a/b.jsonl.zst"
    assert run.docs("web", "a/b.jsonl.zst.parquet") == f"{tmp_path}/docs/web/a/b.jsonl.zst.parquet"
    assert run.removed("web", "x.parquet") == f"{tmp_path}/dedup/removed/web/x.parquet"
    assert run.record("ingest", "web/a.jsonl") == f"{tmp_path}/tasks/ingest/web/a.jsonl.json"
    assert run.stage_stats("dedup") == f"{tmp_path}/stats/dedup.json"
    assert run.stage_issues("dedup") == f"{tmp_path}/stats/dedup.issues.jsonl"
    assert run.manifest == f"{tmp_path}/manifest.json" and run.mixture == f"{tmp_path}/mixture.json"
    assert run.relative(RunDir.shard_path("web", "train", 3, 1)) == f"{tmp_path}/shards/web/train/000003-0001"
    assert run.train("train", "metrics.jsonl") == f"{tmp_path}/train/metrics.jsonl"
    assert as_run(str(tmp_path)) == run and as_run(run) is run


def test_remote_urls_keep_their_scheme():
    run = RunDir("s3://bucket/runs/x")
    assert run.docs("web", "a.parquet") == "s3://bucket/runs/x/docs/web/a.parquet"
    assert run.tokenize("groups.json") == "s3://bucket/runs/x/tokenize/groups.json"


def test_docs_listing_skips_temporaries_and_other_files(tmp_path):
    run = RunDir(str(tmp_path))
    for rel in ("web/b.jsonl.parquet", "web/a/c.jsonl.parquet", "code/x.parquet"):
        storage.write_bytes(run.docs(*rel.split("/", 1)), b"x" * len(rel))
    # an interrupted atomic commit and a stray file are not documents
    with open(storage.temp_name(run.docs("web", "d.parquet")), "wb") as fh:
        fh.write(b"partial")
    storage.write_bytes(run.docs("web", "notes.txt"), b"")
    files = run.docs_files("web")
    assert [f.rel for f in files] == ["a/c.jsonl.parquet", "b.jsonl.parquet"]
    assert all(f.source == "web" and f.url == run.docs("web", f.rel) for f in files)
    assert files[1].version.startswith(f"{len('web/b.jsonl.parquet')}:")
    assert [(f.source, f.rel) for f in run.all_docs_files()] == [
        ("code", "x.parquet"), ("web", "a/c.jsonl.parquet"), ("web", "b.jsonl.parquet")]
    assert run.docs_files("absent") == []


def test_file_stamp_changes_when_a_file_is_rewritten(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    fs, p = storage.url_to_fs(str(path))
    before = storage.file_stamp(fs.info(p))
    path.write_bytes(b"three")
    os.utime(path, (1, 1))
    assert storage.file_stamp(fs.info(p)) != before
    assert storage.is_temporary(os.path.basename(storage.temp_name(str(path))))
    assert not storage.is_temporary("f.bin")


def test_assets_task_logs_and_the_probe_are_under_the_run(tmp_path):
    import pytest

    from pipeline.layout import RunDirError

    run = RunDir("s3://bucket/runs/x")
    assert run.assets("tokenizer.model") == "s3://bucket/runs/x/assets/tokenizer.model"
    assert run.task_log("ingest", "web/a.jsonl") == "s3://bucket/runs/x/logs/tasks/ingest/web/a.jsonl.log"
    assert run.task_logs("ingest") == "s3://bucket/runs/x/logs/tasks/ingest"
    probe = run.probe()
    assert probe.startswith("s3://bucket/runs/x/.tinyprep-run.tmp-") and storage.is_temporary(probe)
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(RunDirError):
            run.assets(bad)
        with pytest.raises(RunDirError):
            run.task_log("ingest", bad)
    # a run holding assets is still recognised as a run (an earlier run is adopted, not refused)
    local = tmp_path / "old"
    (local / "assets").mkdir(parents=True)
    (local / "recipe.yaml").write_text("name: x\n")
    RunDir(str(local)).claim()
    assert RunDir(str(local)).is_marked()
