"""Drive a prepared job on the Ray this process is connected to, with live progress.

Shared by `tlctl submit --local` (the CLI's own process) and a cluster job's driver.
One job per run: before anything of the run is written, the driver takes the run's lease
(jobs.storage.lease; a second submit of a running run is refused, exit 2), renews it while
the job runs and releases it when the job ends, however it ends; a lease taken over from a
dead holder is recorded as a `lease_takeover` event, a lease lost to another job stops this
one (exit 1). Training runs in a thread so that Ray Train does not take over SIGINT (its
handler exits the process silently); the calling thread renders progress from a queue that
rank 0 (or the search's Tune callback) feeds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs.driver.interrupts import SigintWatch
from jobs.driver.job import run_job
from jobs.driver.preflight import Prepared, recheck_resume
from jobs.errors import EXIT_FAILED, TlctlError
from jobs.search.tune import run_search
from jobs.storage.lease import Lease, acquire
from jobs.storage.metrics import post_event

PROGRESS_QUEUE_SIZE = 1000
LOCAL_JOB = "tlctl submit --local"


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
    job: str = LOCAL_JOB,
) -> dict[str, Any]:
    """Hold the run's lease, train (or search) in a thread, feed `on_progress`, return the
    summary. `job` names this job to a submit that the lease refuses.

    Ray must be initialized. Errors come back as TlctlError (exit 1 for a failed job, 2 for
    a run another job holds). On KeyboardInterrupt the caller must end the process without
    `ray.shutdown()`: shutting Ray down under the training thread's pending calls crashes
    the interpreter.
    """
    lease = take_lease(prepared, job)
    try:
        return _drive(
            recheck_resume(prepared),
            lease,
            on_progress=on_progress,
            submitted_at=submitted_at,
            concurrency=concurrency,
            ingest_cpus=ingest_cpus,
        )
    finally:
        lease.release()


def take_lease(prepared: Prepared, job: str) -> Lease:
    """The run's lease, renewing; a takeover from a dead holder becomes an event of the run."""
    spec, layout = prepared.spec, prepared.layout
    # prune: a run that fails before writing anything (a corrupt image) leaves no trace.
    lease = acquire(
        layout.lease,
        job=job,
        what=f"run '{spec.name}' at {layout.uri}",
        prune_empty_parent=True,
    )
    try:
        if lease.took_over is not None:
            old = lease.took_over
            age = lease.took_over_age_s or 0.0
            print(
                f"tlctl: run '{spec.name}': took over the lease of {old.describe()}, whose "
                f"last heartbeat was {age:.0f} s ago (over its {old.ttl_s:.0f} s TTL)",
                file=sys.stderr,
                flush=True,
            )
            post_event(
                layout,
                "lease_takeover",
                window_s=spec.failure.storage_retry_s,
                previous={"host": old.host, "pid": old.pid, "job": old.job},
                heartbeat_age_s=round(age, 1),
                holder={"host": lease.holder.host, "pid": lease.holder.pid, "job": job},
            )
    except BaseException:
        lease.release()
        raise
    return lease.start()


def _drive(
    prepared: Prepared,
    lease: Lease,
    *,
    on_progress: Callable[[dict[str, Any]], None],
    submitted_at: float | None,
    concurrency: int | None,
    ingest_cpus: float,
) -> dict[str, Any]:
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
            lease.check()  # taken over by another job: stop writing the run
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
