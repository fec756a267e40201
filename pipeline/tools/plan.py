"""`tinyprep plan`: estimate a recipe's sizes, CPU time, wall time and disk before running it.

Lists the inputs (never writing into the run directory), ingests a sample of them into a temp
directory while timing CPU, then measures MinHash signatures and tokenization on the sampled
texts. Every number that is assumed rather than measured is listed in `assumptions`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
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

PARALLEL_EFFICIENCY = 0.96  # measured, 1 vs 2 workers (tests/benchmarks/README.md)
DEFAULT_TOKENS_PER_S = 1.43e6  # tinyprep encoder, cold cache, per core (tests/benchmarks/README.md)
BYTES_PER_TOKEN = {"prose": 4.0, "code": 3.0}
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


def _tokenizer_measure(recipe: Recipe, texts: list[str]) -> tuple[float, float] | None:
    """(tokens per CPU second, bytes per token) with the recipe's tokenizer.model, or None."""
    model = recipe.tokenizer.model if recipe.tokenizer else None
    if not model or not storage.exists(model):
        return None
    from ..tokenize.encoder import Encoder

    enc = Encoder(storage.read_bytes(model), cache_entries=recipe.tokenize.cache_entries)
    t0 = time.process_time()
    ntok = 0
    for i in range(0, len(texts), recipe.tokenize.batch_docs):
        ids, _ = enc.encode_to_array(texts[i:i + recipe.tokenize.batch_docs])
        ntok += len(ids)
    cpu = max(time.process_time() - t0, 1e-6)
    return ntok / cpu, sum(len(t.encode()) for t in texts) / max(ntok, 1)


@dataclass(frozen=True)
class _Rates:
    """What the stage estimates need of a source beyond the numbers the plan reports (per core)."""

    ingest: float  # input bytes per CPU second
    dedup: float | None  # text bytes per CPU second for the whole dedup stage; None without dedup
    tokenize: float  # tokens per CPU second
    parquet_per_text: float  # bytes of docs parquet per byte of text


def make_plan(recipe: Recipe, nodes: int = 1, cpus: int | None = None, sample_mb: float = 8.0) -> dict:
    cpus = cpus or os.cpu_count() or 1
    limit = int(sample_mb * (1 << 20))
    assumptions = [f"parallel efficiency {PARALLEL_EFFICIENCY} (measured 1 vs 2 workers, tests/benchmarks/README.md), "
                   f"held constant for any node count: wall = core-hours / (nodes x cpus x {PARALLEL_EFFICIENCY})"]
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
    stage_out = _plan_stages(recipe, sources, rates, nodes, nodes * cpus * PARALLEL_EFFICIENCY, assumptions)
    total = {k: sum(v[k] for v in stage_out.values()) for k in ("core_hours", "wall_hours", "disk_bytes")}
    total["tokens"] = sum(s["tokens"] for s in sources.values())
    total["documents"] = sum(s["documents"] for s in sources.values())
    return {"recipe": recipe.name, "nodes": nodes, "cpus_per_node": cpus, "sample_mb": sample_mb,
            "parallel_efficiency": PARALLEL_EFFICIENCY, "sources": sources, "stages": stage_out,
            "total": total, "assumptions": assumptions}


def _plan_source(recipe: Recipe, src: SourceConfig, limit: int, tmp: str, notes: list[str]) -> tuple[dict, _Rates]:
    """A source's estimates (the plan's `sources` entry) and rates, measured on a sample of its
    inputs; what is assumed is appended to notes."""
    files, nfiles, input_bytes = _input_size(src, notes)
    m, measured_on = _measure_sample(recipe, src, files, limit, tmp, notes)
    texts = m["texts"]
    text_per_in = m["bytes_kept"] / max(m["input_bytes"], 1)
    kept_frac = m["kept"] / max(m["read"], 1)
    doc_bytes = m["bytes_kept"] / max(m["kept"], 1)
    ingest_rate = m["input_bytes"] / max(m["cpu_s"], 1e-6)
    text_bytes = input_bytes * text_per_in
    dup_docs, dup_bytes, dedup_rate = _dedup_estimate(recipe, src, texts, notes)
    kept_text = text_bytes * (1 - dup_bytes)
    docs = text_bytes / doc_bytes * (1 - dup_docs) if doc_bytes else 0
    tok_rate, bpt = _tokenize_estimate(recipe, src, texts, notes)
    tokens = kept_text / bpt + (docs if recipe.tokenize.bos else 0) + (docs if recipe.tokenize.eos else 0)
    estimate = {
        "input_bytes": input_bytes, "input_files": nfiles, "text_bytes": int(text_bytes),
        "documents_read": int(text_bytes / doc_bytes / kept_frac) if doc_bytes and kept_frac else 0,
        "kept_fraction": kept_frac, "documents": int(docs), "duplicate_rate": dup_bytes,
        "tokens": int(tokens), "bytes_per_token": bpt, "measured_on": measured_on,
        "rates_per_core": {"ingest_mb_s": ingest_rate / 1e6, "tokenize_tokens_s": tok_rate,
                           "dedup_mb_s": dedup_rate / 1e6 if dedup_rate else None},
        "sample": {"input_bytes": m["input_bytes"], "documents": m["read"], "cpu_s": round(m["cpu_s"], 3)},
    }
    return estimate, _Rates(ingest=ingest_rate, dedup=dedup_rate, tokenize=tok_rate,
                            parquet_per_text=m["parquet_bytes"] / max(m["bytes_kept"], 1))


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
                    notes: list[str]) -> tuple[dict, str]:
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
    notes.append(f"{src.name}: rates and ratios measured on the bundled sample ({kind}, same format) "
                 "because the inputs are unreachable")
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


