"""The report of a plain (one-model) run: loss and accuracy per epoch, throughput per epoch,
the validation metric over wall-clock time with the run's restarts and resumes marked,
epochs.csv and the page.

Reads spec, metrics.jsonl (with events not folded in yet) and model.json.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from jobs.errors import TlctlError
from jobs.spec.model import JobSpec
from jobs.storage.layout import RunLayout, epoch_lines
from orchestrator.report.page import (
    definitions,
    esc,
    fmt,
    html_table,
    is_number,
    new_figure,
    no_data,
    save,
    write_csv,
    write_page,
)

# Events worth a mark on the time axis, with their colour and label; `workers` (a placement,
# logged at every start) is not.
EVENT_MARKS = {
    "worker_failure": ("#c62828", "worker failure", "--"),
    "resumed": ("#1565c0", "resumed", "-."),
    "checkpoint_skipped": ("#ef6c00", "checkpoint skipped", ":"),  # at a resume's time
}


def _epochs(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per epoch, in epoch order; a re-run epoch (after a restart) keeps its last."""
    by_epoch = {int(m["epoch"]): m for m in epoch_lines(lines) if m.get("epoch") is not None}
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_context(run: RunLayout, spec: JobSpec) -> dict[str, Any]:
    """Everything the plots and the page need, read once from storage (a run with no epoch
    yet is refused before `--out` is touched)."""
    lines = run.read_log()
    epochs = _epochs(lines)
    if not epochs:
        raise TlctlError(
            f"run '{spec.name}' has no epochs recorded yet; `tlctl runs show {spec.name}` "
            "shows what it has"
        )
    model = run.read_model_info()
    scored = [m for m in epochs if is_number(m.get("val_acc"))]
    best = max(scored, key=lambda m: m["val_acc"]) if scored else None
    times = [float(m["time"]) for m in lines if is_number(m.get("time"))]
    return {
        "name": spec.name,
        "uri": run.uri,
        "backbone": f"{spec.backbone.name} (freeze_depth {spec.backbone.freeze_depth})",
        "max_epochs": spec.train.epochs,
        "epochs": epochs,
        "events": [m for m in lines if m.get("event") in EVENT_MARKS],
        "start": min(times) if times else 0.0,
        "best": best,
        "model": model,
        "model_uri": run.model.uri if model else None,
    }


# --- plots ---------------------------------------------------------------------------------


