"""A job with a `search:` block: Ray Tune runs one data-parallel Train run per trial.

The Ray 2.60 pattern: `tune.Tuner` runs a small driver function per trial that builds the
same `TorchTrainer` as a plain job (the trial's spec is the job's with the sampled values
written in) with `TuneReportCallback`, so every epoch reaches Tune and ASHA can stop weak
trials. Each trial is laid out under `trials/<trial-id>/` like a plain run; Tune's own
state is under `tune/` (what a resubmit restores); the search driver is the only writer of
the run's `metrics.jsonl` (jobs.search.callbacks), and writes `trials.parquet` and the best
trial's `model/` at the end.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.data.pipeline import build_datasets
from jobs.driver.job import patient_layout, summary, write_run_header
from jobs.driver.preflight import Prepared
from jobs.errors import EXIT_FAILED, TlctlError, root_cause
from jobs.search import state
from jobs.search.algorithms import search_algorithm
from jobs.search.callbacks import PROGRESS, SearchLog
from jobs.search.space import apply_trial, hyperparameters, param_space, trials_for
from jobs.search.trials import export_best, trial_id_of, trial_rows, write_trials_table
from jobs.spec.search import SearchSpec
from jobs.storage.layout import TUNE
from jobs.storage.metrics import post_event
from jobs.training.checkpoints import remove_stale_local_checkpoints
from jobs.training.trainer import build_trainer

TRIAL_DRIVER_CPUS = 0.01


# ---------------------------------------------------------------------------------------
# In each trial (a Tune function actor): one ordinary Train run.


def trial_spec(prepared: Prepared, config: dict[str, Any]):
    """A trial's spec: the job's with the trial's values, its best checkpoint kept by the
    metric the search ranks trials by."""
    search = prepared.spec.search
    spec = apply_trial(prepared.spec, config)
    return spec.copy_with(checkpoint={"metric": search.metric, "mode": search.mode})


def _trial_function(config: dict[str, Any], *, prepared: Prepared, datasets: dict) -> None:
    """Tune's trainable: the job's TorchTrainer with this trial's values, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trial = prepared.replace(
        spec=trial_spec(prepared, config), layout=prepared.layout.trial(trial_id)
    )
    tags = {"trial_id": trial_id, **hyperparameters(prepared.spec.search, config)}
    trainer = build_trainer(
        trial.worker_job(metrics_tags=tags), datasets=datasets, callbacks=[TuneReportCallback()]
    )
    try:
        trainer.fit()
    except Exception as exc:  # Tune keeps the text; make it the cause, not a dump
        raise RuntimeError(f"trial {trial_id} failed: {root_cause(exc)}") from exc


# ---------------------------------------------------------------------------------------
# The search driver.


def concurrency_on_ray(prepared: Prepared, *, ingest_cpus: float = 0) -> int:
    """Trials at once on the Ray this process is connected to (never oversubscribed)."""
    import ray

    total = ray.cluster_resources()
    return trials_for(
        prepared.spec,
        cluster_cpus=float(total.get("CPU", 0)),
        cluster_gpus=float(total.get("GPU", 0)),
        ingest_cpus=ingest_cpus,
    )


def _scheduler(search: SearchSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epochs_done",
        max_t=epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )


def _tuner(prepared: Prepared, datasets: dict, concurrency: int):
    """A new Tuner, or the interrupted one restored from `<run>/tune` (finished trials kept,
    unfinished and errored ones resumed: their Train runs pick up their own checkpoints)."""
    from ray import tune

    spec, layout = prepared.spec, prepared.layout
    search = spec.search
    trainable = tune.with_parameters(_trial_function, prepared=prepared, datasets=datasets)
    # The trial's driver function only waits on its Train run, whose workers hold the
    # trial's resources; Tune refuses an empty request, so it takes a token 0.01 CPU.
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS})
    fs = layout.root.fs
    # Pre-flight has checked the state against tlctl's manifest (jobs.search.state).
    if tune.Tuner.can_restore(layout.tune.path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(
            layout.tune.path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
        return tuner, True
    epochs = spec.train.epochs
    log = SearchLog(layout.uri, spec.storage.endpoint, search, epochs)
    recorder = state.StateRecorder(layout.uri, spec.storage.endpoint, spec.name)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            scheduler=_scheduler(search, epochs),
            # The searcher holds the concurrency limit (TuneConfig's would be ignored).
            search_alg=search_algorithm(
                search, seed=spec.train.seed, concurrency=concurrency, recorder=recorder
            ),
            trial_name_creator=lambda t: t.trial_id,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=TUNE,
            storage_path=layout.root.path,
            storage_filesystem=fs,
            verbose=0,
            callbacks=[log],
            # A trial that fails is recorded as failed; worker faults inside a trial are
            # handled by the trial's own Train FailureConfig.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    state.start(layout.tune, spec.name)  # the Tuner has written tuner.pkl
    return tuner, False


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
    start = time.time()
    search, epochs = prepared.spec.search, prepared.spec.train.epochs
    if prepared.complete:
        info = prepared.layout.read_model_info() or {}
        return search_summary(prepared, info, time.time() - start, already_complete=True)
    if concurrency is None:
        concurrency = concurrency_on_ray(prepared, ingest_cpus=ingest_cpus)
    # Decoded once here (and cached when small): every trial streams the same blocks.
    datasets = build_datasets(prepared.plan, prepared.spec.data)
    write_run_header(prepared)
    tuner, restored = _tuner(prepared, datasets, concurrency)
    if restored:
        # Before fit: the search's log writer folds it in when it starts.
        post_event(
            prepared.layout, "search_resumed", window_s=prepared.spec.failure.storage_retry_s
        )
    if progress is not None:
        PROGRESS[prepared.layout.uri] = progress
    try:
        grid = tuner.fit()
        # Tune is done, so this process is the only writer left: every trial's epochs in
        # its own log reach the run's (a stopped trial's last one Tune never delivered).
        log = SearchLog(prepared.layout.uri, prepared.spec.storage.endpoint, search, epochs)
        for result in grid:
            log.merge_trial(trial_id_of(result))
            # An early-stopped trial's group was killed mid-upload: its local copies stay.
            remove_stale_local_checkpoints(prepared.layout.trial(trial_id_of(result)).uri)
    except TlctlError:
        raise
    except Exception as exc:  # Tune wraps driver errors
        raise TlctlError(f"search failed: {root_cause(exc)}", exit_code=EXIT_FAILED) from exc
    finally:
        PROGRESS.pop(prepared.layout.uri, None)
    # Past the search, storage calls wait out an outage as the trials' training did.
    prepared = prepared.replace(layout=patient_layout(prepared))
    rows = trial_rows(prepared.spec, prepared.layout, grid, log.lines or [])
    write_trials_table(prepared.layout, rows)
    info = export_best(prepared, rows)
    return search_summary(prepared, info, time.time() - start, rows=rows)


def search_summary(
    prepared: Prepared,
    info: dict[str, Any],
    wall: float,
    *,
    rows: list[dict[str, Any]] | None = None,
    already_complete: bool = False,
) -> dict[str, Any]:
    rows = rows if rows is not None else prepared.layout.read_trials_table()
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
            "trials_uri": prepared.layout.trials_table.uri,
        }
    )
    out["epochs"] = out["trial_epochs"]
    return out
