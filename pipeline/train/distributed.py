"""Processes and process groups: run inside torchrun, or start the ranks ourselves.

- Inside `torchrun` (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) the
  process is one rank and joins the group from the environment.
- Otherwise `launch` starts `nproc` ranks on this machine: one (this process) runs in place; more
  are spawned, each a fresh interpreter, rendezvousing on a free local TCP port.

GPU ranks use NCCL, one device each (LOCAL_RANK); CPU ranks use gloo, and share the cores evenly.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True inside torchrun (the environment names this process's rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class DeviceError(RuntimeError):
    """The GPUs asked for (or present) cannot be used by this torch; the message says what to install."""


NVIDIA_SMI_TIMEOUT = 5.0  # seconds; a driver in a bad state can make nvidia-smi hang
TORCH_INDEX = "https://download.pytorch.org/whl"
# torch 2.13's CUDA builds and the oldest driver branch each runs on (CUDA minor version
# compatibility: 12.x runs on drivers >= 525, 13.x on >= 580). PyPI's Linux x86_64 wheel is cu130.
CUDA_BUILDS = (("cu130", 13, 580), ("cu126", 12, 525))


def pick_device(preference: str) -> str:
    """"cpu" or "cuda" for train.device (auto, cpu, cuda). DeviceError when cuda is asked for and
    torch sees no GPU, or when auto finds GPUs on the machine (nvidia-smi) that torch cannot use:
    training on CPU there would be quietly thousands of times slower."""
    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    gpus = nvidia_gpus()
    if preference == "cuda":
        raise DeviceError(f"train.device is cuda but {torch_build()} sees no GPU: {_why_no_gpu(gpus)}; "
                          "or set train.device: cpu to train on CPU")
    if not gpus or _gpus_hidden():
        return "cpu"
    raise DeviceError(f"nvidia-smi lists {_count(gpus)} but {torch_build()} cannot use them: {_why_no_gpu(gpus)}; "
                      "or set train.device: cpu to train on CPU anyway")


def torch_build() -> str:
    """torch's version and the CUDA it was built for, e.g. "torch 2.13.0 (CUDA 13.0 build)"."""
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU-only build"
    return f"torch {torch.__version__} ({build})"


