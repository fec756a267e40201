"""The stage contract: what a stage declares, what a task returns, and the list of stages.

A stage is a `Stage` subclass (one instance per stage module, named `stage`):

    name                          "ingest", ...
    phases(recipe, run)           the stage's phases, in order; generated lazily, so a phase may
                                  depend on what the previous one wrote (dedup's component
                                  rounds). Default: one unnamed phase (None).
    plan(recipe, run, phase)      -> list[Task]: called once the previous phase has completed
    run_task(task, recipe, run)   -> TaskResult: a plain function of the task; writes its outputs
                                  with `storage.atomic_open`
    cpus_per_task(recipe)         CPUs each task gets (default 1)
    allowed_errors(recipe)        bad inputs the stage may count before it fails (default 0;
                                  None: any number)
    finish(recipe, run, records)  after the last phase succeeded (default: nothing)

The runner (`pipeline/runner.py`) writes completion records, resumes, retries, merges stats and
reports progress; an executor (`pipeline/executors.py`: Ray, or in-process) runs the tasks. Stage
code never sees Ray.
"""

from __future__ import annotations

import hashlib
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import orjson

if TYPE_CHECKING:
    from .layout import RunDir
    from .recipe import Recipe

CODE_VERSION = "1"  # bump when a stage's output for the same input changes

# The stages in flow order: name -> module holding its `stage` object.
STAGES = {
    "download": "pipeline.download",
    "ingest": "pipeline.ingest",
    "dedup": "pipeline.dedup",
    "tokenize": "pipeline.tokenize",
    "mix": "pipeline.mix",
}


class StageFailed(Exception):
    """A stage cannot run or ended with failed tasks or too many bad inputs; the message says why."""


@dataclass(frozen=True)
class Task:
    stage: str
    id: str  # unique within the stage (across its phases), path-like: "<source>/<rel_path>[@part]"
    source: str
    fingerprint: str  # of everything the outputs depend on; a completion record must match it
    size: int = 0  # input bytes, for progress
    payload: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class TaskResult:
    """What a task hands the runner; it becomes the task's completion record."""

    outputs: list[str] = field(default_factory=list)  # URLs the task committed
    stats: dict = field(default_factory=dict)  # merged over the stage's tasks (stats.merge_all)
    issues: list[dict] = field(default_factory=list)  # bad inputs: {file, line, kind, message}
    docs: int = 0  # documents read, for progress
    bytes: int = 0  # input bytes read, for progress
    errors: int = 0  # bad inputs counted against allowed_errors
    transfer: dict = field(default_factory=dict)  # retry-dependent details, kept out of the stats


class Stage(ABC):
    """Base class of the stages; see the module docstring for the contract."""

    name: str = ""

    def phases(self, recipe: Recipe, run: RunDir) -> Iterator[str | None]:
        yield None

    @abstractmethod
    def plan(self, recipe: Recipe, run: RunDir, phase: str | None) -> list[Task]: ...

    @abstractmethod
    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult: ...

    def cpus_per_task(self, recipe: Recipe) -> int:
        return 1

    def allowed_errors(self, recipe: Recipe) -> int | None:
        return 0

    def finish(self, recipe: Recipe, run: RunDir, records: list[dict]) -> None:
        return None


def get_stage(name: str) -> Stage:
    """The `stage` object of a stage module (imported on first use)."""
    if name not in STAGES:
        raise StageFailed(f"unknown stage {name!r}; available: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).stage


def fingerprint(*parts: Any) -> str:
    """A short hash of everything a task's outputs depend on (pydantic models by their JSON)."""
    h = hashlib.sha256(CODE_VERSION.encode())
    for p in parts:
        if hasattr(p, "model_dump"):
            p = p.model_dump(mode="json", by_alias=True)
        h.update(orjson.dumps(p, option=orjson.OPT_SORT_KEYS))
        h.update(b"\x00")
    return h.hexdigest()[:20]
