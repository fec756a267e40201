"""Values inside a record: dotted-path access, and the markers for "no value" and "unreadable".

Readers hand the steps each record's text or, in its place, `MISSING` (no value at the path) or
a `Bad` (why the record could not be read); the steps, the subset and the meta column read other
fields through `getter` / `values_at`.
"""

from __future__ import annotations

from typing import Any, Callable

MISSING = object()  # no value at the path


class Bad:
    """An unreadable record in a batch (in place of its text)."""

    __slots__ = ("reason", "message")

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


def getter(path: str) -> Callable[[Any], Any]:
    """A function giving the value at a dotted path of a parsed record (MISSING where there is none)."""
    keys = path.split(".")
    if len(keys) == 1:
        key = keys[0]
        return lambda o: o.get(key, MISSING) if type(o) is dict else MISSING

    def get(o: Any) -> Any:
        for k in keys:
            if type(o) is not dict:
                return MISSING
            o = o.get(k, MISSING)
            if o is MISSING:
                return o
        return o

    return get


def fast_values(objs: list, keys: list[str]) -> list:
    """The value at keys of every object, at C speed; raises where one is missing."""
    if len(keys) == 1:
        k = keys[0]
        return [o[k] for o in objs]
    if len(keys) == 2:
        k1, k2 = keys
        return [o[k1][k2] for o in objs]
    raise KeyError(keys)


def values_at(objs: list, path: str) -> list:
    """The value at a dotted path of every object (MISSING where there is none)."""
    try:
        return fast_values(objs, path.split("."))
    except (KeyError, TypeError, IndexError):
        get = getter(path)
        return [get(o) for o in objs]
