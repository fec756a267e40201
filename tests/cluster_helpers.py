"""A Ray cluster of separate `ray start` nodes on this machine, shaped like one spread over several.

`ray.cluster_utils.Cluster` starts every node in the test process's own temp directory, working
directory and environment, so a run that only works because the nodes share a disk passes there.
Here each node is its own `ray start --block` process (a process group) with

- its own temp directory (`--temp-dir`: sessions, logs, the unpacked job working directory) and
  its own working directory;
- an environment without the test's credentials (`AWS_*`), `RAY_ADDRESS` or `TINYPREP_*`: what
  the tasks need has to come through the job or the runner, as on a real cluster;
- optionally a private mount namespace in which given directories are empty (`hide`): a file
  in one of them is on the driver's machine only;
- token authentication (`RAY_AUTH_MODE=token`, one token for the cluster and its users), which
  Ray 2.61 makes the default for every cluster.

The head runs the dashboard with its job server on a free loopback port and the Ray Client
server. Nodes are ended by their process group (the `ray start` process leads it), never by name:
`ray stop` would end every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv: `ray`, `tinyprep` and this Python, as on every node
READY = "This command will now block forever"  # `ray start --block` prints it once the node runs


def free_ports(n: int) -> list[int]:
    """n ports free on loopback now (held together while picked, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def can_hide() -> bool:
    """Whether a node can be started in a mount namespace with directories hidden (root, unshare)."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'd=$(mktemp -d) && mount -t tmpfs tmpfs "$d"; r=$?; umount "$d"; rmdir "$d"; exit $r'],
                           capture_output=True)
    return probe.returncode == 0


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    cwd: Path
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalRayCluster:
    """A head and worker nodes started with `ray start`; `shutdown()` ends every one of them."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's socket paths must stay under 108 bytes: temp directories go under a short /tmp name
        self.temp_root = Path(tempfile.mkdtemp(prefix="tp-ray-"))
        self.token = secrets.token_hex(16)
        self.nodes: list[Node] = []
        self.gcs_address = ""
        self.dashboard_url = ""
        self.client_address = ""

    @property
    def user_env(self) -> dict[str, str]:
        """What a user of the cluster needs beside an address: the token (set nowhere else)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "RAY_", "TINYPREP_")) and k != "PYTEST_CURRENT_TEST"}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # an activated venv, as the Slurm script does
        return {**env, **self.user_env}

    def start_head(self, num_cpus: int) -> Node:
        gcs, dashboard, client = free_ports(3)
        node = self._start("head", ["--head", f"--port={gcs}", "--include-dashboard=true",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                    f"--ray-client-server-port={client}"], num_cpus, ())
        self.gcs_address = (node.temp_dir / "ray_current_cluster").read_text().strip()
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.client_address = f"ray://127.0.0.1:{client}"
        self._wait_for_job_server()
        return node

    def add_node(self, num_cpus: int, hide: tuple[Path, ...] = ()) -> Node:
        assert self.gcs_address, "start the head first"
        return self._start(f"worker{len(self.nodes)}", [f"--address={self.gcs_address}"], num_cpus, hide)

    def _start(self, name: str, args: list[str], num_cpus: int, hide: tuple[Path, ...]) -> Node:
        base = self.root / name
        cwd, temp_dir = base / "cwd", self.temp_root / name
        cwd.mkdir(parents=True)
        temp_dir.mkdir()
        agent, agent_grpc, runtime_env, metrics = free_ports(4)  # the defaults would collide between nodes
        cmd = [str(BIN / "ray"), "start", "--block", *args, f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={96 << 20}",
               "--disable-usage-stats"]
        if hide:
            # a private mount namespace: a tmpfs over each hidden directory, then exec ray start (same pid)
            mounts = " && ".join(f'mount -t tmpfs tmpfs "${{{i + 1}}}"' for i in range(len(hide)))
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'{mounts} && shift {len(hide)} && exec "$@"', "sh", *map(str, hide), *cmd]
        log = base / "ray-start.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self._node_env(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        node = Node(name, proc, temp_dir, cwd, log)
        self.nodes.append(node)
        deadline = time.time() + 120
        while READY not in log.read_text(errors="replace"):
            if not node.alive() or time.time() > deadline:
                raise RuntimeError(f"ray start ({name}) did not come up:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return node

    def _wait_for_job_server(self) -> None:
        request = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    json.load(r)
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def submit(self, *entrypoint: str, working_dir: Path, runtime_env: dict,
               timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit` against the head's job server, waiting for the end (the job's output)."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir),
               "--runtime-env-json", json.dumps(runtime_env), "--log-style", "record"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        return subprocess.run([*cmd, "--", *entrypoint], env={**env, **self.user_env}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def kill(self, node: Node) -> None:
        """SIGKILL the node's processes at once, as when its machine dies."""
        self._signal(node, signal.SIGKILL)
        node.proc.wait()

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            if node.alive():
                self._signal(node, signal.SIGTERM)
        deadline = time.time() + 3  # the head does not always finish a graceful stop: then SIGKILL
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(node, signal.SIGKILL)  # whatever of its group is left
            node.proc.wait()
        shutil.rmtree(self.temp_root, ignore_errors=True)

    @staticmethod
    def _signal(node: Node, sig: int) -> None:
        try:
            os.killpg(node.proc.pid, sig)
        except ProcessLookupError:
            pass
