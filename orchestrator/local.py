"""`tlctl submit --local`: run a job on an embedded single-node Ray in this process.

Ray gets only the CPUs/GPUs the job asks for plus a little for data ingest (with every
CPU held by training workers, Ray Data's tasks would never run). Ray's own logs stay out
of the terminal unless `--verbose`. Training runs in a thread; the main thread renders
progress from a queue that rank 0 feeds, and Ctrl-C stops Ray cleanly.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.run import Prepared, run_job
from jobs.tune import run_search

INGEST_CPUS = 2  # logical CPUs left for Ray Data's read/decode tasks


def local_trials(spec: dict[str, Any]) -> int:
    """Trials a search runs at once here: as many as this machine's CPUs/GPUs hold."""
    from jobs.search_space import max_concurrent_trials

    if not spec.get("search"):
        return 1
    scaling = spec["scaling"]
    return max_concurrent_trials(
        spec["search"].get("max_concurrent_trials", "auto"),
        num_workers=int(scaling["num_workers"]),
        cpus_per_worker=float(scaling["cpus_per_worker"]),
        use_gpu=bool(scaling["use_gpu"]),
        cluster_cpus=float(os.cpu_count() or 1),
        cluster_gpus=float(_gpu_count()) if scaling["use_gpu"] else 0.0,
    )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def ray_resources(spec: dict[str, Any]) -> dict[str, int]:
    """The job's workers (each trial's, for a search) plus INGEST_CPUS for Ray Data."""
    from jobs.tune import TRIAL_DRIVER_CPUS

    scaling = spec["scaling"]
    trials = local_trials(spec)
    workers = int(scaling["num_workers"]) * trials
    drivers = TRIAL_DRIVER_CPUS * trials if spec.get("search") else 0.0
    cpus = math.ceil(float(scaling["cpus_per_worker"]) * workers + drivers) + INGEST_CPUS
    return {"num_cpus": cpus, "num_gpus": workers if scaling["use_gpu"] else 0}


def start_ray(spec: dict[str, Any], *, verbose: bool) -> bool:
    """A fresh local Ray (never a stale /tmp/ray cluster) sized for this job.

    Returns False when this process already runs Ray (a notebook, a test): it is reused.
    """
    import ray

    if ray.is_initialized():
        return False

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # A search starts a few actors per trial (Tune's, Train's controller and workers); the
    # raylet warns on the console past 4x this many starting at once, which is normal here.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "16")
    res = ray_resources(spec)
    if spec["scaling"]["use_gpu"]:
        have = _gpu_count()
        if have < res["num_gpus"]:
            raise TlctlError(
                f"scaling.num_workers: {res['num_gpus']} GPU workers asked for, this machine "
                f"has {have} GPU(s) (valid: 1..{max(have, 1)}, or scaling.use_gpu: false)"
            )
    ray.init(
        address="local",
        # Ray Train frees the workers of a trial that Tune stops (ASHA) through the state
        # API, which the dashboard serves; without it their CPUs stay reserved.
        include_dashboard=bool(spec.get("search")),
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        **res,
    )
    from ray.data import DataContext

    if not verbose:
        quiet_ray_logs()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    return True


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


def run_local(
    prepared: Prepared,
    *,
    verbose: bool,
    on_progress: Callable[[dict[str, Any]], None],
    submitted_at: float,
) -> dict[str, Any]:
    """Start Ray, train in a thread, feed `on_progress` from rank 0's queue, stop Ray.

    Training runs in a thread so that Ray Train does not take over SIGINT (its handler
    exits the process silently). On Ctrl-C the KeyboardInterrupt is re-raised without
    `ray.shutdown()`: shutting Ray down under the training thread's pending calls crashes
    the interpreter, so the caller must end the process (Ray's processes share its fate).
    Checkpoints already in storage are complete; the same spec resumes from them.
    """
    import ray
    from ray.util.queue import Queue

    started = start_ray(prepared.spec, verbose=verbose)
    interrupted = False
    try:
        progress = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                if prepared.spec.get("search"):
                    outcome["summary"] = run_search(
                        prepared,
                        progress=progress,
                        submitted_at=submitted_at,
                        concurrency=local_trials(prepared.spec),
                    )
                else:
                    outcome["summary"] = run_job(
                        prepared, progress=progress, submitted_at=submitted_at
                    )
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=work, name="tlctl-train", daemon=True)
        thread.start()
        while thread.is_alive():
            _drain(progress, on_progress, timeout=0.2)
        _drain(progress, on_progress, timeout=0.0)
        if "error" in outcome:
            err = outcome["error"]
            if isinstance(err, TlctlError):
                raise err
            raise TlctlError(f"job failed: {err}", exit_code=EXIT_FAILED) from err
        return outcome["summary"]
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if started and not interrupted:
            ray.shutdown()


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
