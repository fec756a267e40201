"""Mix: source weights and a token budget -> `RUN/mixture.json`, the plan the trainer's loader follows.

Per source (recipe order): `available_tokens` = its train tokens in manifest.json;
`samples_per_epoch = (available_tokens - 1) // seq_len` (a sample is seq_len + 1 consecutive tokens
of the source's train stream, sample j starting at token j * seq_len); the normalized weight
(explicit `sources[].weight`, or proportional to available tokens); then

- `total_samples = ceil(token_budget / seq_len)`; with `token_budget: null`, the largest total for
  which no source repeats: `max T with round(w_s * T) <= samples_per_epoch_s` for every source
  (one epoch of the limiting source), and `token_budget` is recorded as `T * seq_len`;
- `samples_s` by largest remainder over `w_s * total_samples` (ties: recipe order), so the
  samples sum to the total exactly; `epochs_s = samples_s / samples_per_epoch_s`.

A source that would repeat more than `mix.max_epochs` times gives a warning (logged and kept in
mixture.json). An impossible plan (a source with no train tokens or fewer than seq_len + 1, a
missing weight, a manifest tokenized with another tokenizer than the recipe's) stops the stage
with a message that says what to change. The planning is done when the stage is planned, so a
bad plan fails at once; the single task writes the file.
"""

from __future__ import annotations

import hashlib
import logging
import math

from .formats import FormatError
from .formats.manifest import (
    Manifest,
    Mixture,
    MixtureSource,
    manifest_fingerprint,
    parse_mixture,
    read_manifest,
    samples_per_epoch,
    write_mixture,
)
from .layout import RunDir
from .recipe import Recipe
from .stage import Stage, StageFailed, Task, TaskResult, fingerprint

STAGE = "mix"
log = logging.getLogger("tinyprep")


class MixError(StageFailed):
    """The mixture cannot be planned; the message says why and what to change."""


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integers proportional to weights that sum to total exactly (ties go to the earlier entry)."""
    quotas = [w * total for w in weights]
    base = [math.floor(q) for q in quotas]
    rest = total - sum(base)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - base[i]), i))
    for i in order[:max(rest, 0)]:
        base[i] += 1
    return base


def load_run_manifest(run: RunDir) -> tuple[Manifest, bytes]:
    """RUN/manifest.json and its bytes; a missing or invalid one stops the stage (MixError)."""
    try:
        return read_manifest(run)
    except FormatError as e:
        raise MixError(str(e)) from None


def check_tokenizer(recipe: Recipe, run: RunDir, manifest: Manifest) -> None:
    """manifest.json must come from the recipe's tokenizer (same model file bytes)."""
    from .tokenize.tokenizer import (
        TokenizerMismatch,
        check_manifest_tokenizer,
        tokenizer_url,
    )

    try:
        check_manifest_tokenizer(tokenizer_url(recipe, run), run, manifest, role="recipe's tokenizer",
                                 hint="; rerun the tokenize stage (or set tokenizer.model to the model it used)")
    except (StageFailed, TokenizerMismatch) as e:
        raise MixError(str(e)) from None


def plan_mixture(recipe: Recipe, manifest: Manifest, manifest_bytes: bytes) -> Mixture:
    """The mixture for the recipe's sources, weights and budget over the manifest's train shards."""
    cfg = recipe.mix
    seq_len = cfg.seq_len
    names = [s.name for s in recipe.sources]
    available, spe = [], []
    for s in recipe.sources:
        tokens = manifest.sources.get(s.name, {}).get("train", {}).get("tokens", 0)
        n = samples_per_epoch(tokens, seq_len)
        if n == 0:
            raise MixError(f"mix: source {s.name!r} has {tokens:,} train tokens, fewer than one sample of "
                           f"seq_len + 1 = {seq_len + 1:,}; drop it from the recipe or lower mix.seq_len")
        available.append(tokens)
        spe.append(n)
    if cfg.weights == "explicit":
        missing = [f"sources[{i}].weight" for i, s in enumerate(recipe.sources) if s.weight is None]
        if missing:
            raise MixError(f"mix.weights is 'explicit' but {', '.join(missing)} is not set "
                           f"(set the weights, or mix.weights: proportional)")
        raw = [float(s.weight) for s in recipe.sources]
    else:
        raw = [float(t) for t in available]
    weights = [w / sum(raw) for w in raw]
    if cfg.token_budget is not None:
        total = -(-cfg.token_budget // seq_len)
        budget = cfg.token_budget
    else:
        # start just above the float estimate; the exact allocation decides
        total = int(min(n / w for n, w in zip(spe, weights))) + len(spe)
        while total > 0 and any(k > n for k, n in zip(largest_remainder(weights, total), spe)):
            total -= 1
        budget = total * seq_len
    if total <= 0:
        raise MixError("mix: the plan has no sample")
    samples = largest_remainder(weights, total)
    warnings = []
    sources = []
    for name, w, tokens, n, k in zip(names, weights, available, spe, samples):
        epochs = k / n
        if epochs > cfg.max_epochs:
            warnings.append(f"source {name}: {epochs:.2f} epochs ({k:,} samples of {n:,} per epoch), more than "
                            f"mix.max_epochs = {cfg.max_epochs:g}")
        sources.append(MixtureSource(name=name, weight=w, available_tokens=tokens, samples_per_epoch=n, samples=k,
                                     epochs=epochs, tokens=k * seq_len,
                                     shards=[e.path for e in manifest.shards_of(name, "train")]))
    weight_map = {s.name: s.weight for s in sources}
    return Mixture(seq_len=seq_len, seed=cfg.seed, token_budget=budget, weights=cfg.weights,
                   manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                   fingerprint=manifest_fingerprint(manifest, weight_map, seq_len, cfg.seed),
                   sources=sources, total_samples=total, warnings=warnings)


class MixStage(Stage):
    name = STAGE

    def plan(self, recipe: Recipe, run: RunDir, phase: str | None = None) -> list[Task]:
        manifest, raw = load_run_manifest(run)
        check_tokenizer(recipe, run, manifest)
        mixture = plan_mixture(recipe, manifest, raw)
        for w in mixture.warnings:
            log.warning("mix: %s", w)
        for s in mixture.sources:
            log.info("mix: %s: weight %.6f, %s samples (%.4f of the total), %.3f epochs of %s available tokens",
                     s.name, s.weight, f"{s.samples:,}", s.samples / mixture.total_samples, s.epochs,
                     f"{s.available_tokens:,}")
        doc = mixture.to_json()
        return [Task(STAGE, "mixture", "", fingerprint(STAGE, doc), payload={"mixture": doc})]

    def run_task(self, task: Task, recipe: Recipe, run: RunDir) -> TaskResult:
        mixture = parse_mixture(task.payload["mixture"])
        write_mixture(run, mixture)
        stats = {"sources": {s.name: {"samples": s.samples, "tokens": s.tokens, "available_tokens": s.available_tokens}
                             for s in mixture.sources},
                 "total_samples": mixture.total_samples, "warnings": len(mixture.warnings)}
        return TaskResult(outputs=[run.mixture], stats=stats)


stage = MixStage()
