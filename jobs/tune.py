"""A job with a `search:` block: Ray Tune runs one data-parallel Train run per trial.

The Ray 2.60 pattern: `tune.Tuner` runs a small driver function per trial that builds the
same `TorchTrainer` as a plain job (the trial's spec is the job's with the sampled values
written in) with `TuneReportCallback`, so every epoch reaches Tune and ASHA can stop weak
trials. Layout under the run prefix:

    spec.yaml, classes.json   as for a plain job (the spec keeps its search block)
    tune/                     Tune's experiment state: what a resubmit restores
    trials/<trial-id>/        each trial laid out like a plain run: checkpoints/, metrics.jsonl
    metrics.jsonl             every trial's epochs and events, tagged with trial id and values
    trials.parquet            one row per trial: values, best metric, epochs, status, checkpoint
    model/                    the best trial's best checkpoint, winning values in model.json

Only the search driver writes the run's `metrics.jsonl` (trials run concurrently, and S3 has
no append); each trial's rank 0 writes its own file under `trials/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.manifest import MANIFEST, checkpoint_dirs, complete_checkpoint
from jobs.metrics import epoch_lines, read_metrics, write_metrics
from jobs.retry import retry_window
from jobs.retrying_fs import patient
from jobs.run import (
    Prepared,
    _public_metrics,
    build_trainer,
    data_section,
    model_json,
    publish_model,
    root_cause,
    summary,
    write_run_header,
)
from jobs.search_space import apply_trial, dimensions, param_space
from jobs.storage import Location, list_dir, read_text
from jobs.train import META_FILE, MODEL_FILE, STATE_FILE
from jobs.trials import TRIALS_TABLE, read_trials_table, write_trials_table

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
TRIAL_DRIVER_CPUS = 0.01
CHECKPOINT_FILES = (MODEL_FILE, STATE_FILE, META_FILE, MANIFEST)
# Keys Tune adds to every result; the rest is what the training loop reported.
TUNE_RESULT_KEYS = {
    "config",
    "date",
    "done",
    "experiment_tag",
    "checkpoint_dir_name",
    "checkpoint_path",
    "episodes_total",
    "hostname",
    "iterations_since_restore",
    "node_ip",
    "pid",
    "should_checkpoint",
    "time_since_restore",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "timesteps_since_restore",
    "timesteps_total",
    "training_iteration",
    "trial_id",
}


def hyperparameters(search: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values as plain numbers, in the fixed dimension order."""
    trial = apply_trial({"backbone": {}, "train": {}}, config)
    return {
        key: trial[section][key]
        for key in dimensions(search)
        for section in ("backbone", "train")
        if key in trial[section]
    }


def trial_location(run: Location, trial_id: str) -> Location:
    return run.join(TRIALS_DIR, trial_id)


# ---------------------------------------------------------------------------------------
# In each trial (a Tune function actor): one ordinary Train run.


