"""FailureLog records every failure of a worker group, whatever the phase: it follows Ray
Train's own controller states (real state and error objects of Ray Train 2.60), writing
real event objects to a local run directory."""

from __future__ import annotations

from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
from ray.train.v2._internal.execution.controller.state import (
    ErroredState,
    ReschedulingState,
    RestartingState,
    RunningState,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from jobs.storage.layout import RunLayout
from jobs.storage.location import resolve
from jobs.training.trainer import FailureLog


def test_every_failure_state_is_one_event_with_its_phase(tmp_path) -> None:
    layout = RunLayout(resolve(str(tmp_path / "run")))
    log = FailureLog(layout.uri, None, {"trial_id": "t1"}, window_s=5)
    startup = ControllerError(WorkerGroupStartupFailedError("worker died during init"))
    died = WorkerGroupError("rank 1 died", {1: RuntimeError("rank 1 died")})
    log.after_controller_state_update(RunningState(), RunningState())  # no failure
    log.after_controller_state_update(None, ReschedulingState(training_failed_error=startup))
    log.after_controller_state_update(RunningState(), RestartingState(training_failed_error=died))
    log.after_controller_state_update(None, ErroredState(training_failed_error=died))
    events = [e for e in layout.read_log() if e.get("event") == "worker_failure"]
    assert [(e["phase"], e["ranks"]) for e in events] == [
        ("starting", []),
        ("training", [1]),
        ("final", [1]),
    ]
    assert "worker died during init" in events[0]["cause"]
    assert "rank 1 died" in events[1]["cause"] and events[1]["trial_id"] == "t1"
