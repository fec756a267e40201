"""Global exact and fuzzy (MinHash LSH) deduplication across all sources, on Ray.

The stage module the runner imports (`next_phase`, `plan`, `run_task`), and the contract with the
tokenize stage: `removed_ids(run_url, source, docs_rel)`. See `stage.py` for the phases.
"""

from .stage import cluster_bucket, next_phase, plan, read_layout, removed_ids, removed_url, run_task

__all__ = ["next_phase", "plan", "run_task", "removed_ids", "removed_url", "read_layout", "cluster_bucket"]
