"""Running beyond one process: a multi-node Ray cluster and an S3-compatible object store.

The cluster is real: a head and a worker node, each its own raylet (`ray.cluster_utils.Cluster`),
started by the test on this machine; `tinyprep run` reaches it through RAY_ADDRESS exactly as on
a cluster. The object store is moto's S3 server on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, outputs, tinyprep

RECIPE = str(ROOT / "recipes" / "sample.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        yield c, worker
    finally:
        c.shutdown()


def _node_ids(run: Path, stage: str) -> set[str]:
    return {json.loads(p.read_text())["node_id"] for p in (run / "tasks" / stage).rglob("*.json")}


def test_multi_node_run_matches_the_local_run(reference, workdir, tmp_path, cluster):
    c, _ = cluster
    run = tmp_path / "cluster"
    r = tinyprep("run", RECIPE, "--output", str(run), cwd=workdir, env={"RAY_ADDRESS": c.address})
    assert r.returncode == 0, r.stderr
    assert "connected to Ray cluster" in r.stderr
    assert len(_node_ids(run, "ingest") | _node_ids(run, "download")) == 2, "tasks ran on one node only"
    assert outputs(run) == reference[2]


def test_killing_a_worker_node_mid_stage_changes_nothing(reference, workdir, tmp_path, cluster):
    c, worker = cluster
    run = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": c.address, "TINYPREP_FAULTS": "ingest:slimpajama/*chunk1*:slow:1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", RECIPE, "--output", str(run),
                             "--set", "ray.retry_backoff_s=0.2"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until ingest tasks are running (the first ones dispatched, chunk1, sleep 2 s), then kill
        # the worker node while it runs one of them
        deadline = time.time() + 120
        while not any("ingest:" in line or "ingest: " in line for line in _log_lines(run)):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        c.remove_node(worker)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "retrying" in err  # the tasks that were on the dead node ran again
    assert outputs(run) == reference[2]


def _log_lines(run: Path) -> list[str]:
    logs = sorted((run / "logs").glob("*-run.log")) if (run / "logs").exists() else []
    return logs[-1].read_text().splitlines() if logs else []


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        server.stop()


def test_sample_on_s3_gives_the_same_outputs_as_on_local_disk(reference, workdir, sample_dir, tmp_path, s3):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("corpus")
    fs.mkdir("runs")
    fs.put(str(sample_dir / "slimpajama"), "corpus/sample/slimpajama", recursive=True)
    fs.put(str(sample_dir / "starcoderdata"), "corpus/sample/starcoderdata", recursive=True)
    r = tinyprep("run", RECIPE, "--output", "s3://runs/sample", "--workers", "2",
                 "--set", "sources[0].urls=[s3://corpus/sample/slimpajama/train/chunk*/*.jsonl.zst]",
                 "--set", "sources[1].urls=[s3://corpus/sample/starcoderdata/*/*.parquet]",
                 cwd=workdir, env=s3)
    assert r.returncode == 0, r.stderr
    assert "testing" not in r.stderr + r.stdout  # credentials are never logged
    local = tmp_path / "copy"
    fs.get("runs/sample", str(local), recursive=True)
    # the same documents, removal lists, shards, manifest, mixture and stats, byte for byte
    assert outputs(local) == reference[2]
    # a rerun on S3 resumes: nothing left to do
    r = tinyprep("run", RECIPE, "--output", "s3://runs/sample", "--workers", "2",
                 "--set", "sources[0].urls=[s3://corpus/sample/slimpajama/train/chunk*/*.jsonl.zst]",
                 "--set", "sources[1].urls=[s3://corpus/sample/starcoderdata/*/*.parquet]",
                 cwd=workdir, env=s3)
    assert r.returncode == 0 and "0 to run" in r.stderr
