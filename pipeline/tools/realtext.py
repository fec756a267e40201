"""Real text of this machine, for measuring tokenizing rates with the cache behaviour of real
data (`tinyprep plan`, tests/benchmarks/bench_plan_rates.py): never generated, never repeated.

* code: C headers under /usr/include and Python sources under /usr/lib/python3*/ (sorted walk;
  files whose bytes were seen before are skipped), one file a document, as in Starcoderdata;
* prose: English lines from /usr/share/doc (READMEs, NEWS, changelogs, copyright notices; `.gz`
  read), Perl's `.pod` manuals and Python's `pydoc_data/topics.py`; a line is kept when it is
  mostly letters and was not seen before anywhere in the corpus (licence texts repeated across
  packages count once), and consecutive kept lines of a file make documents of about 4.5 KB,
  SlimPajama's mean.

Either may come out short (or empty) on a machine without these files; callers say so.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os

DOC_BYTES = 4500  # SlimPajama's mean document


def _files(patterns: list[str]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        out += glob.glob(pattern, recursive=True)
    return sorted(p for p in set(out) if os.path.isfile(p) and not os.path.islink(p))


def _read(path: str) -> str | None:
    try:
        data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


CODE_PATTERNS = {"c": ["/usr/include/**/*.h"], "python": ["/usr/lib/python3*/**/*.py"]}


def make_code(mb: float, languages: tuple[str, ...] = ("c", "python")) -> list[str]:
    """Real code, one file a document, no file twice: C headers, then Python sources (either alone
    with `languages`)."""
    seen: set[bytes] = set()
    docs, size, target = [], 0, int(mb * 1e6)
    for path in _files([p for lang in languages for p in CODE_PATTERNS[lang]]):
        text = _read(path)
        if not text or len(text) > 1 << 20:
            continue
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in seen:
            continue
        seen.add(key)
        docs.append(text)
        size += len(text.encode())
        if size >= target:
            break
    return docs


def _prose_line(line: str) -> bool:
    s = line.strip()
    letters = sum(c.isalpha() or c == " " for c in s)
    return len(s.split()) >= 5 and letters >= 0.8 * len(s)


def make_prose(mb: float) -> list[str]:
    """Real English lines, none twice in the corpus, as documents of about DOC_BYTES."""
    seen: set[bytes] = set()
    docs, size, target = [], 0, int(mb * 1e6)
    paths = _files(["/usr/lib/python3*/pydoc_data/topics.py", "/usr/share/perl*/**/*.pod",
                    "/usr/share/doc/**/README*", "/usr/share/doc/**/NEWS*", "/usr/share/doc/**/changelog*",
                    "/usr/share/doc/**/copyright"])
    for path in paths:
        text = _read(path)
        if not text:
            continue
        doc: list[str] = []
        doc_bytes = 0
        for line in text.splitlines():
            if not _prose_line(line):
                continue
            key = hashlib.blake2b(line.strip().encode(), digest_size=16).digest()
            if key in seen:
                continue
            seen.add(key)
            doc.append(line.strip())
            doc_bytes += len(line)
            if doc_bytes >= DOC_BYTES:
                docs.append("\n".join(doc))
                size += doc_bytes
                doc, doc_bytes = [], 0
        if doc_bytes >= 200:  # SlimPajama's short-document filter
            docs.append("\n".join(doc))
            size += doc_bytes
        if size >= target:
            break
    return docs


def real_text(kind: str, mb: float) -> list[str]:
    """Documents of real `kind` ("prose" or "code") text, about `mb` MB (less where the machine has less)."""
    return make_code(mb) if kind == "code" else make_prose(mb)
