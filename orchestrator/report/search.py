"""The report of a hyperparameter search: per-trial curves, the metric over the searched
values, epochs per trial (what early stopping saved), trials.csv and the page.

Reads spec, metrics.jsonl, trials.parquet and model.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs.errors import TlctlError
from jobs.spec.model import JobSpec
from jobs.spec.search import DIMENSIONS
from jobs.storage.layout import TRIALS_TABLE, RunLayout, epoch_lines
from jobs.storage.location import exists
from orchestrator.display import trial_checkpoint
from orchestrator.report.page import (
    OTHER_COLOUR,
    STATUS_COLOURS,
    blend,
    definitions,
    esc,
    fmt,
    html_table,
    is_number,
    new_figure,
    no_data,
    pct,
    save,
    write_csv,
    write_page,
)

# --- reading the run -----------------------------------------------------------------------


def _require_trials(run: RunLayout, name: str) -> None:
    """A search's report needs trials.parquet: an unfinished search has none."""
    if not exists(run.trials_table):
        raise TlctlError(
            f"run '{name}' has no {TRIALS_TABLE} yet: the search has not finished "
            f"(resubmit its spec to resume it; `tlctl runs show {name}` shows its progress)"
        )


def _curves_by_trial(lines: list[dict[str, Any]], metric: str) -> dict[str, list[tuple]]:
    """(epoch, value) per trial, sorted; a re-run epoch (after a resume) keeps its last value."""
    points: dict[str, dict[int, float]] = {}
    for m in epoch_lines(lines):
        value = m.get(metric)
        if m.get("trial_id") is None or not is_number(value) or m.get("epoch") is None:
            continue
        points.setdefault(str(m["trial_id"]), {})[int(m["epoch"])] = float(value)
    return {t: sorted(p.items()) for t, p in points.items()}


# --- small helpers -------------------------------------------------------------------------


def _dims(rows: list[dict[str, Any]]) -> list[str]:
    """The searched hyperparameters: the table has a column for each, in DIMENSIONS order."""
    columns = {k for r in rows for k in r}
    return [d for d in DIMENSIONS if d in columns]


def _values(row: dict[str, Any], dims: list[str]) -> str:
    return " ".join(f"{d}={fmt(row.get(d))}" for d in dims)


def _label(row: dict[str, Any], dims: list[str]) -> str:
    return f"{row['trial_id']} {_values(row, dims)}".strip()


def _best_trial(rows: list[dict[str, Any]], model: dict[str, Any] | None) -> str | None:
    """The exported model's trial; before export, the top-ranked trial with a checkpoint."""
    if model and model.get("trial_id"):
        return str(model["trial_id"])
    return next((str(r["trial_id"]) for r in rows if r.get("checkpoint_uri")), None)


