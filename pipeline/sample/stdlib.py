"""The bundled sample's raw material: the standard library of the running Python.

Its ``.py``, ``.json``, ``.xml`` and ``.toml`` files under ``sysconfig.get_paths()["stdlib"]``
(``site-packages``, ``dist-packages`` and ``__pycache__`` excluded), visited in sorted order so
that the same Python gives the same material: module, class and function docstrings (extracted
with :mod:`ast`) become prose, the source files themselves become code. pipeline/sample.py
turns them into the sample's documents.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import unicodedata
from pathlib import Path

from ..text import slimpajama_normalize

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_DOC_KINDS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative paths (with '/') of the stdlib's files, in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return out


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is unreadable or not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _docstring_owners(tree: ast.AST):
    """Module, class and function nodes of ``tree`` in source order (statements only: much
    cheaper than ``ast.walk``, and defs can only appear in statement lists)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_KINDS):
            yield node
        children = []
        for name in _STMT_FIELDS:
            value = getattr(node, name, None)
            if isinstance(value, list):
                children.extend(c for c in value if isinstance(c, ast.AST))
        stack.extend(reversed(children))


def collect_docstrings(root: Path, files: list[str], budget: int) -> list[str]:
    """Unique (after normalization), NFC-normalized docstrings of non-test modules, in order,
    until about `budget` characters (which bounds the ast parsing time)."""
    seen: set[str] = set()
    out: list[str] = []
    total = 0
    for rel in files:
        if not rel.endswith(".py") or _TEST_DIRS.intersection(rel.split("/")[:-1]):
            continue
        src = read_text(root / rel)
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
        if total >= budget:
            break
    return out


def code_files(root: Path, files: list[str], extensions: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """(path, text) of the stdlib's distinct code files per language ({language: extension}), in
    listing order: python files of 200 to 100,000 characters, others up to 1,000,000."""
    seen: set[str] = set()
    by_lang: dict[str, list[tuple[str, str]]] = {k: [] for k in extensions}
    for rel in files:
        for lang, ext in extensions.items():
            if rel.endswith(ext):
                text = read_text(root / rel)
                limit = 100_000 if lang == "python" else 1_000_000
                if text is None or not text.strip() or len(text) > limit or (lang == "python" and len(text) < 200):
                    break
                digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
                if digest in seen:
                    break
                seen.add(digest)
                by_lang[lang].append((rel, text))
                break
    return by_lang
