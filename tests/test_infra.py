"""The cluster files in infra/ checked against the schemas of the tools that read them, and every
tinyprep command they (and README's "Running on a cluster") run against the real CLI.

- infra/ray-cluster.yaml: Ray's own cluster-config validation (`ray/autoscaler/ray-schema.json`,
  after Ray fills in the AWS defaults, as `ray up` does), and what `ray up` does not do for us
  (credentials for the workers).
- infra/kuberay-rayjob.yaml: the RayJob fields against KubeRay's CRD (tests/schemas/, its source
  in the file), the pod templates against Kubernetes' own schemas (kubernetes-validate, strict).
- infra/slurm/tinyprep.sbatch: `bash -n`, shellcheck (skipped when it is not installed), and the
  script itself run against stand-ins for srun, scontrol, ray and tinyprep: CPUs per step, the exit
  status and the cleanup of the Ray steps on failure.
- infra/Dockerfile: what the cluster tools run inside the image.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import click
import pytest
import ray
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SBATCH = INFRA / "slurm" / "tinyprep.sbatch"


def _tinyprep_commands(text: str) -> list[list[str]]:
    """Every `tinyprep ...` invocation in a text, usage comments included (shell words after `tinyprep`)."""
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


def _rayjob() -> dict:
    return yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay-rayjob.yaml", "slurm/tinyprep.sbatch", "README"])
def test_infra_files_run_real_commands(name):
    if name == "README":  # its "Running on a cluster" section
        text = (ROOT / "README.md").read_text().split("### Running on a cluster", 1)[1].split("\n### ", 1)[0]
    else:
        text = (INFRA / name).read_text()
    commands = _tinyprep_commands(text)
    if name == "kuberay-rayjob.yaml":  # the entrypoint is a folded YAML string
        commands.append(shlex.split(_rayjob()["spec"]["entrypoint"])[1:])
    assert commands, f"{name} runs no tinyprep command"
    for cmd in commands:
        _parses(cmd)
        if cmd[0] == "run" and cmd[1] != "R.yaml":
            recipe = cmd[1].replace("/opt/tinyprep/", "")  # the image's WORKDIR holds the checkout
            assert (ROOT / recipe).exists(), f"{name} names a recipe that does not exist: {recipe}"


# --- KubeRay ----------------------------------------------------------------------------------


def test_kuberay_rayjob_matches_kuberays_crd():
    import jsonschema

    schema = json.loads((ROOT / "tests" / "schemas" / "kuberay-rayjob.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    doc = _rayjob()
    validator.validate(doc)
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("tinyprep run ")
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__  # the image's Ray matches the pin
    assert spec["rayClusterSpec"]["workerGroupSpecs"]
    # the schema catches what the API server would refuse: an int where ray start params are strings
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert not validator.is_valid(bad)


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    cluster = doc["spec"]["rayClusterSpec"]
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]


def test_kuberay_pod_templates_are_valid_kubernetes():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for name, template in _pod_templates(_rayjob()):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(doc, version, strict=True)
    bad = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
           "template": {"spec": {"containers": [{"name": "c", "image": "i", "envForm": []}]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_kuberay_pods_get_credentials_and_can_run_kuberays_probes():
    dockerfile = (INFRA / "Dockerfile").read_text()
    for name, template in _pod_templates(_rayjob()):
        for c in template["spec"]["containers"]:
            # the driver (head) and the tasks (workers) both read and write s3://: nothing is forwarded
            assert {"secretRef": {"name": "tinyprep-credentials"}} in c.get("envFrom", []), (name, c["name"])
            # no probe of our own: KubeRay injects `bash -c "wget ... | grep success"`
            if not {"readinessProbe", "livenessProbe"} & set(c):
                assert re.search(r"apt-get install[^\n]*\bwget\b", dockerfile), "KubeRay's probes need wget"


# --- ray up -----------------------------------------------------------------------------------


def _ray_up_config() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())


def test_ray_up_config_passes_rays_own_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_up_config()
    validate_config(prepare_config(config))  # ray-schema.json, after the provider's defaults, as `ray up`
    bad = copy.deepcopy(config)
    bad["available_node_types"]["cpu_worker"]["min_worker"] = 2  # a typo Ray's schema refuses
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_ray_up_workers_have_credentials_and_the_image_what_the_launcher_runs():
    config = _ray_up_config()
    assert config["provider"]["type"] == "aws"
    # Ray gives its default instance profile to the head only; the workers write the run on S3
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert "IamInstanceProfile" in node_type["node_config"], f"{name}: no credentials for S3"
    assert config["docker"]["image"]
    apt = re.search(r"apt-get install[^\n]*", (INFRA / "Dockerfile").read_text()).group(0)
    for tool in ("openssh-client", "rsync"):  # the autoscaler's ssh, rsync -e 'docker exec -i'
        assert tool in apt.split(), tool


# --- Docker -----------------------------------------------------------------------------------


def test_dockerfile_installs_the_package_with_rays_extras_and_cpu_torch():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d", text, re.M)
    assert "torch==2.13.0" in text and "whl/cpu" in text
    assert re.search(r'pip install --no-cache-dir "\.\[s3[^"]*\]" boto3', text)  # boto3: the AWS autoscaler
    assert "COPY pipeline" in text
    deps = re.findall(r'^\s*"(ray\b[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert deps == [f"ray[default,client]=={ray.__version__}"], deps  # dashboard, job server, Ray Client


# --- Slurm ------------------------------------------------------------------------------------


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --cpus-per-task=\d+", text, re.M)
    assert "ray start --head" in text and "ray start --address" in text


def test_slurm_script_passes_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


STUBS = {
    # srun: record the step, drop its options, run its command (in place: the step's pid is the command's)
    "srun": """echo "srun $*" >> "$STUB_LOG"
               while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done
               exec "$@" """,
    "scontrol": 'printf "node1\\nnode2\\nnode3\\n"',
    "hostname": "echo 10.0.0.1",
    "ray": 'echo "ray $*" >> "$STUB_LOG"; echo $$ >> "$STUB_PIDS"; exec sleep 300',  # ray start --block
    "python": "cat >/dev/null; exit 0",  # wait_for_nodes: the nodes are there
    "tinyprep": 'echo "tinyprep $* RAY_ADDRESS=$RAY_ADDRESS" >> "$STUB_LOG"; exit "$TINYPREP_STUB_EXIT"',
}


@pytest.mark.parametrize("tinyprep_exit", [0, 3])
def test_slurm_script_gives_each_step_its_cpus_exits_with_tinypreps_status_and_stops_ray(tmp_path, tinyprep_exit):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body).strip() + "\n")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    log, pids = tmp_path / "log", tmp_path / "pids"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TINYPREP_VENV": str(tmp_path / "venv"),
           "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_CPUS_PER_TASK": "8", "STUB_LOG": str(log),
           "STUB_PIDS": str(pids), "TINYPREP_STUB_EXIT": str(tinyprep_exit)}
    proc = subprocess.Popen(["bash", str(SBATCH), "recipes/tinyllama.yaml", "s3://b/run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
        left = [p for p in map(int, pids.read_text().split()) if _alive(p)]
    finally:
        _killpg(proc.pid)  # whatever the script left behind (it ran in a session of its own)
        proc.wait()
    assert proc.returncode == tinyprep_exit, err
    assert not left, "the script left Ray steps running"
    lines = log.read_text().splitlines()
    ray_steps = [line for line in lines if line.startswith("srun") and " ray start " in line]
    assert len(ray_steps) == 3 and all("--cpus-per-task=8" in line for line in ray_steps), lines
    assert sum(line.startswith("ray start --head") for line in lines) == 1
    assert all("--num-cpus=8" in line for line in lines if line.startswith("ray start"))
    assert "tinyprep run recipes/tinyllama.yaml --output s3://b/run RAY_ADDRESS=10.0.0.1:6379" in lines


def _alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie is dead
    except (FileNotFoundError, IndexError):
        return False


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_an_unknown_flag_is_caught():
    with pytest.raises(click.UsageError):
        _parses(["run", "r.yaml", "--no-such-flag"])
