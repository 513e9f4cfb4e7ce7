"""The local target: run a job on an embedded single-node Ray in this process.

Ray gets only the CPUs/GPUs the job asks for plus a little for data ingest (with every
CPU held by training workers, Ray Data's tasks would never run). Ray's own logs stay out
of the terminal unless `--verbose`. Training runs in a thread; the main thread renders
progress from a queue that rank 0 feeds.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

from jobs.driver.drive import drive, quiet_ray
from jobs.driver.preflight import Prepared, preflight
from jobs.driver.scaling import INGEST_CPUS, resolve_num_workers
from jobs.errors import TlctlError
from jobs.search.space import trials_for
from jobs.search.tune import TRIAL_DRIVER_CPUS
from jobs.spec.load import check_fits_here
from jobs.spec.model import JobSpec
from orchestrator import display
from orchestrator.targets.base import SubmitOptions


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def local_trials(spec: JobSpec) -> int:
    """Trials a search runs at once here: as many as this machine's CPUs/GPUs hold."""
    gpus = float(gpu_count()) if spec.search and spec.scaling.use_gpu else 0.0
    return trials_for(spec, cluster_cpus=float(os.cpu_count() or 1), cluster_gpus=gpus)


def ray_resources(spec: JobSpec) -> dict[str, int]:
    """The job's workers (each trial's, for a search) plus INGEST_CPUS for Ray Data."""
    scaling = spec.scaling
    trials = local_trials(spec)
    workers = scaling.workers * trials
    drivers = TRIAL_DRIVER_CPUS * trials if spec.search else 0.0
    cpus = math.ceil(scaling.cpus_per_worker * workers + drivers) + INGEST_CPUS
    return {"num_cpus": cpus, "num_gpus": workers if scaling.use_gpu else 0}


def start_ray(spec: JobSpec, *, verbose: bool) -> bool:
    """A fresh local Ray (never a stale /tmp/ray cluster) sized for this job.

    Returns False when this process already runs Ray (a notebook, a test): it is reused.
    """
    import ray

    if ray.is_initialized():
        return False
    res = ray_resources(spec)
    if spec.scaling.use_gpu:
        have = gpu_count()
        if have < res["num_gpus"]:
            raise TlctlError(
                f"scaling.num_workers: {res['num_gpus']} GPU workers asked for, this machine "
                f"has {have} GPU(s) (valid: 1..{max(have, 1)}, or scaling.use_gpu: false)"
            )
    ray.init(
        address="local",
        # Ray Train frees the workers of a trial that Tune stops (ASHA) through the state
        # API, which the dashboard serves; without it their CPUs stay reserved.
        include_dashboard=spec.search is not None,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        **res,
    )
    quiet_ray(verbose)
    return True


def run_local(
    prepared: Prepared,
    *,
    verbose: bool,
    on_progress: Callable[[dict[str, Any]], None],
    submitted_at: float,
) -> dict[str, Any]:
    """Start Ray sized for the job, drive it (see `jobs.driver.drive.drive`), stop Ray.

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


class LocalTarget:
    """`--local`: pre-flight here, train here with live progress, print the summary."""

    local = True

    def submit(self, spec: JobSpec, options: SubmitOptions) -> int:
        gpus = gpu_count() if spec.scaling.use_gpu else 0
        spec = resolve_num_workers(spec, gpus=gpus, where="this machine")
        check_fits_here(spec, cpus=os.cpu_count() or 1)
        prepared = preflight(spec)
        if not options.json_out:
            display.console.print(
                display.start_line(prepared, local_trials(prepared.spec)), soft_wrap=True
            )
        with display.progress_display(prepared.spec, options.json_out) as progress:
            summary = run_local(
                prepared,
                verbose=options.verbose,
                submitted_at=options.submitted_at,
                on_progress=progress.update,
            )
        if options.json_out:
            display.emit_json(summary)
        else:
            display.print_summary(summary)
        return 0
