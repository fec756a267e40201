"""The bundled sample corpus: a small, deterministic stand-in for SlimPajama and Starcoderdata.

tinyprep is meant to run on the real TinyLlama pretraining mix (SlimPajama-627B plus
Starcoderdata), which is far too large for tests, demos or a first try of the CLI.
``generate_sample(out_dir)`` builds a corpus of a few megabytes with the same on-disk
layout and record formats, *and* with planted problems whose right answer is known
exactly, so every stage of the pipeline can be checked against ground truth:

* exact duplicates (groups of verbatim copies, some across files and across sources),
* near duplicates with a known, exactly computed 13-character-shingle Jaccard similarity
  under SlimPajama's text normalization (pairs spread over [0.3, 1.0)),
* short documents that SlimPajama's short-document filter (< 200 normalized chars) drops,
* documents stored in Unicode NFD form (they change under NFC normalization),
* ``RedPajamaGithub`` rows (source code inside SlimPajama, which the TinyLlama recipe drops).

Everything is built from the standard library of the *running* Python and nothing else:
the ``.py``, ``.json``, ``.xml`` and ``.toml`` files under ``sysconfig.get_paths()["stdlib"]``
(``site-packages``, ``dist-packages`` and ``__pycache__`` excluded, visited in sorted order).
Prose comes from module, class and function docstrings (extracted with :mod:`ast`); code
comes from the source files themselves. There are no timestamps and the only randomness
is ``random.Random`` with fixed seeds, so the same machine and the same code give
byte-identical files (zstd level and parquet settings are fixed too). Another Python
version or build gives a different, equally valid, sample.

Layout under ``out_dir``::

    SAMPLE_VERSION                                   marker, written last
    planted.json                                     ground truth (pretty JSON, sorted keys)
    slimpajama/train/chunk{1,2}/example_train_{0..4}.jsonl.zst
        one zstd frame per file; one orjson line per record:
        {"text": ..., "meta": {"redpajama_set_name": ...}}
    starcoderdata/{python,json,xml,toml}/train-{i:05d}-of-{n:05d}.parquet
        columns id, content, max_stars_repo_path, max_stars_repo_name, max_stars_count

A location in ``planted.json`` is ``{"source": "slimpajama"|"starcoderdata", "path": <path
relative to that source's root>, "row": <0-based record index in that file>}``. Keys:

* ``exact_duplicates``: ``[{"original": loc, "copies": [loc, ...], "sha256": hex}]``
  (sha256 of the UTF-8 text, identical for the original and every copy);
* ``near_duplicates``: ``[{"a": loc, "b": loc, "target": t, "jaccard": j}]`` where ``j`` is
  the true Jaccard similarity of ``shingles(text_a)`` and ``shingles(text_b)`` (``|j - t| <= 0.02``);
* ``short_documents``: ``[loc]``;
* ``nfd_documents``: ``[{**loc, "nfc_sha256": hex}]`` (sha256 of the NFC form);
* ``github_rows``: number of ``RedPajamaGithub`` rows;
* ``counts``: rows per source / file / set / language, and UTF-8 bytes of text per source;
* ``version``, ``seed``, ``python``: what the sample was built with.

``generate_sample`` is idempotent (an existing sample of the current version is reused)
and atomic (files are written to a temporary directory and renamed into place).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import sysconfig
import tempfile
import unicodedata
import zlib
from pathlib import Path

from .text import slimpajama_normalize

__all__ = [
    "SAMPLE_VERSION",
    "SLIMPAJAMA_SETS",
    "GITHUB_SET",
    "STARCODER_COLUMNS",
    "STARCODER_LANGUAGES",
    "generate_sample",
    "shingles",
    "jaccard",
    "starcoder_schema",
]

#: Bump whenever the generator's output changes.
SAMPLE_VERSION = "tinyprep-sample-1"
SEED = 20240105

PROSE_SETS = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaWikipedia",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaStackExchange",
)
GITHUB_SET = "RedPajamaGithub"
SLIMPAJAMA_SETS = PROSE_SETS + (GITHUB_SET,)
STARCODER_COLUMNS = ("id", "content", "max_stars_repo_path", "max_stars_repo_name", "max_stars_count")
STARCODER_LANGUAGES = {"python": ".py", "json": ".json", "xml": ".xml", "toml": ".toml"}

# Shape of the sample.
_SLIM_CHUNKS = 2
_SLIM_FILES_PER_CHUNK = 5
_PYTHON_PARQUET_FILES = 3
_PROSE_BUDGET = 1_350_000  # chars of docstrings collected (bounds the ast parsing time)
_PYTHON_BUDGET = 11_000_000 # bytes of Python source in starcoderdata/python
_GITHUB_FRACTION = 0.10
_N_BOOKS_EVERY = 60  # every 60th prose doc is a long "Book"
_N_SHORT = 40
_N_NFD = 20
_N_EXACT_PROSE = 24
_N_EXACT_CODE = 6
_NEAR_TARGETS = (0.95, 0.9, 0.85, 0.82, 0.8, 0.75, 0.7, 0.6, 0.5, 0.3)
_NEAR_PER_TARGET = 15
_NEAR_TOL = 0.02
_ZSTD_LEVEL = 3
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_MANAGED = ("slimpajama", "starcoderdata", "planted.json")

_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"[A-Za-z]{3,12}")

_NFD_WORDS = (
    "café", "naïve", "Ångström", "résumé", "façade", "crème brûlée", "Zürich",
    "São Paulo", "piñata", "El Niño", "coöperate", "Dvořák", "Kraków", "Škoda",
    "déjà vu", "über", "jalapeño", "fiancée", "Besançon", "smörgåsbord",
)
_OWNERS = ("python", "pydev-mirror", "stdlib-archive", "openpy", "codeberg-py", "snakepit",
           "pyforge", "batteries-included")


# --------------------------------------------------------------------------- text helpers
def shingles(text: str, n: int = 13, *, normalize: bool = True) -> set[str]:
    """Set of ``n``-character shingles of ``text`` (normalized with :func:`slimpajama_normalize`
    first unless ``normalize=False``; normalizing twice is harmless). A non-empty text
    shorter than ``n`` yields the text itself as its only shingle; an empty text yields
    the empty set."""
    if normalize:
        text = slimpajama_normalize(text)
    if not text:
        return set()
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str | set[str], b: str | set[str], n: int = 13) -> float:
    """Jaccard similarity of two texts' shingle sets (or of two shingle sets)."""
    sa = a if isinstance(a, set) else shingles(a, n)
    sb = b if isinstance(b, set) else shingles(b, n)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def starcoder_schema():
    """The pyarrow schema of the Starcoderdata parquet files."""
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("content", pa.string()),
        ("max_stars_repo_path", pa.string()),
        ("max_stars_repo_name", pa.string()),
        ("max_stars_count", pa.int64()),
    ])