def _tokenize_estimate(recipe: Recipe, src: SourceConfig, texts: list[str], notes: list[str]) -> tuple[float, float]:
    """(tokens per CPU second, bytes per token): measured with the recipe's tokenizer.model, else assumed."""
    tok = _tokenizer_measure(recipe, texts)
    if tok:
        tok_rate, bpt = tok
        notes.append(f"{src.name}: tokenizer {recipe.tokenizer.model}: {bpt:.2f} bytes/token, "
                     f"{tok_rate / 1e6:.2f}M tokens/s per core measured")
        return tok_rate, bpt
    kind = "code" if src.text_field == "content" or _CODE_NAME.search(src.name) else "prose"
    bpt, tok_rate = BYTES_PER_TOKEN[kind], DEFAULT_TOKENS_PER_S
    notes.append(f"{src.name}: no tokenizer file: assumed {bpt} bytes/token ({kind}) and "
                 f"{tok_rate / 1e6:.2f}M tokens/s per core (tinyprep encoder, cold cache, "
                 "tests/benchmarks/README.md)")
    return tok_rate, bpt


def _plan_stages(recipe: Recipe, sources: dict[str, dict], rates: dict[str, _Rates], nodes: int, slots: float,
                 notes: list[str]) -> dict[str, dict]:
    """core_hours, wall_hours and disk_bytes of each of the recipe's stages; `slots` is the
    effective number of cores (nodes x cpus x parallel efficiency)."""
    stages = recipe.stages
    srcs = sources.values()
    stage_out = {}
    if "download" in stages:
        b = sum(sources[s.name]["input_bytes"] for s in recipe.sources if s.download)
        wall = b / (DOWNLOAD_MB_S_PER_NODE * 1e6 * nodes)
        stage_out["download"] = {"core_hours": 0.0, "wall_hours": wall / 3600, "disk_bytes": b}
        notes.append(f"download: network-bound at an assumed {DOWNLOAD_MB_S_PER_NODE:g} MB/s per node "
                     "(not measured), no CPU counted")
    if "ingest" in stages:
        cs = sum(s["input_bytes"] / rates[n].ingest for n, s in sources.items())
        pb = sum(s["text_bytes"] * rates[n].parquet_per_text for n, s in sources.items())
        stage_out["ingest"] = {"core_hours": cs / 3600, "wall_hours": cs / slots / 3600, "disk_bytes": int(pb)}
    if "dedup" in stages:
        cs = sum(s["text_bytes"] / rates[n].dedup for n, s in sources.items() if rates[n].dedup)
        stage_out["dedup"] = {"core_hours": cs / 3600, "wall_hours": cs / slots / 3600,
                              "disk_bytes": int(sum(s["documents_read"] for s in srcs) * 16 * recipe.dedup.bands)}
        notes.append(f"dedup disk: 16 bytes per document and band ({recipe.dedup.bands} bands)")
    if "tokenize" in stages:
        cs = sum(s["tokens"] / rates[n].tokenize for n, s in sources.items())
        width = 2
        stage_out["tokenize"] = {"core_hours": cs / 3600, "wall_hours": cs / slots / 3600,
                                 "disk_bytes": int(sum(s["tokens"] for s in srcs) * width)}
        notes.append("shards: 2 bytes/token (uint16, vocabularies below 65,500 pieces)")
    if "mix" in stages:
        stage_out["mix"] = {"core_hours": 0.0, "wall_hours": 0.0, "disk_bytes": 0}
        notes.append("mix: reads the manifest only; negligible")
    return stage_out


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


def _si(n: float, unit: str = "") -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {p}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def render(plan: dict) -> str:
    lines = [f"plan of {plan['recipe']} on {plan['nodes']} node(s) x {plan['cpus_per_node']} CPUs", "",
             f"{'source':<16}{'input':>11}{'files':>8}{'text':>11}{'docs':>11}{'dup':>7}{'tokens':>11}  measured on"]
    for name, s in plan["sources"].items():
        files = "?" if s["input_files"] is None else str(s["input_files"])
        lines.append(f"{name:<16}{_si(s['input_bytes'], 'B'):>11}{files:>8}{_si(s['text_bytes'], 'B'):>11}"
                     f"{_si(s['documents']):>11}{s['duplicate_rate']:>7.1%}{_si(s['tokens']):>11}  {s['measured_on']}")
    lines += ["", f"{'stage':<16}{'core-hours':>12}{'wall':>12}{'disk':>12}"]
    for name, st in [*plan["stages"].items(), ("total", plan["total"])]:
        lines.append(f"{name:<16}{st['core_hours']:>12.1f}{_hours(st['wall_hours']):>12}{_si(st['disk_bytes'], 'B'):>12}")
    lines += ["", "assumptions:"] + [f"  - {x}" for x in plan["assumptions"]]
    return "\n".join(lines)


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.1f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.1f} h"
