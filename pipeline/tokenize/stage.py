"""The tokenize stage: its phases, their plans and fingerprints, and which code runs each task.

Phases (the package docstring says what each writes): `tokenizer` (only when the recipe trains
its tokenizer), `holdout` (holdout.py), `group` (groups.py), `encode` (packer.py); `finish`
writes the manifest (packer.py). Each task's fingerprint covers everything its outputs depend
on, so a changed document, removal list, tokenizer or setting redoes exactly what it affects.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import storage
from ..formats.manifest import TokenizerInfo
from ..layout import DocsFile, RunDir
from ..recipe import Recipe
from ..stage import Stage, Task, TaskResult, fingerprint
from .docs import all_docs_files, removal_versions
from .errors import TokenizeError
from .groups import GROUPS, run_group
from .holdout import holdout_settings, holdout_url, run_holdout
from .packer import run_encode, write_run_manifest
from .tokenizer import (
    tokenizer_info,
    tokenizer_url,
    train_config_inputs,
    train_tokenizer,
)

STAGE = "tokenize"


def needs_training(recipe: Recipe, run: RunDir) -> bool:
    tok = recipe.tokenizer
    if tok is None or tok.train is None:
        return False
    if not storage.exists(tokenizer_url(recipe, run)):
        return True
    # trained by this stage before: keep it current with the documents (skipped when unchanged)
    return storage.exists(run.record(STAGE, "tokenizer"))


def _holdout_fingerprints(recipe: Recipe, run: RunDir, files: dict[str, list[DocsFile]]) -> dict[str, str]:
    settings = holdout_settings(recipe)
    removals = removal_versions(run, files)
    return {f"holdout/{f.source}/{f.rel}": fingerprint(STAGE, "holdout", f.version, settings,
                                                       removals[f"{f.source}/{f.rel}"])
            for fs in files.values() for f in fs}


def _group_fingerprint(recipe: Recipe, holdout_fps: dict[str, str], itemsize: int, tokenizer: str) -> str:
    return fingerprint(STAGE, "group", sorted(holdout_fps.items()), recipe.tokenize.shard_mb, itemsize,
                       recipe.tokenize.dedup_holdout, tokenizer)


def _size_of(version: str) -> int:
    head = version.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def _tokenizer_tasks(recipe: Recipe, run: RunDir, files: dict[str, list[DocsFile]]) -> list[Task]:
    cfg = recipe.tokenizer.train
    versions = [(f.source, f.rel, f.version) for fs in files.values() for f in fs]
    url = tokenizer_url(recipe, run)
    where = run.to_relative(url)  # not the run's location: a moved run keeps its tokenizer
    return [Task(STAGE, "tokenizer", "", fingerprint(STAGE, "tokenizer", versions, train_config_inputs(cfg), where),
                 payload={"out": url, "train": train_config_inputs(cfg),
                          "inputs": [f.url for fs in files.values() for f in fs]})]


def _encode_tasks(recipe: Recipe, run: RunDir, files: dict[str, list[DocsFile]], holdout_fps: dict[str, str],
                  info: TokenizerInfo, dtype: np.dtype) -> list[Task]:
    groups = storage.read_json(run.tokenize(GROUPS))
    group_fp = _group_fingerprint(recipe, holdout_fps, dtype.itemsize, info.sha256)
    if not groups or groups.get("fingerprint") != group_fp:
        raise TokenizeError(f"{run.tokenize(GROUPS)}: missing or stale (the group phase did not run)")
    cfg = recipe.tokenize
    by_rel = {(f.source, f.rel): f for fs in files.values() for f in fs}
    settings = {"bos": cfg.bos, "eos": cfg.eos, "dtype": dtype.name, "shard_mb": cfg.shard_mb,
                "tokenizer": info.sha256, "holdout": holdout_settings(recipe), "dedup_holdout": cfg.dedup_holdout}
    out = []
    for split in ("train", "validation"):
        for source in sorted(groups[split]):
            for g, group in enumerate(groups[split][source]):
                members = [by_rel[(source, rel)] for rel, _ in group]
                task_id = f"{split}/{source}/{g:06d}"
                fp = fingerprint(STAGE, "encode", split, [holdout_fps[f"holdout/{source}/{f.rel}"] for f in members],
                                 settings, group_fp if split == "train" else None)
                out.append(Task(STAGE, task_id, source, fp, size=sum(b for _, b in group), payload={
                    "split": split, "group": g, "dtype": dtype.name, "tokenizer_sha256": info.sha256,
                    "files": [{"rel": f.rel, "url": f.url, "holdout": holdout_url(run, f)} for f in members],
                    "parts": run.tokenize("parts", split, source, f"{g:06d}.json"),
                }))
    return out


class TokenizeStage(Stage):
    name = STAGE

    def phases(self, recipe: Recipe, run: RunDir) -> Iterator[str]:
        if needs_training(recipe, run):
            yield "tokenizer"
        yield from ("holdout", "group", "encode")

    def cpus_per_task(self, recipe: Recipe) -> int:
        return recipe.tokenize.cpus_per_task

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None) -> list[Task]:
        files = all_docs_files(recipe, run)
        if phase == "tokenizer":
            return _tokenizer_tasks(recipe, run, files)
        info, dtype = tokenizer_info(recipe, run)  # a missing or unusable tokenizer fails before any work
        fps = _holdout_fingerprints(recipe, run, files)
        if phase == "holdout":
            return [Task(STAGE, f"holdout/{f.source}/{f.rel}", f.source, fps[f"holdout/{f.source}/{f.rel}"],
                         size=_size_of(f.version),
                         payload={"docs": f.url, "rel": f.rel, "out": holdout_url(run, f)})
                    for fs in files.values() for f in fs]
        if phase == "group":
            inputs = [{"source": f.source, "rel": f.rel, "url": f.url, "holdout": holdout_url(run, f)}
                      for fs in files.values() for f in fs]
            return [Task(STAGE, "group", "", _group_fingerprint(recipe, fps, dtype.itemsize, info.sha256),
                         payload={"inputs": inputs, "itemsize": dtype.itemsize, "tokenizer_sha256": info.sha256})]
        if phase == "encode":
            return _encode_tasks(recipe, run, files, fps, info, dtype)
        raise ValueError(f"unknown tokenize phase {phase!r}")

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        if task.id == "tokenizer":
            p = task.payload
            info = train_tokenizer(p["inputs"], p["out"], **{k: v for k, v in p["train"].items()})
            return TaskResult(outputs=[p["out"]], stats={"tokenizer": {"trained_documents": info["documents"],
                                                                        "trained_sentences": info["sentences"]}})
        if task.id.startswith("holdout/"):
            return run_holdout(task, recipe, run)
        if task.id == "group":
            return run_group(task, recipe, run)
        return run_encode(task, recipe, run)

    def finish(self, recipe: Recipe, run: RunDir, records: list[dict]) -> None:
        write_run_manifest(recipe, run, records)


stage = TokenizeStage()