# --------------------------------------------------------------------------- source material
def _stdlib_files(root: Path) -> list[str]:
    """Relative paths (with '/') of the stdlib's files, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return out


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


_DOC_KINDS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstring_owners(tree: ast.AST):
    """Module, class and function nodes of ``tree`` in source order (statements only: much
    cheaper than ``ast.walk``, and defs can only appear in statement lists)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_KINDS):
            yield node
        children = []
        for field in _STMT_FIELDS:
            value = getattr(node, field, None)
            if isinstance(value, list):
                children.extend(c for c in value if isinstance(c, ast.AST))
        stack.extend(reversed(children))


def _collect_docstrings(root: Path, files: list[str]) -> list[str]:
    """Unique (after normalization), NFC-normalized docstrings of non-test modules, in order."""
    seen: set[str] = set()
    out: list[str] = []
    total = 0
    for rel in files:
        if not rel.endswith(".py") or _TEST_DIRS.intersection(rel.split("/")[:-1]):
            continue
        src = _read_text(root / rel)
        if src is None or ('"""' not in src and "'''" not in src):  # cheap skip: no docstrings
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in _docstring_owners(tree):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            try:
                doc.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from escapes
                continue
            doc = unicodedata.normalize("NFC", doc.strip())
            key = slimpajama_normalize(doc)
            if len(key) < 20 or key in seen:
                continue
            seen.add(key)
            out.append(doc)
            total += len(doc)
        if total >= _PROSE_BUDGET:
            break
    return out


