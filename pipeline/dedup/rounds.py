"""The components-NN phases: one large-star / small-star round of connected components per phase
(the algorithm is components.py), and the round summaries that say whether a round converged."""

from __future__ import annotations

import numpy as np

from .. import storage
from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from . import components as cc
from .layout import (
    EDGE_SCHEMA,
    FINAL_SCHEMA,
    Layout,
    bucket_url,
    round_url,
    verify_url,
    verifying,
)
from .shuffle import node_file, node_partition, read_partition, u64, write_partitioned


def round_violations(run: RunDir, layout: Layout, r: int) -> int:
    return sum(storage.read_json(round_url(run, r, p, "json"))["violations"] for p in range(layout.ne))


def final_round(run: RunDir, layout: Layout) -> int:
    r = 1
    while round_violations(run, layout, r):
        r += 1
    return r


def _round_inputs(recipe: Recipe, run: RunDir, layout: Layout, r: int) -> list[str]:
    if r > 1:
        return [round_url(run, r - 1, q, "arrow") for q in range(layout.ne)]
    if verifying(recipe):
        return [verify_url(run, q) for q in range(layout.nv)]
    return [bucket_url(run, q, "edges") for q in range(layout.nb)]


def components_task(task: Task, recipe: Recipe, run: RunDir, layout: Layout) -> TaskResult:
    r, p = task.payload["round"], task.payload["part"]
    t = read_partition(_round_inputs(recipe, run, layout, r), p, EDGE_SCHEMA)
    nb = cc.Neighbourhoods(*(u64(t, c) for c in ("ahi", "alo", "bhi", "blo")))
    del t
    violations, leaves, centres = nb.check()
    ngroups = max(len(layout.groups), 1)
    # leaf -> centre, and centres with their component's size; valid once a round has no violation
    fhi = np.concatenate([leaves[0], centres[0]])
    flo = np.concatenate([leaves[1], centres[1]])
    shi = np.concatenate([leaves[2], centres[0]])
    slo = np.concatenate([leaves[3], centres[1]])
    size = np.concatenate([np.zeros(len(leaves[0]), np.uint64), centres[2]])
    final_url = round_url(run, r, p, "final.arrow")
    write_partitioned(final_url, {"hi": fhi, "lo": flo, "shi": shi, "slo": slo, "size": size},
                      layout.group_of(node_file(flo)), ngroups, FINAL_SCHEMA)
    # (a partition whose input is already stars still runs the round: the reverse halves of its
    # edges live in other partitions, and only the round as a whole keeps both)
    ahi, alo, bhi, blo = nb.large_star() if r % 2 == 1 else nb.small_star()
    url = round_url(run, r, p, "arrow")
    write_partitioned(url, {"ahi": ahi, "alo": alo, "bhi": bhi, "blo": blo},
                      node_partition(ahi, alo, layout.ne), layout.ne, EDGE_SCHEMA)
    summary_url = round_url(run, r, p, "json")
    storage.write_json(summary_url, {"round": r, "part": p, "edges_in": len(nb), "edges_out": int(len(ahi)),
                                     "violations": violations})
    return TaskResult(outputs=[final_url, url, summary_url])
