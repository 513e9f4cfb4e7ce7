"""The training loop that runs in every Ray Train worker (PyTorch DDP).

Plain functions in the manner of torchvision's reference `train.py`: `train_one_epoch`,
`evaluate`, checkpoint save/load, and `train_loop_per_worker`, which Ray Train runs on
each worker. Rank 0 alone writes checkpoints and the run's `metrics.jsonl`; every rank
calls `ray.train.report` (it is collective).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs import backbones
from jobs.manifest import checkpoint_dirs, checkpoint_name, verify
from jobs.metrics import MetricsLog
from jobs.retry import retry_window
from jobs.storage import Location, foreground_fs, read_bytes, resolve
from jobs.upload import Uploader, local_checkpoint_prefix, remove_stale_local_checkpoints

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
# ASYNC: the upload runs in Ray Train's single background upload thread, so the next epoch
# trains meanwhile. SYNC (uploads block the loop) is kept for the checkpoint benchmark.
UPLOAD_MODE = os.environ.get("TLCTL_CHECKPOINT_UPLOAD_MODE", "ASYNC")


def read_uri(uri: str, endpoint: str | None = None) -> bytes:
    """Bytes of a local path or s3:// object (weights given as `backbone.weights`)."""
    return read_bytes(resolve(uri, endpoint))


def build_job_model(spec: dict[str, Any], num_classes: int) -> torch.nn.Module:
    """The job's model, frozen and with its weights loaded (s3:// through the job's endpoint).

    The driver's pre-flight and every worker build it the same way.
    """
    bb, head = spec["backbone"], spec["head"]
    return backbones.build_model(
        bb["name"],
        num_classes,
        weights=bb["weights"],
        freeze_depth=int(bb["freeze_depth"]),
        hidden=head["hidden"],
        dropout=head["dropout"],
        load_bytes=functools.partial(read_uri, endpoint=spec["storage"].get("endpoint")),
    )


def to_input(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """uint8 NHWC batch → normalized float NCHW (channels_last memory on GPU)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = x.sub_(mean).div_(std)
    return x.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on GPU for `auto`; fp32 on CPU unless asked otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(
    params: list[torch.nn.Parameter], train: dict[str, Any]
) -> torch.optim.Optimizer:
    name, lr, wd = train["optimizer"], float(train["lr"]), float(train["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def make_scheduler(optimizer: torch.optim.Optimizer, train: dict[str, Any]):
    """Per-epoch schedule: cosine decay to 1% of lr, or constant."""
    epochs = int(train["epochs"])
    if train.get("lr_schedule", "cosine") == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    )


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(
    model,
    optimizer,
    batches,
    *,
    mean,
    std,
    device,
    precision,
    channels_last,
    label_smoothing,
    on_step=None,
) -> dict[str, float]:
    """One pass over this worker's shard; returns global (all-reduced) loss, acc, images/s."""
    backbones.set_train_mode(model, True)
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_sum = correct = seen = 0.0
    steady_images, steady_start = 0, None
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        x = to_input(batch["image"].to(device, non_blocking=True), mean, std, channels_last)
        y = batch["label"].to(device, non_blocking=True)
        with autocast_for(precision, device):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = y.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += float((logits.argmax(1) == y).sum())
        seen += n
        if step == 1:  # steady state starts after the first (warm-up) step
            steady_start, steady_images = time.perf_counter(), 0
        elif steady_start is not None:
            steady_images += n
        if on_step is not None:
            on_step(step, loss_sum / seen, correct / seen)
    elapsed = time.perf_counter() - start
    steady = time.perf_counter() - steady_start if steady_start else elapsed
    loss_sum, correct, seen, steady_images = _all_sum(
        [loss_sum, correct, seen, float(steady_images)], device
    )
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "train_images": int(seen),
        "images_per_s": seen / elapsed if elapsed else 0.0,
        # all workers' images after their warm-up step, over this worker's time for them
        "steady_images_per_s": steady_images / steady if steady > 0 else 0.0,
        "train_time_s": elapsed,
    }


