"""Storage calls that outlast an outage: retried with exponential backoff and full jitter.

An S3 server that is down, restarting or slow (connection refused, timeouts, 5xx, SlowDown)
must not kill hours of training: checkpoint uploads and metrics writes are retried until a
window (`failure.storage_retry_s`, default 5 minutes) has passed since the first failure,
then the job fails with the storage error. Errors a retry cannot fix (access denied, no such
bucket) fail at once: the decision is the error's type (jobs.storage.errors). Each retried
write is idempotent (a whole object is put again), so nothing is lost or written twice.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from jobs.errors import EXIT_FAILED
from jobs.storage.errors import StorageError, as_storage_error

DEFAULT_WINDOW_S = 300.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
logger = logging.getLogger(__name__)
T = TypeVar("T")


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, first × 2^attempt)]."""
    return rng() * min(MAX_DELAY_S, FIRST_DELAY_S * 2**attempt)


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    window_s: float = DEFAULT_WINDOW_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """`fn()`, retried on transient storage errors until `window_s` after the first one.

    Anything else is raised unchanged, at once.
    """
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            error = as_storage_error(exc)
            if error is None or not error.transient:
                raise
            now = clock()
            first_failure = now if first_failure is None else first_failure
            if now - first_failure >= window_s:
                raise StorageError(
                    f"storage: {what} still failing after {window_s:.0f} s of retries: {error}",
                    exit_code=EXIT_FAILED,
                ) from exc
            if on_retry is not None:
                on_retry(attempt, exc)
            logger.warning("storage: %s failed (%s); retrying", what, error)
            sleep(min(backoff(attempt), max(0.0, window_s - (now - first_failure))))
            attempt += 1
