"""`tinyprep plan`: estimate a recipe's sizes, CPU time, wall time and disk before running it.

Lists the inputs (never writing into the run directory), ingests a sample of them into a temp
directory while timing CPU, then measures MinHash signatures and tokenization. Each figure that
is uncertain is a [low, high] range; every number that is assumed rather than measured is listed
in `assumptions`; the published sizes of a known dataset (SlimPajama-627B, Starcoderdata) and
TinyLlama's own figures are shown beside the estimate (`published.py`, with references).

Where ratios come from, in order: a sample of the source's own inputs; when those cannot be
read, the published figures of its dataset; else the bundled sample (synthetic: flagged).
Tokenizing rates are never taken from synthetic text (its words repeat, so the exact encoder's
cache hits far more often than on real data): with the recipe's tokenizer.model they are
measured here, on the sampled inputs or on real text of the same kind (`realtext.py`), from a
cold cache; without it they are the figures of tests/benchmarks/bench_plan_rates.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from .. import ingest, storage
from ..inputs import expand_source
from ..layout import RunDir
from ..recipe import Recipe, SourceConfig
from ..stage import Task
from .published import REFERENCES, TINYLLAMA, published_for
from .realtext import real_text

PARALLEL_EFFICIENCY = 0.96  # measured, 1 vs 2 workers (tests/benchmarks/README.md); the wall range's slow end
# Tokens per CPU-second, (plain SentencePiece, the exact encoder from a cold cache), on real text
# of this kind with a 32,000-piece Llama-2-style BPE: tests/benchmarks/bench_plan_rates.py, 2026-11-30.
TOKENIZE_RATES = {
    "prose": (1.05e6, 2.92e6, "bench_plan_rates.py, 2026-11-30: real prose, 97.4% cache hits cold"),
    "code": (1.06e6, 3.43e6, "bench_plan_rates.py, 2026-11-30: real code, 97.9% cache hits cold"),
}
# Llama-2 bytes per token, from published sizes (published.py): SlimPajama's 2.0-2.39 TB of text
# over its 690B Llama tokens [SP6, LLM]; Starcoderdata's 882 GB over 291B Llama tokens [SC, LLM].
BYTES_PER_TOKEN = {"prose": (2.9, 3.46, "SlimPajama's published text over its Llama tokens"),
                   "code": (3.03, 3.03, "Starcoderdata's published text over its Llama tokens")}
REAL_TEXT_MB = 4.0  # real text of a kind to measure a tokenizer on when the inputs are not readable
DOWNLOAD_MB_S_PER_NODE = 100.0
DEDUP_PHASE_FACTOR = 2.0  # signatures -> whole dedup stage (buckets, verify, components, apply)
LIST_TIMEOUT_S = 30.0
_CODE_NAME = re.compile(r"code|star|stack|github", re.I)


class PlanError(Exception):
    """The plan cannot be made; the message names the source."""


def _list_with_timeout(src: SourceConfig):
    box: dict = {}

    def work():
        try:
            box["files"] = expand_source(src)
        except BaseException as e:  # noqa: BLE001 - reported as the reason of the fallback
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(LIST_TIMEOUT_S)
    if t.is_alive():
        raise TimeoutError(f"listing took over {LIST_TIMEOUT_S:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["files"]


def _pick(files, limit_bytes: int):
    """Files spread over first-level directories (round robin) up to limit_bytes."""
    groups: dict[str, list] = {}
    for f in files:
        groups.setdefault(f.rel_path.split("/", 1)[0] if "/" in f.rel_path else "", []).append(f)
    queues = list(groups.values())
    out, total, i = [], 0, 0
    while any(queues) and (not out or total < limit_bytes):
        q = queues[i % len(queues)]
        if q:
            f = q.pop(0)
            out.append(f)
            total += max(f.size, 0)
        i += 1
    return out


def _sample_ingest(recipe: Recipe, src: SourceConfig, files, limit_bytes: int, tmp: str) -> dict:
    """Ingest the picked files (parquet: the first row group; jsonl: the first limit_bytes) into tmp."""
    run = RunDir(os.path.join(tmp, "run"))
    m = {"input_bytes": 0, "read": 0, "kept": 0, "bytes_kept": 0, "cpu_s": 0.0, "parquet_bytes": 0, "texts": []}
    budget = limit_bytes
    for f in files:
        if budget <= 0 and m["read"]:
            break
        fmt = ingest.detect_format(f.rel_path) if src.format == "auto" else src.format
        payload = {"url": f.url, "rel_path": f.rel_path, "format": fmt, "split": None}
        nbytes = max(f.size, 0)
        if fmt == "parquet":
            splits = ingest.parquet_splits(f.url, 1)
            if splits:
                start, end, first_row, rows, nbytes = splits[0]
                payload.update(split=[start, end], first_row=first_row, rows=rows)
        elif f.size < 0 or f.size > budget or not storage.is_local(storage.url_to_fs(f.url)[0]):
            part = os.path.join(tmp, "head", f.rel_path)
            os.makedirs(os.path.dirname(part), exist_ok=True)
            with storage.fsspec_open(f.url, "rb") as fh, open(part, "wb") as out:
                out.write(fh.read(max(budget, 1 << 20)))
            payload["url"], nbytes = part, os.path.getsize(part)
            payload["head"] = True  # a cut file: ingest uses its last, unverifiable frame as read
        task = Task(ingest.STAGE, f"{src.name}/{f.rel_path}", src.name, "plan", size=nbytes, payload=payload)
        t0 = time.process_time()
        res = ingest.stage.run_task(task, recipe, run)
        m["cpu_s"] += time.process_time() - t0
        c = res.stats["sources"][src.name]
        if c["read"] == 0 and c["files_unreadable"]:
            raise OSError(f"{f.url}: unreadable")
        m["input_bytes"] += nbytes
        m["read"] += c["read"]
        m["kept"] += c["kept"]
        m["bytes_kept"] += c["bytes_kept"]
        for out in res.outputs:
            m["parquet_bytes"] += os.path.getsize(out)
            m["texts"] += pq.read_table(out, columns=["text"]).column("text").to_pylist()
        budget -= nbytes
    if not m["read"]:
        raise OSError("no record read")
    return m


def _bundled_files(src: SourceConfig, tmp: str):
    """The bundled sample's files of the same format as the source (generated into tmp)."""
    from ..sample import generate_sample

    root = Path(tmp) / "bundled"
    if not root.exists():
        generate_sample(root)
    first = (src.urls or [""])[0]
    code = first.endswith(".parquet") or src.format == "parquet"
    pattern = str(root / ("starcoderdata/*/*.parquet" if code else "slimpajama/train/chunk*/*.jsonl.zst"))
    files = storage.expand_urls([pattern])
    if src.select.dirs is not None:
        files = [f for f in files if f.rel_path.split("/", 1)[0] in set(src.select.dirs)] or files
    return files, ("starcoderdata" if code else "slimpajama")


