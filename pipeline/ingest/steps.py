"""The document steps of ingest, in the order a batch of records goes through them:

    readable -> selection -> too_large -> nfc -> short -> empty -> datatrove filters

Every step works on a whole batch: lists aligned with the batch's readable records (T: the texts,
U: each text as an ASCII str or its UTF-8 bytes, blen: UTF-8 sizes) and `alive`, the positions
still in. A step returns what it rejects and why (`Rejected`: a reason, positions, and messages
when each rejection is also reported as an issue); the caller (task.py) counts and drops them, in
one place. `nfc` changes texts and rejects nothing.
"""

from __future__ import annotations

import functools
import importlib
import re
import unicodedata
from typing import Any, Callable, NamedTuple

import orjson

from ..text import PUNCT_BYTES
from .fields import MISSING, Bad
from .ids import document_ids


class Rejected(NamedTuple):
    reason: str  # the `filtered` counter it goes to
    positions: list[int]  # in the batch (as `alive`)
    messages: list[str] | None = None  # one issue per position, when the step reports them


def readable(texts: list, text_field: str) -> tuple[list[str], list[int] | None, list[tuple[int, str, str]]]:
    """The records with a text: (their texts, their positions in `texts` or None for all, and
    (position, reason, message) of each of the others)."""
    if len(set(map(type, texts))) == 1 and type(texts[0]) is str:
        return texts, None, []
    idx: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for i, t in enumerate(texts):
        if type(t) is str:
            idx.append(i)
        elif isinstance(t, Bad):
            bad.append((i, t.reason, t.message))
        elif t is MISSING:
            bad.append((i, "missing_text", f"no field {text_field!r}"))
        elif t is None:
            bad.append((i, "null_text", f"field {text_field!r} is null"))
        else:
            bad.append((i, "text_not_string", f"field {text_field!r} is a {type(t).__name__}, not a string"))
    return [texts[i] for i in idx], idx, bad


def without(alive: list[int], out: list[int]) -> list[int]:
    gone = set(out)
    return [p for p in alive if p not in gone]


def selection(column: Callable[[str], list], alive: list[int], include: list[tuple[str, frozenset]],
              exclude: list[tuple[str, frozenset]]) -> Rejected:
    """Records whose field is not among the included values, or is among the excluded ones."""
    rejected: list[int] = []
    for path, wanted in include:
        vals = column(path)
        out = [p for p in alive if type(vals[p]) is not str or vals[p] not in wanted]
        if out:
            rejected += out
            alive = without(alive, out)
    for path, unwanted in exclude:
        vals = column(path)
        out = [p for p in alive if type(vals[p]) is str and vals[p] in unwanted]
        if out:
            rejected += out
            alive = without(alive, out)
    return Rejected("selection", rejected)


def too_large(blen: list[int], alive: list[int], limit: int) -> Rejected:
    """Documents over `limit` UTF-8 bytes, each reported."""
    out = [p for p in alive if blen[p] > limit]
    return Rejected("too_large", out, [f"document of {blen[p]} bytes > max_document_bytes {limit}" for p in out])


def nfc(T: list[str], U: list, blen: list[int], alive: list[int]) -> None:
    """Unicode NFC, in place; ASCII texts (str in U) are already in NFC, and so are texts whose
    other characters are all NFC-inert (`nfc_inert`)."""
    normalize = unicodedata.normalize  # returns its argument when the quick check passes
    inert, ascii_bytes = _nfc_inert_run(), _ASCII_BYTES
    for p in alive:
        u = U[p]
        if type(u) is bytes:
            rest = u.translate(None, ascii_bytes)  # the UTF-8 of its non-ASCII characters
            # (texts mostly non-ASCII go straight to the quick check)
            if len(rest) << 2 < len(u) and inert(rest.decode()) is not None:
                continue
            t = normalize("NFC", T[p])
            if t is not T[p] and t != T[p]:
                T[p] = t
                U[p] = t.encode()
                blen[p] = len(U[p])


