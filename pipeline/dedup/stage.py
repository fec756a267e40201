"""The dedup stage: its phases, how each is planned, and what one task of each holds.

Phases (each a set of Ray tasks; a phase reads only what the previous ones wrote to RUN/dedup/):

  signatures   one task per group of docs files: the 128-bit text hash (exact) and the MinHash
               band keys (fuzzy) of every document, written partitioned by hash range
               (sig/gNNNNNN.{exact,bands}.arrow: one batch per bucket partition) plus a small
               per-document index (id, subset, bytes) for the stats.
  buckets      one task per hash-range partition, all bands: sorts its records by (band, key,
               node); each bucket of n documents yields n-1 edges to its smallest node (exact
               buckets also flag their non-smallest members). Candidate edges go to the verify
               partition of their hub, with requests for the texts they need; or, without
               verification, straight into the graph.
  gather       (verify only) one task per group of docs files: reads the requested texts and
               writes them to the verify partitions that asked for them.
  verify       (verify only) one task per edge partition: exact shingle-set Jaccard of every
               candidate pair; the pairs at or above the threshold become graph edges.
  components-NN  connected components, large-star / small-star rounds (components.py) until a
               round finds its input already a union of stars.
  removal      one task per group of docs files: RUN/dedup/removed/<source>/<rel> for every docs
               file (id, reason, survivor), and the stage's stats.

The tasks live in signatures.py, candidates.py (buckets, gather, verify), rounds.py (components)
and removal.py; every file of RUN/dedup/ and the layout in layout.py; this module plans the phases.

Partition counts and the grouping of docs files are chosen once, from the docs' row counts and
sizes (parquet footers) and `dedup.max_task_memory_mb` (M), and saved in RUN/dedup/layout.json;
they never depend on the number of workers. The removal lists do not depend on them either.
What one task holds: a signatures/gather/removal task, one group of docs files (at most
M / (4 x bytes of its records per document) documents and M / 2 bytes of text, streamed 128
documents at a time); a buckets task, 1/`band_partitions` of all band and exact records
(partitions >= N x record bytes x 4 / M); a verify task, 1/`verify_partitions` of the candidate
texts (>= 3 x text bytes / M); a components task, 1/`edge_partitions` of the edges (>= N x 256 / M,
the graph has at most about one edge per document). `dedup.partitions` is the minimum of each.
The bound holds for data spread by hashing; a single bucket or component of more than about
M / 64 bytes of edges (tens of millions of copies of one document) lands in one task.
"""

from __future__ import annotations

from typing import Iterator

from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Stage, Task, TaskResult, fingerprint
from .candidates import buckets_task, gather_task, verify_task
from .layout import Layout, read_layout, source_ranks, verifying, write_layout
from .removal import removal_task
from .rounds import components_task, final_round, round_violations
from .signatures import signatures_task

STAGE = "dedup"
MAX_ROUNDS = 200


def _base_fingerprint(recipe: Recipe, layout: Layout) -> str:
    return fingerprint(STAGE, recipe.dedup, source_ranks(recipe), layout.digest)


def _task(recipe, layout, task_id, size=0, **payload) -> Task:
    return Task(STAGE, task_id, "", fingerprint(_base_fingerprint(recipe, layout), task_id, payload),
                size=size, payload=payload)


# ---------------------------------------------------------------------------------------------
# Phases


def _phases(recipe: Recipe, run: RunDir) -> Iterator[str]:
    """signatures, buckets, [gather, verify,] components-001.. until a round converges, removal."""
    yield "signatures"
    yield "buckets"
    if verifying(recipe):
        yield "gather"
        yield "verify"
    r = 1
    while True:
        yield f"components-{r:03d}"
        if round_violations(run, read_layout(run), r) == 0:
            break
        if r >= MAX_ROUNDS:
            raise RuntimeError(f"dedup: connected components did not converge in {MAX_ROUNDS} rounds")
        r += 1
    yield "removal"


def _group_text_bytes(layout: Layout, g: int) -> int:
    return sum(layout.files[i]["bytes"] for i in layout.group_files(g))


def _plan(recipe: Recipe, run: RunDir, phase: str) -> list[Task]:
    if phase == "signatures":
        layout = write_layout(recipe, run)
        return [_task(recipe, layout, f"signatures/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g)
                for g in range(len(layout.groups))]
    layout = read_layout(run)
    if phase == "buckets":
        return [_task(recipe, layout, f"buckets/p{p:05d}", phase=phase, part=p) for p in range(layout.nb)]
    if phase == "gather":
        return [_task(recipe, layout, f"gather/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g)
                for g in range(len(layout.groups))]
    if phase == "verify":
        return [_task(recipe, layout, f"verify/p{p:05d}", phase=phase, part=p) for p in range(layout.nv)]
    if phase.startswith("components-"):
        r = int(phase.split("-")[1])
        return [_task(recipe, layout, f"{phase}/p{p:05d}", phase="components", round=r, part=p)
                for p in range(layout.ne)]
    if phase == "removal":
        final = final_round(run, layout)
        return [_task(recipe, layout, f"removal/g{g:06d}", _group_text_bytes(layout, g), phase=phase, group=g,
                      round=final) for g in range(len(layout.groups))]
    raise ValueError(f"dedup: unknown phase {phase!r}")


class DedupStage(Stage):
    name = STAGE

    def phases(self, recipe: Recipe, run: RunDir) -> Iterator[str]:
        return _phases(recipe, run)

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None) -> list[Task]:
        return _plan(recipe, run, phase)

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        fn = {"signatures": signatures_task, "buckets": buckets_task, "gather": gather_task, "verify": verify_task,
              "components": components_task, "removal": removal_task}[task.payload["phase"]]
        return fn(task, recipe, run, read_layout(run))


stage = DedupStage()
