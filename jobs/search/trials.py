"""A finished search's record: one row per trial (`trials.parquet`) and the best trial's
`model/`.

Rows come from the run's metrics (merged with each trial's own) and the checkpoints in
storage, not from Tune's last results, so they say what the storage holds.
"""

from __future__ import annotations

import io
import os
from typing import Any

from jobs.driver.preflight import Prepared
from jobs.errors import EXIT_FAILED, TlctlError
from jobs.search.space import apply_trial, hyperparameters
from jobs.spec.model import JobSpec
from jobs.storage.layout import CHECKPOINT_FILES, RunLayout, epoch_lines
from jobs.storage.location import Location, list_dir, write_bytes
from jobs.training.checkpoints import complete_checkpoint
from jobs.training.export import model_info, publish_model


def trial_id_of(result) -> str:
    """The trial id of one entry of Tune's result grid (its directory's name)."""
    return os.path.basename(result.path.rstrip("/"))


def trial_rows(
    spec: JobSpec, layout: RunLayout, grid, run_lines: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per trial of Tune's result grid, best first.

    Metrics come from the run's record (`run_lines`, already merged with each trial's own
    log), checkpoints from storage: the best epoch is the best logged one, and the
    checkpoint is the best epoch's that is complete in storage. They differ when ASHA
    stopped the trial while its last checkpoint was being uploaded (and when ties or
    `checkpoint.every_epochs` leave epochs without one); the row then says both.
    """
    search = spec.search
    metric, mode = search.metric, search.mode
    rows = []
    for result in grid:
        trial_id = trial_id_of(result)
        lines = [m for m in epoch_lines(run_lines) if m.get("trial_id") == trial_id]
        kept = _complete_checkpoints(layout.trial(trial_id))
        best = _best_line(lines, metric, mode)
        saved = _best_line([m for m in lines if int(m["epoch"]) in kept], metric, mode)
        done = max((int(m["epoch"]) + 1 for m in lines), default=0)
        if result.error is not None:
            status = "error"
        elif done >= spec.train.epochs:
            status = "completed"
        else:
            status = "stopped"  # ASHA ended it early: a decision, not a failure
        rows.append(
            {
                "trial_id": trial_id,
                **hyperparameters(search, result.config or {}),
                "status": status,
                "epochs_run": done,
                f"best_{metric}": best.get(metric) if best else None,
                "best_epoch": int(best["epoch"]) if best else None,
                "val_acc": best.get("val_acc") if best else None,
                "train_time_s": sum(float(m.get("epoch_time_s", 0.0)) for m in lines),
                # The model this trial can give: its best epoch with a complete checkpoint.
                "checkpoint_epoch": int(saved["epoch"]) if saved else None,
                f"checkpoint_{metric}": saved.get(metric) if saved else None,
                "checkpoint_uri": kept[int(saved["epoch"])].uri if saved else None,
                "error": _error_text(result.error),
            }
        )
    scored = [r for r in rows if r[f"best_{metric}"] is not None]
    unscored = [r for r in rows if r[f"best_{metric}"] is None]
    scored.sort(key=lambda r: r[f"best_{metric}"], reverse=mode == "max")
    return scored + sorted(unscored, key=lambda r: r["trial_id"])


def write_trials_table(layout: RunLayout, rows: list[dict[str, Any]]) -> None:
    """trials.parquet: one row per trial, readable with pandas/pyarrow anywhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    for name in ("error", "checkpoint_uri"):  # all-null columns would be typed null
        if name in table.column_names:
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, table[name].cast(pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(layout.trials_table, buf.getvalue())


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


def _complete_checkpoints(trial: RunLayout) -> dict[int, Location]:
    """Epoch → its newest checkpoint dir holding every file (a trial that ASHA stops can
    leave a partly uploaded one behind); a cheap listing, export verifies the winner."""
    found: dict[int, Location] = {}
    for epoch, loc in trial.checkpoint_dirs():  # newest rewrite first
        if epoch not in found and set(CHECKPOINT_FILES) <= set(list_dir(loc)):
            found[epoch] = loc
    return found


def export_best(prepared: Prepared, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best checkpoint of the search → `model/` (same contract as a plain job).

    Ranked by the metric at each trial's checkpoint, not its best epoch: a trial whose best
    epoch lost its checkpoint to the stop can only give its earlier one.
    """
    search = prepared.spec.search
    metric = search.metric
    saved = [r for r in rows if r["checkpoint_uri"] and r[f"checkpoint_{metric}"] is not None]
    if not saved:
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise TlctlError(
            "search produced no checkpoint to export"
            + (f": {'; '.join(errors)}" if errors else ""),
            exit_code=EXIT_FAILED,
        )
    pick = max if search.mode == "max" else min
    winner = pick(saved, key=lambda r: r[f"checkpoint_{metric}"])  # first of equals
    values = {k: winner[k] for k in search.dimensions()}
    trial = prepared.layout.trial(winner["trial_id"])
    epoch = int(winner["checkpoint_epoch"])
    ckpt, reason = complete_checkpoint(trial, epoch)
    if ckpt is None:
        raise TlctlError(
            f"the best trial's checkpoint is not complete ({reason})", exit_code=EXIT_FAILED
        )
    best = next(m for m in epoch_lines(trial.read_log()) if int(m["epoch"]) == epoch)
    job = prepared.replace(spec=apply_trial(prepared.spec, values)).worker_job()
    info = model_info(job, best, ckpt.uri)
    info["trial_id"] = winner["trial_id"]
    info["hyperparameters"] = values
    info["search_metric"] = search.metric
    publish_model(prepared.layout, ckpt, info)
    return info
