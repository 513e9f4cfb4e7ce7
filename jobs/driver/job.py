"""A plain (non-search) job on the Ray this process is connected to: train, then export.

Runs in the CLI process for `--local` and in the job's driver on a cluster.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jobs.data.pipeline import build_datasets
from jobs.driver.preflight import Prepared
from jobs.errors import EXIT_FAILED, TlctlError, root_cause
from jobs.spec.load import spec_yaml
from jobs.storage.errors import StorageError
from jobs.storage.layout import RunLayout, epoch_lines
from jobs.storage.location import write_text
from jobs.storage.metrics import fold_events
from jobs.storage.retrying_fs import patient
from jobs.training.checkpoints import remove_stale_local_checkpoints
from jobs.training.export import export_model
from jobs.training.trainer import build_trainer

FOLD_AFTER_FAILURE_S = 10.0


def write_run_header(prepared: Prepared) -> None:
    """spec.yaml and classes.json: written once training is about to start."""
    layout = prepared.layout
    write_text(layout.spec, spec_yaml(prepared.spec))
    write_text(layout.classes, json.dumps(prepared.plan.classes))


def patient_layout(prepared: Prepared) -> RunLayout:
    """The run through a retrying filesystem: past training, storage calls wait out an
    outage as training's did."""
    window = prepared.spec.failure.storage_retry_s
    return prepared.layout.with_root(patient(prepared.layout.root, window))


def fold_after_failure(layout: RunLayout) -> None:
    """Fold the events of a failed run (its last worker failure) into metrics.jsonl. A
    storage failure here must not hide the job's own error, and loses nothing: the event
    objects stay, and readers merge them (RunLayout.read_log)."""
    try:
        fold_events(layout, window_s=FOLD_AFTER_FAILURE_S)
    except StorageError:
        pass


def run_job(prepared: Prepared, *, progress=None, submitted_at: float | None = None) -> dict:
    """Train (or resume) and export; returns the summary. Ray must be initialized."""
    start = time.time()
    if prepared.complete:
        info = prepared.layout.read_model_info() or {}
        return summary(prepared, info, time.time() - start, already_complete=True)
    job = prepared.worker_job(progress=progress, submitted_at=submitted_at)
    datasets = build_datasets(prepared.plan, prepared.spec.data)
    trainer = build_trainer(job, datasets=datasets)
    write_run_header(prepared)
    try:
        result = trainer.fit()
    except Exception as exc:
        fold_after_failure(prepared.layout)
        if isinstance(exc, TlctlError):
            raise
        # Ray wraps worker errors; show the cause
        raise TlctlError(f"training failed: {root_cause(exc)}", exit_code=EXIT_FAILED) from exc
    finally:
        # No worker group is left to upload them: local copies a killed group left here.
        remove_stale_local_checkpoints(prepared.layout.uri)
    # No worker group runs any more: the driver is the log's writer now.
    fold_events(prepared.layout, window_s=prepared.spec.failure.storage_retry_s)
    info = export_model(job, patient_layout(prepared), result)
    return summary(prepared, info, time.time() - start)


def summary(
    prepared: Prepared, info: dict[str, Any], wall: float, *, already_complete: bool = False
) -> dict[str, Any]:
    lines = epoch_lines(prepared.layout.read_log())
    metrics = info.get("metrics") or {}
    return {
        "run": prepared.spec.name,
        "best_val_acc": metrics.get("val_acc"),
        "best_epoch": metrics.get("epoch"),
        "epochs": len(lines),
        "wall_time_s": wall,
        "model_uri": prepared.layout.model.uri,
        "run_uri": prepared.layout.uri,
        "already_complete": already_complete,
    }