def _sample_recipe(recipe: Recipe, src: SourceConfig, bundled: bool) -> Recipe:
    """The recipe with the source read in place (and, for the bundled sample, its text field)."""
    upd: dict = {"download": False}
    if bundled:
        fields = {"slimpajama": ("text", ["meta.redpajama_set_name"]),
                  "starcoderdata": ("content", ["max_stars_repo_name"])}
        kind = "starcoderdata" if src.text_field == "content" or _CODE_NAME.search(src.name) else "slimpajama"
        upd["text_field"], upd["metadata"] = fields[kind]
        upd["select"] = src.select.model_copy(update={"dirs": None})
        upd["filters"] = []
    s = src.model_copy(update=upd)
    return recipe.model_copy(update={"sources": [s if x.name == src.name else x for x in recipe.sources]})


def _dedup_measure(recipe: Recipe, texts: list[str]) -> tuple[float, float, float]:
    """(signature CPU s, within-sample duplicate fraction of documents, of bytes)."""
    from ..dedup.minhash import MinHashParams, Shingler, Signer

    params = MinHashParams.from_config(recipe.dedup)
    shingler, signer = Shingler(params), Signer(params)
    t0 = time.process_time()
    keys_all = []
    for i in range(0, len(texts), 1024):
        batch = texts[i:i + 1024]
        norm = [params.normalized(t) for t in batch]
        h, d = shingler.hashes(norm)
        sig = signer.signatures(h, d, len(batch))
        keys_all.append(signer.band_keys(sig))
        for t in batch:
            hashlib.blake2b(t.encode(), digest_size=16).digest()
    cpu = time.process_time() - t0
    seen_exact, seen_band = set(), set()
    dup_docs = dup_bytes = 0
    row = 0
    for keys in keys_all:
        for k in keys:
            t = texts[row]
            e = hashlib.blake2b(params.normalized(t) if isinstance(params.normalized(t), bytes)
                                else params.normalized(t).encode(), digest_size=16).digest()
            ks = {(b, int(v)) for b, v in enumerate(k)} if recipe.dedup.fuzzy else set()
            is_dup = (recipe.dedup.exact and e in seen_exact) or bool(ks & seen_band)
            if is_dup:
                dup_docs += 1
                dup_bytes += len(t.encode())
            seen_exact.add(e)
            seen_band |= ks
            row += 1
    total_bytes = sum(len(t.encode()) for t in texts) or 1
    return cpu, dup_docs / max(len(texts), 1), dup_bytes / total_bytes


