"""A search's record: the run's metrics.jsonl (jobs.search.callbacks.SearchLog), the trials
table (jobs.search.trials) and the live table agree with each trial's own metrics, also for
the epoch Tune never delivered because ASHA stopped the trial on an earlier, late result.

Storage is a local directory; Tune's Trial and result-grid entries are plain objects with
the attributes the code reads (what Tune hands over, not what it computes).
"""

from __future__ import annotations

import queue
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jobs.search.callbacks import SearchLog
from jobs.search.trials import trial_rows
from jobs.spec.model import JobSpec
from jobs.spec.search import SearchSpec
from jobs.storage.layout import CHECKPOINT_FILES, RunLayout, epoch_lines
from jobs.storage.location import resolve
from jobs.storage.metrics import MetricsLog, write_jsonl
from orchestrator.display import SearchProgress

EPOCHS = 4
SEARCH = {"freeze_depth": [0, 2], "lr": [0.01], "metric": "val_acc", "mode": "max"}
CONFIG = {"freeze_depth": 2, "lr": 0.01}
TAGS = {"trial_id": "t1", "freeze_depth": 2, "lr": 0.01}


def _metrics(epoch: int, acc: float) -> dict[str, Any]:
    return {"epoch": epoch, "epochs_done": epoch + 1, "val_acc": acc, "epoch_time_s": 2.0}


def _trial() -> SimpleNamespace:
    return SimpleNamespace(trial_id="t1", config=CONFIG, last_result={})


def _result(metrics: dict[str, Any]) -> dict[str, Any]:
    """What Tune passes to on_trial_result: the report plus Tune's own keys."""
    return {**metrics, "training_iteration": metrics["epoch"] + 1, "trial_id": "t1", "pid": 1}


@pytest.fixture
def run(tmp_path: Path) -> RunLayout:
    return RunLayout(resolve(str(tmp_path / "search")))


def trial_logs(run: RunLayout, accs: list[float]) -> None:
    """The trial's rank 0 logs its epochs under trials/t1/ (with the trial's tags)."""
    log = MetricsLog(run.trial("t1"), **TAGS)
    for epoch, acc in enumerate(accs):
        log.epoch(_metrics(epoch, acc))
    log.close()


def search_log(run: RunLayout, progress: queue.Queue | None = None) -> SearchLog:
    from jobs.search.callbacks import PROGRESS

    if progress is not None:
        PROGRESS[run.uri] = progress
    log = SearchLog(run.uri, None, SearchSpec.model_validate(SEARCH), EPOCHS)
    log.setup()
    return log


def run_epochs(run: RunLayout, trial_id: str = "t1") -> list[int]:
    return [m["epoch"] for m in epoch_lines(run.read_log()) if m["trial_id"] == trial_id]


def drain(progress: queue.Queue) -> list[dict[str, Any]]:
    items = []
    while not progress.empty():
        items.append(progress.get_nowait())
    return items


def test_the_epoch_after_the_late_result_reaches_the_record(run: RunLayout) -> None:
    """Tune delivered epoch 0 only; ASHA stopped the trial while it logged epoch 1."""
    from jobs.search.callbacks import PROGRESS

    progress: queue.Queue = queue.Queue()
    log = search_log(run, progress)
    try:
        log.on_trial_start(0, [], _trial())
        trial_logs(run, [0.31, 0.42])
        log.on_trial_result(0, [], _trial(), _result(_metrics(0, 0.31)))
        log.on_trial_complete(0, [], _trial())
    finally:
        PROGRESS.pop(run.uri, None)
    lines = run.read_log()
    assert run_epochs(run) == [0, 1]
    assert [m["val_acc"] for m in epoch_lines(lines)] == [0.31, 0.42]
    stopped = [m for m in lines if m.get("event") == "trial_stopped"]
    assert [m["epochs_done"] for m in stopped] == [2]
    assert lines[-1]["event"] == "trial_stopped"  # the merged epoch sits before the end
    # The live table sees the merged epoch before the trial's end, and ends at 2/4.
    items = drain(progress)
    assert [(i.get("epoch"), i["status"]) for i in items] == [
        (None, "running"),
        (0, "running"),
        (1, "running"),
        (None, "stopped"),
    ]
    table = SearchProgress.__new__(SearchProgress)
    table.epochs, table.metric, table.trials, table.lines = EPOCHS, "val_acc", {}, False
    table.live = SimpleNamespace(update=lambda _: None)
    for item in items:
        table.update(item)
    assert table.trials["t1"]["epoch"] == 2 and table.trials["t1"]["best"] == 0.42
    assert table.trials["t1"]["status"] == "stopped"


