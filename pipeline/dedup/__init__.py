"""Global exact and fuzzy (MinHash LSH) deduplication across all sources.

The stage (`stage`, see `stage.py` for the phases) and its contract with the tokenize stage:
`removed_ids(run, source, docs_rel)`.
"""

from .stage import cluster_bucket, read_layout, removed_ids, removed_url, stage

__all__ = ["stage", "removed_ids", "removed_url", "read_layout", "cluster_bucket"]