def _tokenizer_measure(recipe: Recipe, texts: list[str]) -> tuple[tuple[float, float], float] | None:
    """((plain SentencePiece, exact encoder from a cold cache) tokens per CPU second, bytes per
    token) on `texts` with the recipe's tokenizer.model, or None when it cannot be read."""
    model = recipe.tokenizer.model if recipe.tokenizer else None
    if not model or not texts or not storage.exists(model):
        return None
    from ..tokenize.encoder import Encoder

    data = storage.read_bytes(model)
    rates, ntok = [], 0
    for cache in (0, recipe.tokenize.cache_entries):  # 0: plain batches; then a new, empty cache
        enc = Encoder(data, cache_entries=cache)
        t0 = time.process_time()
        ntok = 0
        for i in range(0, len(texts), recipe.tokenize.batch_docs):
            ids, _ = enc.encode_to_array(texts[i:i + recipe.tokenize.batch_docs])
            ntok += len(ids)
        rates.append(ntok / max(time.process_time() - t0, 1e-6))
    return (min(rates), max(rates)), sum(len(t.encode()) for t in texts) / max(ntok, 1)


def _kind(src: SourceConfig) -> str:
    return "code" if src.text_field == "content" or _CODE_NAME.search(src.name) else "prose"


@dataclass(frozen=True)
class _Rates:
    """What the stage estimates need of a source beyond the numbers the plan reports (per core)."""

    ingest: float  # input bytes per CPU second
    dedup: float | None  # text bytes per CPU second for the whole dedup stage; None without dedup
    tokenize: tuple[float, float]  # tokens per CPU second (low, high)
    parquet_per_text: float  # bytes of docs parquet per byte of text
    task_input: float | None  # input bytes of one task (a file), when the file count is known


