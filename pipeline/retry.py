"""Retrying: which errors are worth another try, the delay schedule, and a retry loop around one call.

The failure semantics of reading an input (download and ingest share them):

* An error of the storage layer (opening or reading the bytes) is never bad content. One that
  can heal is retried inside the task on the `backoff_delay` schedule: a connection reset, a
  timeout, an HTTP 5xx, 408/425/429 and S3's throttling codes, and a missing file (404): object
  stores and hubs are eventually consistent, and fsspec's HTTP filesystem reports *any* failed
  HEAD-then-GET of a file's size, a 503 included, as FileNotFoundError. When the retries are
  spent, or at once for an error that cannot heal (`is_permanent`: access refused, a path that
  is not a file, another 4xx), the task raises; the runner retries the task `ray.task_retries`
  times on the same schedule and then fails the stage, naming the task and the file. An input
  that existed when the stage was planned is never dropped silently.
* Only content (bad JSON, bad compression, a value of the wrong type) counts against a stage's
  `max_errors`; the readers decide that, never this module.

`call_with_retries` is the loop (ingest re-opening an input at the same offset); download's
reconnect loop keeps its own state between attempts (bytes written, whether ranged reads work)
and takes only `is_permanent` and the schedule. The runner's task retries are scheduled, not
slept, and live in the runner.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

# HTTP statuses that may heal: not found (eventual consistency), timeouts, too early, throttled.
_RETRYABLE_4XX = frozenset({404, 408, 425, 429})
# botocore ClientError codes that heal (S3 answers RequestTimeout with a 400).
_RETRYABLE_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling",
                              "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                              "TooManyRequestsException", "ProvisionedThroughputExceededException",
                              "InternalError", "ServiceUnavailable"})
_PERMANENT_TYPES = (PermissionError, IsADirectoryError, NotADirectoryError, NotImplementedError)


def http_status(e: BaseException) -> int | None:
    """The HTTP status an error carries: aiohttp's `status`, requests' / httpx's (huggingface_hub)
    `response.status_code`, botocore's `response["ResponseMetadata"]["HTTPStatusCode"]`."""
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(response, dict):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def _error_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return code if isinstance(code, str) else None
    return None


def is_permanent(e: BaseException) -> bool:
    """An error another try cannot fix: access refused, a path that is not a file, an operation the
    store does not support, an HTTP 4xx other than 404/408/425/429 (unless its code is a
    throttling or timeout one). Everything else a storage layer raises is worth a retry.

    The chain of causes is read too: fsspec raises FileNotFoundError *from* the HTTP error of a
    failed HEAD and GET, so a 403 arrives as a FileNotFoundError whose cause says 403.
    """
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, _PERMANENT_TYPES):
            return True
        if _error_code(e) not in _RETRYABLE_CODES:
            status = http_status(e)
            if status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX:
                return True
        e, seen = e.__cause__, seen + 1
    return False


def describe(e: BaseException) -> str:
    """`Type: message` of an error, with the HTTP status of its chain of causes when the error
    itself hides it (fsspec's FileNotFoundError for a 403 or a 503)."""
    text = f"{type(e).__name__}: {e}"
    if http_status(e) is None:
        cause, seen = e.__cause__, 0
        while cause is not None and seen < 8:
            status = http_status(cause)
            if status is not None:
                return f"{text} (HTTP {status})"
            cause, seen = cause.__cause__, seen + 1
    return text


def backoff_delay(attempt: int, first_s: float, max_s: float | None = None) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): first_s * 2**attempt, at most max_s."""
    delay = first_s * 2**attempt
    return delay if max_s is None else min(delay, max_s)


def call_with_retries(
    fn: Callable[[], T],
    retries: int,
    first_s: float,
    *,
    max_s: float | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    retry_if: Callable[[BaseException], bool] = lambda e: not is_permanent(e),
) -> T:
    """fn(), tried again up to `retries` times after an error that `retry_if` accepts.

    After each error `on_error(err)` runs (e.g. to drop a broken connection); then, unless the
    error is not to be retried or it was the last try, the call sleeps
    `backoff_delay(attempt, first_s, max_s)`. The last error is raised as it is.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if on_error is not None:
                on_error(e)
            if attempt == retries or not retry_if(e):
                raise
            time.sleep(backoff_delay(attempt, first_s, max_s))
    raise AssertionError("unreachable")