@torch.no_grad()
def sync_buffers_from_rank0(net: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics before evaluating.

    DDP broadcasts buffers at the start of each training forward, so after the last step
    each rank's running stats include its own last batch. Without this, ranks would
    evaluate slightly different models, none exactly the one rank 0 checkpoints.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in net.buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(model, batches, *, rank, world, mean, std, device, precision, channels_last):
    """Exact validation over the whole val set, shared out by image key (not batch order,
    which differs between workers): each rank evaluates the images with key % world == rank."""
    net = model.module if hasattr(model, "module") else model
    sync_buffers_from_rank0(net)
    backbones.set_train_mode(net, False)
    loss_sum = correct = seen = 0.0
    for batch in batches:
        mine = batch["key"] % world == rank
        if not bool(mine.any()):
            continue
        x = to_input(batch["image"][mine].to(device), mean, std, channels_last)
        y = batch["label"][mine].to(device)
        with autocast_for(precision, device):
            logits = net(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        seen += y.shape[0]
    loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], device)
    return {
        "val_loss": loss_sum / max(seen, 1),
        "val_acc": correct / max(seen, 1),
        "val_images": int(seen),
    }


def save_checkpoint(directory: str, model, optimizer, scheduler, meta: dict[str, Any]) -> None:
    """model.pt is a plain state_dict (loads into torchvision); state.pt resumes training."""
    net = model.module if hasattr(model, "module") else model
    torch.save(net.state_dict(), os.path.join(directory, MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": meta["epoch"],
        },
        os.path.join(directory, STATE_FILE),
    )
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    # manifest.json (sizes, SHA-256) is written by the uploader, off the training loop.


def load_checkpoint(checkpoint, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer and schedule in place; returns the checkpoint's meta."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(
            torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
        )
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        with open(os.path.join(d, META_FILE)) as f:
            return json.load(f)


def worker_placement(rank: int, device: torch.device) -> dict[str, Any]:
    """Where this worker runs: Ray node id and IP, host, process and device."""
    import socket

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


def usable_checkpoint(latest, candidates: list[Location]) -> tuple[Any, list[tuple[str, str]]]:
    """The checkpoint to resume from: the newest of `candidates` (the run's checkpoint dirs,
    newest first) whose manifest verifies (None: start over), and (uri, reason) of each
    newer one skipped.

    Usually that is Ray's latest. It can be newer: a checkpoint whose upload finished (its
    manifest landed) just before its worker or node died, so Ray never registered it; it is
    complete, and resuming from it loses less. It is older when Ray's latest is broken.
    Verified where it lies (not through as_directory: a second download of the same
    checkpoint by load_checkpoint would contend for Ray's per-node download lock).
    """
    import ray.train

    latest_path = latest.path.rstrip("/") if latest is not None else None
    skipped = []
    for loc in candidates:
        reason = verify(loc)
        if reason is None:
            if loc.path.rstrip("/") == latest_path:
                return latest, skipped
            return ray.train.Checkpoint(loc.path, filesystem=loc.fs), skipped
        skipped.append((loc.uri, reason))
    return None, skipped


