"""Where the exact encoder may cut text, decided from the model (ENCODER.md gives the argument).

``cut_plan(model_info(...))`` says whether cutting is exact for a model (BPE, identity
normalization, no user-defined or UNUSED pieces, no piece across a word boundary, ...) and, if so,
the cut characters and the character groups (characters adjacent in some piece); ``segmenter``
compiles them into one regex whose matches are the segments. Change this and ENCODER.md together.
"""

from __future__ import annotations

import re
from itertools import chain, pairwise
from typing import Any

from .spmodel import MODEL_TYPES, NORMAL, UNUSED, USER_DEFINED, model_info

WS = "\u2581"  # SentencePiece's escaped space
# Characters cut around when no multi-character piece contains them (trainers read lines, so
# newlines never are inside pieces; the others are checked on the vocabulary as well).
CUT_CANDIDATES = "\n\r\t\f\v"

_CROSS_WORD = re.compile(f"[^{WS}]{WS}")  # a piece that would straddle a word cut


def cut_plan(info: dict) -> tuple[bool, str | None, dict]:
    """(exact?, why not, plan): plan = {"prefix": bool, "cut_chars": str, "groups": [str]}."""
    kind = MODEL_TYPES.get(info["model_type"], str(info["model_type"]))
    if kind != "BPE":
        return False, f"model type {kind}: only BPE merges are local", {}
    if info["precompiled_charsmap"]:
        return False, (f"normalization {info['normalizer_name'] or '(custom)'!r} rewrites text "
                       "(a precompiled charsmap); only the identity rule is local"), {}
    if info["remove_extra_whitespaces"]:
        return False, "remove_extra_whitespaces=true collapses whitespace across words", {}
    if not info["escape_whitespaces"]:
        return False, "escape_whitespaces=false", {}
    if info["treat_whitespace_as_suffix"]:
        return False, "treat_whitespace_as_suffix=true", {}
    if not info["split_by_whitespace"]:
        return False, "split_by_whitespace=false: pieces may span words", {}
    types = info["types"]
    pieces = info["pieces"]
    if USER_DEFINED in types:
        n = types.count(USER_DEFINED)
        return False, f"{n} user-defined symbol(s): matched as atoms, possibly across words", {}
    if UNUSED in types:
        n = types.count(UNUSED)
        return False, f"{n} UNUSED piece(s): re-split through a map shared by the whole text", {}
    normal = [p for p, t in zip(pieces, types) if t == NORMAL]
    multi = [p for p in normal if len(p) > 1]
    bad = next((p for p in multi if _CROSS_WORD.search(p)), None)
    if bad is not None:
        return False, f"vocabulary piece {bad!r} spans a word boundary", {}
    singles = {p for p in normal if len(p) == 1}
    byte_fallback = info["byte_fallback"]
    if not byte_fallback and WS not in singles:
        return False, ("no byte fallback and no '\u2581' piece: unknown pieces on either side of "
                       "a word boundary would be merged into one <unk>"), {}
    in_multi = set(chain.from_iterable(multi))
    cut_chars = "".join(c for c in CUT_CANDIDATES
                        if c not in in_multi and (byte_fallback or c in singles))
    # pair cuts need byte fallback: without it, unknown characters on both sides of a cut
    # would be merged into one <unk>
    groups = char_groups(multi) if byte_fallback else []
    return True, None, {"prefix": info["add_dummy_prefix"], "cut_chars": cut_chars,
                        "groups": groups}


def char_groups(multi: list[str]) -> list[str]:
    """The characters of the multi-character pieces (other than the whitespace symbol), grouped
    so that any two characters adjacent in a piece are in the same group: the connected
    components of the "adjacent in some piece" relation. Two neighbouring characters of different
    groups (or one of them in no group) are never inside one piece, so BPE never merges across
    them. Largest group first."""
    chars = set(chain.from_iterable(multi))
    chars.discard(WS)
    pairs = {(a, b) for p in multi for a, b in pairwise(p) if a != WS and b != WS}
    parent = {c: c for c in chars}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[str, list[str]] = {}
    for c in chars:
        groups.setdefault(find(c), []).append(c)
    return sorted(("".join(sorted(g)) for g in groups.values()), key=lambda g: (-len(g), g))


def fast_path_supported(model_path_or_proto: Any) -> tuple[bool, str | None]:
    """Whether the segment cache gives exactly SentencePiece's ids for this model, and if not why.

    Accepts a model path, serialized ``ModelProto`` bytes, a ``SentencePieceProcessor`` or a
    ``sentencepiece_model_pb2.ModelProto``. The rules are those of ENCODER.md.
    """
    ok, why, _ = cut_plan(model_info(model_path_or_proto))
    return ok, why


def _class_body(chars: str) -> str:
    """The inside of a regex character class matching exactly ``chars`` (as code point ranges)."""
    cps = sorted(set(map(ord, chars)))
    out, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(re.escape(chr(cps[i])) if i == j
                   else f"{re.escape(chr(cps[i]))}-{re.escape(chr(cps[j]))}")
        i = j + 1
    return "".join(out)


def segment_pattern(cut_chars: str, groups: list[str]) -> str:
    """The segments, as alternatives of one regex (ENCODER.md, "Where the cuts go"):

    * a run of cut characters;
    * a (possibly empty) run of whitespace, then a run of characters of one group, or else one
      character that is in no group (any character but whitespace and cut characters when there
      are no groups: the word cuts alone);
    * a run of whitespace at the end of the text or before a cut character.
    """
    ws = _class_body(" " + WS)
    cc = _class_body(cut_chars)
    alts = [f"[{cc}]+"] if cut_chars else []
    if groups:
        bodies = [_class_body(g) for g in groups]
        runs = "|".join(f"[{b}]+" for b in bodies)
        alts.append(f"[{ws}]*+(?:{runs}|[^{ws}{cc}{''.join(bodies)}])")
    else:
        alts.append(f"[{ws}]*+[^{ws}{cc}]+")
    alts.append(f"[{ws}]+")
    return "|".join(alts)


def segmenter(cut_chars: str, groups: list[str]):
    return re.compile(segment_pattern(cut_chars, groups)).findall
