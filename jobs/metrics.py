"""The run's `metrics.jsonl`: one line per epoch, plus event lines (resume, restart).

Ray Train V2 keeps only the metrics reported with a checkpoint, so tlctl writes its own.
S3 has no append, so the log is kept in memory and the whole object rewritten each epoch
(small: one line per epoch). On resume, lines of epochs that will be re-run are dropped,
so no epoch is ever recorded twice.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jobs.storage import Location, exists, read_text, write_text


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines, skipping blanks (a torn final line is ignored, not fatal)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_metrics(loc: Location) -> list[dict[str, Any]]:
    return parse_lines(read_text(loc)) if exists(loc) else []


def write_metrics(loc: Location, lines: list[dict[str, Any]]) -> None:
    """Rewrite the whole log (S3 has no append): one sorted-key JSON object per line."""
    write_text(loc, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines))


def epoch_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in lines if m.get("kind", "epoch") == "epoch"]


class MetricsLog:
    """Rank 0's writer for `metrics.jsonl`."""

    def __init__(self, loc: Location, **tags: Any) -> None:
        self.loc = loc
        self.tags = tags  # e.g. trial id and hyperparameters, added to every line
        self.lines: list[dict[str, Any]] = []

    def load(self, keep_before_epoch: int) -> None:
        """Keep what earlier attempts recorded, minus epochs that will run again."""
        self.lines = [
            m
            for m in read_metrics(self.loc)
            if m.get("kind") != "epoch" or int(m.get("epoch", 0)) < keep_before_epoch
        ]

    def _write(self, line: dict[str, Any]) -> None:
        self.lines.append({**self.tags, **line, "time": time.time()})
        write_metrics(self.loc, self.lines)

    def epoch(self, metrics: dict[str, Any]) -> None:
        self._write({"kind": "epoch", **metrics})

    def event(self, name: str, **fields: Any) -> None:
        self._write({"kind": "event", "event": name, **fields})
