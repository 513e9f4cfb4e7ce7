"""Pre-flight: everything that can be wrong with a job's input, found before Ray starts and
before anything is written (exit 2).

It runs where the job is driven: in the CLI for `--local`, on the client and again on the
cluster for a cluster job. What it learns (`Prepared`) is what the driver then runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jobs.data.plan import DataPlan, plan_data
from jobs.errors import TlctlError
from jobs.search.state import verify as verify_tune_state
from jobs.spec.model import JobSpec
from jobs.storage.layout import TUNER_STATE, RunLayout, epoch_lines
from jobs.storage.lease import check_free
from jobs.storage.location import check_writable, exists, resolve
from jobs.training.loop import WorkerJob
from jobs.training.model import build_job_model, normalization

# Fields that must match for a run of the same name to be resumed.
IDENTITY_FIELDS = (
    ("backbone", "name"),
    ("backbone", "freeze_depth"),
    ("head", "hidden"),
    ("data", "image_size"),
)


@dataclass(frozen=True)
class Prepared:
    """What pre-flight learned: where the run lives, its data and whether it resumes."""

    spec: JobSpec
    layout: RunLayout
    plan: DataPlan
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resuming: bool
    complete: bool

    def worker_job(self, **extra: Any) -> WorkerJob:
        """What the run's workers need (`extra`: progress, submitted_at, metrics_tags)."""
        return WorkerJob(
            spec=self.spec,
            classes=self.plan.classes,
            mean=self.mean,
            std=self.std,
            run_uri=self.layout.uri,
            train_rows=self.plan.train_rows,
            **extra,
        )

    def replace(self, **changes: Any) -> Prepared:
        return dataclasses.replace(self, **changes)


def preflight(spec: JobSpec, *, check_weights: bool = True) -> Prepared:
    """Validate storage, data and weights against the real world; no compute, no writes.

    The writability probe on storage puts and deletes one small object. `check_weights`
    False skips building the model (a client submitting `weights: imagenet` to a cluster
    that downloads them itself; the job's own pre-flight on the cluster checks them).
    """
    root = resolve(spec.storage.uri, spec.storage.endpoint)
    layout = RunLayout(root.join(spec.name))
    # Probe the storage root, not the run prefix: a run that fails pre-flight leaves no trace.
    check_writable(root)
    plan = plan_data(spec.data, endpoint=spec.data_endpoint, seed=spec.train.seed)
    if check_weights:
        # Builds the model once on the driver: checks that the weights load.
        build_job_model(spec, plan.num_classes)
    mean, std = normalization(spec.backbone.name, spec.backbone.weights)
    # A run another job trains now is refused here, before Ray starts (read only: the job's
    # driver takes the lease itself, jobs.driver.drive).
    check_free(layout.lease, what=f"run '{spec.name}' at {layout.uri}")
    resuming, complete = _check_resume(spec, layout, plan.classes)
    return Prepared(spec, layout, plan, mean, std, resuming, complete)


def recheck_resume(prepared: Prepared) -> Prepared:
    """`prepared` with its resume state read again once the run's lease is held: another
    job may have trained the run between this pre-flight and the lease."""
    resuming, complete = _check_resume(prepared.spec, prepared.layout, prepared.plan.classes)
    if (resuming, complete) == (prepared.resuming, prepared.complete):
        return prepared
    return prepared.replace(resuming=resuming, complete=complete)


def _check_resume(spec: JobSpec, layout: RunLayout, classes: list[str]) -> tuple[bool, bool]:
    """(resuming, complete): refuse to resume a run with a different model or classes."""
    if not layout.has_spec():
        return False, False
    stored = layout.read_spec()
    for section, key in IDENTITY_FIELDS:
        old, new = getattr(getattr(stored, section), key), getattr(getattr(spec, section), key)
        if old != new:
            raise TlctlError(
                f"{section}.{key}: run '{spec.name}' already exists at {layout.uri} with "
                f"{section}.{key}={old!r}, not {new!r}; a run resumes only with the same model "
                "(choose a new name, or delete the old run)"
            )
    old_classes = layout.read_classes()
    if old_classes is not None and old_classes != classes:
        raise TlctlError(
            f"data.train: run '{spec.name}' was trained on classes {old_classes}, "
            f"the data now has {classes} (choose a new name)"
        )
    if stored.search != spec.search:
        raise TlctlError(
            f"search: run '{spec.name}' already exists at {layout.uri} with a different "
            "search block; a run resumes only with the same search (choose a new name)"
        )
    model_done = exists(layout.model_info)
    if spec.search:
        complete = model_done and exists(layout.trials_table)
        if not complete and exists(layout.tune.join(TUNER_STATE)):
            verify_tune_state(layout.tune, spec.name)  # a restore unpickles it
        return True, complete
    done = epoch_lines(layout.read_log())
    last = max((int(m["epoch"]) for m in done), default=-1)
    return True, model_done and last + 1 >= spec.train.epochs
