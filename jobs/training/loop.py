"""The loop that runs in every Ray Train worker (PyTorch DDP), in four readable steps.

`train_loop_per_worker` sets up (model, optimizer, data shards), resumes from the newest
complete checkpoint, then per epoch trains and evaluates (`run_epoch`) and checkpoints and
reports (`checkpoint_and_report`). Rank 0 alone writes checkpoints and the run's
`metrics.jsonl`; every rank calls `ray.train.report` (it is collective).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from jobs.redact import redact_data
from jobs.spec.model import JobSpec
from jobs.storage.layout import RunLayout, checkpoint_name
from jobs.storage.location import foreground_fs
from jobs.storage.metrics import MetricsLog
from jobs.training.checkpoints import (
    load_checkpoint,
    local_checkpoint_prefix,
    remove_stale_local_checkpoints,
    save_checkpoint,
    usable_checkpoint,
)
from jobs.training.model import build_job_model, trainable_parameters
from jobs.training.steps import evaluate, make_optimizer, make_scheduler, train_one_epoch
from jobs.training.upload import Uploader

LOG_BEFORE_REPORT_S = 2.0  # a metrics line lands in ~0.05 s; longer means an outage


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of a run needs, made once by the driver (Ray pickles it)."""

    spec: JobSpec
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    run_uri: str  # the run's (or the trial's) prefix
    train_rows: int
    progress: Any = None  # the driver's ray.util.queue.Queue, if it shows live progress
    submitted_at: float | None = None
    metrics_tags: dict[str, Any] = field(default_factory=dict)  # a trial's id and values

    def layout(self) -> RunLayout:
        return RunLayout.at(self.run_uri, self.spec.storage.endpoint)


