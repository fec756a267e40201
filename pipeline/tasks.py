"""What a stage hands the runner: tasks, and the listing of a source's input files.

A stage module (`pipeline/download.py`, `pipeline/ingest.py`, ...) exposes two plain functions:

    plan(recipe, run_url) -> list[Task]
    run_task(task, recipe, run_url) -> dict   # {"outputs": [...], "stats": {...}, "issues": [...],
                                              #  "docs": int, "bytes": int, "errors": int}

`run_task` writes its outputs with `storage.atomic_open` and returns a small result; the runner
writes the completion record, retries, resumes and reports progress. Stage code never sees Ray.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import storage
from .recipe import Recipe, SourceConfig

CODE_VERSION = "1"  # bump when a stage's output for the same input changes


@dataclass(frozen=True)
class Task:
    stage: str
    id: str  # unique within the stage, path-like: "<source>/<rel_path>[@part]"
    source: str
    fingerprint: str  # of everything the outputs depend on; a completion record must match it
    size: int = 0  # input bytes, for progress
    payload: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256(CODE_VERSION.encode())
    for p in parts:
        if hasattr(p, "model_dump"):
            p = p.model_dump(mode="json", by_alias=True)
        h.update(orjson.dumps(p, option=orjson.OPT_SORT_KEYS))
        h.update(b"\x00")
    return h.hexdigest()[:20]


def record_url(run_url: str, stage: str, task_id: str) -> str:
    return storage.join(run_url, "tasks", stage, task_id + ".json")


def raw_url(run_url: str, source: str, rel_path: str) -> str:
    """Where the download stage puts a source's file inside the run."""
    return storage.join(run_url, "raw", source, rel_path)


def _listing_key(src: SourceConfig) -> str:
    return fingerprint(src.urls, src.url_list, src.url_list_match, src.select.dirs)


def list_inputs(recipe: Recipe, src: SourceConfig, run_url: str) -> list[storage.InputFile]:
    """The source's input files, sorted, filtered to `select.dirs`; listed once per run.

    Listing a remote dataset (59,166 SlimPajama files) is slow, so the first stage that needs it
    stores the listing in RUN/inputs/<source>.json and later stages read it back.
    """
    cache = storage.join(run_url, "inputs", f"{src.name}.json")
    key = _listing_key(src)
    cached = storage.read_json(cache)
    if cached and cached.get("key") == key:
        return [storage.InputFile(**f) for f in cached["files"]]
    files = expand_source(src)
    storage.write_json(cache, {"key": key, "source": src.name, "files": [f.to_json() for f in files]})
    return files


def expand_source(src: SourceConfig) -> list[storage.InputFile]:
    """List a source's input files (urls, url_list), sorted, filtered to `select.dirs`."""
    files = storage.expand_urls(src.urls) if src.urls else []
    if src.url_list:
        files += storage.expand_url_list(src.url_list, src.url_list_match)
    if src.select.dirs is not None:
        wanted = set(src.select.dirs)
        files = [f for f in files if "/" in f.rel_path and f.rel_path.split("/", 1)[0] in wanted]
        if not files:
            raise FileNotFoundError(
                f"source {src.name}: no input file under the directories {sorted(wanted)} (select.dirs)"
            )
    seen: dict[str, storage.InputFile] = {}
    for f in files:
        seen.setdefault(f.rel_path, f)
    return [seen[k] for k in sorted(seen)]
