"""A spec's `search:` block as trials: grid enumeration, Ray Tune param space, concurrency.

Works on the plain dict form of the block (`JobSpec.model_dump()["search"]`), because
that is what travels to the cluster. Each searched dimension is either a list of choices
or one distribution `{kind: [lo, hi]}` with kind `range` (inclusive ints), `loguniform`
or `uniform`. Pure logic: `ray.tune` is imported only by `param_space`, so the client
can validate a spec without loading Ray.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

from jobs.errors import TlctlError

# Searched dimension → (spec section it overrides, type a trial value is cast to).
TARGETS: dict[str, tuple[str, type]] = {
    "freeze_depth": ("backbone", int),
    "lr": ("train", float),
    "weight_decay": ("train", float),
    "batch_size": ("train", int),
}
DIMENSIONS = tuple(TARGETS)
_EPS = 1e-9  # 0.1 * 3 / 0.1 is 2.9999999999999996, not 3: floor with a little slack


def dimensions(search: dict[str, Any]) -> dict[str, Any]:
    """The searched dimensions that are present, in the fixed DIMENSIONS order."""
    return {key: search[key] for key in DIMENSIONS if search.get(key) is not None}


def distribution(value: Any) -> str | None:
    """`range`, `loguniform` or `uniform` for `{kind: [lo, hi]}`; None for a list of choices."""
    return next(iter(value)) if isinstance(value, dict) else None


def choices(key: str, value: Any) -> list[Any]:
    """Every value a grid visits: the list itself, or every int of an inclusive range."""
    kind = distribution(value)
    if kind is None:
        return list(value)
    if kind == "range":
        lo, hi = value["range"]
        return list(range(lo, hi + 1))
    raise TlctlError(f"search.{key}: search_alg grid needs a list of choices, not {kind}")


def grid_size(search: dict[str, Any]) -> int:
    """Number of combinations of the grid, computed without enumerating it."""
    return math.prod(len(choices(k, v)) for k, v in dimensions(search).items())


def grid_combinations(search: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination (Cartesian product) in a fixed order: the last dimension varies fastest."""
    dims = {key: choices(key, value) for key, value in dimensions(search).items()}
    return [dict(zip(dims, combo, strict=True)) for combo in itertools.product(*dims.values())]


def trial_count(search: dict[str, Any]) -> int:
    """Trials a search runs: num_samples, or for a grid each combination num_samples times.

    That is Ray Tune's own rule for `grid_search` with `num_samples`.
    """
    samples = search.get("num_samples") or 1
    return grid_size(search) * samples if search.get("search_alg") == "grid" else samples


def param_space(search: dict[str, Any]) -> dict[str, Any]:
    """The Ray Tune param space: one Tune domain (or grid_search) per searched dimension."""
    from ray import tune

    grid = search.get("search_alg") == "grid"
    return {key: _domain(tune, key, value, grid) for key, value in dimensions(search).items()}


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
    if setting != "auto" and (
        isinstance(setting, bool) or not isinstance(setting, int) or setting < 1
    ):
        raise TlctlError(
            f"search.max_concurrent_trials: {setting!r} is not allowed (valid: auto, an int >= 1)"
        )
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


def apply_trial(spec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The job spec of one trial: a deep copy with the sampled hyperparameters written in.

    This is how a Tune trial becomes an ordinary job, so its `search` block is dropped.
    Values are cast to plain int/float (Tune may sample numpy scalars, which YAML can't
    store). Config keys that are not searched dimensions are left out of the spec.
    """
    trial = copy.deepcopy(spec)
    for key, value in config.items():
        if key in TARGETS:
            section, cast = TARGETS[key]
            trial.setdefault(section, {})[key] = cast(value)
    trial["search"] = None
    return trial