def make_plan(recipe: Recipe, nodes: int = 1, cpus: int | None = None, sample_mb: float = 8.0) -> dict:
    """The plan (see the module docstring): per source and per stage, each figure a value or a
    [low, high] range, the published figures beside, and every assumption spelled out."""
    cpus = cpus or os.cpu_count() or 1
    limit = int(sample_mb * (1 << 20))
    assumptions = [f"wall time: from core-hours / ({nodes} x {cpus} CPUs) (every task busy) up to core-hours / "
                   f"(CPUs x {PARALLEL_EFFICIENCY}) + the longest task; {PARALLEL_EFFICIENCY} is the efficiency "
                   "measured from 1 to 2 workers (tests/benchmarks/README.md), not at this scale"]
    sources: dict[str, dict] = {}
    rates: dict[str, _Rates] = {}
    with tempfile.TemporaryDirectory(prefix="tinyprep-plan-") as tmp:
        for src in recipe.sources:
            sources[src.name], rates[src.name] = _plan_source(recipe, src, limit, tmp, assumptions)
        if "dedup" not in recipe.stages:
            assumptions.append("dedup not in the recipe's stages: duplicate rate 0")
        else:
            assumptions.append(f"dedup CPU: the MinHash signature rate divided by {DEDUP_PHASE_FACTOR} for the "
                               "buckets / verify / components / apply phases (not measured)")
    stage_out = _plan_stages(recipe, sources, rates, nodes, cpus, assumptions)
    total = {k: _sum_ranges(v[k] for v in stage_out.values()) for k in ("core_hours", "wall_hours", "disk_bytes")}
    total["tokens"] = _sum_ranges(s["tokens"] for s in sources.values())
    total["documents"] = _sum_ranges(s["documents"] for s in sources.values())
    return {"recipe": recipe.name, "nodes": nodes, "cpus_per_node": cpus, "sample_mb": sample_mb,
            "parallel_efficiency": PARALLEL_EFFICIENCY, "sources": sources, "stages": stage_out,
            "total": total, "published": _published_beside(recipe, sources, stage_out),
            "assumptions": assumptions}


def _plan_source(recipe: Recipe, src: SourceConfig, limit: int, tmp: str, notes: list[str]) -> tuple[dict, _Rates]:
    """A source's estimates (the plan's `sources` entry) and rates; what is assumed is appended to
    notes. Ratios (text, documents, tokens per input byte) come from a sample of its own inputs,
    else from its dataset's published figures, else from the bundled sample (flagged)."""
    files, nfiles, input_bytes = _input_size(src, notes)
    pub = published_for(src)
    m, measured_on = _measure_sample(recipe, src, files, limit, tmp, notes, bool(pub))
    texts = m["texts"]
    kind = _kind(src)
    dup_docs, dup_bytes, dedup_rate = _dedup_estimate(recipe, src, texts, notes)
    own = measured_on == "its own inputs"
    if own or pub is None:
        text_per_in = m["bytes_kept"] / max(m["input_bytes"], 1)
        doc_bytes = m["bytes_kept"] / max(m["kept"], 1)
        text = (input_bytes * text_per_in,) * 2
        docs = tuple(t / doc_bytes * (1 - dup_docs) if doc_bytes else 0 for t in text)
        kept_text = tuple(t * (1 - dup_bytes) for t in text)
        tok_rate, bpt = _tokenize_estimate(recipe, src, texts if own else [], kind, notes)
        tokens = (kept_text[0] / bpt[1], kept_text[1] / bpt[0])
        tokens = tuple(t + d * (recipe.tokenize.bos + recipe.tokenize.eos) for t, d in zip(tokens, docs))
    else:  # the published ratios per input byte, applied to the listed (or size_gb) input bytes
        in_lo, in_hi = pub["input_bytes"][:2]

        def scaled(key: str) -> tuple[float, float] | None:
            v = pub.get(key)
            return None if v is None else (input_bytes * v[0] / in_hi, input_bytes * v[1] / in_lo)

        text, tokens = scaled("text_bytes"), scaled("tokens")
        doc_bytes = m["bytes_kept"] / max(m["kept"], 1)
        docs = scaled("documents") or tuple(t / doc_bytes for t in text)
        tok_rate, _ = _tokenize_estimate(recipe, src, [], kind, notes)
        bpt = (text[0] / tokens[1], text[1] / tokens[0])
        what = "text, documents and tokens" if pub.get("documents") else \
            "text and tokens (documents: the sampled mean document size)"
        notes.append(f"{src.name}: {what} per input byte from the published figures of {pub['dataset']} "
                     f"(see `published`); CPU rates measured on {measured_on}")
    task_input = input_bytes / nfiles if nfiles else _published_files(src)
    estimate = {
        "input_bytes": input_bytes, "input_files": nfiles, "text_bytes": _r(text), "documents": _r(docs),
        "duplicate_rate": dup_bytes, "tokens": _r(tokens), "bytes_per_token": [round(b, 3) for b in bpt],
        "measured_on": measured_on if own or pub is None else f"published figures ({pub['dataset']})",
        "kind": kind,
        "rates_per_core": {"ingest_mb_s": m["input_bytes"] / max(m["cpu_s"], 1e-6) / 1e6,
                           "tokenize_tokens_s": _r(tok_rate),
                           "dedup_mb_s": dedup_rate / 1e6 if dedup_rate else None},
        "sample": {"input_bytes": m["input_bytes"], "documents": m["read"], "cpu_s": round(m["cpu_s"], 3)},
    }
    return estimate, _Rates(ingest=m["input_bytes"] / max(m["cpu_s"], 1e-6), dedup=dedup_rate, tokenize=tok_rate,
                            parquet_per_text=m["parquet_bytes"] / max(m["bytes_kept"], 1),
                            task_input=task_input if task_input else None)


