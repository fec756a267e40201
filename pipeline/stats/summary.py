"""Everything a run directory knows about its data, merged into one versioned JSON document.

`collect(RUN)` reads what the stages left (any fsspec URL; nothing is written): the resolved
recipe, `RUN/stats/<stage>.json` (the runner's merged counts), `RUN/stats/<stage>.issues.jsonl`,
`RUN/stats/timeline.json`, `RUN/manifest.json`, `RUN/mixture.json` and the shards' `.idx` files
(document lengths; the `.bin` files are only sized). A stage, file or shard that is missing or
unreadable is listed under `missing` / `problems` and its numbers are null; the rest is still
reported, so a partial or failed run shows how far it got.

`tinyprep stats RUN --json` prints this document. Format "tinyprep-stats", version 1:

    format, version, run (the URL given)
    recipe      {name, stages, sources: [names]} of RUN/recipe.yaml, or null
    stages      {<stage>: {status: done | failed | incomplete | missing | not_in_recipe,
                 tasks, tasks_done, tasks_failed: [[task, why]], errors, records (incomplete only)}}
    missing     [str]  stages / files that a complete run would have
    problems    [str]  files that exist but cannot be used, counts that disagree
    sources     {<source>: NODE + {files, files_unreadable, download: {files, bytes},
                 shards: {train, validation}, lengths: {train, validation: LENGTHS},
                 mixture: MIXSOURCE, checks: [CHECK], subsets: {<subset>: NODE}}}
    totals      NODE summed over the sources (without subsets)
    mixture     {seq_len, seed, token_budget, total_samples, weights, fingerprint, warnings,
                 max_epochs (the recipe's mix.max_epochs)} or null
    dedup       {ran, clusters: [{min_size, max_size, clusters}], clusters_total}
    shards      [{path, source, split, docs, tokens, bin_bytes}]  manifest order
    issues      {<stage>: {count, by_kind: {kind: n}, examples: [first 20 {file, line, kind, message}]}}
    timeline    {runs: [RUN/stats/timeline.json entries], stages: {<stage>: last run + docs_per_s,
                 mb_per_s (null when tasks were skipped), mb_per_task_s}}
    reference   {slimpajama_dedup_bytes_rate: {<RedPajama set>: rate}}
    length_bins {scheme, bins_per_doubling, exact_below}

    NODE        docs:   {read, filtered: {reason: n}, filtered_total, unreadable: {reason: n},
                         unreadable_total, ingested, duplicate_exact, duplicate_fuzzy,
                         duplicate_holdout, kept, train, validation}
                bytes:  {read, ingested, duplicate_exact, duplicate_fuzzy, kept}   (UTF-8 text)
                tokens: {train, validation, total, estimated}
                dedup:  {docs_rate, bytes_rate, slimpajama_bytes_rate}
                accounting: {identity, kept_after, read, accounted, holds}
    LENGTHS     {count, sum, min, max, mean, quantiles: {p01, p10, p25, p50, p75, p90, p99},
                 histogram: {<bin lower edge, 10 digits>: n}}   tokens per document
    MIXSOURCE   {weight (target share), realized_share (samples / total_samples), natural_share
                 (share of the available train tokens), available_tokens, samples_per_epoch,
                 samples, epochs, tokens}
    CHECK       {check, ok, values}

Documents (per source and subset): `read = kept + filtered_total + unreadable_total +
duplicate_exact + duplicate_fuzzy + duplicate_holdout`, each term counted by the stage that
removed the documents (ingest, dedup, tokenize); a term of a stage that did not run is null and
left out, and `kept_after` names the last stage counted (`kept` = documents in the shards, train
+ validation, once tokenize ran). Subsets are counted through dedup (tokenize counts per source),
so a subset's `kept` is after dedup, its `duplicate_holdout` null and its tokens an estimate
(the source's tokens in proportion to the subset's kept text bytes, `estimated: true`).
`checks` compare what consecutive stages say about the same documents (dedup's input = ingest's
output, tokenize's dedup removals = dedup's duplicates, manifest = tokenize's counts, mixture =
manifest). Document lengths come from the shards' `.idx`, in a mergeable histogram
(pipeline/stats/histogram.py): equal for any number of workers, shards or merge order.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import yaml

from .. import storage
from ..formats import FormatError
from ..formats.manifest import load_manifest, load_mixture, shard_prefix
from ..formats.megatron import read_index
from ..layout import MANIFEST_NAME, MIXTURE_NAME, RunDir, as_run
from ..stage import STAGES
from .histogram import BINS_PER_DOUBLING, EXACT_BELOW, LengthStats

FORMAT = "tinyprep-stats"
VERSION = 1
SPLITS = ("train", "validation")
ISSUE_EXAMPLES = 20

# SlimPajama's bytes removed by its global dedup, per RedPajama set (Cerebras, SlimPajama README).
SLIMPAJAMA_DEDUP_BYTES_RATE = {
    "RedPajamaCommonCrawl": 0.638, "RedPajamaGithub": 0.462, "RedPajamaC4": 0.068,
    "RedPajamaWikipedia": 0.022, "RedPajamaBook": 0.020, "RedPajamaStackExchange": 0.002,
    "RedPajamaArXiv": 0.0006,
}
_PUBLISHED_BY_KEY = {k[len("RedPajama"):].lower(): v for k, v in SLIMPAJAMA_DEDUP_BYTES_RATE.items()}
_PUBLISHED_BY_KEY["books"] = _PUBLISHED_BY_KEY["book"]


class SummaryError(Exception):
    """The run directory cannot be summarized at all (it does not exist or holds nothing of a run)."""


def slimpajama_dedup_rate(subset: str) -> float | None:
    """SlimPajama's published bytes-removed rate for a RedPajama set name ("RedPajamaC4", "c4")."""
    key = subset.lower()
    key = key[len("redpajama"):] if key.startswith("redpajama") else key
    return _PUBLISHED_BY_KEY.get(key)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _total(*values: int | None) -> int | None:
    """Sum of the known values; None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 6) if a is not None and b else None


def _read_json(url: str, problems: list[str]) -> Any:
    try:
        return storage.read_json(url)
    except (orjson.JSONDecodeError, OSError) as e:
        problems.append(f"{url}: unreadable: {e}")
        return None


def _read_recipe(run: RunDir, missing: list[str], problems: list[str]) -> dict | None:
    """RUN/recipe.yaml as written by the runner (the resolved recipe), or None."""
    url = run.recipe
    try:
        data = yaml.safe_load(storage.read_bytes(url))
    except FileNotFoundError:
        missing.append("recipe.yaml: the resolved recipe (the run never started)")
        return None
    except (yaml.YAMLError, OSError) as e:
        problems.append(f"{url}: unreadable: {e}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{url}: not a recipe")
        return None
    return data


def _count_records(run: RunDir, stage: str) -> int:
    fs, root = storage.url_to_fs(run.tasks(stage))
    try:
        return sum(1 for p in fs.find(root) if p.endswith(".json"))
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# Stages


def _stages(run: RunDir, recipe: dict | None, missing: list[str], problems: list[str]) -> tuple[dict, dict]:
    """Status of every stage, and the merged stats of those that wrote them."""
    status: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    planned = recipe["stages"] if recipe else list(STAGES)
    for stage in STAGES:
        doc = _read_json(run.stage_stats(stage), problems)
        if doc is None:
            records = _count_records(run, stage)
            if records:
                status[stage] = {"status": "incomplete", "records": records}
                missing.append(f"stage {stage}: stopped before its end ({records} task(s) finished, "
                               f"no stats/{stage}.json)")
            elif stage in planned:
                status[stage] = {"status": "missing"}
                missing.append(f"stage {stage}: not run (no stats/{stage}.json)")
            else:
                status[stage] = {"status": "not_in_recipe"}
            continue
        failed = [list(f) for f in doc.get("tasks_failed", [])]
        done = doc.get("tasks_done", 0) == doc.get("tasks", 0) and not failed
        status[stage] = {"status": "done" if done else "failed", "tasks": doc.get("tasks", 0),
                         "tasks_done": doc.get("tasks_done", 0), "tasks_failed": failed,
                         "errors": doc.get("errors", 0)}
        if not done:
            problems.append(f"stage {stage}: {len(failed)} task(s) failed; its counts cover the "
                            f"{doc.get('tasks_done', 0)} of {doc.get('tasks', 0)} tasks that finished")
        stats[stage] = doc.get("stats") or {}
    return status, stats


def _issues(run: RunDir, stages: dict) -> dict:
    out = {}
    for stage, st in stages.items():
        if st["status"] in ("missing", "not_in_recipe"):
            continue
        try:
            raw = storage.read_bytes(run.stage_issues(stage))
        except FileNotFoundError:
            continue
        issues = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        if issues:
            kinds = Counter(i.get("kind", "?") for i in issues)
            out[stage] = {"count": len(issues), "by_kind": dict(sorted(kinds.items())),
                          "examples": issues[:ISSUE_EXAMPLES]}
    return out


def _timeline(run: RunDir, problems: list[str]) -> dict:
    runs = _read_json(run.timeline, problems) or []
    stages = {}
    for entry in runs:  # the last run of a stage describes it (a resumed run counts skipped tasks)
        e = dict(entry)
        wall, task_s = e.get("wall_s") or 0.0, e.get("task_seconds") or 0.0
        fresh = not e.get("skipped")
        e["docs_per_s"] = round(e.get("docs", 0) / wall, 1) if fresh and wall else None
        e["mb_per_s"] = round(e.get("bytes", 0) / 1e6 / wall, 3) if fresh and wall else None
        e["mb_per_task_s"] = round(e.get("bytes", 0) / 1e6 / task_s, 3) if task_s else None
        stages[e.get("stage", "?")] = e
    ordered = {s: stages[s] for s in STAGES if s in stages}
    ordered.update({s: v for s, v in stages.items() if s not in ordered})
    return {"runs": runs, "stages": ordered}


# ---------------------------------------------------------------------------------------------
# Shards


def _shard_lengths(run: RunDir, shard) -> tuple[LengthStats | None, str | None]:
    """A shard's document-length stats, or the reason they cannot be read / disagree with the manifest."""
    prefix = shard_prefix(run, shard)
    try:
        dtype, lengths, _ = read_index(prefix, pointers=False)
    except FormatError as e:
        return None, str(e)
    stats = LengthStats.of(lengths)
    if stats.count != shard.docs or stats.sum != shard.tokens:
        return stats, (f"{prefix}.idx: {stats.count} documents / {stats.sum} tokens, manifest.json says "
                       f"{shard.docs} / {shard.tokens}")
    size = storage.size(prefix + ".bin")
    if size != shard.tokens * dtype.itemsize:
        return stats, f"{prefix}.bin: {'missing' if size is None else f'{size} bytes'}, expected " \
                      f"{shard.tokens * dtype.itemsize}"
    return stats, None