def _series(ctx: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    points = [(int(m["epoch"]) + 1, float(m[key])) for m in ctx["epochs"] if is_number(m.get(key))]
    return [e for e, _ in points], [v for _, v in points]


def plot_curves(ctx: dict[str, Any], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation side by side: over- or underfitting
    at a glance, the best epoch marked."""
    fig = new_figure(11.0, 4.2)
    best = ctx["best"]
    for i, (what, title) in enumerate((("loss", "loss"), ("acc", "accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, style in (("train", "--"), ("val", "-")):
            xs, ys = _series(ctx, f"{split}_{what}")
            if xs:
                ax.plot(xs, ys, linestyle=style, marker="o", markersize=3, label=split)
        if best is not None:
            ax.axvline(int(best["epoch"]) + 1, color="#2e7d32", linewidth=1, alpha=0.6)
        ax.set_xlabel("epoch")
        ax.set_title(title + (" (green: best val acc)" if best is not None and i else ""))
        ax.set_xlim(0.5, max(ctx["max_epochs"], 1) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            no_data(ax, f"no {title} recorded")
    return save(fig, path)


def plot_throughput(ctx: dict[str, Any], path: Path) -> Path:
    """Training images per second per epoch: a slow first epoch (warm-up, caching) or a
    slow epoch after a restart shows here."""
    fig = new_figure(8.0, 4.0)
    ax = fig.add_subplot()
    xs, ys = _series(ctx, "images_per_s")
    if xs:
        ax.bar_label(ax.bar(xs, ys, color="#546e7a"), fmt="%.0f", fontsize=8)
        ax.set_title(f"training throughput per epoch (mean {sum(ys) / len(ys):.0f} img/s)")
    else:
        no_data(ax, "no throughput recorded")
    ax.set_xlabel("epoch")
    ax.set_ylabel("images / s")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def plot_timeline(ctx: dict[str, Any], path: Path) -> Path:
    """Validation accuracy when each epoch ended, on wall-clock minutes since the run began,
    with worker failures, resumes and skipped checkpoints as vertical lines."""
    fig = new_figure(9.0, 4.2)
    ax = fig.add_subplot()
    start = ctx["start"]
    points = [
        ((float(m["time"]) - start) / 60, float(m["val_acc"]), int(m["epoch"]) + 1)
        for m in ctx["epochs"]
        if is_number(m.get("time")) and is_number(m.get("val_acc"))
    ]
    if points:
        ax.plot([t for t, _, _ in points], [v for _, v, _ in points], marker="o", color="#37474f")
        for t, v, epoch in points:
            ax.annotate(str(epoch), (t, v), textcoords="offset points", xytext=(0, 5), fontsize=7)
    seen: set[str] = set()
    for e in ctx["events"]:
        colour, label, style = EVENT_MARKS[e["event"]]
        ax.axvline(
            (float(e.get("time", start)) - start) / 60,
            color=colour,
            linestyle=style,
            linewidth=2.0 if style == ":" else 1.2,
            label=None if label in seen else label,
        )
        seen.add(label)
    ax.set_xlabel("minutes since the run started")
    ax.set_ylabel("val acc")
    ax.set_title("val acc at each epoch's end (labels: epoch)")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="lower right")
    if not points and not seen:
        no_data(ax, "no timed epochs recorded")
    return save(fig, path)


# --- the page ------------------------------------------------------------------------------


def _when(t: Any) -> str:
    if not is_number(t):
        return "-"
    return dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def _summary_html(ctx: dict[str, Any]) -> str:
    best, epochs = ctx["best"], ctx["epochs"]
    done = len(epochs)
    status = "complete" if ctx["model"] else f"{done} of {ctx['max_epochs']} epochs so far"
    counts: dict[str, int] = {}
    for e in ctx["events"]:
        counts[EVENT_MARKS[e["event"]][1]] = counts.get(EVENT_MARKS[e["event"]][1], 0) + 1
    items = [
        ("run", ctx["name"]),
        ("storage", ctx["uri"]),
        ("backbone", ctx["backbone"]),
        ("status", status),
        ("epochs", f"{done} / {ctx['max_epochs']}"),
        (
            "best val acc",
            f"{fmt(best['val_acc'])} (epoch {int(best['epoch']) + 1})" if best else "-",
        ),
        ("training time", f"{sum(float(m.get('epoch_time_s') or 0) for m in epochs):.1f} s"),
        ("events", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"),
        ("model", ctx["model_uri"] or "not exported yet"),
    ]
    if ctx["model"]:
        items.append(("model checkpoint", ctx["model"].get("checkpoint")))
    return definitions(items)


EPOCH_COLUMNS = (
    ("epoch", None),
    ("train loss", "train_loss"),
    ("train acc", "train_acc"),
    ("val loss", "val_loss"),
    ("val acc", "val_acc"),
    ("img/s", "images_per_s"),
    ("time (s)", "epoch_time_s"),
    ("checkpoint wait (s)", "checkpoint_wait_s"),
)


def _epochs_html(ctx: dict[str, Any]) -> str:
    best = ctx["best"]
    rows = []
    for m in ctx["epochs"]:
        cells = [f'<td class="num">{int(m["epoch"]) + 1}</td>']
        cells += [f'<td class="num">{esc(m.get(key))}</td>' for _, key in EPOCH_COLUMNS[1:]]
        css = ' class="best"' if best is not None and m["epoch"] == best["epoch"] else ""
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    return html_table([h for h, _ in EPOCH_COLUMNS], rows)


def _events_html(ctx: dict[str, Any]) -> str:
    rows = []
    for e in ctx["events"]:
        detail = e.get("cause") or e.get("reason") or ""
        if e.get("checkpoint"):
            detail = f"{e['checkpoint']}: {detail}"
        if e["event"] == "resumed" and e.get("from_checkpoint_epoch") is not None:
            detail = f"from the checkpoint of epoch {int(e['from_checkpoint_epoch']) + 1}"
        at = "-" if e.get("epoch") is None else str(int(e["epoch"]) + 1)
        rows.append(
            f"<tr><td>{esc(_when(e.get('time')))}</td><td>{esc(e['event'])}</td>"
            f'<td class="num">{esc(at)}</td><td>{esc(detail)}</td></tr>'
        )
    return html_table(["time", "event", "epoch", "detail"], rows)


def write_run_report(ctx: dict[str, Any], out: Path) -> dict[str, Any]:
    """curves.png, throughput.png, timeline.png, epochs.csv and index.html in `out`."""
    images = {
        "curves.png": plot_curves(ctx, out / "curves.png"),
        "throughput.png": plot_throughput(ctx, out / "throughput.png"),
        "timeline.png": plot_timeline(ctx, out / "timeline.png"),
    }
    csv_path = write_csv(
        [{k: v for k, v in m.items() if k != "kind"} for m in ctx["epochs"]], out / "epochs.csv"
    )
    captions = {
        "curves.png": "loss and accuracy per epoch",
        "throughput.png": "training throughput per epoch",
        "timeline.png": "val acc over time, with restarts and resumes",
    }
    sections = [("epochs (1-based)", _epochs_html(ctx))]
    if ctx["events"]:
        sections.append(("events", _events_html(ctx)))
    page = write_page(
        out / "index.html",
        f"tlctl run report: {ctx['name']}",
        _summary_html(ctx),
        images,
        captions,
        sections,
    )
    best = ctx["best"]
    return {
        "files": [str(p) for p in (*images.values(), csv_path, page)],
        "run": ctx["uri"],
        "kind": "train",
        "epochs": len(ctx["epochs"]),
        "best_epoch": int(best["epoch"]) if best else None,
        "best_val_acc": best["val_acc"] if best else None,
        "model_uri": ctx["model_uri"],
    }