class _Progress:
    """Per-step callback: notes the first step's time (start-up cost) and pushes progress
    to the driver's queue (local runs), at most ~4 times a second."""

    def __init__(self, queue, epoch: int, steps: int) -> None:
        self.queue, self.epoch, self.steps, self.last = queue, epoch, steps, 0.0
        self.first_step_at: float | None = None

    def __call__(self, step: int, loss: float, acc: float) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()
        now = time.monotonic()
        if self.queue is None or (now - self.last < 0.25 and step + 1 < self.steps):
            return
        self.last = now
        try:
            self.queue.put_nowait(
                {
                    "epoch": self.epoch,
                    "step": step + 1,
                    "steps": self.steps,
                    "loss": loss,
                    "acc": acc,
                }
            )
        except Exception:  # noqa: BLE001 - progress is best effort, never fails training
            pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: build, freeze, wrap in DDP, train, evaluate, checkpoint."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    spec, classes = config["spec"], config["classes"]
    data, train = spec["data"], spec["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(spec["scaling"]["cpus_per_worker"])))
    torch.manual_seed(int(train.get("seed", 0)))
    device = ray.train.torch.get_device()
    channels_last = device.type == "cuda"

    model = build_job_model(spec, len(classes))
    mean_t, std_t = config["mean"], config["std"]
    mean = torch.tensor(mean_t, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_t, device=device).view(1, 3, 1, 1)
    optimizer = make_optimizer(backbones.trainable_parameters(model), train)
    scheduler = make_scheduler(optimizer, train)

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1

    # Resume after prepare_model, so optimizer state lands on the parameters' device. Every
    # rank verifies and loads the same checkpoint, so the replicas stay identical.
    run = resolve(config["run_uri"], spec["storage"].get("endpoint"))
    start_epoch, resumed_from = 0, None
    existing = [loc for _, loc in checkpoint_dirs(run.join("checkpoints"))]
    checkpoint, skipped = usable_checkpoint(ray.train.get_checkpoint(), existing)
    if checkpoint is not None:
        net = model.module if hasattr(model, "module") else model
        meta = load_checkpoint(checkpoint, net, optimizer, scheduler)
        start_epoch, resumed_from = int(meta["epoch"]) + 1, int(meta["epoch"])

    # Names left by earlier attempts are never reused (see checkpoint_name).
    taken = {loc.path.rstrip("/").rsplit("/", 1)[-1] for loc in existing}
    tags = config.get("metrics_tags") or {}
    window = retry_window(spec)
    # Hashing and uploading 100s of MB compete with training for the CPU: the background
    # upload thread runs at low priority and does its S3 writes itself (not in pyarrow's pool).
    uploader = Uploader(window, fs=foreground_fs(run), background=UPLOAD_MODE == "ASYNC")
    log = (
        MetricsLog(run.join("metrics.jsonl"), retry_window_s=window, **tags) if rank == 0 else None
    )
    if log is not None:
        # A checkpoint's manifest lands only after its epoch's metrics line: a run resumed
        # from it never lacks that line.
        uploader.before_manifest = log.flush
    workers = gather_placement(rank, world, device)
    if rank == 0:
        remove_stale_local_checkpoints(config["run_uri"])
    if log is not None:
        log.load(keep_before_epoch=start_epoch)
        for uri, reason in skipped:
            log.event("checkpoint_skipped", epoch=start_epoch, checkpoint=uri, reason=reason)
        if resumed_from is not None:
            log.event("resumed", epoch=start_epoch, from_checkpoint_epoch=resumed_from)
        # Which node each worker ran on (again after every restart: placement can change).
        log.event("workers", epoch=start_epoch, workers=workers)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = int(train["batch_size"])
    steps = max(1, config["train_rows"] // world // batch_size)
    queue = config.get("progress") if rank == 0 else None
    run_start = config.get("submitted_at")
    for epoch in range(start_epoch, int(train["epochs"])):
        epoch_start = time.time()
        batches = train_shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=False,
            prefetch_batches=2,
            local_shuffle_buffer_size=batch_size * 4 if data.get("shuffle", True) else None,
        )
        progress = _Progress(queue, epoch, steps)
        metrics = train_one_epoch(
            model,
            optimizer,
            batches,
            mean=mean,
            std=std,
            device=device,
            precision=train["precision"],
            channels_last=channels_last,
            label_smoothing=float(train.get("label_smoothing", 0.0)),
            on_step=progress,
        )
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics.update(
            evaluate(
                model,
                val_shard.iter_torch_batches(batch_size=batch_size * 2, prefetch_batches=2),
                rank=rank,
                world=world,
                mean=mean,
                std=std,
                device=device,
                precision=train["precision"],
                channels_last=channels_last,
            )
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
        if epoch == start_epoch and progress.first_step_at:
            metrics["first_step_at"] = progress.first_step_at
            if run_start:
                metrics["startup_s"] = progress.first_step_at - run_start
        epochs = int(train["epochs"])
        every = int(spec["checkpoint"].get("every_epochs", 1))
        ckpt_dir = None
        if rank == 0 and ((epoch + 1) % every == 0 or epoch == epochs - 1):
            # Waits only when max_pending checkpoints still wait for storage (see Uploader).
            metrics["checkpoint_wait_s"] = uploader.wait_below(
                int(spec["checkpoint"].get("max_pending") or 4)
            )
            ckpt_dir = tempfile.mkdtemp(prefix=local_checkpoint_prefix(config["run_uri"]))
            save_checkpoint(
                ckpt_dir,
                model,
                optimizer,
                scheduler,
                {
                    "epoch": epoch,
                    "metrics": metrics,
                    "classes": classes,
                    "spec": spec,
                    "mean": mean_t,
                    "std": std_t,
                },
            )
        if rank == 0:
            log.epoch(metrics)
            if queue is not None:
                try:
                    queue.put_nowait({"epoch_done": epoch, **metrics})
                except Exception:  # noqa: BLE001 - best effort
                    pass
        # Uploaded by tlctl's uploader: retried through storage outages, manifest last; the
        # local copy deleted after, in the background (see UPLOAD_MODE).
        if ckpt_dir:
            uploader.submitted()
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
            checkpoint_dir_name=checkpoint_name(epoch, taken),
            checkpoint_upload_mode=getattr(CheckpointUploadMode, UPLOAD_MODE),
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=uploader,
        )
    if log is not None:
        log.close()  # every metrics line in storage before this worker reports done
