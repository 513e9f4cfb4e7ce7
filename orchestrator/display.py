"""Terminal rendering: live training progress, summaries and run tables (Rich).

On a terminal: live bars, a live trials table, boxed tables. When stdout is not a terminal
(a pipe, a log file): one line per epoch or trial event, tables as plain aligned columns
with one row per line, never wrapped or cut (as `kubectl get` and `ray job list` print), so
`tlctl runs list | grep NAME` finds the whole name. Text that comes from the user or from
storage (names, URIs, class names, errors) is escaped before Rich sees it: `[/]` in a run
name is printed, never read as markup.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from jobs.driver.progress import epoch_line, progress_line
from jobs.driver.progress import num as _num
from jobs.driver.progress import pct as _pct
from jobs.spec.model import JobSpec
from jobs.spec.search import SearchSpec


class _Console(Console):
    """A Console that never wraps a line when its output is not a terminal."""

    @property  # type: ignore[override]
    def soft_wrap(self) -> bool:
        return self._soft_wrap or not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:
        self._soft_wrap = value


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)


def show(table: Table) -> None:
    """A table: boxed on a terminal; piped, plain columns, one row per line, never cut."""
    if console.is_terminal:
        console.print(table)
        return
    heads = [_plain(c.header) for c in table.columns]
    cells = [[_plain(cell) for cell in column.cells] for column in table.columns]
    rows = [list(r) for r in zip(*cells, strict=True)] if cells else []
    if table.show_header:
        rows.insert(0, heads)
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(len(heads))]
    if table.title:
        typer.echo(_plain(table.title))
    for row in rows:
        parts = [
            cell.rjust(w) if column.justify == "right" else cell.ljust(w)
            for cell, w, column in zip(row, widths, table.columns, strict=True)
        ]
        typer.echo("  ".join(parts).rstrip())


def _plain(cell: Any) -> str:
    """A cell's text without its markup (cells are markup strings or Text)."""
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain


def emit_json(data: Any) -> None:
    """`--json` output: one JSON document on stdout."""
    typer.echo(json.dumps(data, indent=1, default=str))


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


class QuietProgress:
    """No live display (`--json`: stdout carries only the summary)."""

    def __enter__(self) -> QuietProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, item: dict[str, Any]) -> None:
        pass


class TrainingProgress:
    """One progress bar per epoch (loss/accuracy live), one summary line when it ends."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None
        self.epoch: int | None = None

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, item: dict[str, Any]) -> None:
        if "epoch_done" in item:
            self._epoch_done(item)
            return
        epoch = int(item["epoch"])
        if epoch != self.epoch:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.epoch = epoch
            self.task = self.progress.add_task(
                "train",
                total=item["steps"],
                epoch=epoch + 1,
                epochs=self.epochs,
                loss="-",
                acc="-",
            )
        self.progress.update(
            self.task,
            completed=min(item["step"], item["steps"]),
            total=max(item["steps"], item["step"]),
            loss=_num(item["loss"]),
            acc=_pct(item["acc"]),
        )

    def _epoch_done(self, m: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task, self.epoch = None, None
        self.progress.console.print(epoch_line(m, self.epochs))


_HYPER = ("freeze_depth", "lr", "weight_decay", "batch_size")
_STATUS_STYLE = {
    "running": "cyan",
    "completed": "green",
    "stopped": "yellow",
    "error": "red",
    "pending": "dim",
}


def _value(key: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if key != "batch_size" else str(int(v))
    return "-" if v is None else str(v)


class SearchProgress:
    """A live table of a search's trials: values, epoch, val accuracy, status."""

    def __init__(self, epochs: int, metric: str = "val_acc") -> None:
        from rich.live import Live

        self.epochs, self.metric = epochs, metric
        self.trials: dict[str, dict[str, Any]] = {}
        self.lines = not console.is_terminal  # piped: a line per trial epoch or status
        self.live = Live(self._table(), console=console, refresh_per_second=4)

    def __enter__(self) -> SearchProgress:
        if not self.lines:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lines:
            return
        self.live.update(self._table())
        self.live.stop()
        console.print()

    def update(self, item: dict[str, Any]) -> None:
        if not item.get("search"):
            return
        if self.lines:
            row = self.trials.setdefault(item["trial_id"], {})
            line = progress_line(item, self.epochs)
            if line and line != row.get("printed"):
                typer.echo(line)
                row["printed"] = line
            return
        row = self.trials.setdefault(item["trial_id"], {"best": None})
        row.update({k: item[k] for k in _HYPER if k in item})
        row["status"] = item.get("status", row.get("status"))
        if "epoch" in item:
            row["epoch"] = int(item["epoch"]) + 1
            row["last"] = item.get(self.metric)
            value = item.get(self.metric)
            better = max if not self.metric.endswith("loss") else min
            if isinstance(value, (int, float)):
                row["best"] = value if row["best"] is None else better(row["best"], value)
        self.live.update(self._table())

    def _table(self) -> Table:
        table = Table(title="trials", title_justify="left")
        keys = [k for k in _HYPER if any(k in r for r in self.trials.values())]
        for col in ("trial", *keys, "epoch", self.metric, "best", "status"):
            table.add_column(col, justify="left" if col in ("trial", "status") else "right")
        fmt = _pct if self.metric.endswith("acc") else _num
        for trial_id, r in sorted(self.trials.items()):
            status = r.get("status") or "pending"
            table.add_row(
                escape(trial_id),
                *(_value(k, r.get(k)) for k in keys),
                f"{r.get('epoch', 0)}/{self.epochs}",
                fmt(r.get("last")),
                fmt(r.get("best")),
                f"[{_STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]",
            )
        return table