def _lengths(run: RunDir, manifest, problems: list[str], threads: int) -> dict[tuple[str, str], LengthStats]:
    with ThreadPoolExecutor(max(1, threads)) as pool:  # many small reads: overlap their latency
        results = list(pool.map(lambda s: _shard_lengths(run, s), manifest.shards))
    out: dict[tuple[str, str], LengthStats] = {}
    for shard, (stats, problem) in zip(manifest.shards, results):
        if problem:
            problems.append(problem)
        if stats is not None:
            key = (shard.source, shard.split)
            out[key] = out.get(key, LengthStats()).merge(stats)
    return out


# ---------------------------------------------------------------------------------------------
# Per-source and per-subset nodes


def _node(ingest: dict | None, dedup: dict | None, tok: dict | None, tokens: dict | None) -> dict:
    """One source's or subset's counts from the stages that ran (None: that stage did not run)."""
    filtered = dict(sorted((ingest or {}).get("filtered", {}).items()))
    unreadable = dict(sorted((ingest or {}).get("unreadable", {}).items()))
    docs = {
        "read": ingest.get("read", 0) if ingest is not None else None,
        "filtered": filtered, "filtered_total": sum(filtered.values()) if ingest is not None else None,
        "unreadable": unreadable, "unreadable_total": sum(unreadable.values()) if ingest is not None else None,
        "ingested": ingest.get("kept", 0) if ingest is not None else None,
        "duplicate_exact": dedup.get("duplicate_exact", 0) if dedup is not None else None,
        "duplicate_fuzzy": dedup.get("duplicate_fuzzy", 0) if dedup is not None else None,
        "duplicate_holdout": tok.get("removed", {}).get("duplicate_holdout", 0) if tok is not None else None,
        "train": tok.get("train", {}).get("docs", 0) if tok is not None else None,
        "validation": tok.get("validation", {}).get("docs", 0) if tok is not None else None,
    }
    if tok is not None:
        kept, kept_after = docs["train"] + docs["validation"], "tokenize"
    elif dedup is not None:
        kept, kept_after = dedup.get("kept", 0), "dedup"
    else:
        kept, kept_after = docs["ingested"], "ingest" if ingest is not None else None
    docs["kept"] = kept
    nbytes = {
        "read": ingest.get("bytes_read", 0) if ingest is not None else None,
        "ingested": ingest.get("bytes_kept", 0) if ingest is not None else None,
        "duplicate_exact": dedup.get("bytes_duplicate_exact", 0) if dedup is not None else None,
        "duplicate_fuzzy": dedup.get("bytes_duplicate_fuzzy", 0) if dedup is not None else None,
    }
    nbytes["kept"] = dedup.get("bytes_kept", 0) if dedup is not None else nbytes["ingested"]
    dup_docs = _total(docs["duplicate_exact"], docs["duplicate_fuzzy"])
    dup_bytes = _total(nbytes["duplicate_exact"], nbytes["duplicate_fuzzy"])
    node = {
        "docs": docs, "bytes": nbytes,
        "tokens": tokens or {"train": None, "validation": None, "total": None, "estimated": False},
        "dedup": {"docs_rate": _ratio(dup_docs, dedup.get("docs")) if dedup is not None else None,
                  "bytes_rate": _ratio(dup_bytes, dedup.get("bytes")) if dedup is not None else None,
                  "slimpajama_bytes_rate": None},
    }
    node["accounting"] = _accounting(docs, kept_after)
    return node


