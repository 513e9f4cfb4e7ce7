"""The run's metrics log: one writer at a time, events of other processes in objects of their
own, folded in by the log's next writer; nothing lost when both write at once."""

from __future__ import annotations

import threading

import pytest

from cluster.local.s3server import S3Server
from jobs.storage.layout import RunLayout, epoch_lines, merge_by_time
from jobs.storage.location import resolve
from jobs.storage.metrics import MetricsLog, fold_events, post_event
from jobs.training.trainer import FailureLog


def test_metrics_are_written_in_the_background_and_flushed_on_close(tmp_path) -> None:
    layout = RunLayout(resolve(str(tmp_path)))
    log = MetricsLog(layout, trial_id="t1")
    for epoch in range(5):
        log.epoch({"epoch": epoch, "val_acc": epoch / 10})
    log.event("resumed", epoch=3)
    log.close()
    lines = layout.read_log()
    assert [m.get("epoch") for m in lines] == [0, 1, 2, 3, 4, 3]
    assert all(m["trial_id"] == "t1" for m in lines)


def test_a_metrics_write_that_cannot_succeed_surfaces_in_the_training_thread(tmp_path) -> None:
    (tmp_path / "file").write_text("x")  # a file where the log's directory should be
    log = MetricsLog(RunLayout(resolve(str(tmp_path / "file"))))
    log.epoch({"epoch": 0})
    with pytest.raises(Exception):  # noqa: B017 - the storage error, whatever its type
        log.close()
    with pytest.raises(Exception):  # noqa: B017
        log.epoch({"epoch": 1})


def test_events_are_merged_by_time_and_folded_once(tmp_path) -> None:
    layout = RunLayout(resolve(str(tmp_path)))
    log = MetricsLog(layout)
    log.epoch({"epoch": 0})
    log.close()
    event = post_event(layout, "worker_failure", ranks=[1])
    assert [m.get("event") for m in layout.read_log()] == [None, "worker_failure"]
    fold_events(layout)
    fold_events(layout)  # folding twice adds nothing
    lines = layout.read_log()
    assert [m.get("id") for m in lines] == [None, event["id"]]
    assert merge_by_time([{"time": 1}, {"time": 3}], [{"time": 2}]) == [
        {"time": 1},
        {"time": 2},
        {"time": 3},
    ]


def _failure(layout: RunLayout, endpoint: str) -> None:
    """What Ray Train's controller does when rank 1 dies (the callback itself, for real)."""
    FailureLog(layout.uri, endpoint, {}, window_s=30).after_exception(
        None, {1: RuntimeError("rank 1 died")}
    )


def test_a_failure_event_and_an_epoch_line_at_the_same_moment_both_survive(
    s3_env: S3Server, s3_bucket: str
) -> None:
    """The race tlctl had: the controller rewrote metrics.jsonl with a worker_failure event
    while rank 0, which keeps the log in memory, rewrote it with its next epoch line; the
    later write won and the other line was lost."""
    endpoint = s3_env.endpoint
    for attempt in range(4):
        layout = RunLayout(resolve(f"s3://{s3_bucket}/race-{attempt}", endpoint))
        rank0 = MetricsLog(layout)
        rank0.load(keep_before_epoch=0)
        rank0.epoch({"epoch": 0})
        rank0.flush()
        if attempt == 0:  # the failure lands first, rank 0's next write after it
            _failure(layout, endpoint)
            rank0.epoch({"epoch": 1})
            rank0.flush()
        else:  # both at once
            start = threading.Barrier(2)

            def controller(layout: RunLayout = layout, start: threading.Barrier = start) -> None:
                start.wait()
                _failure(layout, endpoint)

            thread = threading.Thread(target=controller)
            thread.start()
            start.wait()
            rank0.epoch({"epoch": 1})
            rank0.flush()
            thread.join()
        rank0.close()
        seen = [m.get("event") or m.get("epoch") for m in layout.read_log()]
        assert sorted(map(str, seen)) == ["0", "1", "worker_failure"], (attempt, seen)
        # The restarted worker group's rank 0 folds the event into the log it writes.
        new_rank0 = MetricsLog(layout)
        new_rank0.load(keep_before_epoch=2)
        new_rank0.event("resumed", epoch=2)
        new_rank0.close()
        lines = layout.read_log()
        assert [m["epoch"] for m in epoch_lines(lines)] == [0, 1]
        events = [m["event"] for m in lines if m.get("kind") == "event"]
        assert events == ["worker_failure", "resumed"], (attempt, events)
        failure = next(m for m in lines if m.get("event") == "worker_failure")
        assert failure["ranks"] == [1] and "rank 1 died" in failure["cause"]
