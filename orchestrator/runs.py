"""The run registry: what storage says about runs. Reads storage only; no Ray needed."""

from __future__ import annotations

from typing import Any

from jobs.errors import TlctlError
from jobs.spec.model import NAME_RE, JobSpec
from jobs.storage.layout import RunLayout, epoch_lines, parse_checkpoint_name
from jobs.storage.location import Location, describe_error, exists, list_dir, resolve


def _status(layout: RunLayout, spec: JobSpec, epochs_done: int) -> str:
    model = exists(layout.model_info)
    if spec.search:
        return "complete" if model and exists(layout.trials_table) else "running/interrupted"
    if model:
        return "complete"
    return "running/interrupted" if epochs_done < spec.train.epochs else "exporting"


def run_record(layout: RunLayout, *, detail: bool = False) -> dict[str, Any] | None:
    """Summary of one run prefix, or None when the prefix holds no tlctl run."""
    if not layout.has_spec():
        return None
    spec = layout.read_spec()
    lines = layout.read_log()
    epochs = epoch_lines(lines)
    times = [float(m["time"]) for m in lines if isinstance(m.get("time"), (int, float))]
    model = layout.read_model_info()
    best = (model or {}).get("metrics") or (
        max(epochs, key=lambda m: m.get("val_acc", 0.0)) if epochs else {}
    )
    record: dict[str, Any] = {
        "name": spec.name,
        "kind": "search" if spec.search else "train",
        "status": _status(layout, spec, len(epochs)),
        "backbone": spec.backbone.name,
        "freeze_depth": spec.backbone.freeze_depth,
        "epochs_done": len(epochs),
        "epochs": spec.train.epochs,
        "best_val_acc": best.get("val_acc"),
        "best_epoch": best.get("epoch"),
        # min/max, not first/last: a search's record adds a stopped trial's last epoch
        # (with its own time) after lines written later.
        "started_at": min(times, default=None),
        "updated_at": max(times, default=None),
        "model_uri": layout.model.uri if model else None,
        "uri": layout.uri,
    }
    if spec.search:
        trial_ids = {m.get("trial_id") for m in lines if m.get("trial_id")}
        record["trials"] = len(trial_ids)
        record["best_trial"] = (model or {}).get("trial_id")
        record["hyperparameters"] = (model or {}).get("hyperparameters")
        record["freeze_depth"] = (model or {}).get("freeze_depth", "searched")
    if detail:
        if spec.search:
            record["trial_table"] = layout.read_trials_table()
            record["search"] = spec.search.model_dump()
        record["metrics"] = epochs
        record["events"] = [m for m in lines if m.get("kind") == "event"]
        placements = [e for e in record["events"] if e.get("event") == "workers"]
        record["workers"] = placements[-1]["workers"] if placements else []
        record["model"] = model
        record["classes"] = (model or {}).get("classes") or layout.read_classes()
        record["checkpoints"] = [
            layout.checkpoint(name).uri
            for name in list_dir(layout.checkpoints)
            if parse_checkpoint_name(name) is not None
        ]
        record["spec"] = spec.model_dump(mode="json")
    return record


def list_runs(storage: str, endpoint: str | None) -> list[dict[str, Any]]:
    root = resolve(storage, endpoint)
    try:
        names = list_dir(root) if exists(root) else []
    except OSError as exc:
        raise describe_error(exc, root) from exc
    # Not runs: the model registry (REGISTRY) and anything else no run could be named.
    names = [n for n in names if NAME_RE.fullmatch(n)]
    records = [_listed(RunLayout(root.join(n)), n) for n in names]
    return [r for r in records if r is not None]


def _listed(layout: RunLayout, name: str) -> dict[str, Any] | None:
    """A run's row; a run whose stored records do not read (an older tlctl, a foreign or
    damaged object) is listed as unreadable with the reason, not a failure of the list."""
    try:
        return run_record(layout)
    except (TlctlError, ValueError) as exc:
        reason = exc.message if isinstance(exc, TlctlError) else str(exc)
        return {
            "name": name,
            "kind": "train",
            "status": f"unreadable ({' '.join(reason.split())[:120]})",
            "backbone": None,
            "freeze_depth": "-",
            "epochs_done": 0,
            "epochs": 0,
            "best_val_acc": None,
            "best_epoch": None,
            "started_at": None,
            "updated_at": None,
            "model_uri": None,
            "uri": layout.uri,
        }


def locate_run(storage: str, endpoint: str | None, name: str) -> RunLayout:
    """The run's layout; a missing run names the ones that exist."""
    root: Location = resolve(storage, endpoint)
    layout = RunLayout(root.join(name))
    if layout.has_spec():
        return layout
    names = [r["name"] for r in list_runs(storage, endpoint)]
    raise TlctlError(
        f"run '{name}' not found under {root.uri}"
        + (f" (runs there: {', '.join(names)})" if names else " (no runs there)")
    )


def show_run(storage: str, endpoint: str | None, name: str) -> dict[str, Any]:
    record = run_record(locate_run(storage, endpoint, name), detail=True)
    if record is None:  # deleted since it was located
        raise TlctlError(f"run '{name}' is gone from {storage}")
    return record