def _accounting(docs: dict, kept_after: str | None) -> dict:
    terms = ["kept", "filtered_total", "unreadable_total", "duplicate_exact", "duplicate_fuzzy", "duplicate_holdout"]
    used = [t for t in terms if docs.get(t) is not None]
    accounted = sum(docs[t] for t in used) if used else None
    return {"identity": "read = " + " + ".join(used) if used else None, "kept_after": kept_after,
            "read": docs["read"], "accounted": accounted,
            "holds": docs["read"] is not None and accounted == docs["read"]}


def _check(checks: list[dict], text: str, a: Any, b: Any) -> None:
    if a is not None and b is not None:
        checks.append({"check": text, "ok": a == b, "values": [a, b]})


def _source(name: str, stats: dict, manifest, mix_source, mixture_total: int | None,
            available_total: int | None, lengths: dict | None, shard_counts: dict) -> dict:
    ingest = stats.get("ingest", {}).get("sources", {}).get(name) if "ingest" in stats else None
    dedup = stats.get("dedup", {}).get("sources", {}).get(name) if "dedup" in stats else None
    tok = stats.get("tokenize", {}).get("sources", {}).get(name) if "tokenize" in stats else None
    if "dedup" in stats and dedup is None and ingest is not None:
        dedup = {}  # dedup ran and saw no document of this source
    if "tokenize" in stats and tok is None and ingest is not None:
        tok = {}
    tokens = None
    if manifest is not None and name in manifest.sources:
        t = manifest.sources[name]
        tokens = {"train": t["train"]["tokens"], "validation": t["validation"]["tokens"],
                  "total": t["train"]["tokens"] + t["validation"]["tokens"], "estimated": False}
    elif tok is not None:
        tr, va = tok.get("train", {}).get("tokens", 0), tok.get("validation", {}).get("tokens", 0)
        tokens = {"train": tr, "validation": va, "total": tr + va, "estimated": False}
    node = _node(ingest, dedup, tok, tokens)
    node["files"] = ingest.get("files") if ingest is not None else None
    node["files_unreadable"] = ingest.get("files_unreadable") if ingest is not None else None
    dl = stats.get("download", {}).get("sources", {}).get(name)
    node["download"] = {"files": dl.get("files", 0), "bytes": dl.get("bytes", 0)} if dl else None
    node["shards"] = shard_counts.get(name)
    node["lengths"] = ({sp: (lengths[(name, sp)].to_json() if (name, sp) in lengths else None) for sp in SPLITS}
                       if lengths is not None else None)
    node["mixture"] = None
    if mix_source is not None:
        node["mixture"] = {
            "weight": mix_source.weight, "realized_share": _ratio(mix_source.samples, mixture_total),
            "natural_share": _ratio(mix_source.available_tokens, available_total),
            "available_tokens": mix_source.available_tokens, "samples_per_epoch": mix_source.samples_per_epoch,
            "samples": mix_source.samples, "epochs": round(mix_source.epochs, 6), "tokens": mix_source.tokens}

    checks: list[dict] = []
    d = node["docs"]
    if dedup is not None and ingest is not None:
        _check(checks, "dedup input = ingest kept", dedup.get("docs", 0), ingest.get("kept", 0))
        _check(checks, "dedup input bytes = ingest kept bytes", dedup.get("bytes", 0), ingest.get("bytes_kept", 0))
    if tok is not None and ingest is not None:
        _check(checks, "tokenize input = ingest kept", tok.get("read", 0), ingest.get("kept", 0))
        _check(checks, "tokenize dedup removals = dedup duplicates",
               tok.get("removed", {}).get("dedup", 0), _total(d["duplicate_exact"], d["duplicate_fuzzy"]) or 0)
    if manifest is not None and tok is not None and name in manifest.sources:
        for sp in SPLITS:
            _check(checks, f"manifest {sp} docs = tokenize {sp} docs",
                   manifest.sources[name][sp]["docs"], tok.get(sp, {}).get("docs", 0))
            _check(checks, f"manifest {sp} tokens = tokenize {sp} tokens",
                   manifest.sources[name][sp]["tokens"], tok.get(sp, {}).get("tokens", 0))
    if lengths is not None and manifest is not None and name in manifest.sources:
        for sp in SPLITS:
            ls = lengths.get((name, sp), LengthStats())
            _check(checks, f"shard index {sp} docs = manifest", ls.count, manifest.sources[name][sp]["docs"])
    if mix_source is not None and manifest is not None and name in manifest.sources:
        _check(checks, "mixture available tokens = manifest train tokens", mix_source.available_tokens,
               manifest.sources[name]["train"]["tokens"])
    node["checks"] = checks
    node["accounting"]["holds"] = node["accounting"]["holds"] and all(c["ok"] for c in checks)

    subsets = {}
    names = sorted(set((ingest or {}).get("subsets", {})) | set((dedup or {}).get("subsets", {})))
    for sub in names:
        s_ing = (ingest or {}).get("subsets", {}).get(sub) if ingest is not None else None
        s_dd = (dedup or {}).get("subsets", {}).get(sub, {}) if dedup is not None else None
        sn = _node(s_ing, s_dd, None, None)
        # tokens are counted per source: share them out by the subset's kept text bytes
        if tokens is not None and node["bytes"]["kept"] and sn["bytes"]["kept"] is not None:
            share = sn["bytes"]["kept"] / node["bytes"]["kept"]
            sn["tokens"] = {"train": round(tokens["train"] * share), "validation": round(tokens["validation"] * share),
                            "total": round(tokens["total"] * share), "estimated": True}
        sn["dedup"]["slimpajama_bytes_rate"] = slimpajama_dedup_rate(sub)
        subsets[sub] = sn
    node["subsets"] = subsets
    return node


