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

INGEST_CPUS = 2  # logical CPUs left for Ray Data's read/decode tasks


def ray_resources(spec: dict[str, Any]) -> dict[str, int]:
    scaling = spec["scaling"]
    workers = int(scaling["num_workers"])
    cpus = math.ceil(float(scaling["cpus_per_worker"]) * workers) + INGEST_CPUS
    return {"num_cpus": cpus, "num_gpus": workers if scaling["use_gpu"] else 0}


def start_ray(spec: dict[str, Any], *, verbose: bool) -> bool:
    """A fresh local Ray (never a stale /tmp/ray cluster) sized for this job.

    Returns False when this process already runs Ray (a notebook, a test): it is reused.
    """
    import ray

    if ray.is_initialized():
        return False

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    res = ray_resources(spec)
    if spec["scaling"]["use_gpu"]:
        import torch

        have = torch.cuda.device_count()
        if have < res["num_gpus"]:
            raise TlctlError(
                f"scaling.num_workers: {res['num_gpus']} GPU workers asked for, this machine "
                f"has {have} GPU(s) (valid: 1..{max(have, 1)}, or scaling.use_gpu: false)"
            )
    ray.init(
        address="local",
        include_dashboard=False,
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

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
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
                outcome["summary"] = run_job(prepared, progress=progress, submitted_at=submitted_at)
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
