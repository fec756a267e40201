"""The run directory: every path under a run, in one place.

A run directory is any fsspec URL (local by default). Nothing outside this module joins paths
under a run; stages, tools and the trainer ask a `RunDir` for them:

    RUN/recipe.yaml                  resolved copy of the recipe (what actually ran)
    RUN/inputs/<source>.json         the source's input listing, made once per run
    RUN/assets/<name>                files the driver copies in for the workers (the recipe's tokenizer.model)
    RUN/raw/<source>/<rel>           downloaded inputs
    RUN/docs/<source>/<rel>.parquet  ingested documents, one file per input (or row-group range)
    RUN/dedup/...                    layout, signatures, buckets, components, removed/<source>/<rel>
    RUN/tokenize/...                 holdout digests, shard groups, per-task shard lists
    RUN/tokenizer.model              a tokenizer the tokenize stage trained
    RUN/shards/<source>/<split>/*.bin|*.idx
    RUN/manifest.json, RUN/mixture.json
    RUN/tasks/<stage>/<task>.json    completion records
    RUN/tasks/<stage>.index.json.zst every record of a finished stage in one file (read on resume)
    RUN/stats/<stage>.json, <stage>.issues.jsonl, timeline.json
    RUN/logs/<time>-<pid>-run.log
    RUN/logs/tasks/<stage>/<task>.log  what a task logged, written by the task (wherever it ran)
    RUN/<train.dir>/...              checkpoints and metrics of `tinyprep train`

Temporary names (atomic commits) and file-version stamps come from `storage`; listings here skip
temporaries, so a killed writer's leftovers are never read as outputs.

Containment: every part of a path that comes from input (an input's path under its source root,
a docs file's name, `train.dir`) must be a normalized relative path; anything with `..`, an
absolute path or a URL is refused with `RunDirError`, so nothing the input says can place a file
outside the run. A run directory is marked at creation (`RUN/.tinyprep-run`); the runner cleans
up only inside a marked run, and only temporaries of its own naming.
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass

from . import storage

MANIFEST_NAME = "manifest.json"
MIXTURE_NAME = "mixture.json"
RUN_TOKENIZER = "tokenizer.model"  # where a tokenizer trained by the tokenize stage goes
MARKER_NAME = ".tinyprep-run"  # written when a run directory is created
_DRIVE = re.compile(r"^[A-Za-z]:")
# what a run directory holds (any other entry means the directory is someone else's)
RUN_ENTRIES = frozenset({"recipe.yaml", "inputs", "assets", "raw", "docs", "dedup", "tokenize", RUN_TOKENIZER, "shards",
                          MANIFEST_NAME, MIXTURE_NAME, "tasks", "stats", "logs", "train", MARKER_NAME})


class RunDirError(ValueError):
    """A path would leave the run directory, or the output is not a run directory (one line)."""


def contained(path: str, what: str) -> str:
    """`path` if it is a normalized relative path that stays below its root, else RunDirError."""
    if not isinstance(path, str) or not path:
        raise RunDirError(f"{what}: must be a non-empty relative path, got {path!r}")
    if "://" in path or path.startswith(("/", "\\", "~")) or _DRIVE.match(path) or "\\" in path or "\x00" in path:
        raise RunDirError(f"{what}: {path!r} is not a path relative to the run directory")
    if any(p in ("", ".", "..") for p in path.split("/")):
        raise RunDirError(f"{what}: {path!r} escapes the run directory or is not normalized")
    return path


@dataclass(frozen=True)
class DocsFile:
    """One ingested docs file: RUN/docs/<source>/<rel>."""

    source: str
    rel: str  # relative to RUN/docs/<source>/
    url: str
    version: str  # storage.file_stamp of the file: changes when the file is rewritten


class RunDir:
    """The paths of one run directory (a URL; nothing is created until written)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/") or str(url)

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def _join(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def relative(self, path: str) -> str:
        """A run-relative path (as the manifest and the completion records keep them) as a URL;
        a URL or absolute path (an output outside the run) is returned as it is."""
        return path if "://" in path or path.startswith("/") else self._join(path)

    def to_relative(self, url: str) -> str:
        """A URL under the run as a run-relative path (a moved or copied run still resolves it)."""
        prefix = self.url + "/"
        return url[len(prefix):] if url.startswith(prefix) else url

    # -- the recipe, inputs and raw copies ------------------------------------------------------

    @property
    def recipe(self) -> str:
        return self._join("recipe.yaml")

    def inputs_listing(self, source: str) -> str:
        return self._join("inputs", f"{source}.json")

    def assets(self, name: str) -> str:
        """A file the driver copies into the run at its start, so that tasks on any node read it
        from the run's storage rather than from a path only the driver's machine has."""
        return self._join("assets", contained(name, "asset"))

    def raw(self, source: str, rel_path: str) -> str:
        """Where the download stage puts a source's file."""
        return self._join("raw", contained(source, "source"), contained(rel_path, f"source {source}: input path"))

    # -- documents ------------------------------------------------------------------------------

    def docs_root(self, source: str | None = None) -> str:
        return self._join("docs", source) if source else self._join("docs")

    def docs(self, source: str, rel: str) -> str:
        """An ingested docs file by its path under RUN/docs/<source>/."""
        return self._join("docs", contained(source, "source"), contained(rel, f"source {source}: docs file"))

    def docs_files(self, source: str) -> list[DocsFile]:
        """The source's docs files (RUN/docs/<source>/**.parquet, temporaries skipped), sorted."""
        return [DocsFile(source, rel, self.docs(source, rel), storage.file_stamp(info))
                for rel, info in self.find(self.docs_root(source), suffix=".parquet")]

    def all_docs_files(self) -> list[DocsFile]:
        """Every docs file of the run (RUN/docs/<source>/**.parquet), sorted by path."""
        out = []
        for rel, info in self.find(self.docs_root(), suffix=".parquet"):
            source, _, rest = rel.partition("/")
            out.append(DocsFile(source, rest, self.docs(source, rest), storage.file_stamp(info)))
        return out

    def find(self, root_url: str, suffix: str = "") -> list[tuple[str, dict]]:
        """(path relative to root_url, fsspec info) of every committed file below it, sorted."""
        fs, root = storage.url_to_fs(root_url)
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for path, info in found.items():
            name = path.rsplit("/", 1)[-1]
            if storage.is_temporary(name) or not name.endswith(suffix):
                continue
            out.append((posixpath.relpath(path, root), info))
        return sorted(out, key=lambda p: p[0])

    # -- dedup, tokenize ------------------------------------------------------------------------

    def dedup(self, *parts: str) -> str:
        return self._join("dedup", *parts)

    def removed(self, source: str, docs_rel: str) -> str:
        """The dedup removal list of the docs file RUN/docs/<source>/<docs_rel>."""
        return self.dedup("removed", contained(source, "source"), contained(docs_rel, f"source {source}: docs file"))

    def tokenize(self, *parts: str) -> str:
        return self._join("tokenize", *parts)

    @property
    def trained_tokenizer(self) -> str:
        return self._join(RUN_TOKENIZER)

    # -- shards, manifest, mixture --------------------------------------------------------------

    @property
    def shards_root(self) -> str:
        return self._join("shards")

    @staticmethod
    def shard_path(source: str, split: str, group: int, part: int) -> str:
        """A shard's prefix relative to the run (as manifest.json records it)."""
        return f"shards/{source}/{split}/{group:06d}-{part:04d}"

    @property
    def manifest(self) -> str:
        return self._join(MANIFEST_NAME)

    @property
    def mixture(self) -> str:
        return self._join(MIXTURE_NAME)

    # -- the runner's records, stats and logs ---------------------------------------------------

    def tasks(self, stage: str) -> str:
        return self._join("tasks", stage)

    def record(self, stage: str, task_id: str) -> str:
        return self._join("tasks", stage, task_id + ".json")

    def record_index(self, stage: str) -> str:
        """The stage's completion records in one file, beside (not inside) RUN/tasks/<stage>/."""
        return self._join("tasks", f"{stage}.index.json.zst")

    def stage_stats(self, stage: str) -> str:
        return self._join("stats", f"{stage}.json")

    def stage_issues(self, stage: str) -> str:
        return self._join("stats", f"{stage}.issues.jsonl")

    @property
    def timeline(self) -> str:
        return self._join("stats", "timeline.json")

    def log(self, name: str) -> str:
        return self._join("logs", name)

    def task_logs(self, stage: str) -> str:
        return self._join("logs", "tasks", stage)

    def task_log(self, stage: str, task_id: str) -> str:
        """What one task logged (its last attempt), written by the task through storage."""
        return self._join("logs", "tasks", stage, contained(task_id, f"{stage} task id") + ".log")

    # -- training -------------------------------------------------------------------------------

    def train(self, train_dir: str, *parts: str) -> str:
        return self._join(contained(train_dir, "train.dir"), *parts)

    # -- the marker -----------------------------------------------------------------------------

    @property
    def marker(self) -> str:
        return self._join(MARKER_NAME)

    def probe(self) -> str:
        """A throwaway file the preflight writes and removes to prove the run is writable; named as
        an atomic commit's temporary, so one a killed run left behind is cleaned up like those."""
        return storage.temp_name(self.marker)

    def is_marked(self) -> bool:
        return storage.exists(self.marker)

    def claim(self) -> None:
        """Make sure this is a run directory we may write and clean: mark a new or empty one, accept
        a marked one, adopt one that holds only what runs hold (an earlier version's run, or a run
        assembled from another's docs/ and dedup/), refuse anything else with RunDirError: a
        user's directory is never written into."""
        if not self.url:
            raise RunDirError("output: the run directory must not be empty")
        if self.is_marked():
            return
        fs, path = storage.url_to_fs(self.url)
        if fs.exists(path):
            if not fs.isdir(path):
                raise RunDirError(f"{self.url}: exists and is not a directory")
            names = {posixpath.basename(e.rstrip("/")) for e in fs.ls(path, detail=False)}
            if names - RUN_ENTRIES:
                raise RunDirError(f"{self.url}: not empty and not a tinyprep run directory (no {MARKER_NAME}); "
                                  f"choose a new or empty output directory")
        storage.write_json(self.marker, {"format": "tinyprep-run", "version": 1,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def as_run(run: RunDir | str) -> RunDir:
    """A RunDir from a RunDir or a URL (for the public functions that accept either)."""
    return run if isinstance(run, RunDir) else RunDir(run)
