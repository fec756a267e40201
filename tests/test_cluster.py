"""Running beyond one machine: a Ray job on a multi-node cluster with no shared disk, a worker node
killed mid-stage, and an S3-compatible object store.

The cluster (tests/cluster_helpers.py) is started with `ray start` the way a real one is: a head
with the dashboard and its job server, worker nodes each with their own temp directory, working
directory and environment (no credentials), token authentication. The job test gives the worker
node a private mount namespace in which the directory holding the tokenizer is empty, so a worker
that reads a file only the driver has fails exactly as it would on another machine. The object
store is moto's S3 server on loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_helpers import LocalRayCluster, can_hide
from conftest import ROOT, outputs, tinyprep

RECIPE = str(ROOT / "recipes" / "sample.yaml")
S3_SOURCES = ("--set", "sources[0].urls=[s3://corpus/sample/slimpajama/train/chunk*/*.jsonl.zst]",
              "--set", "sources[1].urls=[s3://corpus/sample/starcoderdata/*/*.parquet]")
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    c = LocalRayCluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets per process, not per server: start every test from an empty store
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        server.stop()


def _s3_with_corpus(sample_dir: Path):
    """The sample corpus under s3://corpus/sample/ and an empty bucket s3://runs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("corpus")
    fs.mkdir("runs")
    fs.put(str(sample_dir / "slimpajama"), "corpus/sample/slimpajama", recursive=True)
    fs.put(str(sample_dir / "starcoderdata"), "corpus/sample/starcoderdata", recursive=True)
    return fs


def _node_ids(run: Path, stage: str) -> set[str]:
    return {json.loads(p.read_text())["node_id"] for p in (run / "tasks" / stage).rglob("*.json")}


def _given_the_tokenizer(reference: Path, path: str) -> tuple[dict[str, str], dict]:
    """The reference run's outputs as a run given its tokenizer at `path` has them, instead of
    training it: manifest.json names `path` instead of the run's `tokenizer.model` (so mixture.json's
    manifest_sha256 follows), there is no RUN/tokenizer.model, and tokenize's stats lack the training
    task. Every other byte is the same. Returns (digest without stats/tokenize.json, those stats)."""
    want = outputs(reference)
    manifest = (reference / "manifest.json").read_bytes()
    theirs = manifest.replace(b'"path": "tokenizer.model"', b'"path": ' + json.dumps(path).encode(), 1)
    assert theirs != manifest, "manifest.json's format changed: update this test"
    mixture = (reference / "mixture.json").read_bytes()
    old, new = hashlib.sha256(manifest).hexdigest(), hashlib.sha256(theirs).hexdigest()
    assert mixture.count(old.encode()) == 1
    want["manifest.json"] = hashlib.sha256(theirs).hexdigest()
    want["mixture.json"] = hashlib.sha256(mixture.replace(old.encode(), new.encode())).hexdigest()
    want["tokenizer.model"] = "missing"
    del want["stats/tokenize.json"]
    stats = json.loads((reference / "stats" / "tokenize.json").read_text())
    del stats["stats"]["tokenizer"]  # what the training task reports
    stats["tasks"] -= 1
    stats["tasks_done"] -= 1
    return want, stats


