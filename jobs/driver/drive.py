"""Drive a prepared job on the Ray this process is connected to, with live progress.

Shared by `tlctl submit --local` (the CLI's own process) and a cluster job's driver.
Training runs in a thread so that Ray Train does not take over SIGINT (its handler exits
the process silently); the calling thread renders progress from a queue that rank 0 (or
the search's Tune callback) feeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs.driver.interrupts import SigintWatch
from jobs.driver.job import run_job
from jobs.driver.preflight import Prepared
from jobs.errors import EXIT_FAILED, TlctlError
from jobs.search.tune import run_search

PROGRESS_QUEUE_SIZE = 1000


def quiet_ray(verbose: bool) -> None:
    """Ray's console log lines off unless `verbose` (its log files stay complete), and Ray
    Data's progress bars and execution banners with them."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if verbose:
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.air"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        if name != "ray.data":  # ray.data keeps DEBUG for its own log file
            logger.setLevel(logging.ERROR)


def drive(
    prepared: Prepared,
    *,
    on_progress: Callable[[dict[str, Any]], None],
    submitted_at: float | None,
    concurrency: int | None = None,
    ingest_cpus: float = 0,
) -> dict[str, Any]:
    """Train (or search) in a thread, feed `on_progress`, return the summary.

    Ray must be initialized. Errors come back as TlctlError (exit 1 for a failed job).
    On KeyboardInterrupt the caller must end the process without `ray.shutdown()`:
    shutting Ray down under the training thread's pending calls crashes the interpreter.
    """
    from ray.util.queue import Queue

    progress = Queue(maxsize=PROGRESS_QUEUE_SIZE, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            if prepared.spec.search:
                outcome["summary"] = run_search(
                    prepared,
                    progress=progress,
                    submitted_at=submitted_at,
                    concurrency=concurrency,
                    ingest_cpus=ingest_cpus,
                )
            else:
                outcome["summary"] = run_job(prepared, progress=progress, submitted_at=submitted_at)
        except BaseException as exc:  # handed to the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="tlctl-train", daemon=True)
    with SigintWatch() as ctrl_c:  # Ctrl-C must stop the driver, see driver.interrupts
        thread.start()
        while thread.is_alive():
            ctrl_c.check()
            _drain(progress, on_progress, timeout=0.2)
        _drain(progress, on_progress, timeout=0.0)
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, TlctlError):
            raise err
        raise TlctlError(f"job failed: {err}", exit_code=EXIT_FAILED) from err
    return outcome["summary"]


def _drain(progress, on_progress, timeout: float) -> None:
    from ray.exceptions import RayActorError
    from ray.util.queue import Empty

    deadline = time.monotonic() + timeout
    while True:
        try:
            item = progress.get(block=timeout > 0, timeout=max(0.01, deadline - time.monotonic()))
        except (Empty, RayActorError):  # nothing new, or the queue is gone with Ray
            return
        on_progress(item)
        if time.monotonic() >= deadline:
            return
