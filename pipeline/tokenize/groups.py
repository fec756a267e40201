"""The group phase: the holdout index, and each source's docs files cut into encode groups.

One task merges the holdout digests into the holdout index and cuts each source's files, in
sorted order, into groups of about `GROUP_FILL * shard_mb` of tokens (`RUN/tokenize/groups.json`),
estimating each source's text bytes per token by encoding its first ESTIMATE_SAMPLE_BYTES of
documents. Groups are cut by text bytes, so they depend on the documents and the recipe only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import storage
from ..layout import RunDir
from ..recipe import Recipe
from ..stage import Task, TaskResult
from .docs import iter_batches
from .holdout import read_holdout, write_index
from .packer import worker_encoder
from .tokenizer import load_checked

GROUPS = "groups.json"  # under RUN/tokenize/
GROUP_FILL = 0.9  # groups aim at 90% of shard_mb of estimated tokens: most become one shard, few a tail
ESTIMATE_SAMPLE_BYTES = 1 << 18  # text per source encoded to estimate its bytes per token


def bytes_per_token(sp, urls: list[str], recipe: Recipe, sha256: str | None = None) -> float:
    """UTF-8 bytes per token of the source's first documents (ESTIMATE_SAMPLE_BYTES of text).

    With the tokenizer's sha256, through the worker's exact encoder (packer.py): the same
    counts, faster, and its segment cache is warm for the encode tasks the worker runs next."""
    texts: list[str] = []
    nbytes = 0
    for url in urls:
        for b in iter_batches(url, ["text"], 256):
            for t in b.column(0).to_pylist():
                texts.append(t)
                nbytes += len(t.encode("utf-8"))
                if nbytes >= ESTIMATE_SAMPLE_BYTES:
                    break
            if nbytes >= ESTIMATE_SAMPLE_BYTES:
                break
        if nbytes >= ESTIMATE_SAMPLE_BYTES:
            break
    encoder = worker_encoder(recipe, sp, sha256) if sha256 and texts else None
    if encoder is not None:
        extra = int(recipe.tokenize.bos) + int(recipe.tokenize.eos)
        tokens = len(encoder.encode_to_array(texts)[0]) + extra * len(texts)
    else:
        tokens = sum(map(len, sp.encode(texts, add_bos=recipe.tokenize.bos, add_eos=recipe.tokenize.eos,
                                        num_threads=recipe.tokenize.cpus_per_task))) if texts else 0
    return round(nbytes / tokens, 6) if tokens else 4.0


def cut_groups(items: list[tuple[str, int]], target: float) -> list[list[tuple[str, int]]]:
    """Consecutive items, a group closing once its bytes reach target (every group non-empty)."""
    groups: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    acc = 0
    for rel, nbytes in items:
        current.append((rel, nbytes))
        acc += nbytes
        if acc >= target:
            groups.append(current)
            current, acc = [], 0
    if current:
        groups.append(current)
    return groups


def run_group(task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
    inputs = task.payload["inputs"]
    with ThreadPoolExecutor(16) as pool:  # many small reads: overlap their latency
        results = list(pool.map(read_holdout, [inp["holdout"] for inp in inputs]))
    digests = np.unique(np.concatenate([r[0] for r in results])) if results else np.zeros(0, "S32")
    sp = load_checked(recipe, run, task.payload["tokenizer_sha256"])
    target_tokens = GROUP_FILL * recipe.tokenize.shard_mb * (1 << 20) / task.payload["itemsize"]
    first_files: dict[str, list[str]] = {}
    for inp in inputs:
        first_files.setdefault(inp["source"], []).append(inp["url"])
    sha256 = task.payload["tokenizer_sha256"]
    per_token = {s: bytes_per_token(sp, urls, recipe, sha256) for s, urls in sorted(first_files.items())}
    train: dict[str, list] = {}
    validation: dict[str, list] = {}
    for inp, (_, tb, vb) in zip(inputs, results):
        train.setdefault(inp["source"], []).append((inp["rel"], tb))
        if vb:
            validation.setdefault(inp["source"], []).append((inp["rel"], vb))
    groups = {
        "fingerprint": task.fingerprint,
        "text_bytes_per_token": per_token,
        "train": {s: cut_groups(items, target_tokens * per_token[s]) for s, items in sorted(train.items())},
        "validation": {s: cut_groups(items, target_tokens * per_token[s]) for s, items in sorted(validation.items())},
    }
    index_url = write_index(run, digests)
    groups_url = run.tokenize(GROUPS)
    storage.write_json(groups_url, groups)
    return TaskResult(outputs=[index_url, groups_url], stats={"holdout_texts": len(digests)})
