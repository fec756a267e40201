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
This module plants the documents; `stdlib.py` reads the standard library and `files.py`
places the records into files and writes them.

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

import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .. import storage
from ..text import slimpajama_normalize
from .files import starcoder_schema, write_slimpajama, write_starcoderdata
from .stdlib import code_files, collect_docstrings, stdlib_files, stdlib_root

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


def _fake_repo(rel: str, owner_salt: int = 0) -> tuple[str, int]:
    top = rel.split("/")[0]
    top = top[:-3] if top.endswith(".py") else top.rsplit(".", 1)[0]
    h = zlib.crc32(top.encode("utf-8"))
    owner = _OWNERS[(h + owner_salt) % len(_OWNERS)]
    name = f"{owner}/{top.strip('_') or 'lib'}" + ("-fork" if owner_salt else "")
    stars = zlib.crc32(name.encode("utf-8")) % 4000
    return name, stars


# --------------------------------------------------------------------------- planting
@dataclass
class _Planted:
    """The records of both sources, in the order placement sees them, and what was planted in
    them (the ground truth of planted.json). Records are dicts; placement adds "_file", "_row"
    and writing "_loc" to them."""

    slim: list[dict]
    shorts: list[dict]
    star: dict[str, list[dict]] = field(default_factory=dict)
    nfd: list[dict] = field(default_factory=list)
    exact_groups: list[dict] = field(default_factory=list)
    near_pairs: list[dict] = field(default_factory=list)


def _plant_prose(stdlib: Path, files: list[str]) -> _Planted:
    """Prose documents from the docstrings, with exact copies, NFD documents and near duplicates."""
    pool = collect_docstrings(stdlib, files, _PROSE_BUDGET)
    vocab = sorted({w.lower() for d in pool[:2000] for w in _WORD_RE.findall(d)})
    shorts, docs = _build_prose(random.Random(SEED + 1), pool)
    seen_text = {_sha(d["text"]) for d in shorts + docs}
    if len(seen_text) != len(shorts) + len(docs):
        raise RuntimeError("internal error: accidental duplicate prose documents")
    planted = _Planted(slim=shorts + docs, shorts=shorts)

    role_rng = random.Random(SEED + 2)
    mid = [d for d in docs if d["set"] != "RedPajamaBook" and 1000 <= len(d["text"]) <= 4000]
    mid_ids = {id(d) for d in mid}
    other = [d for d in docs if d["set"] != "RedPajamaBook" and id(d) not in mid_ids]
    role_rng.shuffle(mid)
    role_rng.shuffle(other)
    # the first 6 exact originals are StackExchange docs, copied as CommonCrawl (a cross-set duplicate)
    se = [d for d in other if d["set"] == "RedPajamaStackExchange"][:6]
    se_ids = {id(d) for d in se}
    candidates = se + [d for d in other if id(d) not in se_ids]
    _plant_exact_prose(role_rng, candidates[:_N_EXACT_PROSE], planted)
    planted.nfd = _plant_nfd(role_rng, candidates[_N_EXACT_PROSE:_N_EXACT_PROSE + _N_NFD], seen_text)
    _plant_near(random.Random(SEED + 3), mid, vocab, seen_text, planted)
    return planted


def _plant_exact_prose(rng: random.Random, originals: list[dict], planted: _Planted) -> None:
    """1 to 3 verbatim copies of each original."""
    for d in originals:
        d["role"] = "exact"
        group = {"original": d, "copies": []}
        for _ in range(rng.randint(1, 3)):
            name = "RedPajamaCommonCrawl" if d["set"] == "RedPajamaStackExchange" else d["set"]
            c = {"text": d["text"], "set": name, "role": "exact_copy", "copy_of": d}
            group["copies"].append(c)
            planted.slim.append(c)
        planted.exact_groups.append(group)


def _plant_nfd(rng: random.Random, docs: list[dict], seen_text: set[str]) -> list[dict]:
    """Turn the documents into NFD text (in place)."""
    if len(docs) < _N_NFD:
        raise RuntimeError("not enough prose for NFD documents")
    for d in docs:
        d["text"] = _make_nfd(rng, d["text"])
        d["role"] = "nfd"
        seen_text.add(_sha(d["text"]))
    return docs


def _plant_near(rng: random.Random, mid: list[dict], vocab: list[str], seen_text: set[str],
                planted: _Planted) -> None:
    """_NEAR_PER_TARGET near duplicates of 1-4 KB documents for every target Jaccard."""
    cands = iter(mid)
    for target in _NEAR_TARGETS:
        made = 0
        while made < _NEAR_PER_TARGET:
            a = next(cands, None)
            if a is None:
                raise RuntimeError("not enough 1-4 KB prose documents for near duplicates")
            res = _make_near_duplicate(rng, a["text"], target, vocab)
            if res is None or _sha(res[0]) in seen_text:
                continue
            b_text, j = res
            seen_text.add(_sha(b_text))
            a["role"] = "near_a"
            b = {"text": b_text, "set": a["set"], "role": "near_b"}
            planted.slim.append(b)
            planted.near_pairs.append({"a": a, "b": b, "target": target, "jaccard": j})
            made += 1