def test_a_line_that_lands_after_the_stop_is_merged_once_tune_is_done(run: RunLayout) -> None:
    log = search_log(run)
    trial_logs(run, [0.31])
    log.on_trial_result(0, [], _trial(), _result(_metrics(0, 0.31)))
    log.on_trial_complete(0, [], _trial())
    trial_logs(run, [0.31, 0.42])  # the stopped rank 0's last write lands late
    progress: queue.Queue = queue.Queue()
    after = search_log(run, progress)  # what run_search does once tuner.fit() returns
    try:
        merged = after.merge_trial("t1")
        assert after.merge_trial("t1") == []  # merging again changes nothing
    finally:
        from jobs.search.callbacks import PROGRESS

        PROGRESS.pop(run.uri, None)
    assert [m["epoch"] for m in merged] == [1]
    assert run_epochs(run) == [0, 1]
    stopped = [m for m in run.read_log() if m.get("event") == "trial_stopped"]
    assert [m["epochs_done"] for m in stopped] == [2]
    # The live table is told, without flipping the finished trial back to running.
    assert [(i["epoch"], i["status"]) for i in drain(progress)] == [(1, "stopped")]


def test_a_line_that_differs_from_the_trials_own_is_replaced(run: RunLayout) -> None:
    log = search_log(run)
    log.on_trial_result(0, [], _trial(), _result(_metrics(0, 0.99)))
    trial_logs(run, [0.31])
    assert [m["epoch"] for m in log.merge_trial("t1")] == [0]
    assert [m["val_acc"] for m in epoch_lines(run.read_log())] == [0.31]


def _grid_entry(run: RunLayout, trial_id: str, error: Exception | None = None):
    return SimpleNamespace(path=run.trial(trial_id).uri, config=CONFIG, error=error)


def _checkpoint(run: RunLayout, name: str, files=CHECKPOINT_FILES) -> None:
    for f in files:
        path = Path(run.trial("t1").checkpoint(name).path) / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _spec() -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "search",
            "backbone": {"name": "resnet18", "weights": "none"},
            "data": {"train": "/data/train"},
            "train": {"epochs": EPOCHS},
            "storage": {"uri": "/runs"},
            "search": SEARCH,
        }
    )


def test_the_table_says_when_the_best_epoch_lost_its_checkpoint(run: RunLayout) -> None:
    """Epoch 1 is the best but ASHA's stop cut its upload short (no manifest)."""
    trial_logs(run, [0.31, 0.42])
    _checkpoint(run, "epoch-0000")
    _checkpoint(run, "epoch-0001", files=CHECKPOINT_FILES[:2])
    write_jsonl(
        run.metrics,
        [{"kind": "epoch", **TAGS, **_metrics(e, a)} for e, a in enumerate([0.31, 0.42])],
    )
    [row] = trial_rows(_spec(), run, [_grid_entry(run, "t1")], run.read_log())
    assert row["status"] == "stopped" and row["epochs_run"] == 2
    assert (row["best_val_acc"], row["best_epoch"]) == (0.42, 1)
    assert (row["checkpoint_epoch"], row["checkpoint_val_acc"]) == (0, 0.31)
    assert row["checkpoint_uri"] == run.trial("t1").checkpoint("epoch-0000").uri


def test_a_trial_without_a_complete_checkpoint_has_none(run: RunLayout) -> None:
    trial_logs(run, [0.31])
    _checkpoint(run, "epoch-0000", files=CHECKPOINT_FILES[:1])
    [row] = trial_rows(
        _spec(), run, [_grid_entry(run, "t1", RuntimeError("boom"))], trial_lines(run)
    )
    assert row["status"] == "error" and row["best_val_acc"] == 0.31
    assert row["checkpoint_uri"] is None and row["checkpoint_epoch"] is None


def trial_lines(run: RunLayout) -> list[dict[str, Any]]:
    return run.trial("t1").read_log()


def test_the_cluster_follow_keeps_an_ended_trial_ended(run: RunLayout) -> None:
    """`submit --wait` follows the run's metrics.jsonl: an epoch merged after the trial's end
    updates its epoch without flipping it back to running."""
    from orchestrator.targets.cluster import MetricsFeed

    log = search_log(run)
    trial_logs(run, [0.31])
    log.on_trial_result(0, [], _trial(), _result(_metrics(0, 0.31)))
    log.on_trial_complete(0, [], _trial())
    feed = MetricsFeed(SimpleNamespace(layout=run, spec=SimpleNamespace(search=True)))
    assert [(i.get("epoch"), i["status"]) for i in feed.new_items()] == [
        (0, "running"),
        (None, "stopped"),
    ]
    trial_logs(run, [0.31, 0.42])
    search_log(run).merge_trial("t1")
    assert [(i.get("epoch"), i["status"]) for i in feed.new_items()] == [(1, "stopped")]