def progress_display(spec: JobSpec, json_out: bool) -> Any:
    """The live display for a run of `spec` (none with --json)."""
    if json_out:
        return QuietProgress()
    if spec.search:
        return SearchProgress(spec.train.epochs, spec.search.metric)
    return TrainingProgress(spec.train.epochs)


def start_line(prepared: Any, concurrency: int) -> str:
    """What is about to run, in one line: model, data, workers, search size, where to."""
    spec, plan = prepared.spec, prepared.plan
    verb = "resuming" if prepared.resuming else "starting"
    workers = spec.scaling.workers
    data = f"{plan.num_classes} classes, {plan.train_rows} train images"
    search = spec.search
    uri = prepared.layout.uri
    if not search:
        return (
            f"{verb} run [bold]{escape(spec.name)}[/]: {spec.backbone.name} (freeze_depth "
            f"{spec.backbone.freeze_depth}), {data}, {workers} workers → {escape(uri)}"
        )
    return (
        f"{verb} search [bold]{escape(spec.name)}[/]: {spec.backbone.name}, "
        f"{search.trial_count()} trials over {', '.join(search.dimensions())} "
        f"({search.search_alg}, {search.scheduler}), {data}, {workers} worker"
        f"{'s' if workers > 1 else ''} per trial, up to {concurrency} at once → {escape(uri)}"
    )


def already_complete(prepared: Any, *, json_out: bool) -> None:
    name = prepared.spec.name
    if json_out:
        emit_json({"run": name, "already_complete": True})
        return
    console.print(
        f"run {name} is already complete at {prepared.layout.uri}: nothing submitted "
        "(choose a new name to train again)",
        markup=False,
    )