def _plant_code(stdlib: Path, files: list[str], planted: _Planted) -> None:
    """Starcoderdata records per language, RedPajamaGithub rows in slimpajama (about
    _GITHUB_FRACTION of its rows), and exact duplicates of code across both sources."""
    code_rng = random.Random(SEED + 4)
    by_lang = code_files(stdlib, files, STARCODER_LANGUAGES)
    code_rng.shuffle(by_lang["python"])
    n_github = round(len(planted.slim) * _GITHUB_FRACTION / (1 - _GITHUB_FRACTION))
    github_src, by_lang["python"] = _split_python(by_lang["python"], n_github - _N_EXACT_CODE)
    for rel, text in github_src:
        planted.slim.append({"text": text, "set": GITHUB_SET, "role": "github"})
    for lang, items in by_lang.items():
        planted.star[lang] = []
        for rel, text in items:
            repo, stars = _fake_repo(rel)
            planted.star[lang].append({"content": text, "path": rel, "repo": repo, "stars": stars, "lang": lang})
    _plant_exact_code(code_rng, planted)


def _split_python(py_files: list[tuple[str, str]], n_github: int) -> tuple[list, list]:
    """(the files that become RedPajamaGithub rows, starcoderdata's python files up to _PYTHON_BUDGET)."""
    github_src = [f for f in py_files if 500 <= len(f[1]) <= 40_000][:n_github]
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
    return github_src, star_py


def _plant_exact_code(rng: random.Random, planted: _Planted) -> None:
    """A starcoder python file also appears as a RedPajamaGithub row, and half of them also as a
    fork in another python parquet file."""
    code_originals = [r for r in planted.star["python"] if 500 <= len(r["content"]) <= 20_000]
    for i, r in enumerate(rng.sample(code_originals, _N_EXACT_CODE)):
        group = {"original": r, "copies": []}
        c = {"text": r["content"], "set": GITHUB_SET, "role": "exact_copy"}
        planted.slim.append(c)
        group["copies"].append(c)
        if i % 2 == 0:
            repo, stars = _fake_repo(r["path"], owner_salt=1 + i)
            fork = dict(r, repo=repo, stars=stars, copy_of=r)
            planted.star["python"].append(fork)
            group["copies"].append(fork)
        planted.exact_groups.append(group)


def _planted_info(planted: _Planted, counts: dict) -> dict:
    """The contents of planted.json (locations come from writing)."""
    loc = lambda r: dict(r["_loc"])  # noqa: E731
    return {
        "version": SAMPLE_VERSION,
        "seed": SEED,
        "python": platform.python_version(),
        "exact_duplicates": [
            {"original": loc(g["original"]), "copies": [loc(c) for c in g["copies"]],
             "sha256": _sha(g["original"].get("text", g["original"].get("content")))}
            for g in planted.exact_groups
        ],
        "near_duplicates": [
            {"a": loc(p["a"]), "b": loc(p["b"]), "target": p["target"], "jaccard": p["jaccard"]}
            for p in planted.near_pairs
        ],
        "short_documents": [loc(d) for d in planted.shorts],
        "nfd_documents": [dict(loc(d), nfc_sha256=_sha(unicodedata.normalize("NFC", d["text"])))
                          for d in planted.nfd],
        "github_rows": counts["sets"].get(GITHUB_SET, 0),
        "counts": counts,
    }


def _build(root_out: Path) -> dict:
    """Plant, place and write the whole sample under root_out; return planted.json's contents."""
    stdlib = stdlib_root()
    files = stdlib_files(stdlib)
    planted = _plant_prose(stdlib, files)
    _plant_code(stdlib, files, planted)
    counts: dict = {"files": {"slimpajama": {}, "starcoderdata": {}},
                    "rows": {}, "sets": {}, "languages": {}, "text_bytes": {}}
    write_slimpajama(root_out, planted.slim, random.Random(SEED + 5), counts)
    write_starcoderdata(root_out, planted.star, random.Random(SEED + 6), counts)
    info = _planted_info(planted, counts)
    (root_out / "planted.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info


# --------------------------------------------------------------------------- main entry
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
    tmp = Path(storage.temp_name(str(out_dir.parent / f".{out_dir.name}")))
    tmp.mkdir(mode=0o700)  # private until renamed into place, as tempfile.mkdtemp would make it
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
