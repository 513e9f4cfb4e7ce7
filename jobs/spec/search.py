"""The `search:` block of a job spec: a Ray Tune search over freeze depth, lr and more.

Each searched dimension is a list of choices or `{kind: [lo, hi]}` with kind `range`
(inclusive ints), `loguniform` or `uniform`; every problem becomes one
`search.field: message (valid: …)` line, like the rest of the spec. The grid arithmetic
(dimensions, choices, trial count) lives here too, because validation needs it; turning the
block into Ray Tune objects is `jobs.search.space`'s.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.errors import TlctlError
from jobs.redact import clip, clip_text
from jobs.training.backbones import freeze_depth_error, get_backbone

MAX_GRID_TRIALS = 1000  # a larger grid runs only with allow_large_grid (`--yes`)
# Searched dimension → the spec section whose field of the same name a trial overrides.
TARGETS: dict[str, str] = {
    "freeze_depth": "backbone",
    "lr": "train",
    "weight_decay": "train",
    "batch_size": "train",
}
DIMENSIONS = tuple(TARGETS)
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
Metric = Literal["val_acc", "val_loss", "train_acc", "train_loss"]


IntDimension = list[int] | dict[Literal["range"], list[int]]
FloatDimension = list[float] | dict[Literal["loguniform", "uniform"], list[float]]
_FLOAT_KINDS = ("loguniform", "uniform")


def _as_float(value: Any) -> float:
    """A finite number; strings too, since YAML reads `1e-3` (no dot) as a string."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{clip(value)} is not a number")
    return number


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{clip(value)} is not an integer")
    return value


def _in_range(low: float, high: float | None, *, low_open: bool = False) -> Callable[[Any], Any]:
    """A check that a choice or bound lies in the range its train/backbone field accepts."""
    valid = f"{'>' if low_open else '>='} {low:g}" + (
        f" and <= {high:g}" if high is not None else ""
    )

    def check(value: float) -> float:
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise ValueError(f"{value:g} is out of range (valid: {valid})")
        return value

    return check


def _listed(values: list[Any], limit: int = 8) -> str:
    """Values for a message: the first `limit` of them, each clipped (a list can be long)."""
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else clip_text(v) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def _forms(kinds: tuple[str, ...]) -> str:
    return " or ".join(["a list of choices", *(f"{{{k}: [lo, hi]}}" for k in kinds)])


def _dimension(value: Any, kinds: tuple[str, ...], cast: Callable, check: Callable) -> Any:
    """Canonical form of one searched dimension: a list of choices or `{kind: [lo, hi]}`."""
    if value is None:
        return None
    if isinstance(value, list):
        return _choice_list(value, kinds, cast, check)
    if isinstance(value, dict):
        return _bounds(value, kinds, cast, check)
    raise ValueError(f"{clip(value)} is not allowed (valid: {_forms(kinds)})")


def _choice_list(value: list, kinds: tuple[str, ...], cast: Callable, check: Callable) -> list:
    if not value:
        raise ValueError(f"no choices (valid: {_forms(kinds)})")
    items = [check(cast(v)) for v in value]
    dupes = sorted({v for v in items if items.count(v) > 1})
    if dupes:
        raise ValueError(f"{_listed(dupes)} listed twice (each choice runs once)")
    return items


def _bounds(value: dict, kinds: tuple[str, ...], cast: Callable, check: Callable) -> dict:
    kind = next(iter(value), None)
    if len(value) != 1 or kind not in kinds:
        got = _listed(list(value)) or "{}"
        raise ValueError(f"{{{got}: …}} is not allowed (valid: {_forms(kinds)})")
    pair = value[kind]
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError(f"{kind} needs [lo, hi] (got {clip(pair)})")
    lo, hi = (cast(v) for v in pair)
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"loguniform lo must be > 0 (got {lo:g})")
    if lo >= hi:
        raise ValueError(f"{kind} lo must be < hi (got [{lo:g}, {hi:g}])")
    return {kind: [check(lo), check(hi)]}


