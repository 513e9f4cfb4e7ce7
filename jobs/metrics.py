"""The run's `metrics.jsonl`: one line per epoch, plus event lines (resume, restart).

Ray Train V2 keeps only the metrics reported with a checkpoint, so tlctl writes its own.
S3 has no append, so the log is kept in memory and the whole object rewritten each epoch
(small: one line per epoch). On resume, lines of epochs that will be re-run are dropped,
so no epoch is ever recorded twice.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from jobs.retry import DEFAULT_WINDOW_S, retrying
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
    """Rank 0's writer for `metrics.jsonl`.

    Writes happen in a background thread, so a storage outage does not stall training: each
    write puts the whole log as it stands (retried through the outage; a line is never lost
    or written twice), and a write that fails past the retry window is raised by the next
    call. `close()` waits for the last write.
    """

    def __init__(
        self, loc: Location, *, retry_window_s: float = DEFAULT_WINDOW_S, **tags: Any
    ) -> None:
        self.loc = loc
        self.window = retry_window_s  # a storage outage is waited out this long
        self.tags = tags  # e.g. trial id and hyperparameters, added to every line
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._pending = 0  # lines appended since the last write started
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def load(self, keep_before_epoch: int) -> None:
        """Keep what earlier attempts recorded, minus epochs that will run again."""
        lines = retrying(lambda: read_metrics(self.loc), what="metrics.jsonl", window_s=self.window)
        self.lines = [
            m
            for m in lines
            if m.get("kind") != "epoch" or int(m.get("epoch", 0)) < keep_before_epoch
        ]

    def _write(self, line: dict[str, Any]) -> None:
        with self._cond:
            self._raise_error()
            self.lines.append({**self.tags, **line, "time": time.time()})
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._writer, name="tlctl-metrics", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                snapshot, self._pending, self._busy = list(self.lines), 0, True
            try:
                retrying(
                    lambda lines=snapshot: write_metrics(self.loc, lines),
                    what="metrics.jsonl",
                    window_s=self.window,
                )
            except BaseException as exc:  # noqa: BLE001 - raised in the training thread
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait until every line is in storage (or raise the write's error)."""
        self.flush()

    def flush(self) -> None:
        """Wait until every line so far is in storage (or raise the write's error)."""
        with self._cond:
            while (self._pending or self._busy) and self._error is None:
                self._cond.wait(timeout=1.0)
            self._raise_error()

    def epoch(self, metrics: dict[str, Any]) -> None:
        self._write({"kind": "epoch", **metrics})

    def event(self, name: str, **fields: Any) -> None:
        self._write({"kind": "event", "event": name, **fields})
