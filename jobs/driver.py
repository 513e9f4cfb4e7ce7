"""Drive a prepared job on the Ray this process is connected to, with live progress.

Shared by `tlctl submit --local` (the CLI's own process) and `jobs.entrypoint` (the job's
driver on a cluster). Training runs in a thread so that Ray Train does not take over SIGINT
(its handler exits the process silently); the calling thread renders progress from a
queue that rank 0 (or the search's Tune callback) feeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.interrupts import SigintWatch
from jobs.run import Prepared, run_job

INGEST_CPUS = 2  # logical CPUs left for Ray Data's read/decode tasks


def quiet_ray_logs() -> None:
    """Ray's console log lines off (its log files stay complete); only errors get through."""
    import ray.data  # noqa: F401 - configures the ray.data loggers we then quiet

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.air"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        if name != "ray.data":  # ray.data keeps DEBUG for its own log file
            logger.setLevel(logging.ERROR)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and execution banners only with --verbose."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose


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

    from jobs.tune import run_search

    progress = Queue(maxsize=1000, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            if prepared.spec.get("search"):
                outcome["summary"] = run_search(
                    prepared,
                    progress=progress,
                    submitted_at=submitted_at,
                    concurrency=concurrency,
                    ingest_cpus=ingest_cpus,
                )
            else:
                outcome["summary"] = run_job(prepared, progress=progress, submitted_at=submitted_at)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="tlctl-train", daemon=True)
    with SigintWatch() as ctrl_c:  # Ctrl-C must stop the driver, see jobs.interrupts
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
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = progress.get(block=timeout > 0, timeout=max(0.01, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - ray.util.queue.Empty, or the queue actor is gone
            return
        on_progress(item)
        if time.monotonic() >= deadline:
            return
