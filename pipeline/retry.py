"""Retrying with exponential backoff: the delay schedule, and a retry loop around one call.

`backoff_delay` is the one schedule (first_s, 2 * first_s, 4 * first_s, ..., at most max_s).
`call_with_retries` retries a call that failed with a transient error (ingest re-opening an input
after an I/O error); download's reconnect loop keeps its own state between attempts (bytes
written, whether ranged reads work) and takes only the schedule. The runner's task retries are
scheduled, not slept, and live in the runner.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def backoff_delay(attempt: int, first_s: float, max_s: float | None = None) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): first_s * 2**attempt, at most max_s."""
    delay = first_s * 2**attempt
    return delay if max_s is None else min(delay, max_s)


def call_with_retries(
    fn: Callable[[], T],
    retries: int,
    first_s: float,
    *,
    on_error: Callable[[BaseException], None] | None = None,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
    give_up_on: tuple[type[BaseException], ...] = (FileNotFoundError,),
) -> T:
    """fn(), tried again up to `retries` times after an error of a `retry_on` type.

    `give_up_on` errors (checked first: FileNotFoundError is an OSError) are raised at once.
    After each retried error `on_error(err)` runs (e.g. to drop a broken connection), then,
    unless it was the last try, the call sleeps `backoff_delay(attempt, first_s)`. The last
    error is raised as it is.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except give_up_on:
            raise
        except retry_on as e:
            if on_error is not None:
                on_error(e)
            if attempt == retries:
                raise
            time.sleep(backoff_delay(attempt, first_s))
    raise AssertionError("unreachable")