def _totals(sources: dict) -> dict:
    def add(a, b):
        if isinstance(a, dict):
            return {k: add(a.get(k), b.get(k)) for k in a} if isinstance(b, dict) else a
        if isinstance(a, bool) or isinstance(b, bool):
            return bool(a) or bool(b)
        return _total(a, b)

    keys = ("docs", "bytes", "tokens")
    nodes = list(sources.values())
    if not nodes:
        return {}
    out = {k: nodes[0][k] for k in keys}
    for n in nodes[1:]:
        out = {k: add(out[k], n[k]) for k in keys}
    for part in ("filtered", "unreadable"):
        merged: Counter = Counter()
        for n in nodes:
            merged.update(n["docs"][part])
        out["docs"][part] = dict(sorted(merged.items()))
    ran = out["docs"]["duplicate_exact"] is not None
    removed_docs = _total(out["docs"]["duplicate_exact"], out["docs"]["duplicate_fuzzy"])
    removed_bytes = _total(out["bytes"]["duplicate_exact"], out["bytes"]["duplicate_fuzzy"])
    out["dedup"] = {"docs_rate": _ratio(removed_docs, out["docs"]["ingested"]) if ran else None,
                    "bytes_rate": _ratio(removed_bytes, out["bytes"]["ingested"]) if ran else None,
                    "slimpajama_bytes_rate": None}
    out["accounting"] = {"holds": all(n["accounting"]["holds"] for n in nodes),
                         "read": out["docs"]["read"], "kept": out["docs"]["kept"]}
    return out