# --------------------------------------------------------------------------- prose documents
def _loguniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _build_prose(rng: random.Random, pool: list[str]) -> tuple[list[dict], list[dict]]:
    """Return (short docs, regular docs); each doc is {"text", "set", "role"}."""
    cand = [i for i, d in enumerate(pool) if 40 <= len(slimpajama_normalize(d)) < 190]
    if len(cand) < _N_SHORT:
        raise RuntimeError("not enough short docstrings in this Python's stdlib")
    short_idx = set(rng.sample(cand, _N_SHORT))
    regular_sets = [s for s in PROSE_SETS if s != "RedPajamaBook"]
    weights = [0.45, 0.25, 0.1, 0.08, 0.12]  # CC, C4, Wikipedia, ArXiv, StackExchange
    shorts = [{"text": pool[i], "set": rng.choices(regular_sets, weights)[0], "role": "short"}
              for i in sorted(short_idx)]

    rest = [d for i, d in enumerate(pool) if i not in short_idx]
    docs: list[dict] = []
    pos = 0
    while pos < len(rest):
        if len(docs) % _N_BOOKS_EVERY == _N_BOOKS_EVERY // 2:
            name, target = "RedPajamaBook", rng.randint(20_000, 50_000)
        else:
            name = rng.choices(regular_sets, weights)[0]
            r = rng.random()
            if r < 0.45:
                target = _loguniform(rng, 350, 1200)
            elif r < 0.9:
                target = _loguniform(rng, 1200, 4000)
            else:
                target = _loguniform(rng, 4000, 12000)
        parts: list[str] = []
        size = 0
        while pos < len(rest) and size < target:
            parts.append(rest[pos])
            size += len(rest[pos]) + 2
            pos += 1
        while pos < len(rest) and len(slimpajama_normalize("\n\n".join(parts))) < 220:
            parts.append(rest[pos])
            pos += 1
        text = "\n\n".join(parts)
        if len(slimpajama_normalize(text)) < 220 and docs:  # leftover tail: merge into previous
            docs[-1]["text"] += "\n\n" + text
            continue
        docs.append({"text": text, "set": name, "role": "base"})
    return shorts, docs


def _edit_words(tokens: list[str], word_pos: list[int], plan: list[tuple], k: int) -> str:
    """Apply the first k ops of ``plan`` (on distinct word tokens) and join the tokens."""
    ops = {word_pos[w]: (op, new) for w, op, new in plan[:k]}
    out: list[str] = []
    skip_ws = False
    for i, tok in enumerate(tokens):
        if skip_ws:
            skip_ws = False
            if i % 2 == 1:
                continue
        edit = ops.get(i)
        if edit is None:
            out.append(tok)
        elif edit[0] == "replace":
            out.append(edit[1])
        elif edit[0] == "insert":
            out.append(tok + " " + edit[1])
        else:  # delete the word and the whitespace after it
            skip_ws = True
    return "".join(out)


def _make_near_duplicate(rng: random.Random, text: str, target: float,
                         vocab: list[str]) -> tuple[str, float] | None:
    tokens = _WS_RE.split(text)
    seps = _WS_RE.findall(text)
    merged: list[str] = []
    for i, tok in enumerate(tokens):  # alternate word, whitespace, word, ...
        merged.append(tok)
        if i < len(seps):
            merged.append(seps[i])
    word_pos = [i for i in range(0, len(merged), 2) if merged[i]]
    if len(word_pos) < 50:
        return None
    sa = shingles(text)
    for _attempt in range(6):
        order = rng.sample(range(len(word_pos)), len(word_pos))
        plan = []
        for w in order:
            r = rng.random()
            op = "replace" if r < 0.5 else ("insert" if r < 0.75 else "delete")
            new = rng.choice(vocab)
            while new == merged[word_pos[w]]:
                new = rng.choice(vocab)
            plan.append((w, op, new))
        cache: dict[int, tuple[str, float]] = {}

        def at(k: int) -> tuple[str, float]:
            if k not in cache:
                b = _edit_words(merged, word_pos, plan, k)
                cache[k] = (b, jaccard(sa, shingles(b)))
            return cache[k]

        # find the smallest k with J(k) <= target; start from a generous bound on k
        lo, hi = 1, min(len(plan), int(len(plan) * (1.0 - target) * 1.2) + 6)
        if at(hi)[1] > target:
            lo, hi = hi, len(plan)
            if at(hi)[1] > target:
                continue
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mid)[1] <= target:
                hi = mid
            else:
                lo = mid + 1
        best = min((k for k in range(max(1, lo - 2), min(len(plan), lo + 2) + 1)),
                   key=lambda k: (abs(at(k)[1] - target), k))
        b, j = at(best)
        if abs(j - target) <= _NEAR_TOL and j < 1.0 and len(slimpajama_normalize(b)) >= 220:
            return b, j
    return None


