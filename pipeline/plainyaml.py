"""Untrusted YAML (and data given in Python) to plain values, or one line saying where and why.

A recipe may hold only plain values: mappings with string keys, lists, strings, integers within
64 bits, finite numbers, booleans and null. PyYAML's safe loader alone would build sets, bytes,
dates and NaN, accept duplicate keys (the last wins silently) and non-string keys, and expand an
alias bomb ("billion laughs") into billions of values. Here the composed node graph is walked
instead: tags other than the plain ones are refused before anything is built, aliases are
bounded (MAX_VALUES, no cycles), and every refusal names the line and the key path.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml


class PlainYamlError(ValueError):
    """What a recipe may not hold, as one line: `where:line:column: key.path: why`."""


MAX_VALUES = 200_000  # values after aliases expand: bounds a "billion laughs" document
MAX_DEPTH = 64  # nesting of mappings and lists
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # what a recipe value may hold (the JSON round-trip's range)
_TAG = "tag:yaml.org,2002:"
_KINDS = {"null": "a null", "bool": "a boolean", "int": "an integer", "float": "a number", "timestamp": "a date"}
_SIMPLE_KEY = re.compile(r"[A-Za-z_][\w-]*")


def fmt_loc(loc: tuple[Any, ...]) -> str:
    """A key path as written in messages: `sources[1].select.include['meta.set']`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.fullmatch(str(part)):
            out += ("." if out else "") + str(part)
        else:  # a key with dots, spaces or newlines: quoted, so the path stays one unambiguous line
            out += f"[{str(part)!r}]"
    return out or "(top level)"


class _Refused(Exception):
    """A value the recipe may not hold: where (key path, YAML mark) and why."""

    def __init__(self, loc: tuple, msg: str, mark=None):
        super().__init__(msg)
        self.loc, self.msg, self.mark = loc, msg, mark

    def line(self, where: str) -> str:
        at = f":{self.mark.line + 1}:{self.mark.column + 1}" if self.mark is not None else ""
        return f"{where}{at}: {fmt_loc(self.loc) + ': ' if self.loc else ''}{self.msg}"


def _scalar_problem(v: Any) -> str | None:
    """Why a scalar cannot be a recipe value (None: it can)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return None if _INT_RANGE[0] <= v <= _INT_RANGE[1] else "is an integer past 64 bits"
    if isinstance(v, float):
        return None if math.isfinite(v) else f"{v} is not a finite number"
    if isinstance(v, str):
        return "contains a NUL character" if "\x00" in v else None
    return f"a {type(v).__name__} is not a recipe value (plain strings, numbers, booleans, null, lists, mappings)"


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class _Plain:
    """Walks a composed YAML node graph into plain data, refusing what a recipe may not hold."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.values = 0
        self.open: set[int] = set()  # the nodes being walked: an alias to one of them is a cycle

    def walk(self, node: yaml.Node, loc: tuple, depth: int = 0) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _Refused(loc, f"the document expands to more than {MAX_VALUES:,} values (aliases?)",
                           node.start_mark)
        if depth > MAX_DEPTH:
            raise _Refused(loc, f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, loc)
        if id(node) in self.open:
            raise _Refused(loc, "an alias refers to a node that contains it", node.start_mark)
        kind = "seq" if isinstance(node, yaml.SequenceNode) else "map"
        if node.tag != _TAG + kind:
            raise self.tag_refused(node, loc)
        self.open.add(id(node))
        try:
            if kind == "seq":
                return [self.walk(n, loc + (i,), depth + 1) for i, n in enumerate(node.value)]
            return self.mapping(node, loc, depth)
        finally:
            self.open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, loc: tuple, depth: int) -> dict:
        out: dict[str, Any] = {}
        first: dict[str, yaml.Node] = {}
        merged: dict[str, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == _TAG + "merge":  # `<<: *base`: the explicit keys win, earlier merges first
                for m in (vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]):
                    got = self.walk(m, loc, depth + 1)
                    if not isinstance(got, dict):
                        raise _Refused(loc, "'<<' must merge a mapping", m.start_mark)
                    for k, v in got.items():
                        merged.setdefault(k, v)
                continue
            key = self.key(knode, loc)
            if key in first:
                raise _Refused(loc + (key,), f"duplicate key (first at line {first[key].start_mark.line + 1})",
                               knode.start_mark)
            first[key] = knode
            out[key] = self.walk(vnode, loc + (key,), depth + 1)
        return {**{k: v for k, v in merged.items() if k not in out}, **out} if merged else out

    def key(self, node: yaml.Node, loc: tuple) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise _Refused(loc, "a key must be a string, not a list or mapping", node.start_mark)
        if node.tag != _TAG + "str":
            kind = _KINDS.get(node.tag.removeprefix(_TAG))
            if kind is None:
                raise self.tag_refused(node, loc)
            raise _Refused(loc, f"the key {_short(node.value)} reads as {kind}, not a string; quote it",
                           node.start_mark)
        if "\x00" in node.value:
            raise _Refused(loc, "a key contains a NUL character", node.start_mark)
        return node.value

    def scalar(self, node: yaml.ScalarNode, loc: tuple) -> Any:
        tag = node.tag.removeprefix(_TAG)
        if tag in ("str", "timestamp"):  # a date is kept as written: no recipe value is a date
            value: Any = node.value
        elif tag in ("null", "bool", "int", "float"):
            try:
                value = self.loader.construct_object(node)
            except ValueError:  # an integer of thousands of digits (Python's int parsing limit)
                raise _Refused(loc, "is an integer past 64 bits", node.start_mark) from None
        else:
            raise self.tag_refused(node, loc)
        problem = _scalar_problem(value)
        if problem is not None:
            if isinstance(value, float):
                problem = f"{node.value} is not a finite number"
            raise _Refused(loc, problem, node.start_mark)
        return value

    @staticmethod
    def tag_refused(node: yaml.Node, loc: tuple) -> _Refused:
        tag = node.tag.replace(_TAG, "!!", 1) if node.tag.startswith(_TAG) else node.tag
        return _Refused(loc, f"the YAML tag {_short(tag, 60)} is not allowed (a recipe holds plain strings, "
                             f"numbers, booleans, null, lists and mappings)", node.start_mark)


