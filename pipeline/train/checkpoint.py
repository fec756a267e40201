"""Checkpoints with torch.distributed.checkpoint (DCP): sharded save, resharded load.

RUN/<train.dir>/checkpoints/step-NNNNNNNN/ holds one DCP checkpoint: the model and optimizer
(sharded, so it loads on any world size), the training position (`train`: step, samples consumed,
the mixture fingerprint, the global batch) and each rank's RNG state (`rng.rank<r>`). `meta.json`,
written by rank 0 once DCP has committed everything, marks the checkpoint complete and says what
it belongs to; a directory without it (a run killed while saving) is ignored. Resuming checks the
plan and the model shape before anything is loaded.

The plan: meta.json's `plan` (`loader.plan_record`) holds everything the sample stream is a function of
(loader.py): seq_len, the mixture seed, the global batch, and per source in order its name, samples
planned, samples per epoch and train shards (count, tokens, a digest of their checksums), with the
weights and token budget that led to them. Resuming compares it field by field with this run's
(`loader.plan_changes`) and refuses, in one line naming what changed, any change that alters a sample to
come: re-running `mix` with another token_budget keeps the mixture fingerprint (shard checksums,
weights, seq_len, seed) but changes every source's share of a batch, hence every later batch.
Changes that leave the stream as it was resume: a planned sample count that changes while every
source's share of a batch (mixing.py's allocation) stays the same, a weight whose planned counts did
not move, and anything outside the plan (validation, logging, world size). A checkpoint without a
plan record (written before it existed) is checked by the mixture fingerprint alone.

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

from .. import storage
from .loader import PLAN_VERSION, is_plan_record, plan_changes

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
    if "plan" in meta and not is_plan_record(meta["plan"]):
        raise CheckpointError(f"meta.json: 'plan' is not a plan record of version {PLAN_VERSION}")
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


def check_compatible(info: CheckpointInfo, plan: dict, fingerprint: str, model: dict) -> None:
    """CheckpointError unless the checkpoint was trained on the same sample stream (its plan record,
    else for an older checkpoint the mixture fingerprint and global batch) and model shape; `plan`
    is this run's plan_record."""
    meta = info.meta
    if "plan" in meta:
        changes = plan_changes(meta["plan"], plan)
        if changes:
            shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
            batch = meta["plan"]["global_batch"]
            undo = [f"set train.global_batch back to {batch}"] if batch != plan["global_batch"] else []
            if len(changes) > len(undo):
                undo.append("re-run mix with the original settings")
            raise CheckpointError(
                f"{info.path}: step {info.step} was trained on a different plan: {shown}; to resume, "
                f"{' and '.join(undo)}, or start over with --fresh (or another train.dir)")
    else:
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{info.path}: trained on mixture {str(meta.get('fingerprint'))[:12]}, but this run's mixture.json "
                f"has fingerprint {fingerprint[:12]} (another mixture); start afresh with --fresh or use another "
                "train.dir")
        if meta.get("global_batch") != plan["global_batch"]:
            raise CheckpointError(
                f"{info.path}: trained with train.global_batch {meta.get('global_batch')}, this run has "
                f"{plan['global_batch']} (the sample stream is defined per global batch)")
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
        storage.write_bytes(str(path / "meta.json"),
                            orjson.dumps({**meta, "step": step, **train_state}, option=orjson.OPT_INDENT_2))
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
