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
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

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


def pick_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no GPU is visible")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


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
