"""Checkpoints with torch.distributed.checkpoint (DCP): sharded save, resharded load.

RUN/<train.dir>/checkpoints/step-NNNNNNNN/ holds one DCP checkpoint: the model and optimizer
(sharded, so it loads on any world size), the training position (`train`: step, samples consumed,
the mixture fingerprint, the global batch) and each rank's RNG state (`rng.rank<r>`). `meta.json`,
written by rank 0 once DCP has committed everything, marks the checkpoint complete and says what
it belongs to; a directory without it (a run killed while saving) is ignored. Resuming checks the
mixture fingerprint, the global batch and the model shape before anything is loaded.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("tinyprep")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint that this run cannot resume from; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    meta: dict


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under root, oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / "meta.json").is_file():
                out.append(CheckpointInfo(d, int(m.group(1)), orjson.loads((d / "meta.json").read_bytes())))
    return sorted(out, key=lambda c: c.step)


def latest(root: Path) -> CheckpointInfo | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def check_compatible(info: CheckpointInfo, fingerprint: str, global_batch: int, model: dict) -> None:
    """CheckpointError unless the checkpoint was trained on this mixture, batch and model shape."""
    meta = info.meta
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{info.path}: trained on mixture {str(meta.get('fingerprint'))[:12]}, but this run's mixture.json has "
            f"fingerprint {fingerprint[:12]} (another mixture); start afresh with --fresh or use another train.dir")
    if meta.get("global_batch") != global_batch:
        raise CheckpointError(
            f"{info.path}: trained with train.global_batch {meta.get('global_batch')}, this run has {global_batch} "
            "(the sample stream is defined per global batch)")
    if meta.get("model") != model:
        raise CheckpointError(f"{info.path}: model {meta.get('model')} differs from this run's {model}")


class _ModelAndOptimizer(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _rng_state(device: torch.device) -> torch.Tensor:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return torch.cat(states)


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[n:].clone(), device)


def save(root: Path, step: int, model, optimizer, train_state: dict, meta: dict, rank: int,
         device: torch.device, keep: int) -> Path:
    """Save a checkpoint of `step` (collective: every rank calls it); return its directory."""
    path = step_dir(root, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt at the same step
    dist.barrier()
    state = {"app": _ModelAndOptimizer(model, optimizer), "train": dict(train_state),
             f"rng.rank{rank}": _rng_state(device)}
    dcp.save(state, checkpoint_id=str(path))
    if rank == 0:
        tmp = path / "meta.json.tmp"
        tmp.write_bytes(orjson.dumps({**meta, "step": step, **train_state}, option=orjson.OPT_INDENT_2))
        tmp.rename(path / "meta.json")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        for d in root.iterdir():  # incomplete ones older than this (killed while saving)
            m = _STEP_DIR.match(d.name)
            if m and int(m.group(1)) < step and not (d / "meta.json").exists():
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    return path


def load(info: CheckpointInfo, model, optimizer, rank: int, device: torch.device) -> dict:
    """Load model, optimizer and (where this rank saved one) RNG state; return the train state."""
    train_state = {"step": 0, "samples": 0, "fingerprint": "", "global_batch": 0}
    state = {"app": _ModelAndOptimizer(model, optimizer), "train": train_state}
    rng_key = f"rng.rank{rank}"
    saved = dcp.FileSystemReader(str(info.path)).read_metadata().state_dict_metadata
    has_rng = rng_key in saved
    if has_rng:
        state[rng_key] = _rng_state(device)
    dcp.load(state, checkpoint_id=str(info.path))
    if has_rng and info.meta.get("world") == dist.get_world_size():
        _set_rng_state(state[rng_key], device)
    else:
        torch.manual_seed(int(state["train"]["step"]) * 1009 + rank)
    return dict(state["train"])