def _published_files(src: SourceConfig) -> float | None:
    """Input bytes per file of a published dataset whose file count is known (SlimPajama)."""
    pub = published_for(src)
    if pub and pub.get("files"):
        return pub["input_bytes"][0] / pub["files"]
    return None


def _r(pair) -> list[int]:
    return [int(pair[0]), int(pair[1])]


def _sum_ranges(items) -> list[float]:
    lo = hi = 0.0
    for v in items:
        a, b = (v, v) if isinstance(v, (int, float)) else v
        lo, hi = lo + a, hi + b
    return [lo, hi]


def _input_size(src: SourceConfig, notes: list[str]) -> tuple[list, int | None, int]:
    """(files, file count or None, input bytes) from the listing, else from the recipe's size_gb."""
    try:
        files = _list_with_timeout(src)
        known = [f.size for f in files if f.size >= 0]
        input_bytes = int(sum(known) / len(known) * len(files)) if known else None
        nfiles = len(files)
        if input_bytes is None:
            if src.size_gb is None:
                raise OSError("the listing gives no file sizes")
            input_bytes = int(src.size_gb * 1e9)
            notes.append(f"{src.name}: file sizes unknown: size_gb {src.size_gb:g} from the recipe")
        elif len(known) < nfiles:
            notes.append(f"{src.name}: {nfiles - len(known)} file sizes unknown: taken as the mean")
        return files, nfiles, input_bytes
    except Exception as e:  # noqa: BLE001 - no listing: the recipe's size_gb, else an error
        if src.size_gb is None:
            raise PlanError(f"source {src.name}: inputs could not be listed ({_short(e)}) "
                            "and the recipe gives no size_gb for it") from None
        notes.append(f"inputs of {src.name} could not be listed ({_short(e)}): size_gb {src.size_gb:g} "
                     "from the recipe")
        return [], None, int(src.size_gb * 1e9)


def _measure_sample(recipe: Recipe, src: SourceConfig, files, limit: int, tmp: str,
                    notes: list[str], published: bool) -> tuple[dict, str]:
    """(_sample_ingest's measurements, what they were measured on): the source's own inputs, or
    the bundled sample of the same format when they cannot be listed or read."""
    if files:
        try:
            m = _sample_ingest(_sample_recipe(recipe, src, False), src, _pick(files, limit), limit,
                               os.path.join(tmp, src.name))
            return m, "its own inputs"
        except Exception as e:  # noqa: BLE001 - unreadable: the bundled sample
            notes.append(f"{src.name}: inputs unreadable ({_short(e)})")
    bfiles, kind = _bundled_files(src, tmp)
    m = _sample_ingest(_sample_recipe(recipe, src, True), src.model_copy(update={"download": False}),
                       _pick(bfiles, limit), limit, os.path.join(tmp, src.name + "-bundled"))
    what = "the ingest CPU rate" if published else "rates and ratios"
    notes.append(f"{src.name}: {what} measured on the bundled sample ({kind}, same format) because the inputs "
                 "are unreachable")
    return m, f"the bundled sample ({kind})"