# ---------------------------------------------------------------------------------------------
# NFC-inert characters
#
# Most non-ASCII text (accented Latin letters, curly quotes, dashes, CJK, emoji) is made of
# characters that NFC leaves alone whatever surrounds them: canonical combining class 0, their
# own NFC, and never the second character of a canonical composition (those are combining
# marks, a few vowel signs and length marks of Indic and other scripts, and Hangul vowel and
# trailing jamo: none is in the blocks below, as tests/ingest checks against every canonical
# decomposition). A text of ASCII and such characters is in NFC, so `nfc` checks only its
# non-ASCII characters, whose UTF-8 is what remains once the ASCII bytes are deleted (a fast
# bytes.translate), instead of running the quick check on every character.

_ASCII_BYTES = bytes(range(0x80))
_INERT_BLOCKS = (  # Unicode blocks of common text; their characters are checked one by one below
    (0x00A0, 0x02FF), (0x0370, 0x052F), (0x0590, 0x06FF), (0x1E00, 0x1FFF), (0x2010, 0x2027),
    (0x2030, 0x205E), (0x2070, 0x209F), (0x20A0, 0x20CF), (0x2100, 0x2BFF), (0x3000, 0x30FF),
    (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F000, 0x1FAFF),
)


def nfc_inert(c: str) -> bool:
    """Whether NFC leaves `c` alone wherever it stands (in one of _INERT_BLOCKS)."""
    cp = ord(c)
    return (any(a <= cp <= b for a, b in _INERT_BLOCKS) and not unicodedata.combining(c)
            and unicodedata.normalize("NFC", c) == c)


@functools.cache
def _nfc_inert_run() -> Callable[[str], Any]:
    """`fullmatch` of a regex matching runs of NFC-inert characters (built once per process)."""
    ranges, start, prev = [], None, None
    for a, b in _INERT_BLOCKS:
        for cp in range(a, b + 1):
            if nfc_inert(chr(cp)):
                if start is None or cp != prev + 1:
                    if start is not None:
                        ranges.append((start, prev))
                    start = cp
                prev = cp
    ranges.append((start, prev))
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]*").fullmatch


def short(T: list[str], U: list, alive: list[int], min_chars: int) -> Rejected:
    """SlimPajama's filter: documents whose normalized form has fewer than min_chars characters."""
    # Most documents are long: the ASCII characters of a prefix of their UTF-8 that are neither
    # punctuation nor whitespace prove it (inline, no call: str for ASCII texts, bytes for the
    # others); is_short() settles the rest exactly.
    m, counted = min_chars, _COUNTED_ASCII
    k = _prefix_len(m)
    out = [p for p in alive
           if int.from_bytes((U[p][:k].encode() if type(U[p]) is str else U[p][:k]).translate(counted),
                             "little").bit_count() < m
           and is_short(T[p], m)]
    return Rejected("short", out)


def empty(T: list[str], blen: list[int], alive: list[int]) -> Rejected:
    """Documents with no text, or only whitespace."""
    return Rejected("empty", [p for p in alive if not blen[p] or T[p].isspace()])


# ---------------------------------------------------------------------------------------------
# SlimPajama's short-document filter, exact and fast


# UTF-8 byte -> 1 when it counts as a character of the normalized text, else 0: ASCII
# punctuation, ASCII whitespace (str.isspace, including \x1c-\x1f) and continuation bytes do
# not count (so a non-ASCII character counts once, by its lead byte).
_COUNTED = bytes(
    0 if (c < 0x80 and (c in PUNCT_BYTES or chr(c).isspace())) or 0x80 <= c < 0xC0 else 1
    for c in range(256)
)
# The same for ASCII bytes only (every byte >= 0x80 -> 0): the count of a UTF-8 prefix is a
# lower bound of the normalized length of any text it starts (lowercasing maps each such
# character to one that neither the punctuation removal nor the whitespace split removes),
# wherever the prefix cuts a character, and with no correction for non-ASCII whitespace.
_COUNTED_ASCII = bytes(c if i < 0x80 else 0 for i, c in enumerate(_COUNTED))
# UTF-8 prefixes covering every non-ASCII character for which str.isspace() is true
# (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
_SPACE_SUSPECTS = (b"\xc2\x85", b"\xc2\xa0", b"\xe1\x9a\x80", b"\xe2\x80", b"\xe2\x81\x9f", b"\xe3\x80\x80")


