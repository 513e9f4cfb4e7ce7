"""The run registry: what storage says about runs. Reads storage only; no Ray needed."""

from __future__ import annotations

import json
from typing import Any

import yaml

from jobs.errors import TlctlError
from jobs.metrics import epoch_lines, read_metrics
from jobs.storage import Location, describe_error, exists, list_dir, read_text, resolve
from jobs.trials import TRIALS_TABLE, read_trials_table


def _status(run: Location, spec: dict[str, Any], epochs_done: int) -> str:
    if spec.get("search"):
        done = exists(run.join("model", "model.json")) and exists(run.join(TRIALS_TABLE))
        return "complete" if done else "running/interrupted"
    if exists(run.join("model", "model.json")):
        return "complete"
    target = int((spec.get("train") or {}).get("epochs", 0))
    return "running/interrupted" if epochs_done < target else "exporting"


def run_record(run: Location, *, detail: bool = False) -> dict[str, Any] | None:
    """Summary of one run prefix, or None when the prefix holds no tlctl run."""
    spec_loc = run.join("spec.yaml")
    if not exists(spec_loc):
        return None
    spec = yaml.safe_load(read_text(spec_loc)) or {}
    lines = read_metrics(run.join("metrics.jsonl"))
    epochs = epoch_lines(lines)
    model = None
    if exists(run.join("model", "model.json")):
        model = json.loads(read_text(run.join("model", "model.json")))
    best = (model or {}).get("metrics") or (
        max(epochs, key=lambda m: m.get("val_acc", 0.0)) if epochs else {}
    )
    search = spec.get("search")
    record: dict[str, Any] = {
        "name": spec.get("name", run.uri.rsplit("/", 1)[-1]),
        "kind": "search" if search else "train",
        "status": _status(run, spec, len(epochs)),
        "backbone": (spec.get("backbone") or {}).get("name"),
        "freeze_depth": (spec.get("backbone") or {}).get("freeze_depth"),
        "epochs_done": len(epochs),
        "epochs": (spec.get("train") or {}).get("epochs"),
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        "started_at": lines[0]["time"] if lines else None,
        "updated_at": lines[-1]["time"] if lines else None,
        "model_uri": run.join("model").uri if model else None,
        "uri": run.uri,
    }
    if search:
        trial_ids = {m.get("trial_id") for m in lines if m.get("trial_id")}
        record["trials"] = len(trial_ids)
        record["best_trial"] = (model or {}).get("trial_id")
        record["hyperparameters"] = (model or {}).get("hyperparameters")
        record["freeze_depth"] = (model or {}).get("freeze_depth", "searched")
    if detail:
        if search:
            record["trial_table"] = read_trials_table(run)
            record["search"] = search
        record["metrics"] = epochs
        record["events"] = [m for m in lines if m.get("kind") == "event"]
        placements = [e for e in record["events"] if e.get("event") == "workers"]
        record["workers"] = placements[-1]["workers"] if placements else []
        record["model"] = model
        record["classes"] = (model or {}).get("classes") or _classes(run)
        record["checkpoints"] = [run.join("checkpoints", c).uri for c in _checkpoints(run)]
        record["spec"] = spec
    return record


def _classes(run: Location) -> list[str] | None:
    loc = run.join("classes.json")
    return json.loads(read_text(loc)) if exists(loc) else None


def _checkpoints(run: Location) -> list[str]:
    loc = run.join("checkpoints")
    if not exists(loc):
        return []
    return [c for c in list_dir(loc) if c.startswith("epoch-")]


def list_runs(storage: str, endpoint: str | None) -> list[dict[str, Any]]:
    root = resolve(storage, endpoint)
    try:
        names = list_dir(root) if exists(root) else []
    except OSError as exc:
        raise describe_error(exc, root) from None
    records = [run_record(root.join(n)) for n in names]
    return [r for r in records if r is not None]


def show_run(storage: str, endpoint: str | None, name: str) -> dict[str, Any]:
    root = resolve(storage, endpoint)
    record = run_record(root.join(name), detail=True)
    if record is None:
        names = [r["name"] for r in list_runs(storage, endpoint)]
        raise TlctlError(
            f"run '{name}' not found under {root.uri}"
            + (f" (runs there: {', '.join(names)})" if names else " (no runs there)")
        )
    return record
