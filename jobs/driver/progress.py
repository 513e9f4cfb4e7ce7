"""Progress as plain text lines: what a cluster job logs per epoch and the terminal shows
when a run's epoch ends (the same words in both places)."""

from __future__ import annotations

from typing import Any


def pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One finished epoch of a plain run."""
    return (
        f"epoch {int(m['epoch']) + 1}/{epochs}  train loss {num(m.get('train_loss'))} "
        f"acc {pct(m.get('train_acc'))}  val loss {num(m.get('val_loss'))} acc "
        f"{pct(m.get('val_acc'))}  {num(m.get('images_per_s'), '.0f')} img/s  "
        f"{num(m.get('epoch_time_s'), '.1f')} s"
    )


def progress_line(item: dict[str, Any], epochs: int) -> str | None:
    """One log line per finished epoch (plain runs) or trial epoch/status (searches)."""
    if item.get("search"):
        trial = item.get("trial_id", "?")
        if "epoch" in item:
            return (
                f"trial {trial} epoch {int(item['epoch']) + 1}/{epochs}  "
                f"train acc {pct(item.get('train_acc'))}  val loss {num(item.get('val_loss'))} "
                f"acc {pct(item.get('val_acc'))}"
            )
        return f"trial {trial} {item.get('status', '')}".rstrip()
    if "epoch_done" not in item:
        return None
    return epoch_line(item, epochs)
