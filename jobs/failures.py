"""The run's record of worker failures: which ranks died, why, and when.

Ray Train restarts the worker group after a worker or its node is lost (up to
`failure.max_failures` times) and the new rank 0 resumes from the latest checkpoint that
verifies, logging a `resumed` event. This callback, which runs in Ray Train's controller,
adds the other half to `metrics.jsonl`: a `worker_failure` event with the failed ranks, the
cause (the error's last line, not a traceback) and the time. It writes before the restart,
so the new rank 0, which keeps the log's events when it loads it, keeps this one too.
"""

from __future__ import annotations

import time
from typing import Any

from ray.train import UserCallback

from jobs.metrics import read_metrics, write_metrics
from jobs.retry import DEFAULT_WINDOW_S, retrying
from jobs.storage import resolve


def cause_of(exc: BaseException) -> str:
    """The last `SomeError: message` line of a worker's error."""
    from jobs.run import root_cause

    return root_cause(exc)[:500]


class FailureLog(UserCallback):
    """Module-level and plain-valued: Ray pickles it into the Train controller."""

    def __init__(
        self,
        run_uri: str,
        endpoint: str | None,
        tags: dict[str, Any] | None = None,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self.run_uri, self.endpoint = run_uri, endpoint
        self.tags = dict(tags or {})
        self.window_s = window_s

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        if not worker_exceptions:
            return
        ranks = sorted(worker_exceptions)
        event = {
            **self.tags,
            "kind": "event",
            "event": "worker_failure",
            "ranks": ranks,
            "cause": cause_of(worker_exceptions[ranks[0]]),
            "time": time.time(),
        }
        loc = resolve(self.run_uri, self.endpoint).join("metrics.jsonl")

        def append() -> None:
            write_metrics(loc, [*read_metrics(loc), event])

        retrying(append, what="metrics.jsonl (worker failure)", window_s=self.window_s)