def normalized_length(text: str) -> int:
    """len(text.slimpajama_normalize(text)), computed faster."""
    # Deleting ASCII bytes from UTF-8 is exact and much faster than str.translate on non-ASCII text.
    b = text.lower().encode("utf-8", "surrogatepass").translate(None, PUNCT_BYTES)
    return len(" ".join(b.decode("utf-8", "surrogatepass").split()))


def _length_lower_bound(prefix: str) -> int:
    """A lower bound of the normalized length of any text that starts with `prefix`.

    Counts the characters that are neither ASCII punctuation nor whitespace; lowercasing never
    shortens a character (only U+0130 changes length, to 2) nor turns it into punctuation or
    whitespace, and non-ASCII whitespace is subtracted through a superset of its encodings.
    """
    b = prefix.encode("utf-8", "surrogatepass")
    n = int.from_bytes(b.translate(_COUNTED), "little").bit_count()
    if not b.isascii():
        n -= sum([b.count(s) for s in _SPACE_SUSPECTS])
    return n


def _prefix_len(min_chars: int) -> int:
    return min_chars + (min_chars >> 1) + 16  # prose has well over 2/3 counted characters


def is_short(text: str, min_chars: int) -> bool:
    """len(slimpajama_normalize(text)) < min_chars, exact; O(min_chars) for most long documents.

    A prefix's lower bound proves most documents long enough; the others (short ones, or long
    ones made mostly of punctuation and spaces) get the exact computation.
    """
    if min_chars <= 0:
        return False
    n = len(text)
    k = _prefix_len(min_chars)
    while k < n:
        if _length_lower_bound(text[:k]) >= min_chars:
            return False
        k *= 4
    if n >= min_chars and _length_lower_bound(text) >= min_chars:
        return False
    return normalized_length(text) < min_chars


# ---------------------------------------------------------------------------------------------
# datatrove filters


def make_filter(spec) -> Any:
    """The datatrove filter a recipe names (`class` and `args`)."""
    module, _, name = spec.class_.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"filter {spec.class_!r} cannot be imported: {e}") from None
    return cls(**spec.args)


def datatrove_filters(filters: list, T: list[str], alive: list[int], rows: list[int], source: str, rel_path: str,
                      subset_vals: list | None, metas: list[str] | None) -> list[Rejected]:
    """The recipe's datatrove filters, in order, on the documents at `alive` (rows, metas: theirs).

    A document rejected by a filter is not shown to the next; the reason is the filter's class
    name, with the reason it gives after a colon.
    """
    from datatrove.data import Document

    ids = document_ids(source, rel_path, rows)
    docs = []
    for j, p in enumerate(alive):
        meta = {"source": source, "file": rel_path, "row": rows[j]}
        if subset_vals is not None:
            meta["subset"] = subset_vals[p]
        if metas is not None:
            meta.update(orjson.loads(metas[j]))
        docs.append(Document(text=T[p], id=str(int(ids[j])), metadata=meta))
    keep = [True] * len(alive)
    out: dict[str, list[int]] = {}
    for flt in filters:
        todo = [j for j in range(len(alive)) if keep[j]]
        if not todo:
            break
        step = max(int(getattr(flt, "batch_size", 1) or 1), 1)
        step = step if step > 1 else len(todo)
        name = type(flt).__name__
        for b in range(0, len(todo), step):
            part = todo[b:b + step]
            for j, res in zip(part, flt.filter_batch([docs[j] for j in part])):
                ok, reason = res if isinstance(res, tuple) else (res, None)
                if not ok:
                    keep[j] = False
                    out.setdefault(f"{name}:{reason}" if reason else name, []).append(alive[j])
    return [Rejected(reason, positions) for reason, positions in out.items()]
