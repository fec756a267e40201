"""Progress of a stage: a rich bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("tinyprep")


def _rate(n: float, secs: float) -> float:
    return n / secs if secs > 0 else 0.0


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Rates(ProgressColumn):
    def __init__(self, owner: "StageProgress"):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        o = self.owner
        el = time.monotonic() - o.start
        return Text(f"{_rate(o.docs, el):,.0f} docs/s  {_rate(o.bytes, el) / 1e6:,.1f} MB/s  "
                    f"{o.done}/{o.total} files  {o.failed} failed", style="cyan")


class StageProgress:
    """Counts finished tasks of one stage; renders a bar (tty) or a log line every `period` s."""

    def __init__(self, stage: str, total: int, total_bytes: int, skipped: int, period: float = 10.0,
                 tty: bool | None = None):
        self.stage, self.total, self.total_bytes = stage, total, max(total_bytes, 1)
        self.done = self.skipped = skipped
        self.failed = self.docs = self.bytes = 0
        self.done_bytes = 0
        self.start = time.monotonic()
        self.period = period
        self.last_log = self.start
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._bar: Progress | None = None
        if self.tty and total:
            self._bar = Progress(TextColumn(f"[bold]{stage:<9}"), BarColumn(), _Rates(self),
                                 TimeRemainingColumn(), console=Console(), transient=False)
            self._task = self._bar.add_task(stage, total=total, completed=skipped)
            self._bar.start()

    def task_done(self, docs: int, nbytes: int, size: int) -> None:
        self.done += 1
        self.docs += docs
        self.bytes += nbytes
        self.done_bytes += size
        self._tick()

    def task_failed(self) -> None:
        self.failed += 1
        self._tick()

    def eta(self) -> float | None:
        el = time.monotonic() - self.start
        worked = self.done - self.skipped
        if worked <= 0 or el <= 0:
            return None
        return el / worked * (self.total - self.done - self.failed)

    def line(self) -> str:
        el = time.monotonic() - self.start
        eta = self.eta()
        return (f"{self.stage}: {self.done}/{self.total} files ({self.skipped} already done, {self.failed} failed), "
                f"{self.docs:,} docs ({_rate(self.docs, el):,.0f} docs/s), {self.bytes / 1e6:,.1f} MB "
                f"({_rate(self.bytes, el) / 1e6:,.2f} MB/s), elapsed {fmt_duration(el)}"
                + (f", ETA {fmt_duration(eta)}" if eta is not None else ""))

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed)
            return
        now = time.monotonic()
        if now - self.last_log >= self.period:
            self.last_log = now
            log.info(self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        log.info(self.line().replace(f"{self.stage}:", f"{self.stage} finished:", 1))
