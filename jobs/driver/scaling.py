"""`scaling.num_workers: auto`: one training worker per GPU, resolved where the job runs.

The client cannot know a remote cluster's GPUs, so `auto` stays in the spec until the
job's driver starts (on the cluster, or in the CLI for `--local`) and is then replaced by
a number, which is what the run's stored spec records.
"""

from __future__ import annotations

from jobs.errors import TlctlError
from jobs.spec.model import CPU_WORKERS, JobSpec

INGEST_CPUS = 2  # logical CPUs left for Ray Data's read/decode tasks


def resolve_num_workers(spec: JobSpec, *, gpus: float, where: str) -> JobSpec:
    """`spec` with a numeric `scaling.num_workers` (`gpus`: GPUs `where` has); a copy."""
    scaling = spec.scaling
    if scaling.num_workers != "auto":
        return spec
    if not scaling.use_gpu:
        workers = CPU_WORKERS
    elif int(gpus) >= 1:
        workers = int(gpus)
    else:
        raise TlctlError(
            f"scaling.num_workers: auto means one worker per GPU, and {where} has no GPU "
            "right now (an autoscaling cluster adds GPU nodes only on demand: set "
            "scaling.num_workers to a number, or scaling.use_gpu: false)"
        )
    return spec.copy_with(scaling={"num_workers": workers})
