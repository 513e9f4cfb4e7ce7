"""Terminal rendering: live training progress, summaries and run tables (Rich)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def _num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


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
        self.progress.console.print(
            f"epoch {int(m['epoch']) + 1}/{self.epochs}  "
            f"train loss {_num(m.get('train_loss'))} acc {_pct(m.get('train_acc'))}  "
            f"val loss {_num(m.get('val_loss'))} acc {_pct(m.get('val_acc'))}  "
            f"{_num(m.get('images_per_s'), '.0f')} img/s  {_num(m.get('epoch_time_s'), '.1f')} s"
        )


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"run {summary['run']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if summary.get("already_complete"):
        table.add_row("status", "already complete (nothing to train)")
    table.add_row(
        "best val acc",
        f"{_pct(summary['best_val_acc'])} (epoch {(summary['best_epoch'] or 0) + 1})",
    )
    table.add_row("epochs", str(summary["epochs"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("model", summary["model_uri"])
    console.print(table)


def print_runs(records: list[dict[str, Any]]) -> None:
    if not records:
        console.print("no runs")
        return
    table = Table()
    for col in ("name", "status", "backbone", "freeze", "epochs", "best val acc", "updated"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r["name"],
            r["status"],
            r["backbone"] or "-",
            str(r["freeze_depth"]),
            f"{r['epochs_done']}/{r['epochs']}",
            _pct(r["best_val_acc"]),
            _when(r["updated_at"]),
        )
    console.print(table)


def print_run(r: dict[str, Any]) -> None:
    head = Table(show_header=False, title=f"run {r['name']}", title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("status", r["status"])
    head.add_row("backbone", f"{r['backbone']} (freeze_depth {r['freeze_depth']})")
    head.add_row("classes", ", ".join(r.get("classes") or []) or "-")
    head.add_row(
        "best val acc",
        f"{_pct(r['best_val_acc'])} (epoch "
        f"{(r['best_epoch'] if r['best_epoch'] is not None else -1) + 1})",
    )
    head.add_row("best checkpoint", ((r.get("model") or {}).get("checkpoint")) or "-")
    head.add_row("model", r["model_uri"] or "- (not exported yet)")
    head.add_row("location", r["uri"])
    console.print(head)
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
    console.print(table)
    for e in r.get("events") or []:
        console.print(
            f"event: {e.get('event')} at epoch {int(e.get('epoch', 0)) + 1} "
            f"({_when(e.get('time'))})"
        )