def submitted(job_id: str, address: str, prepared: Any, *, json_out: bool) -> None:
    name = prepared.spec.name
    if json_out:
        emit_json({"job_id": job_id, "address": address, "run": name})
        return
    verb = "resumes" if prepared.resuming else "starts"
    console.print(
        f"submitted job {job_id} to {address}: run {name} {verb} → "
        f"{prepared.layout.uri}\n  follow: tlctl jobs logs {job_id} --follow   "
        f"status: tlctl jobs status {job_id}   stop: tlctl jobs stop {job_id}",
        soft_wrap=True,
        markup=False,
    )


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {escape(summary['run'])}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if summary.get("already_complete"):
        table.add_row("status", "already complete (nothing to train)")
    table.add_row(
        "best val acc",
        f"{_pct(summary['best_val_acc'])} (epoch {(summary['best_epoch'] or 0) + 1})",
    )
    if summary.get("search"):
        counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["trial_status"].items()))
        table.add_row("trials", f"{summary['trials']} ({counts})")
        table.add_row("best trial", escape(str(summary["best_trial"])))
        values = summary.get("hyperparameters") or {}
        table.add_row("best values", ", ".join(f"{k}={_value(k, v)}" for k, v in values.items()))
        table.add_row("trial epochs", str(summary["trial_epochs"]))
        table.add_row("trials table", escape(summary["trials_uri"]))
    else:
        table.add_row("epochs", str(summary["epochs"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("model", escape(summary["model_uri"]))
    show(table)


def print_runs(records: list[dict[str, Any]]) -> None:
    if not records:
        console.print("no runs")
        return
    table = Table()
    for col in ("name", "status", "backbone", "freeze", "epochs", "best val acc", "updated"):
        table.add_column(col)
    for r in records:
        if r.get("kind") == "search":
            epochs = f"{r['epochs_done']} in {r.get('trials', 0)} trials"
        else:
            epochs = f"{r['epochs_done']}/{r['epochs']}"
        table.add_row(
            escape(r["name"]) + (" (search)" if r.get("kind") == "search" else ""),
            r["status"],
            escape(r["backbone"] or "-"),
            str(r["freeze_depth"]),
            epochs,
            _pct(r["best_val_acc"]),
            _when(r["updated_at"]),
        )
    show(table)


def print_run(r: dict[str, Any]) -> None:
    head = Table(show_header=False, title=f"run {escape(r['name'])}", title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("status", r["status"])
    head.add_row("backbone", f"{r['backbone']} (freeze_depth {r['freeze_depth']})")
    head.add_row("classes", escape(", ".join(r.get("classes") or []) or "-"))
    head.add_row(
        "best val acc",
        f"{_pct(r['best_val_acc'])} (epoch "
        f"{(r['best_epoch'] if r['best_epoch'] is not None else -1) + 1})",
    )
    if r.get("kind") == "search":
        values = r.get("hyperparameters") or {}
        head.add_row(
            "best trial",
            escape(f"{r.get('best_trial') or '-'} ")
            + ", ".join(f"{k}={_value(k, v)}" for k, v in values.items()),
        )
    head.add_row("best checkpoint", escape(((r.get("model") or {}).get("checkpoint")) or "-"))
    workers = r.get("workers") or []
    if workers:
        nodes = {w.get("node_id") for w in workers}
        head.add_row(
            "workers",
            f"{len(workers)} on {len(nodes)} node{'s' if len(nodes) > 1 else ''} ("
            + ", ".join(f"rank {w.get('rank')} on {str(w.get('node_id'))[:8]}" for w in workers)
            + ")",
        )
    head.add_row("model", escape(r["model_uri"] or "- (not exported yet)"))
    head.add_row("location", escape(r["uri"]))
    show(head)
    if r.get("kind") == "search":
        print_trials(r)
        return
    table = Table(title="per-epoch metrics", title_justify="left")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "img/s", "time"):
        table.add_column(col, justify="right")
    for m in r["metrics"]:
        table.add_row(
            str(int(m["epoch"]) + 1),
            _num(m.get("train_loss")),
            _pct(m.get("train_acc")),
            _num(m.get("val_loss")),
            _pct(m.get("val_acc")),
            _num(m.get("images_per_s"), ".0f"),
            f"{_num(m.get('epoch_time_s'), '.1f')} s",
        )
    show(table)
    for e in r.get("events") or []:
        if e.get("event") == "workers":
            continue
        where = f" at epoch {int(e['epoch']) + 1}" if "epoch" in e else ""
        detail = e.get("cause") or e.get("reason")
        if e.get("checkpoint"):
            detail = f"{e['checkpoint']}: {detail}"
        console.print(
            f"event: {e.get('event')}{where} ({_when(e.get('time'))})"
            + (f": {detail}" if detail else ""),
            markup=False,
            soft_wrap=True,
        )


def _epoch(index: Any) -> str:
    """A 0-based epoch index as people count it."""
    return "-" if index is None else str(int(index) + 1)


def trial_checkpoint(t: dict[str, Any], metric: str, fmt: Any) -> str:
    """A trial's checkpoint, saying so when it is not its best epoch's (lost to the stop)."""
    uri = t.get("checkpoint_uri")
    if not uri:
        return t.get("error") or "-"
    epoch = t.get("checkpoint_epoch")
    if epoch is None or epoch == t.get("best_epoch"):
        return uri
    return f"{uri} (epoch {_epoch(epoch)}, {metric} {fmt(t.get(f'checkpoint_{metric}'))})"


def print_trials(r: dict[str, Any]) -> None:
    """A search's trials, best first (from trials.parquet, or the metrics while running)."""
    search = SearchSpec.model_validate(r["search"])
    metric = search.metric
    keys = list(search.dimensions())
    table = Table(title=f"trials (ranked by {metric})", title_justify="left")
    cols = ("#", "trial", *keys, "status", "epochs", f"best {metric}", "epoch", "checkpoint")
    for col in cols:
        table.add_column(
            col, justify="left" if col in ("trial", "status", "checkpoint") else "right"
        )
    fmt = _pct if metric.endswith("acc") else _num
    rows = r.get("trial_table") or []
    for rank, t in enumerate(rows, 1):
        status = t.get("status") or "-"
        table.add_row(
            str(rank),
            escape(t["trial_id"]),
            *(_value(k, t.get(k)) for k in keys),
            f"[{_STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]",
            f"{t.get('epochs_run')}/{r.get('epochs')}",
            fmt(t.get(f"best_{metric}")),
            _epoch(t.get("best_epoch")),
            escape(trial_checkpoint(t, metric, fmt)),
        )
    if not rows:
        console.print("no trials table yet (the search has not finished); metrics so far:")
    show(table)