def _dedup_estimate(recipe: Recipe, src: SourceConfig, texts: list[str],
                    notes: list[str]) -> tuple[float, float, float | None]:
    """(duplicate fraction of documents, of bytes, dedup text bytes per CPU second); no
    duplicates and no rate when the recipe does not dedup."""
    if "dedup" not in recipe.stages:
        return 0.0, 0.0, None
    sig_cpu, dup_docs, dup_bytes = _dedup_measure(recipe, texts)
    dedup_rate = sum(len(t.encode()) for t in texts) / max(sig_cpu, 1e-6) / DEDUP_PHASE_FACTOR
    notes.append(f"{src.name}: duplicate rate {dup_bytes:.1%} of bytes ({dup_docs:.1%} of documents), "
                 f"measured within the sample ({'exact' if recipe.dedup.exact else ''}"
                 f"{' + LSH band collisions' if recipe.dedup.fuzzy else ''}, unverified): a lower bound "
                 "for the global rate")
    return dup_docs, dup_bytes, dedup_rate


def _tokenize_estimate(recipe: Recipe, src: SourceConfig, texts: list[str], kind: str,
                       notes: list[str]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((low, high) tokens per CPU second, (low, high) bytes per token).

    With the recipe's tokenizer.model: measured on this machine, from plain SentencePiece to the
    exact encoder starting with an empty cache, on the source's own sampled texts, else on real
    text of the same kind (`realtext.py`: what the bundled sample holds is synthetic and repeats).
    Without it: the rates bench_plan_rates.py measured, and bytes per token from published sizes.
    """
    real = texts or real_text(kind, REAL_TEXT_MB)
    tok = _tokenizer_measure(recipe, real)
    where = "its sampled inputs" if texts else f"{REAL_TEXT_MB:g} MB of this machine's real {kind}"
    if tok:
        rate, bpt = tok
        notes.append(f"{src.name}: tokenizer {recipe.tokenizer.model} on {where}: {bpt:.2f} bytes/token, "
                     f"{rate[0] / 1e6:.2f}-{rate[1] / 1e6:.2f}M tokens/s per core (plain SentencePiece to "
                     "the exact encoder from a cold cache)")
        return rate, ((bpt, bpt) if texts else BYTES_PER_TOKEN[kind][:2])
    rate = TOKENIZE_RATES[kind]
    bpt = BYTES_PER_TOKEN[kind]
    bpt_text = f"{bpt[0]:g}" if bpt[0] == bpt[1] else f"{bpt[0]:g}-{bpt[1]:g}"
    notes.append(f"{src.name}: no tokenizer file: {bpt_text} bytes/token ({kind}: {bpt[2]}) and "
                 f"{rate[0] / 1e6:.2f}-{rate[1] / 1e6:.2f}M tokens/s per core ({rate[2]})")
    return rate[:2], bpt[:2]


def _plan_stages(recipe: Recipe, sources: dict[str, dict], rates: dict[str, _Rates], nodes: int, cpus: int,
                 notes: list[str]) -> dict[str, dict]:
    """core_hours, wall_hours and disk_bytes ([low, high]) of each of the recipe's stages."""
    stages, total_cpus = recipe.stages, nodes * cpus
    stage_out = {}

    def stage(core_s: tuple[float, float], tail_s: float, disk: tuple[float, float]) -> dict:
        wall = (core_s[0] / total_cpus, core_s[1] / (total_cpus * PARALLEL_EFFICIENCY) + tail_s)
        return {"core_hours": [core_s[0] / 3600, core_s[1] / 3600], "wall_hours": [wall[0] / 3600, wall[1] / 3600],
                "disk_bytes": [int(disk[0]), int(disk[1])]}

    if "download" in stages:
        b = sum(sources[s.name]["input_bytes"] for s in recipe.sources if s.download)
        wall = b / (DOWNLOAD_MB_S_PER_NODE * 1e6 * nodes) / 3600
        stage_out["download"] = {"core_hours": [0.0, 0.0], "wall_hours": [wall, wall], "disk_bytes": [b, b]}
        notes.append(f"download: network-bound at an assumed {DOWNLOAD_MB_S_PER_NODE:g} MB/s per node "
                     "(not measured), no CPU counted")
    if "ingest" in stages:
        cs = sum(s["input_bytes"] / rates[n].ingest for n, s in sources.items())
        tail = max((rates[n].task_input or 0) / rates[n].ingest for n in sources)
        pb = [sum(s["text_bytes"][i] * rates[n].parquet_per_text for n, s in sources.items()) for i in (0, 1)]
        stage_out["ingest"] = stage((cs, cs), tail, pb)
    if "dedup" in stages:
        cs = [sum(s["text_bytes"][i] / rates[n].dedup for n, s in sources.items() if rates[n].dedup) for i in (0, 1)]
        docs = [sum(s["documents"][i] for s in sources.values()) * 16 * recipe.dedup.bands for i in (0, 1)]
        stage_out["dedup"] = stage(cs, 0.0, docs)
        notes.append(f"dedup disk: 16 bytes per document and band ({recipe.dedup.bands} bands)")
    if "tokenize" in stages:
        cs = (sum(s["tokens"][0] / rates[n].tokenize[1] for n, s in sources.items()),
              sum(s["tokens"][1] / rates[n].tokenize[0] for n, s in sources.items()))
        tail = max((rates[n].task_input or 0) / max(s["input_bytes"], 1) * s["tokens"][1] / rates[n].tokenize[0]
                   for n, s in sources.items())
        stage_out["tokenize"] = stage(cs, tail, [sum(s["tokens"][i] for s in sources.values()) * 2 for i in (0, 1)])
        notes.append("shards: 2 bytes/token (uint16, vocabularies below 65,500 pieces)")
    if "mix" in stages:
        stage_out["mix"] = {"core_hours": [0.0, 0.0], "wall_hours": [0.0, 0.0], "disk_bytes": [0, 0]}
        notes.append("mix: reads the manifest only; negligible")
    return stage_out


def _published_beside(recipe: Recipe, sources: dict[str, dict], stages: dict[str, dict]) -> dict:
    """Per source, its dataset's published figures; for TinyLlama's two datasets, TinyLlama's own
    figures beside the corresponding estimates."""
    out: dict = {"sources": {}, "references": REFERENCES}
    for src in recipe.sources:
        pub = published_for(src)
        if pub:
            out["sources"][src.name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pub.items()}
    names = {n for n, v in out["sources"].items() if v["dataset"].startswith("SlimPajama")}
    if not names or not {"Starcoderdata"} & {v["dataset"] for v in out["sources"].values()}:
        return out
    slim = next(iter(names))
    s = sources[slim]
    ingest_ch = s["input_bytes"] / (s["sample"]["input_bytes"] / max(s["sample"]["cpu_s"], 1e-6)) / 3600
    rate = s["rates_per_core"]["tokenize_tokens_s"]
    ours = [ingest_ch + s["tokens"][0] / rate[1] / 3600, ingest_ch + s["tokens"][1] / rate[0] / 3600]
    gap = TINYLLAMA["slimpajama_prepare_core_hours"][0] / max(ours[1], 1e-9)
    out["note"] = (f"TinyLlama's published SlimPajama preparation is {gap:.0f}x or more this estimate. The estimate is "
                   "CPU time at per-core rates measured on this machine, every task CPU-bound; TinyLlama's is wall "
                   "time ('about a day') on 128 cores, possibly SMT threads, with per-document Python encoding and "
                   "its reads and writes included. Neither the I/O of a 64-CPU node nor SMT is measured here: "
                   "read TinyLlama's figure as the pessimistic bound.")
    out["tinyllama"] = {
        "combined_tokens": {"published": TINYLLAMA["combined_tokens"], "estimate": _sum_ranges(
            v["tokens"] for v in sources.values())},
        "shards_bytes": {"published": TINYLLAMA["shards_bytes"],
                         "estimate": stages.get("tokenize", {}).get("disk_bytes")},
        "slimpajama_prepare_core_hours": {"published": TINYLLAMA["slimpajama_prepare_core_hours"],
                                          "estimate": ours,
                                          "what": "ours: ingest + tokenize of that source"},
    }
    return out


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


def _si(n: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {p}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _span(v, fmt=_si, unit: str = "") -> str:
    """A value, or a [low, high] range as 'low-high' (one value when they agree to 2%)."""
    if v is None:
        return "?"
    lo, hi = (v, v) if isinstance(v, (int, float)) else v[:2]
    if hi <= lo * 1.02:
        return fmt(lo, unit) if fmt is _si else fmt(lo)
    if fmt is _si:
        a, b = _si(lo, unit).split(" "), _si(hi, unit).split(" ")
        return f"{a[0]}-{b[0]} {b[1]}" if a[1:] == b[1:] else f"{_si(lo, unit)}-{_si(hi, unit)}"
    return f"{fmt(lo)}-{fmt(hi)}"


def render(plan: dict) -> str:
    lines = [f"plan of {plan['recipe']} on {plan['nodes']} node(s) x {plan['cpus_per_node']} CPUs", "",
             f"{'source':<14}{'input':>11}{'files':>7}{'text':>17}{'docs':>17}{'dup':>6}{'tokens':>17}  measured on"]
    for name, s in plan["sources"].items():
        files = "?" if s["input_files"] is None else str(s["input_files"])
        lines.append(f"{name:<14}{_si(s['input_bytes'], 'B'):>11}{files:>7}{_span(s['text_bytes'], unit='B'):>17}"
                     f"{_span(s['documents']):>17}{s['duplicate_rate']:>6.1%}{_span(s['tokens']):>17}  "
                     f"{s['measured_on']}")
    pub = plan.get("published", {})
    if pub.get("sources"):
        lines += ["", "published (for what the recipe selects):"]
        for name, p in pub["sources"].items():
            lines.append(f"{name:<14}{_span(p['input_bytes'], unit='B'):>11}{'':>7}"
                         f"{_span(p['text_bytes'], unit='B'):>17}{_span(p['documents']):>17}{'':>6}"
                         f"{_span(p['tokens']):>17}  {p['dataset']}")
            for key in ("input_bytes", "text_bytes", "documents", "tokens"):
                if p.get(key):
                    lines.append(f"{'':<16}{key}: {p[key][2]}")
    lines += ["", f"{'stage':<14}{'core-hours':>18}{'wall':>22}{'disk':>20}"]
    for name, st in [*plan["stages"].items(), ("total", plan["total"])]:
        lines.append(f"{name:<14}{_span(st['core_hours'], lambda h: f'{h:.1f}'):>18}"
                     f"{_span(st['wall_hours'], _hours):>22}{_span(st['disk_bytes'], unit='B'):>20}")
    tl = pub.get("tinyllama")
    if tl:
        lines += ["", "TinyLlama, published, beside this estimate:"]
        for key, label, fmt in (("combined_tokens", "tokens", _span), ("shards_bytes", "shards", None),
                                ("slimpajama_prepare_core_hours", "SlimPajama prepare, core-hours", None)):
            v = tl[key]
            if fmt is None and key == "shards_bytes":
                est = _span(v["estimate"], unit="B") if v["estimate"] else "?"
                publ = _si(v["published"][0], "B")
            elif key == "slimpajama_prepare_core_hours":
                est = _span(v["estimate"], lambda h: f"{h:,.0f}")
                publ = f"{v['published'][0]:,.0f}"
            else:
                est, publ = _span(v["estimate"]), _si(v["published"][0])
            lines.append(f"  {label:<32} published {publ:>10}   estimate {est:>16}   {v['published'][1]}")
    if pub.get("note"):
        lines += textwrap.wrap(pub["note"], 100, initial_indent="  ", subsequent_indent="  ")
    if pub.get("references"):
        lines += ["", "references:"] + [f"  [{k}] {v}" for k, v in pub["references"].items()]
    lines += ["", "assumptions:"] + [f"  - {x}" for x in plan["assumptions"]]
    return "\n".join(lines)


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.1f} h"