def concurrency_error(value: Any) -> str | None:
    """The one rule for `search.max_concurrent_trials`: auto or an int >= 1."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return f"{clip(value)} is not allowed (valid: auto, an integer >= 1)"


def _optuna_installed() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


class SearchSpec(BaseModel):
    """A Ray Tune search: each trial is an ordinary job with the sampled values written in."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    freeze_depth: IntDimension | None = Field(
        None,
        description="choices, or {range: [lo, hi]} (inclusive); absent: backbone.freeze_depth",
    )
    lr: FloatDimension | None = Field(
        None, description="choices, {loguniform: [lo, hi]} or {uniform: [lo, hi]}"
    )
    weight_decay: FloatDimension | None = Field(None, description="same forms as lr")
    batch_size: list[int] | None = Field(None, description="choices")
    num_samples: int | None = Field(
        None, ge=1, description="random/optuna: trials (default 8); grid: passes over the grid"
    )
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha stops weak trials early; fifo runs every trial out"
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(
        4.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung"
    )
    metric: Metric = Field("val_acc", description="what trials are ranked by")
    mode: Literal["max", "min"] | None = Field(
        None, description="default: min for losses, max otherwise"
    )
    max_concurrent_trials: Literal["auto"] | int = Field(
        "auto", description="auto: as many trials at once as the CPUs/GPUs hold (capped to that)"
    )
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random", description="grid: every combination; optuna needs the tlctl[optuna] extra"
    )

    @field_validator("freeze_depth", mode="before")
    @classmethod
    def _freeze_depth(cls, v: Any) -> Any:
        return _dimension(v, ("range",), _as_int, _in_range(0, None))

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, v: Any) -> Any:
        return _dimension(v, _FLOAT_KINDS, _as_float, _in_range(0, 10, low_open=True))

    @field_validator("weight_decay", mode="before")
    @classmethod
    def _weight_decay(cls, v: Any) -> Any:
        return _dimension(v, _FLOAT_KINDS, _as_float, _in_range(0, None))

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        return None if v is None else _dimension(v, (), _as_int, _in_range(1, None))

    @field_validator("max_concurrent_trials", mode="before")
    @classmethod
    def _concurrency(cls, v: Any) -> Any:
        problem = concurrency_error(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _something_to_search(self) -> SearchSpec:
        if not self.dimensions():
            raise ValueError(
                f"nothing to search (valid: set one or more of {', '.join(DIMENSIONS)})"
            )
        return self

    # --- the grid -------------------------------------------------------------------------

    def dimensions(self) -> dict[str, Any]:
        """The searched dimensions that are present, in the fixed DIMENSIONS order."""
        return {key: getattr(self, key) for key in DIMENSIONS if getattr(self, key) is not None}

    def grid_size(self) -> int:
        """Number of combinations of the grid, computed without enumerating it (a range of
        10**12 ints is counted, never built)."""
        return math.prod(choice_count(k, v) for k, v in self.dimensions().items())

    def grid_combinations(self) -> list[dict[str, Any]]:
        """Every combination in a fixed order: the last dimension varies fastest."""
        dims = {key: choices(key, value) for key, value in self.dimensions().items()}
        return [dict(zip(dims, combo, strict=True)) for combo in itertools.product(*dims.values())]

    def trial_count(self) -> int:
        """Trials a search runs: num_samples, or for a grid each combination num_samples
        times (Ray Tune's own rule for `grid_search` with `num_samples`)."""
        samples = self.num_samples or 1
        return self.grid_size() * samples if self.search_alg == "grid" else samples


def distribution(value: Any) -> str | None:
    """`range`, `loguniform` or `uniform` for `{kind: [lo, hi]}`; None for a list of choices."""
    return next(iter(value)) if isinstance(value, dict) else None


def choice_count(key: str, value: Any) -> int:
    """len(choices(key, value)), by arithmetic."""
    kind = distribution(value)
    if kind is None:
        return len(value)
    if kind == "range":
        lo, hi = value["range"]
        return max(hi - lo + 1, 0)
    raise TlctlError(f"search.{key}: search_alg grid needs a list of choices, not {kind}")


def choices(key: str, value: Any) -> list[Any]:
    """Every value a grid visits: the list itself, or every int of an inclusive range."""
    kind = distribution(value)
    if kind is None:
        return list(value)
    if kind == "range":
        lo, hi = value["range"]
        return list(range(lo, hi + 1))
    raise TlctlError(f"search.{key}: search_alg grid needs a list of choices, not {kind}")


def search_errors(
    search: SearchSpec | None, *, backbone: str, epochs: int, allow_large_grid: bool
) -> list[str]:
    """Checks of the search block against the backbone, the training length, the grid and
    what is installed here."""
    if search is None:
        return []
    errors = _freeze_depth_errors(backbone, search.freeze_depth)
    if search.scheduler == "asha" and search.grace_period > epochs:
        errors.append(
            f"search.grace_period: {search.grace_period} is more than train.epochs "
            f"({epochs}) (valid: 1..{epochs})"
        )
    if search.search_alg == "optuna" and not _optuna_installed():
        errors.append(
            "search.search_alg: optuna is not installed (pip install 'tlctl[optuna]'; "
            "valid: random, grid)"
        )
    if search.search_alg == "grid":
        errors += _grid_errors(search, allow_large_grid=allow_large_grid)
    return errors


def _freeze_depth_errors(backbone: str, dimension: Any) -> list[str]:
    if dimension is None:
        return []
    values = dimension["range"] if isinstance(dimension, dict) else dimension
    bad = [v for v in values if freeze_depth_error(backbone, v)]
    if not bad:
        return []
    return [
        f"search.freeze_depth: {_listed(bad)} "
        f"{'is' if len(bad) == 1 else 'are'} out of range for {backbone} "
        f"(valid: 0..{get_backbone(backbone).num_stages})"
    ]


def _grid_errors(search: SearchSpec, *, allow_large_grid: bool) -> list[str]:
    errors = [
        f"search.{key}: search_alg grid needs a list of choices, not {distribution(value)}"
        for key, value in search.dimensions().items()
        if distribution(value) in _FLOAT_KINDS
    ]
    if errors or allow_large_grid:
        return errors
    trials = search.trial_count()
    if trials > MAX_GRID_TRIALS:
        return [
            f"search: grid has {trials} trials (> {MAX_GRID_TRIALS}); pass --yes to run it anyway"
        ]
    return []


def resolve_search(search: SearchSpec | None) -> None:
    """Fill the defaults that depend on other fields (like checkpoint.mode)."""
    if search is None:
        return
    if search.mode is None:
        search.mode = "min" if search.metric.endswith("loss") else "max"
    if search.num_samples is None:
        search.num_samples = 1 if search.search_alg == "grid" else 8
