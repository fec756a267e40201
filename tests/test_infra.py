"""The cluster files in infra/ parse, and every tinyprep command they run exists with those flags."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _tinyprep_commands(text: str) -> list[list[str]]:
    """Every `tinyprep ...` invocation in a file, usage comments included (shell words after `tinyprep`)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        for m in re.finditer(r"\btinyprep ((?:run|validate|sample)(?=\s)[^;&|`\n]*)", line):
            out.append(shlex.split(m.group(1).replace('"$RECIPE"', "R.yaml").replace('"$OUTPUT"', "/o")))
    return out


def _parses(args: list[str]) -> None:
    """Parse (not run) a command line with the real CLI; raises on an unknown command or flag."""
    sub = main.commands[args[0]]
    with click.Context(main) as parent:
        sub.make_context(args[0], list(args[1:]), parent=parent)


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay-rayjob.yaml"])
def test_yaml_files_parse_and_run_real_commands(name):
    text = (INFRA / name).read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    commands = _tinyprep_commands(text)
    assert commands, f"{name} runs no tinyprep command"
    for cmd in commands:
        _parses(cmd)
    for cmd in commands:
        if cmd[0] == "run":
            recipe = cmd[1].replace("/opt/tinyprep/", "")
            assert (ROOT / recipe).exists(), f"{name} names a recipe that does not exist: {recipe}"


def test_kuberay_job_shape():
    doc = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("tinyprep run ")
    assert spec["rayClusterSpec"]["headGroupSpec"] and spec["rayClusterSpec"]["workerGroupSpecs"]
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__  # the image's Ray matches the pin


def test_ray_up_config_shape():
    doc = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert any(t.get("max_workers", 0) > 0 for t in types.values())


def test_slurm_script_is_valid_bash_and_runs_the_cli():
    script = INFRA / "slurm" / "tinyprep.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and "ray start --head" in text and "ray start --address" in text
    cmds = _tinyprep_commands(text)
    assert cmds and all(c[0] == "run" for c in cmds)
    for cmd in cmds:
        _parses(cmd)


def test_dockerfile_installs_the_package_and_cpu_torch():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d", text, re.M)
    assert "torch==2.13.0" in text and "whl/cpu" in text
    assert 'pip install --no-cache-dir ".[s3]"' in text
    assert "COPY pipeline" in text


def test_an_unknown_flag_is_caught():
    with pytest.raises(click.UsageError):
        _parses(["run", "r.yaml", "--no-such-flag"])
