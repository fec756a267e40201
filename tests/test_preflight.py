"""The run's preflight: before any stage (and before Ray starts), one line and an exit code for a
store this machine cannot reach (no backend, no credentials), an output that is not writable, a
source that does not list, a first input that cannot be read."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import tinyprep, tmpfs

from pipeline.executors import LocalExecutor
from pipeline.layout import RunDir
from pipeline.preflight import PreflightError, check_configuration
from pipeline.recipe import parse_recipe
from pipeline.runner import run_recipe


def _data(tmp_path: Path, **over) -> dict:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    (src / "x.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(3)))
    data = {"name": "pre", "output": str(tmp_path / "run"), "stages": ["download", "ingest"],
            "sources": [{"name": "web", "urls": [str(src / "*.jsonl")], "weight": 1.0}]}
    data.update(over)
    return data


def _fails(data: dict, code: int, *words: str) -> str:
    """run_recipe refuses before any stage: PreflightError with the code and the words."""
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as e:
        run_recipe(parse_recipe(data), executor=LocalExecutor())
    assert time.monotonic() - t0 < 10  # seconds, not after a stage
    assert e.value.code == code and "\n" not in str(e.value), (e.value.code, str(e.value))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks (and no instance metadata service to ask)."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("FSSPEC_S3_ANON", raising=False)


def test_an_s3_output_without_credentials_is_refused_before_anything(tmp_path, no_aws):
    _fails(_data(tmp_path, output="s3://bucket/run"), 2, "output: s3://bucket/run: no AWS credentials",
           "AWS_ACCESS_KEY_ID")
    _fails(_data(tmp_path, sources=[{"name": "web", "urls": ["s3://bucket/corpus/*.jsonl"]}]), 2,
           "sources[0].urls: s3://bucket/corpus/*.jsonl: no AWS credentials")
    assert not (tmp_path / "run").exists()  # refused before the run directory was created


def test_credentials_from_the_environment_or_anonymous_access_pass(tmp_path, no_aws, monkeypatch):
    recipe = parse_recipe(_data(tmp_path, output="s3://bucket/run"))
    monkeypatch.setenv("FSSPEC_S3_ANON", "true")
    check_configuration(recipe, ["download", "ingest"])
    monkeypatch.delenv("FSSPEC_S3_ANON")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "key")
    check_configuration(recipe, ["download", "ingest"])  # no network: botocore finds them in the environment


def test_a_store_without_its_backend_is_named(tmp_path):
    try:  # adlfs (abfs://) is not a dependency
        import adlfs  # noqa: F401
        pytest.skip("adlfs is installed here")
    except ImportError:
        pass
    _fails(_data(tmp_path, output="abfs://container/run"), 2, "output: abfs://container/run", "adlfs")


def test_a_source_that_does_not_list_is_one_line(tmp_path):
    _fails(_data(tmp_path, sources=[{"name": "web", "urls": [str(tmp_path / "nothing" / "*.jsonl")]}]), 1,
           "source web:", "nothing/*.jsonl: matches no file")
    # the run directory was claimed (the probe and the listing need it) and holds no stage output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".tinyprep-run", "logs", "recipe.yaml"]


def test_a_dead_url_in_a_url_list_is_found_before_the_download(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "urls.txt").write_text(f"http://127.0.0.1:{port}/data/a.jsonl\nhttp://127.0.0.1:{port}/data/b.jsonl\n")
    _fails(_data(tmp_path, sources=[{"name": "web", "url_list": str(tmp_path / "urls.txt"), "download": True}]), 1,
           "source web:", f"http://127.0.0.1:{port}/data/a.jsonl: cannot be read")


def test_an_ingest_of_downloaded_copies_does_not_need_the_originals(tmp_path):
    data = _data(tmp_path, stages=["ingest"])
    data["sources"][0]["download"] = True
    recipe = parse_recipe(data)
    run = RunDir(recipe.output)
    run.claim()
    from pipeline.inputs import list_inputs

    listed = list_inputs(recipe.sources[0], run)  # an earlier run listed and downloaded them
    raw = Path(run.raw("web", listed[0].rel_path))
    raw.parent.mkdir(parents=True)
    raw.write_bytes((tmp_path / "in" / "x.jsonl").read_bytes())
    (tmp_path / "in" / "x.jsonl").unlink()  # the original is gone: only the copy is read
    reports = run_recipe(recipe, executor=LocalExecutor())
    assert reports[0].ok and reports[0].stats["sources"]["web"]["read"] == 3


@pytest.fixture
def read_only_run(tmp_path):
    """A marked run directory on a tmpfs remounted read-only."""
    with tmpfs(tmp_path / "ro", "1m") as mnt:
        RunDir(str(mnt / "run")).claim()
        (mnt / "run" / "recipe.yaml").write_text("name: pre\n")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt / "run"


def test_an_output_that_is_not_writable_is_one_line_from_the_cli(tmp_path, read_only_run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_data(tmp_path, output=str(read_only_run))))
    t0 = time.monotonic()
    proc = tinyprep("run", str(recipe), cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"output: {read_only_run}" in err[0] and "not writable" in err[0], err[0]
    assert "started an embedded local Ray" not in proc.stderr  # refused before Ray started


def test_the_cli_exits_2_for_missing_credentials(tmp_path, no_aws):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_data(tmp_path, output="s3://bucket/run")))
    proc = tinyprep("run", str(recipe), cwd=tmp_path)  # the environment of no_aws
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: output: s3://bucket/run: no AWS credentials")