def test_ray_job_on_nodes_without_a_shared_disk_matches_the_local_run(reference, sample_dir, tmp_path, s3, cluster):
    """`ray job submit --working-dir . -- tinyprep run ...` as the README says: the run directory
    and the corpus on S3, the credentials only in the job's runtime environment, the tokenizer in
    a directory that only the driver's node can see."""
    if not can_hide():
        pytest.skip("hiding the driver's files from a worker node needs root and `unshare --mount`")
    fs = _s3_with_corpus(sample_dir)
    driver_only = tmp_path / "driver-only"
    driver_only.mkdir()
    tokenizer = driver_only / "tokenizer.model"
    shutil.copyfile(reference[0] / "tokenizer.model", tokenizer)  # the same model: the same shards
    cluster.start_head(num_cpus=1)
    cluster.add_node(num_cpus=1, hide=(driver_only,))
    r = cluster.submit("tinyprep", "run", "recipes/sample.yaml", "--output", "s3://runs/job", *S3_SOURCES,
                       "--set", f"tokenizer.model={tokenizer}",
                       working_dir=ROOT, runtime_env={"env_vars": s3}, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "connected to Ray cluster" in log  # the driver used the job's cluster, not an embedded Ray
    # no tokenize task failed even once: the worker node never needed the driver's file
    assert not [line for line in log.splitlines() if "tokenize" in line and "failed (attempt" in line], log[-6000:]
    local = tmp_path / "copy"
    fs.get("runs/job", str(local), recursive=True)
    assert len(_node_ids(local, "tokenize")) == 2, "tokenize ran on one node only: the hidden file proves nothing"
    got, want = outputs(local), _given_the_tokenizer(reference[0], str(tokenizer))
    del got["stats/tokenize.json"]
    assert got == want[0]
    assert json.loads((local / "stats" / "tokenize.json").read_text()) == want[1]


def test_killing_a_worker_node_mid_stage_changes_nothing(reference, workdir, tmp_path, cluster):
    """A driver on the head's machine (RAY_ADDRESS = the head's address); the worker node dies
    while it runs ingest tasks; the tasks run again elsewhere and the outputs are the local run's."""
    cluster.start_head(num_cpus=1)
    worker = cluster.add_node(num_cpus=1)
    run = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(cluster.user_env, RAY_ADDRESS=cluster.gcs_address, TINYPREP_FAULTS="ingest:slimpajama/*chunk1*:slow:1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", RECIPE, "--output", str(run),
                             "--set", "ray.retry_backoff_s=0.2"],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait until ingest tasks are running (the first ones dispatched, chunk1, sleep 2 s), then kill
        # the worker node while it runs one of them
        deadline = time.time() + 180
        while not any("ingest:" in line or "ingest: " in line for line in _log_lines(run)):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        cluster.kill(worker)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "connected to Ray cluster" in err
    assert "retrying" in err  # the tasks that were on the dead node ran again
    assert outputs(run) == reference[2]


def test_ray_client_address_runs_the_recipe_from_outside_the_cluster(reference, workdir, tmp_path, cluster):
    """RAY_ADDRESS=ray://head:10001 (Ray Client, ray[client]): the driver on a machine that is no
    node of the cluster. The head has no CPU (as in infra/): every task runs on the worker node.
    Download and ingest are enough to compare outputs."""
    cluster.start_head(num_cpus=0)
    cluster.add_node(num_cpus=1)
    run = tmp_path / "client"
    r = tinyprep("run", RECIPE, "--output", str(run), "--stages", "download,ingest", cwd=workdir,
                 env={**cluster.user_env, "RAY_ADDRESS": cluster.client_address})
    assert r.returncode == 0, r.stderr
    assert f"connected to Ray cluster at {cluster.client_address}" in r.stderr
    assert len(_node_ids(run, "ingest") | _node_ids(run, "download")) == 1  # the worker node
    want = {k: v for k, v in reference[2].items() if k.startswith(("raw/", "docs/", "stats/download", "stats/ingest"))}
    assert {k: v for k, v in outputs(run).items() if k in want or k.startswith(("raw/", "docs/"))} == want


def _log_lines(run: Path) -> list[str]:
    logs = sorted((run / "logs").glob("*-run.log")) if (run / "logs").exists() else []
    return logs[-1].read_text().splitlines() if logs else []


def test_sample_on_s3_gives_the_same_outputs_as_on_local_disk(reference, workdir, sample_dir, tmp_path, s3):
    fs = _s3_with_corpus(sample_dir)
    r = tinyprep("run", RECIPE, "--output", "s3://runs/sample", "--workers", "2", *S3_SOURCES, cwd=workdir, env=s3)
    assert r.returncode == 0, r.stderr
    assert "testing" not in r.stderr + r.stdout  # credentials are never logged
    local = tmp_path / "copy"
    fs.get("runs/sample", str(local), recursive=True)
    # the same documents, removal lists, shards, manifest, mixture and stats, byte for byte
    assert outputs(local) == reference[2]
    # a rerun on S3 resumes: nothing left to do
    r = tinyprep("run", RECIPE, "--output", "s3://runs/sample", "--workers", "2", *S3_SOURCES, cwd=workdir, env=s3)
    assert r.returncode == 0 and "0 to run" in r.stderr