def _trial_function(config: dict[str, Any], *, prepared: Prepared, datasets: dict) -> None:
    """Tune's trainable: the job's TorchTrainer with this trial's values, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    spec = apply_trial(prepared.spec, config)
    # Keep each trial's best checkpoint by the metric the search ranks trials by.
    search = prepared.spec["search"]
    spec["checkpoint"] = {**spec["checkpoint"], "metric": search["metric"], "mode": search["mode"]}
    trial = dataclasses.replace(prepared, spec=spec, run=trial_location(prepared.run, trial_id))
    trainer = build_trainer(
        trial,
        datasets=datasets,
        callbacks=[TuneReportCallback()],
        metrics_tags={"trial_id": trial_id, **hyperparameters(prepared.spec["search"], config)},
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Tune keeps the text; make it the cause, not a dump
        raise RuntimeError(f"trial {trial_id} failed: {root_cause(exc)}") from None


# ---------------------------------------------------------------------------------------
# The search driver.


def concurrency_on_ray(spec: dict[str, Any], *, ingest_cpus: float = 0) -> int:
    """Trials at once on the Ray this process is connected to (never oversubscribed)."""
    import ray

    from jobs.search_space import max_concurrent_trials

    scaling, search = spec["scaling"], spec["search"]
    total = ray.cluster_resources()
    return max_concurrent_trials(
        search.get("max_concurrent_trials", "auto"),
        num_workers=int(scaling["num_workers"]),
        cpus_per_worker=float(scaling["cpus_per_worker"]),
        use_gpu=bool(scaling["use_gpu"]),
        cluster_cpus=float(total.get("CPU", 0)),
        cluster_gpus=float(total.get("GPU", 0)),
        ingest_cpus=ingest_cpus,
    )


def _scheduler(search: dict[str, Any], epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search["scheduler"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epochs_done",
        max_t=epochs,
        grace_period=int(search["grace_period"]),
        reduction_factor=float(search["reduction_factor"]),
    )


def _search_alg(search: dict[str, Any], *, seed: int, concurrency: int):
    """The searcher, seeded with train.seed: the same spec samples the same trials."""
    if search["search_alg"] != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:
        raise TlctlError(
            f"search.search_alg: optuna is not installed ({exc}); pip install 'tlctl[optuna]' "
            "(valid without it: random, grid)"
        ) from None
    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)


def _tuner(prepared: Prepared, datasets: dict, concurrency: int):
    """A new Tuner, or the interrupted one restored from `<run>/tune` (finished trials kept,
    unfinished and errored ones resumed: their Train runs pick up their own checkpoints)."""
    from ray import tune

    from jobs.tune_log import SearchLog

    spec, run = prepared.spec, prepared.run
    search = spec["search"]
    trainable = tune.with_parameters(_trial_function, prepared=prepared, datasets=datasets)
    # The trial's driver function only waits on its Train run, whose workers hold the
    # trial's resources; Tune refuses an empty request, so it takes a token 0.01 CPU.
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS})
    state = run.join(TUNE_DIR)
    if tune.Tuner.can_restore(state.path, storage_filesystem=run.fs):
        return tune.Tuner.restore(
            state.path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=run.fs,
        ), True
    epochs = int(spec["train"]["epochs"])
    return tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=search["metric"],
            mode=search["mode"],
            num_samples=int(search["num_samples"]),
            scheduler=_scheduler(search, epochs),
            # The searcher holds the concurrency limit (TuneConfig's would be ignored).
            search_alg=_search_alg(
                search, seed=int(spec["train"].get("seed", 0)), concurrency=concurrency
            ),
            trial_name_creator=lambda t: t.trial_id,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=run.path,
            storage_filesystem=run.fs,
            verbose=0,
            callbacks=[SearchLog(run.uri, spec["storage"].get("endpoint"), search, epochs)],
            # A trial that fails is recorded as failed; worker faults inside a trial are
            # handled by the trial's own Train FailureConfig.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    ), False


def run_search(
    prepared: Prepared,
    *,
    progress=None,
    submitted_at: float | None = None,
    concurrency: int | None = None,
    ingest_cpus: float = 0,
) -> dict:
    """Run (or resume) the search, write trials.parquet, export the best model.

    Ray must be initialized. `concurrency` trials run at once (default: as many as the
    cluster holds with `ingest_cpus` of its CPUs kept free for Ray Data).
    """
    from jobs.data import build_datasets
    from jobs.tune_log import PROGRESS

    start = time.time()
    if prepared.complete:
        info = json.loads(read_text(prepared.run.join("model", "model.json")))
        return search_summary(prepared, info, time.time() - start, already_complete=True)
    if concurrency is None:
        concurrency = concurrency_on_ray(prepared.spec, ingest_cpus=ingest_cpus)
    # Decoded once here (and cached when small): every trial streams the same blocks.
    datasets = build_datasets(prepared.plan, data_section(prepared.spec))
    write_run_header(prepared)
    tuner, restored = _tuner(prepared, datasets, concurrency)
    if restored:
        _append_event(prepared, "search_resumed")
    if progress is not None:
        PROGRESS[prepared.run.uri] = progress
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # Tune state saved often: resume
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune console output
    try:
        grid = tuner.fit()
    except TlctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - Tune wraps driver errors
        raise TlctlError(f"search failed: {root_cause(exc)}", exit_code=EXIT_FAILED) from exc
    finally:
        PROGRESS.pop(prepared.run.uri, None)
    # Past the search, storage calls wait out an outage as the trials' training did.
    prepared = dataclasses.replace(prepared, run=patient(prepared.run, retry_window(prepared.spec)))
    rows = trial_rows(prepared, grid)
    write_trials_table(prepared.run, rows)
    info = export_best(prepared, rows)
    return search_summary(prepared, info, time.time() - start, rows=rows)


def _append_event(prepared: Prepared, name: str) -> None:
    loc = prepared.run.join("metrics.jsonl")
    lines = read_metrics(loc)
    lines.append({"kind": "event", "event": name, "time": time.time()})
    write_metrics(loc, lines)


def trial_rows(prepared: Prepared, grid) -> list[dict[str, Any]]:
    """One row per trial from Tune's results and the trial's own metrics in storage."""
    spec = prepared.spec
    search = spec["search"]
    metric, mode = search["metric"], search["mode"]
    epochs = int(spec["train"]["epochs"])
    rows = []
    for result in grid:
        trial_id = os.path.basename(result.path.rstrip("/"))
        values = hyperparameters(search, result.config or {})
        loc = trial_location(prepared.run, trial_id)
        lines = epoch_lines(read_metrics(loc.join("metrics.jsonl")))
        # The best epoch that has a checkpoint: an epoch can be logged and then lose its
        # checkpoint when ASHA stops the trial mid-upload, and ties keep only one epoch.
        kept = _complete_checkpoints(loc)
        best = _best_line([m for m in lines if int(m["epoch"]) in kept], metric, mode)
        done = max((int(m["epoch"]) + 1 for m in lines), default=0)
        if result.error is not None:
            status = "error"
        elif done >= epochs:
            status = "completed"
        else:
            status = "stopped"  # ASHA ended it early: a decision, not a failure
        ckpt = kept[int(best["epoch"])].uri if best else None
        best = best or _best_line(lines, metric, mode)
        rows.append(
            {
                "trial_id": trial_id,
                **values,
                "status": status,
                "epochs_run": done,
                f"best_{metric}": best.get(metric) if best else None,
                "best_epoch": int(best["epoch"]) if best else None,
                "val_acc": best.get("val_acc") if best else None,
                "train_time_s": sum(float(m.get("epoch_time_s", 0.0)) for m in lines),
                "checkpoint_uri": ckpt,
                "error": _error_text(result.error),
            }
        )
    reverse = mode == "max"
    scored = [r for r in rows if r[f"best_{metric}"] is not None]
    unscored = [r for r in rows if r[f"best_{metric}"] is None]
    scored.sort(key=lambda r: r[f"best_{metric}"], reverse=reverse)
    return scored + sorted(unscored, key=lambda r: r["trial_id"])


def _error_text(error: Exception | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return next((ln for ln in reversed(text) if "failed" in ln), text[-1] if text else "error")


def _best_line(lines: list[dict], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [m for m in lines if isinstance(m.get(metric), (int, float))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda m: m[metric])


def _complete_checkpoints(trial: Location) -> dict[int, Location]:
    """Epoch → its newest checkpoint dir holding every file (a trial that ASHA stops can
    leave a partly uploaded one behind); a cheap listing, export verifies the winner."""
    found: dict[int, Location] = {}
    for epoch, loc in checkpoint_dirs(trial.join("checkpoints")):  # newest rewrite first
        if epoch not in found and set(CHECKPOINT_FILES) <= set(list_dir(loc)):
            found[epoch] = loc
    return found


def export_best(prepared: Prepared, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best trial's best checkpoint → `model/` (same contract as a plain job)."""
    search = prepared.spec["search"]
    metric = search["metric"]
    winner = next((r for r in rows if r["checkpoint_uri"]), None)
    if winner is None:
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise TlctlError(
            "search produced no checkpoint to export"
            + (f": {'; '.join(errors)}" if errors else ""),
            exit_code=EXIT_FAILED,
        )
    run = prepared.run
    values = {k: winner[k] for k in dimensions(search)}
    trial_spec = apply_trial(prepared.spec, values)
    ckpt, reason = complete_checkpoint(
        trial_location(run, winner["trial_id"]).join("checkpoints"), int(winner["best_epoch"])
    )
    lines = epoch_lines(read_metrics(trial_location(run, winner["trial_id"]).join("metrics.jsonl")))
    best = next(m for m in lines if int(m["epoch"]) == int(winner["best_epoch"]))
    if ckpt is None:
        raise TlctlError(
            f"the best trial's checkpoint is not complete ({reason})", exit_code=EXIT_FAILED
        )
    info = model_json(
        dataclasses.replace(prepared, spec=trial_spec),
        _public_metrics(best),
        ckpt.uri,
    )
    info["trial_id"] = winner["trial_id"]
    info["hyperparameters"] = values
    info["search_metric"] = metric
    publish_model(run, ckpt, info)
    return info


def search_summary(
    prepared: Prepared,
    info: dict[str, Any],
    wall: float,
    *,
    rows: list[dict[str, Any]] | None = None,
    already_complete: bool = False,
) -> dict[str, Any]:
    rows = rows if rows is not None else read_trials_table(prepared.run)
    out = summary(prepared, info, wall, already_complete=already_complete)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out.update(
        {
            "search": True,
            "trials": len(rows),
            "trial_status": counts,
            "trial_epochs": sum(int(r["epochs_run"]) for r in rows),
            "best_trial": info.get("trial_id"),
            "hyperparameters": info.get("hyperparameters"),
            "trials_uri": prepared.run.join(TRIALS_TABLE).uri,
        }
    )
    out["epochs"] = out["trial_epochs"]
    return out
