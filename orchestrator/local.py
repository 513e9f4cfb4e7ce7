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
from collections.abc import Callable
from typing import Any

from jobs.driver import INGEST_CPUS, drive, quiet_ray_data, quiet_ray_logs
from jobs.errors import TlctlError
from jobs.run import Prepared


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
    if not verbose:
        quiet_ray_logs()
    quiet_ray_data(verbose)
    return True


def run_local(
    prepared: Prepared,
    *,
    verbose: bool,
    on_progress: Callable[[dict[str, Any]], None],
    submitted_at: float,
) -> dict[str, Any]:
    """Start Ray sized for the job, drive it (see `jobs.driver.drive`), stop Ray.

    On Ctrl-C the KeyboardInterrupt is re-raised without `ray.shutdown()` and the caller
    ends the process (Ray's local processes share its fate). Checkpoints already in
    storage are complete; the same spec resumes from them.
    """
    import ray

    started = start_ray(prepared.spec, verbose=verbose)
    interrupted = False
    try:
        return drive(
            prepared,
            on_progress=on_progress,
            submitted_at=submitted_at,
            concurrency=local_trials(prepared.spec),
        )
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if started and not interrupted:
            ray.shutdown()