def plot_curves(ctx: dict[str, Any], path: Path) -> Path:
    """Validation metric per epoch, one line per trial: where ASHA cut and who won."""
    metric, rows, dims, best = ctx["metric"], ctx["rows"], ctx["dims"], ctx["best_trial"]
    curves = ctx["curves"]
    fig = new_figure(9.0, 5.0)
    ax = fig.add_subplot()
    cmap = _colormap("tab10" if len(rows) <= 10 else "tab20")
    for i, row in enumerate(rows):
        points = curves.get(str(row["trial_id"]))
        if not points:
            continue
        is_best = str(row["trial_id"]) == best
        style = {"stopped": "--", "error": ":"}.get(row.get("status"), "-")
        ax.plot(
            [e + 1 for e, _ in points],
            [v for _, v in points],
            linestyle=style,
            marker="o",
            markersize=3,
            linewidth=3.2 if is_best else 1.3,
            color=cmap(i % cmap.N),
            zorder=3 if is_best else 2,
            label=_label(row, dims) + (" (best)" if is_best else ""),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_xlim(0.5, max(ctx["max_epochs"], 1) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.set_title(f"{metric} per epoch (dashed: stopped early, dotted: error, thick: best)")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        no_data(ax, "no epochs recorded")
    return save(fig, path)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _log_ok(dim: str, values: Iterable[Any]) -> bool:
    """Rates are searched on a log scale; a log axis needs positive values."""
    return dim in ("lr", "weight_decay") and all(is_number(v) and v > 0 for v in values)


def plot_freeze_lr(ctx: dict[str, Any], path: Path) -> Path:
    """Each trial's best metric over freeze_depth × lr (or over the one dimension searched)."""
    dims = ctx["dims"]
    plotted = [d for d in ("lr", "freeze_depth") if d in dims] or dims[:1]
    fig = new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    if len(plotted) == 2:
        _map_2d(fig, ax, ctx)
    elif plotted:
        _scatter_1d(ax, ctx, plotted[0])
    else:
        _bars_per_trial(ax, ctx)
    ax.grid(alpha=0.3)
    return save(fig, path)


def _spread(rows: list[dict[str, Any]], keys: tuple[str, str]) -> list[float]:
    """Vertical offsets so trials that share a grid point (repeats) do not hide each other."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(i)
    offsets = [0.0] * len(rows)
    for members in groups.values():
        for j, i in enumerate(members):
            offsets[i] = (j - (len(members) - 1) / 2) * 0.18
    return offsets


def _label_lifts(xs: list[Any], ys: list[float]) -> list[float]:
    """Value labels alternately above and below the points of a row, so neighbours stay legible
    when lr is sampled from a continuous range."""
    rows: dict[float, list[int]] = {}
    for i, y in enumerate(ys):
        rows.setdefault(y, []).append(i)
    lifts = [13.0] * len(xs)
    for members in rows.values():
        ordered = sorted(members, key=lambda i: xs[i] if is_number(xs[i]) else 0.0)
        for j, i in enumerate(ordered):
            lifts[i] = 13.0 if j % 2 == 0 else -13.0
    return lifts


def _map_2d(fig, ax, ctx: dict[str, Any]) -> None:
    metric, rows = ctx["metric"], ctx["rows"]
    key = f"best_{metric}"
    offsets = _spread(rows, ("lr", "freeze_depth"))
    xs = [r.get("lr") for r in rows]
    ys = [float(r.get("freeze_depth") or 0) + o for r, o in zip(rows, offsets, strict=True)]
    scored = [i for i, r in enumerate(rows) if is_number(r.get(key))]
    unscored = [i for i in range(len(rows)) if i not in scored]
    cmap = "viridis" if ctx["mode"] == "max" else "viridis_r"  # bright = better either way
    if scored:
        sc = ax.scatter(
            [xs[i] for i in scored],
            [ys[i] for i in scored],
            c=[rows[i][key] for i in scored],
            cmap=cmap,
            s=260,
            edgecolors=["black" if _is_best(rows[i], ctx) else "none" for i in scored],
            linewidths=2,
            zorder=3,
        )
        fig.colorbar(sc, ax=ax, label=f"best {metric}")
    if unscored:
        ax.scatter(
            [xs[i] for i in unscored],
            [ys[i] for i in unscored],
            marker="x",
            color=STATUS_COLOURS["error"],
            s=120,
            zorder=3,
            label="no result",
        )
        ax.legend(fontsize=8, loc="best")
    lifts = _label_lifts(xs, ys)
    for i, r in enumerate(rows):
        text = f"{r[key]:.3g}" if is_number(r.get(key)) else str(r.get("status", "-"))
        ax.annotate(
            text,
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(0, lifts[i]),
            ha="center",
            va="center",
            fontsize=8,
        )
    if _log_ok("lr", xs):
        ax.set_xscale("log")
    depths = sorted({int(r["freeze_depth"]) for r in rows if r.get("freeze_depth") is not None})
    ax.set_yticks(depths)
    if depths:
        ax.set_ylim(min(depths) - 0.6, max(depths) + 0.6)
    ax.set_xlabel("lr")
    ax.set_ylabel("freeze_depth")
    ax.set_title(f"best {metric} per trial: freeze_depth × lr (outlined: best trial)")


def _scatter_1d(ax, ctx: dict[str, Any], dim: str) -> None:
    metric, rows = ctx["metric"], ctx["rows"]
    key = f"best_{metric}"
    shown = [r for r in rows if is_number(r.get(key)) and r.get(dim) is not None]
    for status in sorted({r.get("status") for r in shown}, key=str):
        group = [r for r in shown if r.get("status") == status]
        ax.scatter(
            [r[dim] for r in group],
            [r[key] for r in group],
            s=90,
            color=STATUS_COLOURS.get(status, OTHER_COLOUR),
            edgecolors=["black" if _is_best(r, ctx) else "none" for r in group],
            linewidths=2,
            label=str(status),
            zorder=3,
        )
    for r in shown:
        ax.annotate(
            fmt(r[key]), (r[dim], r[key]), textcoords="offset points", xytext=(0, 8), ha="center"
        )
    if _log_ok(dim, [r[dim] for r in shown]):
        ax.set_xscale("log")
    if shown:
        ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.08, y=0.15)  # room for the value labels above the points
    ax.set_xlabel(dim)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} per trial over {dim} (outlined: best trial)")


def _bars_per_trial(ax, ctx: dict[str, Any]) -> None:
    """No tunable dimension in the table: the best metric of each trial, as bars."""
    metric, rows = ctx["metric"], ctx["rows"]
    key = f"best_{metric}"
    ids = [str(r["trial_id"]) for r in rows]
    ax.bar(
        ids,
        [r.get(key) if is_number(r.get(key)) else 0.0 for r in rows],
        color=[STATUS_COLOURS.get(r.get("status"), OTHER_COLOUR) for r in rows],
    )
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} per trial")
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)


def _is_best(row: dict[str, Any], ctx: dict[str, Any]) -> bool:
    return str(row["trial_id"]) == ctx["best_trial"]


def plot_epochs(ctx: dict[str, Any], path: Path) -> Path:
    """Epochs each trial ran against the budget: the compute early stopping saved."""
    rows, max_epochs = ctx["rows"], ctx["max_epochs"]
    fig = new_figure(max(6.0, 0.45 * len(rows) + 3.0), 4.5)
    ax = fig.add_subplot()
    ids = [str(r["trial_id"]) for r in rows]
    ran = [int(r.get("epochs_run") or 0) for r in rows]
    colours = [STATUS_COLOURS.get(r.get("status"), OTHER_COLOUR) for r in rows]
    ax.bar_label(ax.bar(ids, ran, color=colours), fontsize=8)  # "0" shows a trial that failed
    ax.axhline(max_epochs, color="black", linestyle="--", linewidth=1)
    ax.text(1.0, max_epochs, f"max {max_epochs} ", va="bottom", ha="right", transform=blend(ax))
    budget, used = max_epochs * len(rows), sum(ran)
    ax.set_title(
        f"epochs run per trial: {used} of {budget}"
        + (
            f", early stopping saved {budget - used} ({pct(budget - used, budget)})"
            if budget
            else ""
        )
    )
    ax.set_ylabel("epochs run")
    ax.set_ylim(0, max([max_epochs, *ran]) + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    _status_legend(ax, rows)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def _status_legend(ax, rows: list[dict[str, Any]]) -> None:
    from matplotlib.patches import Patch

    statuses = sorted({str(r.get("status")) for r in rows})
    handles = [Patch(color=STATUS_COLOURS.get(s, OTHER_COLOUR), label=s) for s in statuses]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


# --- the page ------------------------------------------------------------------------------


def _summary_html(ctx: dict[str, Any]) -> str:
    best = next((r for r in ctx["rows"] if _is_best(r, ctx)), None)
    counts: dict[str, int] = {}
    for r in ctx["rows"]:
        counts[str(r.get("status"))] = counts.get(str(r.get("status")), 0) + 1
    items = [
        ("run", ctx["name"]),
        ("storage", ctx["uri"]),
        ("backbone", ctx["backbone"]),
        ("search metric", f"{ctx['metric']} ({ctx['mode']})"),
        ("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ("best trial", ctx["best_trial"] or "none yet"),
    ]
    if best is not None:
        items.append(("best hyperparameters", _values(best, ctx["dims"]) or "-"))
        items.append((f"best {ctx['metric']}", fmt(best.get(f"best_{ctx['metric']}"))))
    items.append(("best model", ctx["model_uri"] or "not exported yet"))
    return definitions(items)


def _table_html(ctx: dict[str, Any]) -> str:
    metric, dims = ctx["metric"], ctx["dims"]
    heads = ["rank", "trial", *dims, "status", "epochs", f"best {metric}", "best epoch"]
    heads.append("checkpoint")
    body = []
    for rank, r in enumerate(ctx["rows"], start=1):
        best_epoch = r.get("best_epoch")
        checkpoint = trial_checkpoint(r, metric, fmt) if r.get("checkpoint_uri") else None
        cells = [
            f'<td class="num">{rank}</td>',
            f"<td><code>{esc(r['trial_id'])}</code></td>",
            *(f'<td class="num">{esc(r.get(d))}</td>' for d in dims),
            f'<td class="{esc(r.get("status"))}">{esc(r.get("status"))}'
            + (f'<br><span class="muted">{esc(r["error"])}</span>' if r.get("error") else "")
            + "</td>",
            f'<td class="num">{esc(r.get("epochs_run"))} / {esc(ctx["max_epochs"])}</td>',
            f'<td class="num">{esc(r.get(f"best_{metric}"))}</td>',
            f'<td class="num">{esc(None if best_epoch is None else int(best_epoch) + 1)}</td>',
            f"<td><code>{esc(checkpoint)}</code></td>",
        ]
        css = ' class="best"' if _is_best(r, ctx) else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return html_table(heads, body)


def search_context(run: RunLayout, spec: JobSpec) -> dict[str, Any]:
    """Everything the plots and the page need, read once from storage (before `--out` is
    touched: an unfinished search is refused first)."""
    _require_trials(run, spec.name)
    search = spec.search
    rows = run.read_trials_table()
    model = run.read_model_info()
    return {
        "name": spec.name,
        "uri": run.uri,
        "backbone": spec.backbone.name,
        "metric": search.metric,
        "mode": search.mode or "max",
        "max_epochs": spec.train.epochs,
        "rows": rows,
        "dims": _dims(rows),
        "curves": _curves_by_trial(run.read_log(), search.metric),
        "best_trial": _best_trial(rows, model),
        "model_uri": run.model.uri if model else None,
    }


def write_search_report(ctx: dict[str, Any], out: Path) -> dict[str, Any]:
    """curves.png, freeze_lr.png, epochs.png, trials.csv and index.html in `out`."""
    images = {
        "curves.png": plot_curves(ctx, out / "curves.png"),
        "freeze_lr.png": plot_freeze_lr(ctx, out / "freeze_lr.png"),
        "epochs.png": plot_epochs(ctx, out / "epochs.png"),
    }
    ranked = [{"rank": rank, **row} for rank, row in enumerate(ctx["rows"], start=1)]
    csv_path = write_csv(ranked, out / "trials.csv")
    captions = {
        "curves.png": f"{ctx['metric']} per epoch",
        "freeze_lr.png": f"best {ctx['metric']} by hyperparameters",
        "epochs.png": "epochs run per trial",
    }
    page = write_page(
        out / "index.html",
        f"tlctl search report: {ctx['name']}",
        _summary_html(ctx),
        images,
        captions,
        [("trials (best first; epochs 1-based)", _table_html(ctx))],
    )
    return {
        "files": [str(p) for p in (*images.values(), csv_path, page)],
        "run": ctx["uri"],
        "kind": "search",
        "trials": len(ctx["rows"]),
        "best_trial": ctx["best_trial"],
        "model_uri": ctx["model_uri"],
    }
