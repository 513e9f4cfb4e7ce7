"""The Ray Train run of a job: a TorchTrainer over the job's workers, data and storage,
with a controller callback that records worker failures.

Tune builds the same trainer per trial (the trial's spec and prefix, datasets decoded once
by the search driver, and Tune's report callback).
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback

from jobs.errors import root_cause
from jobs.storage.layout import CHECKPOINTS, RunLayout
from jobs.storage.metrics import post_event
from jobs.storage.retrying_fs import retrying_fs
from jobs.training.loop import WorkerJob, train_loop_per_worker

CAUSE_CHARS = 500


class FailureLog(ControllerCallback):
    """Runs in Ray Train's controller: a `worker_failure` event (failed ranks, the cause as
    the error's last line, the phase, the time) for every failure of the worker group.

    Every restart, whatever the phase: Ray Train 2.60 calls `UserCallback.after_exception`
    only for errors found by polling a *running* group; a worker that dies while the group
    is still starting raises out of the controller's scheduling step, which its failure
    policy retries (ReschedulingState) without that hook. So this is a ControllerCallback
    on the controller's state changes: each move into RestartingState (a running group
    failed), ReschedulingState (the group failed to start) or ErroredState (no retries
    left) is one failure, recorded once.

    The controller is not the writer of `metrics.jsonl` (rank 0 may still be writing it
    when another rank dies), so the event is an object of its own under `events/`; the
    next rank 0 folds it into the log. Plain-valued: Ray pickles it into the controller.
    """

    def __init__(
        self, run_uri: str, endpoint: str | None, tags: dict[str, Any], window_s: float
    ) -> None:
        self.run_uri, self.endpoint = run_uri, endpoint
        self.tags = dict(tags)
        self.window_s = window_s

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import (
            ErroredState,
            ReschedulingState,
            RestartingState,
        )

        phases = {RestartingState: "training", ReschedulingState: "starting"}
        if isinstance(current_state, ErroredState):
            phase = "final"
        else:
            phase = phases.get(type(current_state))
        error = getattr(current_state, "training_failed_error", None)
        if phase is None or error is None:
            return
        failures = dict(getattr(error, "worker_failures", None) or {})
        if failures:
            self.after_exception(None, failures, phase=phase)
        else:  # the group failed to start, or the controller itself failed
            cause = getattr(error, "controller_failure", None) or error
            self.record([], cause, phase)

    def after_exception(
        self, run_context, worker_exceptions: dict[int, Exception], *, phase: str = "training"
    ) -> None:
        """A failure of these ranks (also callable on its own, e.g. by a test)."""
        if not worker_exceptions:
            return
        ranks = sorted(worker_exceptions)
        self.record(ranks, worker_exceptions[ranks[0]], phase)

    def record(self, ranks: list[int], cause: BaseException, phase: str) -> None:
        post_event(
            RunLayout.at(self.run_uri, self.endpoint),
            "worker_failure",
            window_s=self.window_s,
            **self.tags,
            ranks=ranks,
            phase=phase,
            cause=root_cause(cause)[:CAUSE_CHARS],
        )


def build_trainer(job: WorkerJob, *, datasets: dict[str, Any], callbacks: list | None = None):
    """The TorchTrainer for `job` (its checkpoints under `<job.run_uri>/checkpoints`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = job.spec
    scaling, checkpoint = spec.scaling, spec.checkpoint
    per_worker: dict[str, float] = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        per_worker["GPU"] = 1.0
    layout = job.layout()
    window = spec.failure.storage_retry_s
    failure_log = FailureLog(job.run_uri, spec.storage.endpoint, job.metrics_tags, window)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=scaling.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=layout.root.path,
            # Ray Train's own storage calls (snapshots, deletions, resume downloads) wait
            # out an outage as tlctl's writes do.
            storage_filesystem=retrying_fs(layout.root.fs, window),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=checkpoint.keep,
                checkpoint_score_attribute=checkpoint.metric,
                checkpoint_score_order=checkpoint.mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=spec.failure.max_failures),
            callbacks=[failure_log, *(callbacks or [])],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
