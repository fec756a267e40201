"""What `tinyprep train` checks before any rank starts: the recipe against the plan, the shards on disk.

- The recipe's mixture settings (sources, `mix.weights` / `sources[].weight`, `mix.seq_len`,
  `mix.seed`, `mix.token_budget`) must be the ones RUN/mixture.json was planned with: the trainer
  follows mixture.json, so a recipe edited since the mix stage would otherwise train on the old
  plan without a word. The recipe's plan is recomputed with the mix stage's own planner (no I/O).
- Every shard the trainer may read is on disk as manifest.json describes it: the `.bin` exists with
  `bin_bytes` bytes (one stat), the `.idx` exists and its header has the manifest's dtype and
  document count and its size is the one that header implies (an open, a stat, a 34-byte read).
  A few system calls per shard: 0.2-0.3 s for a plan of 8,082 shards (3T tokens) on a local disk.
  Not checked here: the shards' sha256 (a full read of every `.bin`, 6 TB of uint16 at 3T tokens,
  and of every `.idx`, 20 bytes a document, about 60 GB: `tinyprep verify` does it), and what the
  `.bin` holds: the loader checks every batch's token ids as it reads them (loader.first_bad_row).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .. import storage
from ..formats import FormatError
from ..formats.manifest import Manifest, Mixture, ShardEntry, shard_prefix
from ..formats.megatron import read_header
from ..layout import as_run
from ..mix import MixError, plan_mixture
from ..recipe import Recipe

RERUN_MIX = "rerun the mix stage: tinyprep run RECIPE --stages mix"


def recipe_changes(recipe: Recipe, manifest: Manifest, mixture: Mixture) -> list[str]:
    """What differs between the recipe's mixture settings and the ones mixture.json was planned
    with, one phrase per setting ("mix.seq_len 64 in the recipe, 32 in mixture.json")."""
    cfg = recipe.mix
    changes = []
    names = [s.name for s in recipe.sources]
    planned = [s.name for s in mixture.sources]
    if names != planned:
        changes.append(f"sources {names} in the recipe, {planned} in mixture.json")
    for key, mine, theirs in (("mix.seq_len", cfg.seq_len, mixture.seq_len), ("mix.seed", cfg.seed, mixture.seed),
                              ("mix.weights", cfg.weights, mixture.weights)):
        if mine != theirs:
            changes.append(f"{key} {mine} in the recipe, {theirs} in mixture.json")
    if changes:
        return changes
    try:
        plan = plan_mixture(recipe, manifest, b"")
    except MixError as e:  # the recipe's own plan is impossible: that is a change too
        return [f"the recipe's mix settings plan no mixture ({e})"]
    for i, (mine, theirs) in enumerate(zip(plan.sources, mixture.sources)):
        if not math.isclose(mine.weight, theirs.weight, rel_tol=1e-9, abs_tol=1e-12):
            changes.append(f"sources[{i}].weight ({mine.name}) {mine.weight:.6g} in the recipe (normalized), "
                           f"{theirs.weight:.6g} in mixture.json")
    if plan.token_budget != mixture.token_budget:
        mine = f"{cfg.token_budget:,}" if cfg.token_budget is not None else f"null (one epoch: {plan.token_budget:,})"
        changes.append(f"mix.token_budget {mine} in the recipe, {mixture.token_budget:,} in mixture.json")
    return changes


def check_recipe(recipe: Recipe, manifest: Manifest, mixture: Mixture) -> None:
    """FormatError naming every mixture setting the recipe changed since the mix stage ran."""
    changes = recipe_changes(recipe, manifest, mixture)
    if changes:
        raise FormatError(f"{as_run(recipe.output).mixture}: planned with other mix settings than the recipe's: "
                          f"{'; '.join(changes)}; {RERUN_MIX}")


def shards_to_read(manifest: Manifest, mixture: Mixture, validation: bool) -> list[ShardEntry]:
    """The manifest entries of the mixture's train shards, and of its sources' validation shards
    when `validation` (the holdout is read)."""
    by_path = {e.path: e for e in manifest.shards}
    names = {s.name for s in mixture.sources}
    out = [by_path[p] for s in mixture.sources for p in s.shards]
    if validation:
        out += [e for e in manifest.shards if e.split == "validation" and e.source in names]
    return out


def check_shard(run_url: str, entry: ShardEntry) -> None:
    """FormatError naming the file unless the shard's .bin and .idx are the ones manifest.json
    describes (sizes, the .idx header's dtype and document count)."""
    prefix = storage.url_to_fs(shard_prefix(run_url, entry))[1]
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    try:
        size = os.stat(bin_path).st_size
    except FileNotFoundError:
        raise FormatError(f"{bin_path}: missing (manifest.json lists it; restore it or rerun the tokenize "
                          "stage)") from None
    if size != entry.bin_bytes:
        raise FormatError(f"{bin_path}: {size:,} bytes, manifest.json says {entry.bin_bytes:,} (truncated or "
                          "replaced since the tokenize stage)")
    try:
        with open(idx_path, "rb") as fh:
            # FormatError for a short header, a bad magic or dtype code, a size the counts disagree with
            dtype, n, _ = read_header(fh, os.fstat(fh.fileno()).st_size, idx_path)
    except FileNotFoundError:
        raise FormatError(f"{idx_path}: missing (manifest.json lists it; restore it or rerun the tokenize "
                          "stage)") from None
    if dtype != np.dtype(entry.dtype) or n != entry.docs:
        raise FormatError(f"{idx_path}: indexes {n:,} documents of {dtype}, manifest.json says {entry.docs:,} of "
                          f"{entry.dtype} (replaced since the tokenize stage)")


def check_shards(run_url: str, entries: list[ShardEntry]) -> None:
    """check_shard for every entry (the first problem found stops)."""
    fs, _ = storage.url_to_fs(run_url)
    if not storage.is_local(fs):
        raise FormatError(f"{run_url}: the trainer reads shards from a local (or mounted) run directory; "
                          "copy or mount it first")
    for entry in entries:
        check_shard(run_url, entry)
