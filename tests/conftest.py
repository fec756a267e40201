"""Shared fixtures: the sample corpus (generated once per session) and a CLI runner.

Slow tests carry the `slow` marker: end to end runs (the session's `reference` run of the sample,
Ray clusters, the S3 server), Chromium and training. `pytest -m "not slow"` is the fast set a
developer runs while editing; `make test` and CI run everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# fixtures that start Ray, a cluster, a server or training: a test using one is slow
SLOW_FIXTURES = frozenset({"reference", "sample_plan", "run_dir", "cluster", "s3"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from pipeline.sample import generate_sample

    out = tmp_path_factory.mktemp("sample") / "sample"
    generate_sample(out)
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, sample_dir) -> Path:
    """A working directory where `data/sample` is the sample: recipes/sample.yaml runs as is."""
    wd = tmp_path_factory.mktemp("wd")
    (wd / "data").mkdir()
    (wd / "data" / "sample").symlink_to(sample_dir)
    return wd


def tinyprep(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
             **popen) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (its own Ray), as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def kill_run_when(ready, *args: str, cwd: Path, faults: str, timeout: float = 180) -> None:
    """Start `tinyprep ARGS` with TINYPREP_FAULTS, wait until ready() (the stage is under way),
    then SIGKILL its whole process group (driver and embedded Ray), as a dead machine would."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TINYPREP_FAULTS"] = faults
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    """The raised error's message: one line, holding each of `words`."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def tree_digest(root: Path, *subdirs: str) -> dict[str, str]:
    """sha256 of every file under the given subdirectories of a run (relative path -> hash)."""
    out = {}
    for sub in subdirs:
        base = root / sub
        for p in sorted(base.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def outputs(run: Path) -> dict[str, str]:
    """Everything a run produces that must not depend on workers, nodes, retries or kills."""
    digest = tree_digest(run, "raw", "docs", "dedup/removed", "shards")
    for name in ("manifest.json", "mixture.json", "tokenizer.model"):
        p = run / name
        digest[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "missing"
    stats = tree_digest(run, "stats")
    for stage in ("download", "ingest", "dedup", "tokenize", "mix"):
        for name in (f"{stage}.json", f"{stage}.issues.jsonl"):
            digest[f"stats/{name}"] = stats.get(f"stats/{name}", "missing")
    return digest


@pytest.fixture(scope="session")
def reference(workdir, tmp_path_factory):
    """The sample recipe run once locally with 2 workers: (run dir, process, outputs digest)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    r = tinyprep("run", str(ROOT / "recipes" / "sample.yaml"), "--output", str(out), "--workers", "2", cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r, outputs(out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and immune to a loaded machine's oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str):
    """A tmpfs of `size` mounted at mnt for the block (the test is skipped where mounting is not
    allowed); a small disk for disk-full and read-only cases."""
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
