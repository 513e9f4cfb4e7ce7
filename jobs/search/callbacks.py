"""The search driver's Tune callback: the run's metrics.jsonl and the live trials table.

It is the only writer of the run's `metrics.jsonl` while a search runs (each trial's rank 0
writes its own under `trials/`). Tune's results arrive late: with checkpoints uploaded in the
background, a trial's epoch N reaches Tune only after its checkpoint is in storage, while
the trial already trains (and logs) epoch N+1; when ASHA stops the trial on N, Tune never
delivers N+1. So when a trial ends, its record here is brought up to the trial's own log
(`merge_trial`), and the search driver does the same for every trial once Tune is done.
Tune pickles its callbacks into the experiment state and
unpickles them on restore, so this class lives at module level (pickled by reference) and
holds only plain values; the progress queue of the current process is looked up in
`PROGRESS` by run URI.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from jobs.search.space import hyperparameters
from jobs.spec.search import SearchSpec
from jobs.storage.layout import METRICS, RunLayout, epoch_lines
from jobs.storage.metrics import write_jsonl
from jobs.storage.retry import retrying

# Progress queues by run URI (set by run_search for the length of tuner.fit()).
PROGRESS: dict[str, Any] = {}
# Keys Tune adds to every result; the rest is what the training loop reported.
TUNE_RESULT_KEYS = {
    "config",
    "date",
    "done",
    "experiment_tag",
    "checkpoint_dir_name",
    "checkpoint_path",
    "episodes_total",
    "hostname",
    "iterations_since_restore",
    "node_ip",
    "pid",
    "should_checkpoint",
    "time_since_restore",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "timesteps_since_restore",
    "timesteps_total",
    "training_iteration",
    "trial_id",
}


class SearchLog(Callback):
    """Single writer of the run's metrics.jsonl; one line per trial epoch and event."""

    def __init__(self, run_uri: str, endpoint: str | None, search: SearchSpec, epochs: int):
        self.run_uri, self.endpoint = run_uri, endpoint
        self.search, self.epochs = search, epochs
        self.lines: list[dict[str, Any]] | None = None

    def _layout(self) -> RunLayout:
        return RunLayout.at(self.run_uri, self.endpoint)

    def _load(self) -> list[dict[str, Any]]:
        if self.lines is None:  # with the events posted before the search (resumed)
            self.lines = self._layout().read_log()
        return self.lines

    def _trial_tags(self, trial) -> dict[str, Any]:
        return {"trial_id": trial.trial_id, **hyperparameters(self.search, trial.config)}

    def _write(self, line: dict[str, Any], *, replace_epoch: bool = False) -> None:
        lines = self._load()
        if replace_epoch:  # a resumed trial re-runs epochs: keep one line per epoch
            key = (line["trial_id"], line["epoch"])
            lines[:] = [
                m
                for m in lines
                if m.get("kind") != "epoch" or (m.get("trial_id"), m.get("epoch")) != key
            ]
        lines.append({**line, "time": time.time()})
        layout = self._layout()
        retrying(lambda: write_jsonl(layout.metrics, lines), what=METRICS)

    def _progress(self, item: dict[str, Any]) -> None:
        queue = PROGRESS.get(self.run_uri)
        if queue is None:
            return
        try:
            queue.put_nowait({"search": True, **item})
        except Exception:  # progress is best effort: a full queue never fails the search
            pass

    def setup(self, **info: Any) -> None:
        self._load()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write({"kind": "event", "event": "trial_started", **self._trial_tags(trial)})
        self._progress({**self._trial_tags(trial), "status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k not in TUNE_RESULT_KEYS}
        if "epoch" not in metrics:
            return
        line = {"kind": "epoch", **self._trial_tags(trial), **metrics}
        self._write(line, replace_epoch=True)
        self._progress({**line, "status": "running"})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.merge_trial(trial.trial_id)
        done = self.epochs_done(trial.trial_id)
        status = "completed" if done >= self.epochs else "stopped"
        self._write(
            {"kind": "event", "event": f"trial_{status}", "epochs_done": done}
            | self._trial_tags(trial)
        )
        self._progress({**self._trial_tags(trial), "status": status})

    def on_trial_error(self, iteration, trials, trial, **info):
        self.merge_trial(trial.trial_id)
        self._write({"kind": "event", "event": "trial_error"} | self._trial_tags(trial))
        self._progress({**self._trial_tags(trial), "status": "error"})

    # --- the trial's own record ---------------------------------------------------------

    def trial_epochs(self, trial_id: str) -> list[dict[str, Any]]:
        """The run's epoch lines of one trial."""
        return [m for m in epoch_lines(self._load()) if m.get("trial_id") == trial_id]

    def epochs_done(self, trial_id: str) -> int:
        return max((int(m["epoch"]) + 1 for m in self.trial_epochs(trial_id)), default=0)

    def merge_trial(self, trial_id: str) -> list[dict[str, Any]]:
        """Bring the run's lines of `trial_id` up to the trial's own metrics.jsonl: a line
        that differs from the trial's is replaced in place, an epoch Tune never delivered is
        added after the trial's other lines (before its end event, whose epoch count is
        brought up to date). Returns the lines added or replaced (also sent to the live
        table)."""
        trial = self._layout().trial(trial_id)
        own = epoch_lines(retrying(trial.read_log, what=f"{trial_id}/{METRICS}"))
        lines = self._load()
        ours = {int(m["epoch"]): m for m in self.trial_epochs(trial_id)}
        changed = [m for m in own if not _same_epoch(ours.get(int(m["epoch"])), m)]
        if not changed:
            return []
        new = []
        for m in changed:
            if int(m["epoch"]) in ours:
                lines[lines.index(ours[int(m["epoch"])])] = m
            else:
                new.append(m)
        ends = [i for i, m in enumerate(lines) if _is_end(m, trial_id)]
        at = ends[0] if ends else len(lines)
        lines[at:at] = new
        status = "running"
        for m in lines:  # an end event already written (the merge after Tune is done)
            if _is_end(m, trial_id):
                m["epochs_done"] = self.epochs_done(trial_id)
                status = m["event"].removeprefix("trial_")
        layout = self._layout()
        retrying(lambda: write_jsonl(layout.metrics, lines), what=METRICS)
        for m in changed:
            self._progress({**m, "status": status})
        return changed


_END_EVENTS = ("trial_completed", "trial_stopped", "trial_error")


def _is_end(line: dict[str, Any], trial_id: str) -> bool:
    return line.get("trial_id") == trial_id and line.get("event") in _END_EVENTS


def _same_epoch(ours: dict[str, Any] | None, own: dict[str, Any]) -> bool:
    """The run's line says what the trial's own line says (the write time aside)."""
    return ours is not None and all(ours.get(k) == v for k, v in own.items() if k != "time")
