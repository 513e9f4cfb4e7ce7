"""The `search:` block: validation (exit 2, `field: message`), grid enumeration, Tune space.

Pure logic: nothing here starts Ray (param_space only builds Tune domain objects).
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from jobs.errors import TlctlError
from jobs.search.space import apply_trial, max_concurrent_trials
from jobs.search.space import param_space as tune_space
from jobs.spec import search as search_spec
from jobs.spec.load import load_spec, parse_spec
from jobs.spec.search import MAX_GRID_TRIALS, SearchSpec
from orchestrator.cli import app

runner = CliRunner()


def grid_combinations(search: dict) -> list[dict]:
    return SearchSpec.model_validate(search).grid_combinations()


def grid_size(search: dict) -> int:
    return SearchSpec.model_validate(search).grid_size()


def trial_count(search: dict) -> int:
    return SearchSpec.model_validate(search).trial_count()


def param_space(search: dict) -> dict:
    return tune_space(SearchSpec.model_validate(search))


def spec_with(search: dict | None, **sections) -> dict:
    """A minimal valid job spec (resnet18: 5 stages) with the given search block."""
    return {
        "name": "search-demo",
        "data": {"train": "data/x"},
        "storage": {"uri": "s3://tlctl/runs"},
        "backbone": {"name": "resnet18", "weights": "none"},
        "search": search,
        **sections,
    }


def error_lines(raw: dict, **kwargs) -> list[str]:
    with pytest.raises(TlctlError) as info:
        parse_spec(raw, **kwargs)
    assert info.value.exit_code == 2
    header, *lines = info.value.message.splitlines()
    assert header == "invalid job spec:"
    return lines


def assert_error(raw: dict, expected: str, **kwargs) -> None:
    lines = error_lines(raw, **kwargs)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.fixture
def optuna_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError


# --- valid blocks and their defaults --------------------------------------------------------


def test_defaults_resolve() -> None:
    search = parse_spec(spec_with({"freeze_depth": [0, 2], "lr": [0.1]})).search
    assert search is not None
    assert (search.num_samples, search.scheduler, search.grace_period) == (8, "asha", 1)
    assert (search.reduction_factor, search.metric, search.mode) == (4.0, "val_acc", "max")
    assert (search.max_concurrent_trials, search.search_alg) == ("auto", "random")


def test_loss_metric_defaults_to_min_mode() -> None:
    search = parse_spec(spec_with({"lr": [0.1], "metric": "val_loss"})).search
    assert search is not None and search.mode == "min"


def test_grid_runs_each_combination_once_by_default() -> None:
    search = parse_spec(spec_with({"lr": [0.1, 0.01], "search_alg": "grid"})).search
    assert search is not None and search.num_samples == 1


def test_canonical_form_is_plain_yaml() -> None:
    raw = spec_with(
        {
            "freeze_depth": {"range": [1, 3]},
            "lr": {"loguniform": ["1e-4", 0.01]},  # YAML reads 1e-4 (no dot) as a string
            "weight_decay": [0, 0.01],
            "batch_size": [16, 32],
            "max_concurrent_trials": 2,
        }
    )
    dumped = parse_spec(raw).model_dump()["search"]
    assert dumped["freeze_depth"] == {"range": [1, 3]}
    assert dumped["lr"] == {"loguniform": [1e-4, 0.01]}
    assert dumped["weight_decay"] == [0.0, 0.01] and dumped["batch_size"] == [16, 32]
    assert yaml.safe_load(yaml.safe_dump(dumped)) == dumped


def test_no_search_block_stays_none() -> None:
    assert parse_spec(spec_with(None)).search is None


# --- every error path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ({"lr": []}, "search.lr: no choices"),
        ({"freeze_depth": []}, "search.freeze_depth: no choices"),
        ({"weight_decay": []}, "search.weight_decay: no choices"),
        ({"batch_size": []}, "search.batch_size: no choices"),
        ({"lr": {"loguniform": [0.1, 0.01]}}, "search.lr: loguniform lo must be < hi (got "),
        ({"lr": {"uniform": [0.1, 0.1]}}, "search.lr: uniform lo must be < hi (got "),
        ({"freeze_depth": {"range": [3, 1]}}, "search.freeze_depth: range lo must be < hi"),
        ({"lr": {"loguniform": [0, 0.01]}}, "search.lr: loguniform lo must be > 0 (got 0)"),
        (
            {"weight_decay": {"loguniform": [-1, 0.01]}},
            "search.weight_decay: loguniform lo must be > 0",
        ),
        ({"lr": [0.1], "num_samples": 0}, "search.num_samples: "),
        ({"freeze_depth": [0, 7]}, "search.freeze_depth: 7 is out of range for resnet18 "),
        (
            {"freeze_depth": {"range": [0, 9]}},
            "search.freeze_depth: 9 is out of range for resnet18 (valid: 0..5)",
        ),
        ({"freeze_depth": [-1]}, "search.freeze_depth: -1 is out of range (valid: >= 0)"),
        ({"lr": [-0.1]}, "search.lr: -0.1 is out of range (valid: > 0 and <= 10)"),
        ({"batch_size": [0, 8]}, "search.batch_size: 0 is out of range (valid: >= 1)"),
        ({"batch_size": {"range": [8, 64]}}, "search.batch_size: {range: …} is not allowed"),
        ({"freeze_depth": [1.5]}, "search.freeze_depth: 1.5 is not an integer"),
        ({"lr": [True]}, "search.lr: True is not a number"),
        ({"lr": "fast"}, "search.lr: 'fast' is not allowed (valid: a list of choices or "),
        ({"lr": {"normal": [0, 1]}}, "search.lr: {normal: …} is not allowed (valid: "),
        ({"lr": {"uniform": [0.1]}}, "search.lr: uniform needs [lo, hi] (got [0.1])"),
        ({"lr": [0.1, 0.1]}, "search.lr: 0.1 listed twice"),
        (
            {"lr": {"loguniform": [1e-4, 1e-2]}, "search_alg": "grid"},
            "search.lr: search_alg grid needs a list of choices, not loguniform",
        ),
        (
            {"weight_decay": {"uniform": [0, 0.1]}, "search_alg": "grid"},
            "search.weight_decay: search_alg grid needs a list of choices, not uniform",
        ),
        ({}, "search: nothing to search (valid: set one or more of freeze_depth, lr, "),
        ({"num_samples": 4}, "search: nothing to search"),
        ({"lr": [0.1], "bogus": 1}, "search.bogus: unknown field (valid: freeze_depth, lr, "),
        ({"lr": [0.1], "scheduler": "pbt"}, "search.scheduler: pbt is not allowed (valid: asha"),
        ({"lr": [0.1], "search_alg": "bayes"}, "search.search_alg: bayes is not allowed"),
        ({"lr": [0.1], "metric": "f1"}, "search.metric: f1 is not allowed (valid: val_acc"),
        ({"lr": [0.1], "mode": "up"}, "search.mode: up is not allowed (valid: max, min)"),
        ({"lr": [0.1], "grace_period": 0}, "search.grace_period: "),
        ({"lr": [0.1], "grace_period": 11}, "search.grace_period: 11 is more than train.epochs"),
        ({"lr": [0.1], "reduction_factor": 1}, "search.reduction_factor: "),
        (
            {"lr": [0.1], "max_concurrent_trials": 0},
            "search.max_concurrent_trials: 0 is not allowed (valid: auto, an integer >= 1)",
        ),
        ({"lr": [0.1], "max_concurrent_trials": "many"}, "search.max_concurrent_trials: 'many'"),
        ({"lr": [0.1], "max_concurrent_trials": True}, "search.max_concurrent_trials: True"),
    ],
)
def test_invalid_search(search: dict, expected: str) -> None:
    assert_error(spec_with(search), expected)


def test_fifo_ignores_grace_period() -> None:
    assert parse_spec(spec_with({"lr": [0.1], "scheduler": "fifo", "grace_period": 50}))


def test_freeze_depth_limit_follows_the_backbone() -> None:
    raw = spec_with({"freeze_depth": [4, 5]}, backbone={"name": "convnext_tiny", "weights": "none"})
    assert_error(raw, "search.freeze_depth: 5 is out of range for convnext_tiny (valid: 0..4)")
    assert parse_spec(spec_with({"freeze_depth": {"range": [0, 5]}}))  # resnet18 has 5


def test_every_search_error_reported_at_once() -> None:
    lines = error_lines(
        spec_with({"lr": [], "weight_decay": {"uniform": [1, 0]}, "num_samples": 0})
    )
    assert [line.split(":")[0] for line in lines] == [
        "search.lr",
        "search.weight_decay",
        "search.num_samples",
    ]


def test_cross_field_errors_reported_together() -> None:
    search = {"freeze_depth": [0, 6], "lr": {"uniform": [0.1, 0.2]}, "search_alg": "grid"}
    lines = error_lines(spec_with(search))
    assert len(lines) == 2
    assert lines[0].startswith("search.freeze_depth: 6 is out of range")
    assert lines[1].startswith("search.lr: search_alg grid needs a list of choices")


def test_optuna_missing(optuna_missing: None) -> None:
    assert_error(
        spec_with({"lr": [0.1], "search_alg": "optuna"}),
        "search.search_alg: optuna is not installed (pip install 'tlctl[optuna]'; "
        "valid: random, grid)",
    )


def test_optuna_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", types.ModuleType("optuna"))
    search = parse_spec(spec_with({"lr": {"loguniform": [1e-4, 0.1]}, "search_alg": "optuna"}))
    assert search.search is not None and search.search.search_alg == "optuna"


# --- the grid limit ----------------------------------------------------------------------------


def big_grid(num_samples: int | None = None) -> dict:
    search = {
        "freeze_depth": [0, 1, 2, 3, 4],
        "lr": [0.001 * (i + 1) for i in range(20)],
        "batch_size": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
        "search_alg": "grid",
    }  # 5 × 20 × 11 = 1100 combinations
    return search | ({"num_samples": num_samples} if num_samples else {})


def test_grid_over_the_limit_is_refused() -> None:
    assert_error(
        spec_with(big_grid()), "search: grid has 1100 trials (> 1000); pass --yes to run it anyway"
    )


def test_grid_limit_counts_repeats() -> None:
    search = {"freeze_depth": [0, 1, 2, 3, 4], "lr": [0.1, 0.2], "search_alg": "grid"}
    assert parse_spec(spec_with(search | {"num_samples": 100}))  # 10 × 100 = 1000: allowed
    assert_error(spec_with(search | {"num_samples": 101}), "search: grid has 1010 trials")


def test_grid_over_the_limit_allowed(tmp_path: Path) -> None:
    spec = parse_spec(spec_with(big_grid()), allow_large_grid=True)
    assert spec.search is not None
    assert spec.search.trial_count() == 1100 > MAX_GRID_TRIALS
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec_with(big_grid())))
    with pytest.raises(TlctlError, match="grid has 1100 trials"):
        load_spec(path)
    assert load_spec(path, allow_large_grid=True).search is not None


def test_random_search_has_no_grid_limit() -> None:
    assert parse_spec(spec_with(big_grid() | {"search_alg": "random"}))


# --- client edge -------------------------------------------------------------------------------


def test_cli_validate_accepts_a_search(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec_with({"freeze_depth": [0, 2], "lr": [0.1]})))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok: search-demo" in result.output
    bad = runner.invoke(app, ["validate", str(path), "--set", "search.freeze_depth=[9]"])
    assert bad.exit_code == 2
    assert "search.freeze_depth: 9 is out of range for resnet18" in bad.output


def test_set_overrides_reach_the_search_block(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec_with({"lr": [0.1]})))
    spec = load_spec(path, ["search.lr={loguniform: [1.0e-4, 1.0e-2]}", "search.num_samples=3"])
    assert spec.search is not None
    assert spec.search.lr == {"loguniform": [1e-4, 1e-2]} and spec.search.num_samples == 3


# --- grid enumeration --------------------------------------------------------------------------


def test_grid_enumerates_every_combination() -> None:
    search = {"freeze_depth": [0, 2], "lr": [0.1, 0.01, 0.001], "search_alg": "grid"}
    combos = grid_combinations(search)
    expected = [{"freeze_depth": f, "lr": lr} for f in (0, 2) for lr in (0.1, 0.01, 0.001)]
    assert combos == expected  # every one, once, in a fixed order
    assert len({tuple(sorted(c.items())) for c in combos}) == 6
    assert grid_size(search) == 6 == trial_count(search)


def test_grid_over_four_dimensions_and_a_range() -> None:
    search = {
        "batch_size": [16, 32],
        "weight_decay": [0.0, 1e-4],
        "lr": [0.1, 0.01, 0.001],
        "freeze_depth": {"range": [1, 3]},
    }
    combos = grid_combinations(search)
    assert grid_size(search) == len(combos) == 2 * 2 * 3 * 3
    assert {c["freeze_depth"] for c in combos} == {1, 2, 3}  # range is inclusive
    assert list(combos[0]) == ["freeze_depth", "lr", "weight_decay", "batch_size"]
    assert len({tuple(c.values()) for c in combos}) == len(combos)


def test_grid_size_does_not_enumerate() -> None:
    huge = {"lr": [float(i + 1) / 1e6 for i in range(1000)], "batch_size": list(range(1, 1001))}
    assert grid_size(huge | {"freeze_depth": {"range": [0, 999]}}) == 10**9


def test_grid_of_a_distribution_is_an_error() -> None:
    with pytest.raises(TlctlError, match="search.lr: search_alg grid needs a list of choices"):
        grid_combinations({"lr": {"loguniform": [1e-4, 1e-2]}})


def test_trial_count() -> None:
    assert trial_count({"lr": [0.1, 0.2], "num_samples": 3, "search_alg": "grid"}) == 6
    assert trial_count({"lr": [0.1, 0.2], "num_samples": 3, "search_alg": "random"}) == 3


# --- Ray Tune param space ----------------------------------------------------------------------


def test_param_space_random() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = param_space(
        {
            "freeze_depth": {"range": [0, 4]},
            "lr": {"loguniform": [1e-4, 1e-2]},
            "weight_decay": {"uniform": [0.0, 0.1]},
            "batch_size": [16, 32],
            "search_alg": "random",
        }
    )
    assert list(space) == ["freeze_depth", "lr", "weight_decay", "batch_size"]
    depth, lr, wd, batch = space.values()
    assert isinstance(depth, Integer) and (depth.lower, depth.upper) == (0, 5)  # upper exclusive
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert type(lr.get_sampler()).__name__ == "_LogUniform"
    assert isinstance(wd, Float) and type(wd.get_sampler()).__name__ == "_Uniform"
    assert isinstance(batch, Categorical) and batch.categories == [16, 32]


def test_param_space_choices_for_optuna_and_grid() -> None:
    from ray.tune.search.sample import Categorical

    search = {"freeze_depth": [0, 2], "lr": [0.1, 0.01]}
    optuna = param_space(search | {"search_alg": "optuna"})
    assert all(isinstance(d, Categorical) for d in optuna.values())
    grid = param_space(search | {"freeze_depth": {"range": [1, 3]}, "search_alg": "grid"})
    assert grid == {"freeze_depth": {"grid_search": [1, 2, 3]}, "lr": {"grid_search": [0.1, 0.01]}}


def test_param_space_from_a_parsed_spec() -> None:
    from ray.tune.search.sample import Categorical, Float

    spec = parse_spec(spec_with({"freeze_depth": [0, 2, 4], "lr": {"loguniform": [1e-4, 1e-2]}}))
    space = tune_space(spec.search)
    assert set(space) == {"freeze_depth", "lr"}  # absent dimensions are not searched
    assert isinstance(space["freeze_depth"], Categorical) and isinstance(space["lr"], Float)


def test_module_import_loads_neither_ray_nor_the_client() -> None:
    code = (
        "import sys, jobs.search.space; "
        "print(sorted(m for m in ('ray', 'orchestrator', 'typer') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd()
    )
    assert out.stdout.strip() == "[]"


# --- max_concurrent_trials -----------------------------------------------------------------------


def concurrency(setting="auto", **resources) -> int:
    args = {
        "num_workers": 1,
        "cpus_per_worker": 1.0,
        "use_gpu": False,
        "cluster_cpus": 2.0,
        "cluster_gpus": 0.0,
    }
    return max_concurrent_trials(setting, **(args | resources))


def test_concurrency_never_below_one() -> None:
    assert concurrency(ingest_cpus=2) == 1  # 0 fit: one trial still runs
    assert concurrency(3, ingest_cpus=2) == 1


def test_concurrency_by_cpus() -> None:
    assert concurrency(num_workers=2, cpus_per_worker=2, cluster_cpus=16) == 4
    assert concurrency(num_workers=2, cpus_per_worker=2, cluster_cpus=16, ingest_cpus=1) == 3
    assert concurrency(num_workers=1, cpus_per_worker=1, cluster_cpus=2, ingest_cpus=1) == 1
    assert concurrency(num_workers=3, cpus_per_worker=0.1, cluster_cpus=0.9) == 3  # float slack
    assert concurrency(num_workers=2, cpus_per_worker=1, cluster_cpus=8, driver_cpus=1) == 2


def test_explicit_concurrency_is_capped() -> None:
    assert concurrency(8, num_workers=2, cpus_per_worker=2, cluster_cpus=16) == 4
    assert concurrency(2, num_workers=2, cpus_per_worker=2, cluster_cpus=16) == 2


def test_concurrency_by_gpus() -> None:
    gpus = {"use_gpu": True, "num_workers": 2, "cpus_per_worker": 1, "cluster_cpus": 16}
    assert concurrency(**gpus, cluster_gpus=4) == 2  # GPUs bind before CPUs (8)
    assert concurrency(**gpus, cluster_gpus=3) == 1
    assert concurrency(**gpus, cluster_gpus=0) == 1
    assert concurrency(**{**gpus, "cluster_cpus": 2}, cluster_gpus=8) == 1  # CPUs bind
    assert concurrency(num_workers=2, cluster_cpus=16, cluster_gpus=0) == 8  # no GPU asked


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "many"])
def test_bad_concurrency_setting(bad) -> None:
    with pytest.raises(TlctlError, match="search.max_concurrent_trials"):
        concurrency(bad)


# --- a trial becomes an ordinary job -------------------------------------------------------------


def test_apply_trial_writes_the_sampled_values() -> None:
    spec = parse_spec(spec_with({"freeze_depth": [0, 2], "lr": [0.1, 0.01]}))
    config = {
        "freeze_depth": np.int64(2),
        "lr": np.float64(0.01),
        "weight_decay": 0,
        "batch_size": 16,
    }
    trial = apply_trial(spec, config)
    assert trial.backbone.freeze_depth == 2 and type(trial.backbone.freeze_depth) is int
    assert trial.train.lr == 0.01 and type(trial.train.lr) is float
    assert trial.train.weight_decay == 0.0 and type(trial.train.weight_decay) is float
    assert trial.train.batch_size == 16
    assert trial.search is None
    yaml.safe_dump(trial.model_dump())  # storable as the trial's spec.yaml


def test_apply_trial_is_a_deep_copy() -> None:
    spec = parse_spec(spec_with({"lr": [0.1]}, head={"hidden": [64]}))
    before = yaml.safe_dump(spec.model_dump())
    trial = apply_trial(spec, {"lr": 0.1, "note": "not a dimension"})
    trial.head.hidden.append(32)
    assert yaml.safe_dump(spec.model_dump()) == before
    assert "note" not in trial.model_dump() and "note" not in trial.model_dump()["train"]


def test_applied_trial_is_a_valid_plain_job() -> None:
    spec = parse_spec(spec_with({"freeze_depth": {"range": [0, 5]}, "batch_size": [8, 16]}))
    for config in spec.search.grid_combinations():
        trial = parse_spec(apply_trial(spec, config).model_dump())
        assert trial.search is None
        assert trial.backbone.freeze_depth == config["freeze_depth"]
        assert trial.train.batch_size == config["batch_size"]


def test_targets_cover_every_dimension() -> None:
    assert set(search_spec.TARGETS) == set(search_spec.DIMENSIONS)
    assert search_spec.DIMENSIONS == ("freeze_depth", "lr", "weight_decay", "batch_size")


# --- local Ray sizing for a search ------------------------------------------------------------


def test_local_search_runs_as_many_trials_as_the_cpus_hold(monkeypatch) -> None:
    from orchestrator.targets import local

    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    one = parse_spec(spec_with({"lr": [0.1, 0.01]}, scaling={"num_workers": 2}))
    assert local.local_trials(one) == 4  # 8 CPUs / (2 workers x 1 CPU)
    capped = parse_spec(
        spec_with({"lr": [0.1], "max_concurrent_trials": 16}, scaling={"num_workers": 2})
    )
    assert local.local_trials(capped) == 4  # never more than fit
    res = local.ray_resources(one)
    # 4 trials x 2 workers, the trials' token driver CPUs rounded up, + ingest
    assert res == {"num_cpus": 8 + 1 + local.INGEST_CPUS, "num_gpus": 0}
    plain = parse_spec(spec_with(None, scaling={"num_workers": 2}))
    assert local.local_trials(plain) == 1
    assert local.ray_resources(plain) == {"num_cpus": 2 + local.INGEST_CPUS, "num_gpus": 0}


def test_hyperparameters_are_plain_numbers_in_dimension_order() -> None:
    from jobs.search.space import hyperparameters

    search = parse_spec(spec_with({"lr": [0.1], "freeze_depth": [1]})).search
    import numpy as np

    values = hyperparameters(search, {"lr": np.float64(0.1), "freeze_depth": np.int64(1)})
    assert values == {"freeze_depth": 1, "lr": 0.1}
    assert [type(v) for v in values.values()] == [int, float]
