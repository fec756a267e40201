"""Fault injection for tests: `TINYPREP_FAULTS="STAGE:TASK_GLOB:MODE[:TIMES]"`.

Several rules are separated by `;`. MODE is `raise` (the task raises), `exit` (the worker process
dies with `os._exit`), `raise-late` / `exit-late` (the same, after the outputs are committed and
before the completion record is written), `hang` (the task sleeps until the run is killed), `slow`
(the task sleeps 2 s, then runs). TIMES is how many first attempts fail (default 1; `*`: all).
The rules are read inside the worker, so a cluster run forwards the variable to its workers.
"""

from __future__ import annotations

import fnmatch
import os
import time

FAULTS_ENV = "TINYPREP_FAULTS"
_MODES = ("raise", "exit", "raise-late", "exit-late", "hang", "slow")


class FaultRuleError(ValueError):
    """TINYPREP_FAULTS holds a rule that is not STAGE:TASK_GLOB:MODE[:TIMES]."""


def parse_faults() -> list[tuple[str, str, str, int | None]]:
    """The rules of TINYPREP_FAULTS; FaultRuleError names a malformed one (checked before a run)."""
    rules = []
    for rule in filter(None, (r.strip() for r in os.environ.get(FAULTS_ENV, "").split(";"))):
        parts = rule.split(":")
        times_ok = len(parts) == 3 or (len(parts) == 4 and (parts[3] == "*" or parts[3].isdigit()))
        if len(parts) not in (3, 4) or parts[2] not in _MODES or not times_ok:
            raise FaultRuleError(f"{FAULTS_ENV}: bad rule {rule!r}; expected STAGE:TASK_GLOB:MODE[:TIMES] with "
                                 f"MODE one of {', '.join(_MODES)} and TIMES a number or *")
        times = None if len(parts) == 4 and parts[3] == "*" else int(parts[3]) if len(parts) == 4 else 1
        rules.append((parts[0], parts[1], parts[2], times))
    return rules


def inject(stage: str, task_id: str, attempt: int, late: bool) -> None:
    """Fail the way a matching rule says (or return)."""
    for r_stage, glob, mode, times in parse_faults():
        if r_stage != stage or not fnmatch.fnmatchcase(task_id, glob) or mode.endswith("-late") != late:
            continue
        if times is not None and attempt >= times:
            continue
        if mode == "hang":
            time.sleep(24 * 3600)
        if mode == "slow":
            time.sleep(2.0)
            continue
        if mode.startswith("exit"):
            os._exit(17)
        raise RuntimeError(f"injected fault ({FAULTS_ENV}) in {stage} task {task_id}, attempt {attempt}")
