"""What an ingest task counts and reports, per subset of its source.

Every record is counted once: `read == kept + sum(filtered) + sum(unreadable)`, per subset and in
total; records that cannot be read at all are counted under the subset "(unreadable)". Issues
(file, line, kind, message) are kept up to `ingest.report_issues` per task.
"""

from __future__ import annotations

from collections import Counter

ALL_SUBSET = "(all)"  # stats key when the source has no subset field
MISSING_SUBSET = "(missing)"  # the record has no usable value at the subset path
UNREADABLE_SUBSET = "(unreadable)"


class Counts:
    """One task's counters and issues. `subs` arguments: one subset for the whole batch, or a
    list giving the subset of each position."""

    def __init__(self, rel_path: str, report_issues: int):
        self.rel_path, self.report_issues = rel_path, report_issues
        self.subsets: dict[str, dict] = {}
        self.issues: list[dict] = []
        self.files_unreadable = 0

    def _sub(self, key: str) -> dict:
        c = self.subsets.get(key)
        if c is None:
            c = self.subsets[key] = {"read": 0, "kept": 0, "bytes_read": 0, "bytes_kept": 0,
                                     "filtered": {}, "unreadable": {}}
        return c

    def issue(self, kind: str, line: int | None, message: str) -> None:
        if len(self.issues) < self.report_issues:
            self.issues.append({"file": self.rel_path, "line": line, "kind": kind, "message": message})

    def unreadable(self, reason: str, line: int | None, message: str, n: int = 1) -> None:
        """n records that could not be read (reported once)."""
        c = self._sub(UNREADABLE_SUBSET)
        c["read"] += n
        c["unreadable"][reason] = c["unreadable"].get(reason, 0) + n
        self.issue(reason, line, message)

    def add(self, subs: list[str] | str, positions: list[int], key: str, sizes: list[int] | None = None) -> None:
        """counter `key` (+1, or + sizes[p]) for the documents at `positions`, per subset."""
        if type(subs) is str:
            c = self._sub(subs)
            c[key] += len(positions) if sizes is None else sum([sizes[p] for p in positions])
            return
        if sizes is None:
            groups: dict = Counter([subs[p] for p in positions])
        else:
            groups = {}
            for p in positions:
                s = subs[p]
                groups[s] = groups.get(s, 0) + sizes[p]
        for s, n in groups.items():
            self._sub(s)[key] += n

    def filtered(self, subs: list[str] | str, positions: list[int], reason: str) -> None:
        groups = {subs: len(positions)} if type(subs) is str else Counter([subs[p] for p in positions])
        for s, n in groups.items():
            f = self._sub(s)["filtered"]
            f[reason] = f.get(reason, 0) + n

    def result(self) -> dict:
        """The source's counters: totals over its subsets, and per subset (key "subsets")."""
        subsets = {k: self.subsets[k] for k in sorted(self.subsets)}
        total = {"files": 0, "files_unreadable": self.files_unreadable, "read": 0, "kept": 0,
                 "bytes_read": 0, "bytes_kept": 0, "filtered": {}, "unreadable": {}}
        for c in subsets.values():
            for k in ("read", "kept", "bytes_read", "bytes_kept"):
                total[k] += c[k]
            for group in ("filtered", "unreadable"):
                for reason, n in c[group].items():
                    total[group][reason] = total[group].get(reason, 0) + n
        for c in [total, *subsets.values()]:
            c["filtered"] = dict(sorted(c["filtered"].items()))
            c["unreadable"] = dict(sorted(c["unreadable"].items()))
        total["subsets"] = subsets
        return total