def _make_nfd(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    for w in rng.sample(_NFD_WORDS, 3):
        i = rng.randrange(1, len(words))
        words.insert(i, w)
    return unicodedata.normalize("NFD", unicodedata.normalize("NFC", " ".join(words)))


# --------------------------------------------------------------------------- placement
def _place(rng: random.Random, records: list[dict], nfiles: int) -> list[list[dict]]:
    """Spread records over files: free records round-robin after a shuffle, copies (records
    with "copy_of") into a file holding no other member of their group; then shuffle each file."""
    free = [r for r in records if "copy_of" not in r]
    rng.shuffle(free)
    files: list[list[dict]] = [[] for _ in range(nfiles)]
    for i, r in enumerate(free):
        r["_file"] = i % nfiles
        files[i % nfiles].append(r)
    for r in records:
        if "copy_of" in r:
            taken = {r["copy_of"]["_file"]} | {c["_file"] for c in r["copy_of"].get("_copies", [])}
            choices = [f for f in range(nfiles) if f not in taken] or list(range(nfiles))
            r["_file"] = rng.choice(choices)
            r["copy_of"].setdefault("_copies", []).append(r)
            files[r["_file"]].append(r)
    for f in files:
        rng.shuffle(f)
        for row, r in enumerate(f):
            r["_row"] = row
    return files


# --------------------------------------------------------------------------- main entry
def _fake_repo(rel: str, owner_salt: int = 0) -> tuple[str, int]:
    top = rel.split("/")[0]
    top = top[:-3] if top.endswith(".py") else top.rsplit(".", 1)[0]
    h = zlib.crc32(top.encode("utf-8"))
    owner = _OWNERS[(h + owner_salt) % len(_OWNERS)]
    name = f"{owner}/{top.strip('_') or 'lib'}" + ("-fork" if owner_salt else "")
    stars = zlib.crc32(name.encode("utf-8")) % 4000
    return name, stars


def _build(root_out: Path) -> dict:
    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(stdlib)

    # ---- prose
    pool = _collect_docstrings(stdlib, files)
    vocab = sorted({w.lower() for d in pool[:2000] for w in _WORD_RE.findall(d)})
    shorts, docs = _build_prose(random.Random(SEED + 1), pool)
    seen_text = {_sha(d["text"]) for d in shorts + docs}
    if len(seen_text) != len(shorts) + len(docs):
        raise RuntimeError("internal error: accidental duplicate prose documents")

    role_rng = random.Random(SEED + 2)
    mid = [d for d in docs if d["set"] != "RedPajamaBook" and 1000 <= len(d["text"]) <= 4000]
    mid_ids = {id(d) for d in mid}
    other = [d for d in docs if d["set"] != "RedPajamaBook" and id(d) not in mid_ids]
    role_rng.shuffle(mid)
    role_rng.shuffle(other)

    slim_records: list[dict] = shorts + docs
    exact_groups: list[dict] = []
    # exact duplicates of prose: the first 6 originals are StackExchange docs copied as CommonCrawl
    se = [d for d in other if d["set"] == "RedPajamaStackExchange"][:6]
    se_ids = {id(d) for d in se}
    rest_other = [d for d in other if id(d) not in se_ids]
    originals = se + rest_other[: _N_EXACT_PROSE - len(se)]
    for d in originals:
        d["role"] = "exact"
        group = {"original": d, "copies": []}
        for _ in range(role_rng.randint(1, 3)):
            name = "RedPajamaCommonCrawl" if d["set"] == "RedPajamaStackExchange" else d["set"]
            c = {"text": d["text"], "set": name, "role": "exact_copy", "copy_of": d}
            group["copies"].append(c)
            slim_records.append(c)
        exact_groups.append(group)
    nfd_docs = rest_other[_N_EXACT_PROSE - len(se): _N_EXACT_PROSE - len(se) + _N_NFD]
    if len(nfd_docs) < _N_NFD:
        raise RuntimeError("not enough prose for NFD documents")
    for d in nfd_docs:
        d["text"] = _make_nfd(role_rng, d["text"])
        d["role"] = "nfd"
        seen_text.add(_sha(d["text"]))

    near_pairs: list[dict] = []
    near_rng = random.Random(SEED + 3)
    cands = iter(mid)
    for target in _NEAR_TARGETS:
        made = 0
        while made < _NEAR_PER_TARGET:
            a = next(cands, None)
            if a is None:
                raise RuntimeError("not enough 1-4 KB prose documents for near duplicates")
            res = _make_near_duplicate(near_rng, a["text"], target, vocab)
            if res is None or _sha(res[0]) in seen_text:
                continue
            b_text, j = res
            seen_text.add(_sha(b_text))
            a["role"] = "near_a"
            b = {"text": b_text, "set": a["set"], "role": "near_b"}
            slim_records.append(b)
            near_pairs.append({"a": a, "b": b, "target": target, "jaccard": j})
            made += 1

    # ---- code files
    code_rng = random.Random(SEED + 4)
    seen_code: set[str] = set()
    by_lang: dict[str, list[tuple[str, str]]] = {k: [] for k in STARCODER_LANGUAGES}
    for rel in files:
        for lang, ext in STARCODER_LANGUAGES.items():
            if rel.endswith(ext):
                text = _read_text(stdlib / rel)
                limit = 100_000 if lang == "python" else 1_000_000
                if text is None or not text.strip() or len(text) > limit or (lang == "python" and len(text) < 200):
                    break
                h = _sha(text)
                if h in seen_code:
                    break
                seen_code.add(h)
                by_lang[lang].append((rel, text))
                break
    py_files = by_lang["python"]
    code_rng.shuffle(py_files)
    n_prose_rows = len(slim_records)
    n_github = round(n_prose_rows * _GITHUB_FRACTION / (1 - _GITHUB_FRACTION))
    n_github_own = n_github - _N_EXACT_CODE
    github_src = [f for f in py_files if 500 <= len(f[1]) <= 40_000][:n_github_own]
    github_set = {rel for rel, _ in github_src}
    star_py: list[tuple[str, str]] = []
    total = 0
    for rel, text in py_files:
        if rel in github_set:
            continue
        if total >= _PYTHON_BUDGET:
            break
        star_py.append((rel, text))
        total += len(text.encode("utf-8"))
    by_lang["python"] = star_py

    for rel, text in github_src:
        slim_records.append({"text": text, "set": GITHUB_SET, "role": "github"})

    star_records: dict[str, list[dict]] = {}
    for lang, items in by_lang.items():
        recs = []
        for rel, text in items:
            repo, stars = _fake_repo(rel)
            recs.append({"content": text, "path": rel, "repo": repo, "stars": stars, "lang": lang})
        star_records[lang] = recs
    # exact duplicates of code: a starcoder python file also appears as a RedPajamaGithub row,
    # and half of them also as a fork in another python parquet file
    code_originals = [r for r in star_records["python"] if 500 <= len(r["content"]) <= 20_000]
    for i, r in enumerate(code_rng.sample(code_originals, _N_EXACT_CODE)):
        group = {"original": r, "copies": []}
        c = {"text": r["content"], "set": GITHUB_SET, "role": "exact_copy"}
        slim_records.append(c)
        group["copies"].append(c)
        if i % 2 == 0:
            repo, stars = _fake_repo(r["path"], owner_salt=1 + i)
            fork = dict(r, repo=repo, stars=stars, copy_of=r)
            star_records["python"].append(fork)
            group["copies"].append(fork)
        exact_groups.append(group)

    # ---- placement and writing: slimpajama
    nfiles = _SLIM_CHUNKS * _SLIM_FILES_PER_CHUNK
    slim_files = _place(random.Random(SEED + 5), slim_records, nfiles)
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    counts: dict = {"files": {"slimpajama": {}, "starcoderdata": {}},
                    "rows": {}, "sets": {}, "languages": {}, "text_bytes": {}}
    slim_bytes = 0
    for fi, recs in enumerate(slim_files):
        rel = f"train/chunk{fi // _SLIM_FILES_PER_CHUNK + 1}/example_train_{fi % _SLIM_FILES_PER_CHUNK}.jsonl.zst"
        lines = []
        for r in recs:
            r["_loc"] = {"source": "slimpajama", "path": rel, "row": r["_row"]}
            lines.append(orjson.dumps({"text": r["text"], "meta": {"redpajama_set_name": r["set"]}}) + b"\n")
            counts["sets"][r["set"]] = counts["sets"].get(r["set"], 0) + 1
            slim_bytes += len(r["text"].encode("utf-8"))
        dest = root_out / "slimpajama" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(cctx.compress(b"".join(lines)))
        counts["files"]["slimpajama"][rel] = len(recs)
    counts["rows"]["slimpajama"] = len(slim_records)
    counts["text_bytes"]["slimpajama"] = slim_bytes

    # ---- placement and writing: starcoderdata
    schema = starcoder_schema()
    star_bytes = 0
    next_id = 0
    place_rng = random.Random(SEED + 6)
    for lang, recs in star_records.items():
        n = _PYTHON_PARQUET_FILES if lang == "python" else 1
        pfiles = _place(place_rng, recs, n)
        rg = max(1, math.ceil(max(len(f) for f in pfiles) / 5))
        for fi, frecs in enumerate(pfiles):
            rel = f"{lang}/train-{fi:05d}-of-{n:05d}.parquet"
            ids = []
            for r in frecs:
                r["_loc"] = {"source": "starcoderdata", "path": rel, "row": r["_row"]}
                ids.append(str(next_id))
                next_id += 1
                star_bytes += len(r["content"].encode("utf-8"))
            table = pa.table({
                "id": pa.array(ids, pa.string()),
                "content": pa.array([r["content"] for r in frecs], pa.string()),
                "max_stars_repo_path": pa.array([r["path"] for r in frecs], pa.string()),
                "max_stars_repo_name": pa.array([r["repo"] for r in frecs], pa.string()),
                "max_stars_count": pa.array([r["stars"] for r in frecs], pa.int64()),
            }, schema=schema)
            dest = root_out / "starcoderdata" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, dest, row_group_size=rg, compression="zstd", compression_level=_ZSTD_LEVEL,
                           use_dictionary=True, write_statistics=True, version="2.6")
            counts["files"]["starcoderdata"][rel] = len(frecs)
        counts["languages"][lang] = len(recs)
    counts["rows"]["starcoderdata"] = sum(counts["languages"].values())
    counts["text_bytes"]["starcoderdata"] = star_bytes

    loc = lambda r: dict(r["_loc"])  # noqa: E731
    info = {
        "version": SAMPLE_VERSION,
        "seed": SEED,
        "python": platform.python_version(),
        "exact_duplicates": [
            {"original": loc(g["original"]), "copies": [loc(c) for c in g["copies"]],
             "sha256": _sha(g["original"].get("text", g["original"].get("content")))}
            for g in exact_groups
        ],
        "near_duplicates": [
            {"a": loc(p["a"]), "b": loc(p["b"]), "target": p["target"], "jaccard": p["jaccard"]}
            for p in near_pairs
        ],
        "short_documents": [loc(d) for d in shorts],
        "nfd_documents": [dict(loc(d), nfc_sha256=_sha(unicodedata.normalize("NFC", d["text"])))
                          for d in nfd_docs],
        "github_rows": counts["sets"].get(GITHUB_SET, 0),
        "counts": counts,
    }
    (root_out / "planted.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info


def _read_info(out_dir: Path) -> dict | None:
    try:
        if (out_dir / "SAMPLE_VERSION").read_text(encoding="utf-8").strip() != SAMPLE_VERSION:
            return None
        info = json.loads((out_dir / "planted.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("version") != SAMPLE_VERSION:
        return None
    info["root"] = str(out_dir)
    return info


def generate_sample(out_dir, *, force: bool = False) -> dict:
    """Build the sample corpus under ``out_dir`` (see the module docstring) and return the
    contents of ``planted.json`` plus ``"root": str(out_dir)``.

    If ``out_dir/SAMPLE_VERSION`` already holds the current version, nothing is written and
    the stored info is returned, unless ``force=True``. Files are generated in a temporary
    sibling directory and then renamed into place; the ``SAMPLE_VERSION`` marker is removed
    first and written last, so an interrupted run is never mistaken for a complete sample.
    Only ``slimpajama/``, ``starcoderdata/``, ``planted.json`` and ``SAMPLE_VERSION`` are
    replaced; other files in ``out_dir`` are left alone.
    """
    out_dir = Path(out_dir)
    if not force:
        info = _read_info(out_dir)
        if info is not None:
            return info
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        info = _build(tmp)
        (tmp / "SAMPLE_VERSION").write_text(SAMPLE_VERSION + "\n", encoding="utf-8")
        if not out_dir.exists():
            os.rename(tmp, out_dir)
        else:
            marker = out_dir / "SAMPLE_VERSION"
            if marker.exists() or marker.is_symlink():
                marker.unlink()
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            for name in _MANAGED:
                if (out_dir / name).exists():
                    os.rename(out_dir / name, trash / name)
                os.rename(tmp / name, out_dir / name)
            os.rename(tmp / "SAMPLE_VERSION", marker)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    info["root"] = str(out_dir)
    return info