def _yaml_error(where: str, text: str, e: yaml.YAMLError) -> str:
    """A YAML syntax error as one line: where, line:column, the problem."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: no mark, a position
        pos = e.position
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return f"{where}:{line}:{col}: not valid YAML: unacceptable character #x{e.character:04x}"
    mark = getattr(e, "problem_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or next((ln for ln in str(e).splitlines() if ln.strip()), "")
    return f"{where}{at}: not valid YAML: {problem}"


def load_plain_yaml(text: str, where: str, marks: bool = True) -> Any:
    """One YAML document as plain data, or a one-line PlainYamlError naming where, line and key path.

    Nothing but plain values is constructed (no tags); duplicate and non-string keys, integers
    past 64 bits, NaN and infinities are refused; aliases may not expand the document past
    MAX_VALUES values nor refer to themselves. `<<` merge keys work as in YAML 1.1. `marks`:
    name the line and column of a refused value (not for a one-line value such as --set's).
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters: a ReaderError here
        node = loader.get_single_node()
        return None if node is None else _Plain(loader).walk(node, ())
    except yaml.YAMLError as e:
        raise PlainYamlError(_yaml_error(where, text, e)) from None
    except _Refused as e:
        if not marks:
            e.mark = None
        raise PlainYamlError(e.line(where)) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise PlainYamlError(f"{where}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def plain_copy(data: Any, where: str) -> Any:
    """A deep copy of data given in Python (parse_recipe), with the rules of load_plain_yaml."""
    try:
        return _plain_copy(data, ())
    except _Refused as e:
        raise PlainYamlError(e.line(where)) from None


def _plain_copy(v: Any, loc: tuple, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _Refused(loc, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Refused(loc, f"the key {k!r} is not a string")
            if "\x00" in k:
                raise _Refused(loc, "a key contains a NUL character")
            out[k] = _plain_copy(x, loc + (k,), depth + 1)
        return out
    if isinstance(v, (list, tuple)):
        return [_plain_copy(x, loc + (i,), depth + 1) for i, x in enumerate(v)]
    problem = _scalar_problem(v)
    if problem is not None:
        raise _Refused(loc, problem)
    return v