def _clusters(dedup_stats: dict | None) -> dict:
    """Dedup's cluster-size histogram: power-of-two bins keyed by their lower edge (dedup.cluster_bucket)."""
    if dedup_stats is None:
        return {"ran": False, "clusters": [], "clusters_total": None}
    rows = [{"min_size": int(key), "max_size": 2 * int(key) - 1, "clusters": n}
            for key, n in sorted(dedup_stats.get("clusters", {}).items(), key=lambda kv: int(kv[0]))]
    return {"ran": True, "clusters": rows, "clusters_total": sum(r["clusters"] for r in rows)}


# ---------------------------------------------------------------------------------------------
# The document


def _plan_files(run: RunDir, stages: dict, missing: list[str], problems: list[str]):
    """(manifest, mixture) of the run, each None when missing (listed if the recipe has its stage)
    or unusable (listed under problems, as is a mixture that disagrees with the manifest)."""
    manifest = mixture = None
    if storage.exists(run.manifest):
        try:
            manifest = load_manifest(run)
        except FormatError as e:
            problems.append(str(e))
    elif stages["tokenize"]["status"] != "not_in_recipe":
        missing.append(f"{MANIFEST_NAME}: the shards' manifest (written when tokenize finishes)")
    if storage.exists(run.mixture):
        try:
            mixture = load_mixture(run, check_manifest=False)
        except FormatError as e:
            problems.append(str(e))
        if mixture is not None and manifest is not None:
            try:
                load_mixture(run, check_manifest=True)
            except FormatError as e:
                problems.append(str(e))
    elif stages["mix"]["status"] != "not_in_recipe":
        missing.append(f"{MIXTURE_NAME}: the mixture plan (written by the mix stage)")
    return manifest, mixture


