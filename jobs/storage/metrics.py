"""The writers of a run's `metrics.jsonl` and of its event objects.

Ray Train V2 keeps only the metrics reported with a checkpoint, so tlctl writes its own log:
one line per epoch plus event lines. S3 has no append, so a writer keeps the log in memory
and rewrites the whole object; only one process may therefore write it at a time: rank 0
while a worker group trains, the search driver for a search, the job's driver once training
has returned. Anyone else with something to record (Ray Train's controller, which sees a
worker fail while rank 0 may still be writing) posts an event object of its own under
`events/` instead (`post_event`); the log's next writer folds it in (`MetricsLog.load`,
`fold_events`), and readers see it before that (`RunLayout.read_log`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from jobs.storage.layout import METRICS, RunLayout, read_jsonl
from jobs.storage.location import Location, write_text
from jobs.storage.retry import DEFAULT_WINDOW_S, retrying


def write_jsonl(loc: Location, lines: list[dict[str, Any]]) -> None:
    """Rewrite a whole log: one sorted-key JSON object per line."""
    write_text(loc, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines))


def post_event(
    layout: RunLayout, name: str, *, window_s: float = DEFAULT_WINDOW_S, **fields: Any
) -> dict[str, Any]:
    """Record an event in an object of its own (one writer: this call); returns it."""
    now = time.time()
    event_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    event = {**fields, "kind": "event", "event": name, "id": event_id, "time": now}
    retrying(
        lambda: write_text(layout.event(f"{event_id}.json"), json.dumps(event, sort_keys=True)),
        what=f"event {name}",
        window_s=window_s,
    )
    return event


def fold_events(layout: RunLayout, *, window_s: float = DEFAULT_WINDOW_S) -> None:
    """Bring pending event objects into metrics.jsonl. Only for the log's writer of the
    moment: the job's driver once no worker group runs."""

    def fold() -> None:
        lines = read_jsonl(layout.metrics)
        merged = layout.with_pending_events(lines)
        if len(merged) != len(lines):
            write_jsonl(layout.metrics, merged)

    retrying(fold, what=f"{METRICS} (events)", window_s=window_s)


class MetricsLog:
    """The writer of one run's (or trial's) `metrics.jsonl` while a worker group trains.

    Writes happen in a background thread, so a storage outage does not stall training: each
    write puts the whole log as it stands (retried through the outage; a line is never lost
    or written twice), and a write that fails past the retry window is raised by the next
    call. `close()` waits for the last write.
    """

    def __init__(
        self, layout: RunLayout, *, retry_window_s: float = DEFAULT_WINDOW_S, **tags: Any
    ) -> None:
        self.layout = layout
        self.window = retry_window_s  # a storage outage is waited out this long
        self.tags = tags  # e.g. trial id and hyperparameters, added to every line
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._pending = 0  # lines appended since the last write started
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def load(self, keep_before_epoch: int) -> None:
        """Keep what earlier attempts recorded, minus epochs that will run again, plus the
        events posted meanwhile (a worker failure that caused this restart)."""

        def read() -> list[dict[str, Any]]:
            return self.layout.read_log()

        lines = retrying(read, what=METRICS, window_s=self.window)
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
                    lambda lines=snapshot: write_jsonl(self.layout.metrics, lines),
                    what=METRICS,
                    window_s=self.window,
                )
            except BaseException as exc:  # raised in the training thread by the next call
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

    def flush(self) -> None:
        """Wait until every line so far is in storage (or raise the write's error)."""
        with self._cond:
            while (self._pending or self._busy) and self._error is None:
                self._cond.wait(timeout=1.0)
            self._raise_error()

    close = flush  # the last write is the only thing to wait for

    def wait_written(self, timeout_s: float) -> bool:
        """Wait at most `timeout_s` for every line so far to be in storage: False when
        it is not (an outage; the write goes on in the background, an error is raised by
        the next call)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._pending or self._busy) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
            return self._error is None

    def epoch(self, metrics: dict[str, Any]) -> None:
        self._write({"kind": "epoch", **metrics})

    def event(self, name: str, **fields: Any) -> None:
        self._write({"kind": "event", "event": name, **fields})