def nvidia_smi(*args: str) -> str | None:
    """stdout of `nvidia-smi ARGS`; None when it is not on PATH, fails, or runs past
    NVIDIA_SMI_TIMEOUT (it is killed, with anything it started)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        p = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    except OSError:
        return None
    try:
        out, _ = p.communicate(timeout=NVIDIA_SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.stdout.close()
        try:  # a process stuck in the kernel outlives SIGKILL: do not wait for it
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        return None
    return out if p.returncode == 0 else None


def nvidia_gpus() -> list[str]:
    """The GPUs the NVIDIA driver lists (`nvidia-smi -L`: "GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)"),
    as their names; [] without nvidia-smi or when it fails."""
    out = nvidia_smi("-L") or ""
    return [m[1].strip() for m in re.finditer(r"^GPU \d+: (.*?)(?: \(UUID: [^)]*\))?\s*$", out, re.MULTILINE)]


def driver_versions() -> tuple[str | None, str | None]:
    """The driver's version and the newest CUDA it runs, from the `nvidia-smi` banner
    ("Driver Version: 550.54.15   CUDA Version: 12.4"); None for what it does not say."""
    out = nvidia_smi() or ""
    driver = re.search(r"Driver Version:\s*([\d.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (driver[1] if driver else None), (cuda[1] if cuda else None)


def _count(gpus: list[str]) -> str:
    names = sorted(set(gpus))
    return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(names)})"


def _gpus_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing: GPUs hidden on purpose, so auto means CPU."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def _release() -> str:
    return torch.__version__.split("+")[0]


def _install(build: str) -> str:
    return f"pip install 'torch=={_release()}+{build}' --extra-index-url {TORCH_INDEX}/{build}"


def _why_no_gpu(gpus: list[str]) -> str:
    """Why torch sees none of the GPUs, and what to install, as the middle of a one-line error."""
    if not gpus:
        if torch.version.cuda:
            return "nvidia-smi lists none (no NVIDIA GPU or driver on this machine)"
        return f"nvidia-smi lists none, and this torch has no CUDA: on a GPU machine install a CUDA build ({_install('cu130')})"
    driver, cuda = driver_versions()
    facts = [x for x in (driver and f"driver {driver}", cuda and f"runs CUDA <= {cuda}") if x]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        facts.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    about = f" ({', '.join(facts)})" if facts else ""
    if cuda is None:
        return (f"install the torch build the NVIDIA driver runs{about}: {_install('cu130')} for drivers >= 580 "
                f"(CUDA 13), {_install('cu126')} for drivers >= 525 (CUDA 12)")
    major = int(cuda.split(".")[0])
    build = next((name for name, cuda_major, _ in CUDA_BUILDS if cuda_major <= major), None)
    if build is None:
        return (f"the NVIDIA driver{about} is too old for torch {_release()}: upgrade it to "
                f"{CUDA_BUILDS[-1][2]} or newer")
    if torch.version.cuda and int(torch.version.cuda.split(".")[0]) <= major:
        return f"the driver{about} runs this build: check the GPUs with `nvidia-smi` and CUDA_VISIBLE_DEVICES"
    return f"install the build this driver runs{about}: {_install(build)}"


def default_nproc(device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" else 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: str, rank: int | None = None, world: int | None = None, port: int | None = None,
         local_rank: int | None = None, local_world: int | None = None) -> DistEnv:
    """Join (or create) the process group: from the environment under a launcher, else from the
    given rank / world / port on 127.0.0.1."""
    if rank is None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        init_method = "env://"
    else:
        local_rank = rank if local_rank is None else local_rank
        init_method = f"tcp://127.0.0.1:{port}"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        if local_world is None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # the cores shared evenly among this machine's ranks, unless OMP_NUM_THREADS says otherwise
        # (more threads than free cores makes OpenMP spin: 100x slower small matmuls)
        omp = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(omp) if omp.isdigit() else (os.cpu_count() or 1) // max(1, local_world)
        torch.set_num_threads(max(1, threads))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT,
                                device_id=dev if backend == "nccl" else None)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawned(index: int, fn: Callable, args: tuple, device: str, world: int, port: int) -> None:
    env = init(device, rank=index, world=world, port=port, local_world=world)
    try:
        fn(env, *args)
    finally:
        shutdown()


class RankFailed(RuntimeError):
    """A spawned rank raised or died; the message holds its error."""


def _spawned_child(index: int, fn: Callable, args: tuple, device: str, world: int, port: int, error_file: str) -> None:
    try:
        _spawned(index, fn, args, device, world, port)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        with open(error_file, "w", encoding="utf-8") as fh:
            fh.write(f"rank {index}: {type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        code = 1
    else:
        code = 0
    # skip the interpreter's teardown, which takes seconds once torch.distributed has run
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _run_spawned(fn: Callable, args: tuple, nproc: int, device: str) -> None:
    """Start nproc ranks; wait for all; if one fails, stop the others and raise its error."""
    import multiprocessing as mp
    import multiprocessing.connection
    import tempfile

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tinyprep-ranks-") as tmp:
        errors = [os.path.join(tmp, f"rank{i}.err") for i in range(nproc)]
        procs = [ctx.Process(target=_spawned_child, args=(i, fn, args, device, nproc, port, errors[i]),
                             name=f"tinyprep-rank{i}") for i in range(nproc)]
        for p in procs:
            p.start()
        failed = None
        try:
            alive = {p.sentinel: i for i, p in enumerate(procs)}
            while alive and failed is None:
                for sentinel in multiprocessing.connection.wait(list(alive)):
                    i = alive.pop(sentinel)
                    procs[i].join()
                    if procs[i].exitcode != 0 and failed is None:
                        failed = i
        finally:
            for p in procs:  # on failure (or an interrupt here) the other ranks cannot go on
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
        if failed is not None:
            if os.path.exists(errors[failed]):
                with open(errors[failed], encoding="utf-8") as fh:
                    raise RankFailed(fh.read())
            code = procs[failed].exitcode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RankFailed(f"rank {failed} died ({how})")


def launch(fn: Callable, args: tuple, nproc: int, device: str) -> None:
    """Run fn(env, *args) on every rank: in this process under torchrun or with one process,
    else in `nproc` spawned processes (an exception or exit in one stops all: RankFailed here)."""
    if under_launcher():
        env = init(device)
        try:
            fn(env, *args)
        finally:
            shutdown()
        return
    if nproc == 1:
        threads = torch.get_num_threads()
        try:
            _spawned(0, fn, args, device, 1, free_port())
        finally:
            torch.set_num_threads(threads)  # this process goes on after training
        return
    _run_spawned(fn, args, nproc, device)