def _source_names(recipe: dict | None, stats: dict, manifest, mix_sources: dict) -> list[str]:
    """The recipe's sources in order, then any other source a stage, the manifest or the mixture names."""
    names: list[str] = list(recipe["sources"]) if recipe else []
    for stage in ("download", "ingest", "dedup", "tokenize"):
        names += sorted(set(stats.get(stage, {}).get("sources", {})) - set(names))
    if manifest is not None:
        names += sorted(set(manifest.sources) - set(names))
    names += [n for n in mix_sources if n not in names]
    return names


def _source_problems(sources: dict, problems: list[str]) -> None:
    """A failed check of a source is a problem; so is an accounting that does not hold without one."""
    for n, node in sources.items():
        for c in node["checks"]:
            if not c["ok"]:
                problems.append(f"source {n}: {c['check']}: {c['values'][0]} != {c['values'][1]}")
        if node["docs"]["read"] is not None and not node["accounting"]["holds"] and not any(
                not c["ok"] for c in node["checks"]):
            problems.append(f"source {n}: read {node['docs']['read']} != accounted {node['accounting']['accounted']}")


def collect(run: RunDir | str, lengths: bool = True, threads: int = 16) -> dict:
    """The stats document of a run directory (see the module docstring); reads, never writes.

    `lengths=False` skips the shard indexes (document lengths and the per-shard checks).
    """
    run = as_run(run)
    fs, root = storage.url_to_fs(run.url)
    if not fs.isdir(root):
        raise SummaryError(f"{run}: no such run directory")
    missing: list[str] = []
    problems: list[str] = []
    data = _read_recipe(run, missing, problems)
    recipe = None if data is None else {
        "name": data.get("name"), "stages": list(data.get("stages") or []),
        "sources": [s.get("name") for s in data.get("sources") or [] if isinstance(s, dict)]}
    mix_cfg = (data or {}).get("mix")
    max_epochs = mix_cfg.get("max_epochs") if isinstance(mix_cfg, dict) else None
    stages, stats = _stages(run, recipe, missing, problems)
    if recipe is None and not stats:
        raise SummaryError(f"{run}: not a run directory (no recipe.yaml and no stats/)")

    manifest, mixture = _plan_files(run, stages, missing, problems)
    shard_lengths = _lengths(run, manifest, problems, threads) if (lengths and manifest is not None) else None
    shard_counts: dict[str, dict[str, int]] = {}
    if manifest is not None:
        for name, per in manifest.sources.items():
            shard_counts[name] = {sp: per[sp]["shards"] for sp in SPLITS}

    mix_sources = {s.name: s for s in mixture.sources} if mixture is not None else {}
    available_total = sum(s.available_tokens for s in mix_sources.values()) if mix_sources else None
    sources = {n: _source(n, stats, manifest, mix_sources.get(n), mixture.total_samples if mixture else None,
                          available_total, shard_lengths, shard_counts)
               for n in _source_names(recipe, stats, manifest, mix_sources)}
    _source_problems(sources, problems)

    return {
        "format": FORMAT, "version": VERSION, "run": run.url, "recipe": recipe,
        "stages": stages, "missing": missing, "problems": problems,
        "sources": sources, "totals": _totals(sources),
        "mixture": None if mixture is None else {
            "seq_len": mixture.seq_len, "seed": mixture.seed, "token_budget": mixture.token_budget,
            "total_samples": mixture.total_samples, "weights": mixture.weights,
            "fingerprint": mixture.fingerprint, "warnings": list(mixture.warnings),
            "max_epochs": max_epochs},
        "dedup": _clusters(stats.get("dedup")),
        "shards": [] if manifest is None else [
            {"path": s.path, "source": s.source, "split": s.split, "docs": s.docs, "tokens": s.tokens,
             "bin_bytes": s.bin_bytes} for s in manifest.shards],
        "issues": _issues(run, stages),
        "timeline": _timeline(run, problems),
        "reference": {"slimpajama_dedup_bytes_rate": dict(SLIMPAJAMA_DEDUP_BYTES_RATE)},
        "length_bins": {"scheme": "integers below exact_below, then bins_per_doubling log-spaced bins "
                                  "[ceil(2**(k/bins_per_doubling)), ...)",
                        "bins_per_doubling": BINS_PER_DOUBLING, "exact_below": EXACT_BELOW},
    }


def dumps(summary: dict) -> bytes:
    """The JSON bytes of a summary: sorted keys, 2-space indent (equal documents, equal bytes)."""
    return orjson.dumps(summary, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def deterministic_part(summary: dict) -> dict:
    """The summary without what depends on where and when the run ran (its URL and timings)."""
    return {k: v for k, v in summary.items() if k not in ("run", "timeline")}


__all__ = ["collect", "dumps", "deterministic_part", "slimpajama_dedup_rate", "SummaryError",
           "FORMAT", "VERSION", "SLIMPAJAMA_DEDUP_BYTES_RATE"]
