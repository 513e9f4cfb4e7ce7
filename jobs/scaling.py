"""`scaling.num_workers: auto`: one training worker per GPU, resolved where the job runs.

The client cannot know a remote cluster's GPUs, so `auto` stays in the spec until the
job's driver starts (on the cluster, or in the CLI for `--local`) and is then replaced by
a number, which is what the run's stored spec records.
"""

from __future__ import annotations

import copy
from typing import Any

from jobs.errors import TlctlError

CPU_WORKERS = 2  # `auto` without GPUs: two data-parallel CPU workers


def resolve_num_workers(spec: dict[str, Any], *, gpus: float, where: str) -> dict[str, Any]:
    """A copy of `spec` with a numeric `scaling.num_workers` (`gpus`: GPUs `where` has)."""
    scaling = spec["scaling"]
    if scaling["num_workers"] != "auto":
        return spec
    if not scaling["use_gpu"]:
        workers = CPU_WORKERS
    elif int(gpus) >= 1:
        workers = int(gpus)
    else:
        raise TlctlError(
            f"scaling.num_workers: auto means one worker per GPU, and {where} has no GPU "
            "right now (an autoscaling cluster adds GPU nodes only on demand: set "
            "scaling.num_workers to a number, or scaling.use_gpu: false)"
        )
    out = copy.deepcopy(spec)
    out["scaling"]["num_workers"] = workers
    return out
