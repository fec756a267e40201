"""Global exact and fuzzy (MinHash LSH) deduplication across all sources.

The stage (`stage`, see `stage.py` for the phases; `layout.py` for the files of RUN/dedup/) and
its contract with the tokenize stage: `removed_ids(run, source, docs_rel)`.
"""

from .layout import read_layout, removed_ids, removed_url
from .removal import cluster_bucket
from .stage import stage

__all__ = ["stage", "removed_ids", "removed_url", "read_layout", "cluster_bucket"]