@dataclass
class Worker:
    """One worker's state across the loop's steps."""

    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mean: torch.Tensor
    std: torch.Tensor
    layout: RunLayout
    uploader: Uploader
    log: MetricsLog | None  # rank 0 only
    train_shard: Any
    val_shard: Any
    taken: set[str] = field(default_factory=set)  # checkpoint names earlier attempts left

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    @property
    def net(self) -> torch.nn.Module:
        """The model inside DDP."""
        return self.model.module if hasattr(self.model, "module") else self.model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: set up, resume, then train, evaluate and checkpoint each epoch."""
    job: WorkerJob = config["job"]
    worker = setup(job)
    start_epoch = resume(worker)
    for epoch in range(start_epoch, job.spec.train.epochs):
        metrics = run_epoch(worker, epoch, first=epoch == start_epoch)
        checkpoint_and_report(worker, epoch, metrics)
    if worker.log is not None:
        worker.log.close()  # every metrics line in storage before this worker reports done


def setup(job: WorkerJob) -> Worker:
    """Build and freeze the model, wrap it in DDP, make its optimizer, find the data shards."""
    import ray.train
    import ray.train.torch

    spec = job.spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.train.seed)
    device = ray.train.torch.get_device()
    model = build_job_model(spec, len(job.classes))
    train = spec.train
    optimizer = make_optimizer(
        trainable_parameters(model),
        name=train.optimizer,
        lr=train.lr,
        weight_decay=train.weight_decay,
    )
    scheduler = make_scheduler(optimizer, spec.train)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    layout = job.layout()
    background = spec.checkpoint.upload == "async"
    window = spec.failure.storage_retry_s
    # Hashing and uploading 100s of MB compete with training for the CPU: the background
    # upload thread runs at low priority and does its S3 writes itself (not in pyarrow's pool).
    uploader = Uploader(window, fs=foreground_fs(layout.root), background=background)
    log = MetricsLog(layout, retry_window_s=window, **job.metrics_tags) if rank == 0 else None
    if log is not None:
        # A checkpoint's manifest lands only after its epoch's metrics line: a run resumed
        # from it never lacks that line.
        uploader.before_manifest = log.flush
    return Worker(
        job=job,
        rank=rank,
        world=world,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        mean=torch.tensor(job.mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(job.std, device=device).view(1, 3, 1, 1),
        layout=layout,
        uploader=uploader,
        log=log,
        train_shard=ray.train.get_dataset_shard("train"),
        val_shard=ray.train.get_dataset_shard("val"),
    )


def resume(worker: Worker) -> int:
    """Load the newest checkpoint that verifies (every rank the same one, after DDP wrapped
    the model, so optimizer state lands on the parameters' device) and record the restart;
    returns the first epoch to train."""
    import ray.train

    existing = [loc for _, loc in worker.layout.checkpoint_dirs()]
    checkpoint, skipped = usable_checkpoint(ray.train.get_checkpoint(), existing)
    start_epoch, resumed_from = 0, None
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, worker.net, worker.optimizer, worker.scheduler)
        start_epoch, resumed_from = int(meta["epoch"]) + 1, int(meta["epoch"])
    # Names left by earlier attempts are never reused (see layout.checkpoint_name).
    worker.taken = {loc.path.rstrip("/").rsplit("/", 1)[-1] for loc in existing}
    workers = gather_placement(worker.rank, worker.world, worker.device)  # collective
    log = worker.log
    if log is None:
        return start_epoch
    remove_stale_local_checkpoints(worker.job.run_uri)
    log.load(keep_before_epoch=start_epoch)
    for uri, reason in skipped:
        log.event("checkpoint_skipped", epoch=start_epoch, checkpoint=uri, reason=reason)
    if resumed_from is not None:
        log.event("resumed", epoch=start_epoch, from_checkpoint_epoch=resumed_from)
    # Which node each worker ran on (again after every restart: placement can change).
    log.event("workers", epoch=start_epoch, workers=workers)
    return start_epoch


def run_epoch(worker: Worker, epoch: int, *, first: bool) -> dict[str, Any]:
    """Train on this worker's shard, step the schedule, evaluate exactly; the epoch's metrics."""
    job, train = worker.job, worker.job.spec.train
    epoch_start = time.time()
    batch_size = train.batch_size
    batches = worker.train_shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=False,
        prefetch_batches=2,
        local_shuffle_buffer_size=batch_size * 4 if job.spec.data.shuffle else None,
    )
    steps = max(1, job.train_rows // worker.world // batch_size)
    progress = _Progress(job.progress if worker.rank == 0 else None, epoch, steps)
    numerics = {
        "mean": worker.mean,
        "std": worker.std,
        "device": worker.device,
        "precision": train.precision,
        "channels_last": worker.channels_last,
    }
    metrics = train_one_epoch(
        worker.model,
        worker.optimizer,
        batches,
        label_smoothing=train.label_smoothing,
        on_step=progress,
        **numerics,
    )
    lr = worker.optimizer.param_groups[0]["lr"]
    worker.scheduler.step()
    val_batches = worker.val_shard.iter_torch_batches(batch_size=batch_size * 2, prefetch_batches=2)
    metrics.update(
        evaluate(worker.model, val_batches, rank=worker.rank, world=worker.world, **numerics)
    )
    # epochs_done is what ASHA counts: right after a resume too (Tune's own iteration
    # counter restarts at 0 when a trial's function is restarted).
    metrics.update(
        epoch=epoch,
        epochs_done=epoch + 1,
        lr_epoch=lr,  # the schedule's lr this epoch (`lr` is the searched value)
        epoch_time_s=time.time() - epoch_start,
        epoch_start=epoch_start,  # next epoch's start - this one's: the loop's cycle
    )
    if first and progress.first_step_at:
        metrics["first_step_at"] = progress.first_step_at
        if job.submitted_at:
            metrics["startup_s"] = progress.first_step_at - job.submitted_at
    return metrics


def checkpoint_and_report(worker: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 saves the checkpoint (when due) and logs the epoch; every rank reports it.

    The upload is tlctl's uploader's, in Ray Train's upload thread (checkpoint.upload async)
    or in the loop (sync): retried through storage outages, manifest last, the local copy
    deleted after.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    spec, job = worker.job.spec, worker.job
    every, last = spec.checkpoint.every_epochs, epoch == spec.train.epochs - 1
    ckpt_dir = None
    if worker.rank == 0 and ((epoch + 1) % every == 0 or last):
        # Waits only when max_pending checkpoints still wait for storage (see Uploader).
        metrics["checkpoint_wait_s"] = worker.uploader.wait_below(spec.checkpoint.max_pending)
        ckpt_dir = tempfile.mkdtemp(prefix=local_checkpoint_prefix(job.run_uri))
        meta = {
            "epoch": epoch,
            "metrics": metrics,
            "classes": job.classes,
            "spec": redact_data(spec.model_dump(mode="json")),  # as the stored spec.yaml
            "mean": list(job.mean),
            "std": list(job.std),
        }
        save_checkpoint(ckpt_dir, worker.model, worker.optimizer, worker.scheduler, meta)
    if worker.log is not None:
        worker.log.epoch(metrics)
        _put(job.progress, {"epoch_done": epoch, **metrics})
        # The run's (or trial's) own record holds the epoch before Ray hears of it, so a
        # stop decided on this report cannot leave it unrecorded; an outage is not waited.
        worker.log.wait_written(LOG_BEFORE_REPORT_S)
    if ckpt_dir:
        worker.uploader.submitted()
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
        checkpoint_dir_name=checkpoint_name(epoch, worker.taken),
        checkpoint_upload_mode=CheckpointUploadMode[spec.checkpoint.upload.upper()],
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=worker.uploader,
    )


def _put(queue: Any, item: dict[str, Any]) -> None:
    """Progress for the driver's display: best effort, never fails training."""
    if queue is None:
        return
    try:
        queue.put_nowait(item)
    except Exception:  # a full queue, or the driver is gone
        pass


class _Progress:
    """Per-step callback: notes the first step's time (start-up cost) and pushes progress
    to the driver's queue (local runs), at most ~4 times a second."""

    def __init__(self, queue: Any, epoch: int, steps: int) -> None:
        self.queue, self.epoch, self.steps, self.last = queue, epoch, steps, 0.0
        self.first_step_at: float | None = None

    def __call__(self, step: int, loss: float, acc: float) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
        now = time.monotonic()
        if self.queue is None or (now - self.last < 0.25 and step + 1 < self.steps):
            return
        self.last = now
        item = {"epoch": self.epoch, "step": step + 1, "steps": self.steps, "loss": loss}
        _put(self.queue, {**item, "acc": acc})


def worker_placement(rank: int, device: torch.device) -> dict[str, Any]:
    """Where this worker runs: Ray node id and IP, host, process and device."""
    import ray

    return {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
    }


def gather_placement(rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    """Every worker's placement, by rank (collective: all ranks call it)."""
    mine = worker_placement(rank, device)
    if world > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world
        dist.all_gather_object(out, mine)
        return out
    return [mine]
