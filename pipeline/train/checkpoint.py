"""Checkpoints with torch.distributed.checkpoint (DCP): sharded save, resharded load.

RUN/<train.dir>/checkpoints/step-NNNNNNNN/ holds one DCP checkpoint: the model and optimizer
(sharded, so it loads on any world size), the training position (`train`: step, samples consumed,
the mixture fingerprint, the global batch) and each rank's RNG state (`rng.rank<r>`). `meta.json`,
written by rank 0 once DCP has committed everything, marks the checkpoint complete and says what
it belongs to; a directory without it (a run killed while saving) is ignored. Resuming checks the
mixture fingerprint, the global batch and the model shape before anything is loaded.

Choosing the checkpoint to resume from (`resumable`) reads no tensor: a complete checkpoint is
usable when its meta.json parses with the keys resuming needs, its DCP `.metadata` loads, and every
`.distcp` file the metadata names exists and is long enough for the items stored in it. A damaged
one (a truncated or deleted file, junk meta.json) is skipped for the newest usable one before it;
the bytes inside a file of the right length are not checksummed (DCP keeps no checksums).

Nothing in a checkpoint names the run directory: meta.json holds no path, and DCP's `.metadata`,
which records the directory it was written to, records only the checkpoint's own name instead, so
a run directory copied or moved elsewhere resumes.
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
from torch.distributed.checkpoint.metadata import StorageMeta
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


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step-NNNNNNNN directory under root, oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                out.append((int(m.group(1)), d))
    return sorted(out)


# meta.json keys that resuming reads, and their types
_META_KEYS = {"step": int, "samples": int, "fingerprint": str, "global_batch": int, "world": int, "model": dict}


def read_info(path: Path) -> CheckpointInfo:
    """The checkpoint in `path` from its meta.json; CheckpointError says what is wrong with it."""
    m = _STEP_DIR.match(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a step-NNNNNNNN checkpoint directory")
    try:
        meta = orjson.loads((path / "meta.json").read_bytes())
    except FileNotFoundError:
        raise CheckpointError("meta.json is missing (the save did not finish)") from None
    except (OSError, orjson.JSONDecodeError) as e:
        raise CheckpointError(f"meta.json is unreadable: {' '.join(str(e).split())}") from None
    if not isinstance(meta, dict):
        raise CheckpointError("meta.json is not a JSON object")
    for key, typ in _META_KEYS.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"meta.json: {key!r} is missing or not {typ.__name__}")
    if meta["step"] != int(m.group(1)):
        raise CheckpointError(f"meta.json: step {meta['step']} is not the directory's step {int(m.group(1))}")
    return CheckpointInfo(path, meta["step"], meta)


def check_files(path: Path) -> None:
    """CheckpointError unless DCP's .metadata loads and every file it names is long enough for the
    items stored in it (a stat per file; no tensor is read)."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(".metadata is missing")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        need: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    except Exception as e:  # noqa: BLE001 - unpickling junk raises anything; the point is it is unusable
        reason = " ".join(str(e).split())[:80]  # one line, whatever the unpickler said
        raise CheckpointError(f".metadata is unreadable ({type(e).__name__}: {reason})") from None
    for name, end in sorted(need.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{name} is missing") from None
        if size < end:
            raise CheckpointError(f"{name} is truncated ({size:,} bytes, its items need {end:,})")


def complete_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Checkpoints under root whose meta.json is readable (saves that finished), oldest first."""
    out = []
    for _, d in _step_dirs(root):
        if (d / "meta.json").is_file():
            try:
                out.append(read_info(d))
            except CheckpointError:
                continue
    return out


def resumable(root: Path) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The newest usable checkpoint under root (None if there is none), and the damaged ones newer
    than it, newest first, each with the reason. A directory without meta.json is a save that did
    not finish, neither usable nor damaged."""
    damaged = []
    for _, d in reversed(_step_dirs(root)):
        if not (d / "meta.json").exists():
            continue
        try:
            info = read_info(d)
            check_files(d)
        except CheckpointError as e:
            damaged.append((d, str(e)))
            continue
        return info, damaged
    return None, damaged


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


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, but the `.metadata` it writes records the checkpoint's directory name
    instead of its absolute path (which would tie the checkpoint to where the run was)."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=Path(str(self.checkpoint_id)).name, save_id=self.save_id)


def save(root: Path, step: int, model, optimizer, train_state: dict, meta: dict, rank: int,
         device: torch.device, keep: int) -> Path:
    """Save a checkpoint of `step` (collective: every rank calls it); return its directory."""
    path = step_dir(root, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt at the same step
    dist.barrier()
    state = {"app": _ModelAndOptimizer(model, optimizer), "train": dict(train_state),
             f"rng.rank{rank}": _rng_state(device)}
    dcp.save(state, storage_writer=_Writer(str(path)))
    if rank == 0:
        tmp = path / "meta.json.tmp"
        tmp.write_bytes(orjson.dumps({**meta, "step": step, **train_state}, option=orjson.OPT_INDENT_2))
        tmp.rename(path / "meta.json")
        complete = complete_checkpoints(root)
        for old in complete[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        finished = {c.path for c in complete}
        for s, d in _step_dirs(root):  # older ones without a readable meta.json (killed while saving)
            if s < step and d not in finished:
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
