"""A search block as Ray Tune objects: the param space, trial specs, trial concurrency.

Pure logic: `ray.tune` is imported only by `param_space`, so the client can size and
validate a search without loading Ray.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from jobs.errors import TlctlError
from jobs.spec.model import JobSpec
from jobs.spec.search import (
    DIMENSIONS,
    TARGETS,
    SearchSpec,
    choices,
    concurrency_error,
    distribution,
)

_EPS = 1e-9  # 0.1 * 3 / 0.1 is 2.9999999999999996, not 3: floor with a little slack
_CASTS: dict[str, type] = {
    "freeze_depth": int,
    "lr": float,
    "weight_decay": float,
    "batch_size": int,
}


def param_space(search: SearchSpec) -> dict[str, Any]:
    """The Ray Tune param space: one Tune domain (or grid_search) per searched dimension."""
    from ray import tune

    grid = search.search_alg == "grid"
    return {key: _domain(tune, key, value, grid) for key, value in search.dimensions().items()}


def _domain(tune: Any, key: str, value: Any, grid: bool) -> Any:
    if grid:
        return tune.grid_search(choices(key, value))
    kind = distribution(value)
    if kind is None:
        return tune.choice(list(value))
    lo, hi = value[kind]
    if kind == "range":
        return tune.randint(lo, hi + 1)  # randint's upper bound is exclusive
    return tune.loguniform(lo, hi) if kind == "loguniform" else tune.uniform(lo, hi)


def hyperparameters(search: SearchSpec, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values as plain numbers (Tune may sample numpy scalars, which YAML
    can't store), in the fixed dimension order; config keys that are not searched are left
    out."""
    searched = search.dimensions()
    return {
        key: _CASTS[key](config[key]) for key in DIMENSIONS if key in searched and key in config
    }


def apply_trial(spec: JobSpec, config: dict[str, Any]) -> JobSpec:
    """The job spec of one trial: a validated copy with the sampled values written in and
    no search block (a trial is an ordinary job)."""
    values = {key: _CASTS[key](value) for key, value in config.items() if key in TARGETS}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        sections.setdefault(TARGETS[key], {})[key] = value
    raw = spec.model_dump()
    for section, fields in sections.items():
        raw[section].update(fields)
    raw["search"] = None
    return JobSpec.model_validate(raw)


def trials_that_fit(
    *,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    cluster_cpus: float,
    cluster_gpus: float,
    ingest_cpus: float = 0,
    driver_cpus: float = 0,
) -> int:
    """How many trials the cluster holds at once (may be 0): a trial is a whole Train run.

    A trial needs num_workers × cpus_per_worker CPUs plus `driver_cpus` for the Tune
    function that drives it (Tune's default is 1 unless wrapped with `tune.with_resources`),
    and one GPU per worker with use_gpu. `ingest_cpus` stay free for Ray Data, which
    otherwise never gets a CPU and hangs.
    """
    per_trial = num_workers * cpus_per_worker + driver_cpus
    fits = math.floor((cluster_cpus - ingest_cpus) / per_trial + _EPS)
    if use_gpu:
        fits = min(fits, math.floor(cluster_gpus / num_workers + _EPS))
    return max(0, fits)


def max_concurrent_trials(
    setting: Literal["auto"] | int,
    *,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    cluster_cpus: float,
    cluster_gpus: float,
    ingest_cpus: float = 0,
    driver_cpus: float = 0,
) -> int:
    """`auto` → as many trials as fit (at least 1); an explicit number is capped to that.

    Running more trials than fit only leaves Train runs waiting for workers that other
    trials hold, so even an explicit setting never oversubscribes.
    """
    problem = concurrency_error(setting)
    if problem:
        raise TlctlError(f"search.max_concurrent_trials: {problem}")
    fits = max(
        1,
        trials_that_fit(
            num_workers=num_workers,
            cpus_per_worker=cpus_per_worker,
            use_gpu=use_gpu,
            cluster_cpus=cluster_cpus,
            cluster_gpus=cluster_gpus,
            ingest_cpus=ingest_cpus,
            driver_cpus=driver_cpus,
        ),
    )
    return fits if setting == "auto" else min(setting, fits)


def trials_for(
    spec: JobSpec, *, cluster_cpus: float, cluster_gpus: float, ingest_cpus: float = 0
) -> int:
    """`max_concurrent_trials` of `spec`'s search on a cluster of that size."""
    if spec.search is None:
        return 1
    scaling = spec.scaling
    return max_concurrent_trials(
        spec.search.max_concurrent_trials,
        num_workers=scaling.workers,
        cpus_per_worker=scaling.cpus_per_worker,
        use_gpu=scaling.use_gpu,
        cluster_cpus=cluster_cpus,
        cluster_gpus=cluster_gpus if scaling.use_gpu else 0.0,
        ingest_cpus=ingest_cpus,
    )
