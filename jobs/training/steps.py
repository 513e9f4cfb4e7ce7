"""The numerical steps of training, as plain functions in the manner of torchvision's
reference `train.py`: one epoch of training, an exact evaluation, the optimizer and the
schedule. They know nothing of Ray or storage, so benchmarks run them bare (torch alone:
the GPU benchmark's image has no Ray and no pydantic).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from jobs.training.model import set_train_mode

if TYPE_CHECKING:
    from jobs.spec.model import TrainSpec


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
    params: list[torch.nn.Parameter], *, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """`train.optimizer` over the trainable parameters (SGD with Nesterov momentum 0.9)."""
    wd = weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec):
    """Per-epoch schedule: cosine decay to 1% of lr, or constant."""
    epochs = train.epochs
    if train.lr_schedule == "constant":
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
    set_train_mode(model, True)
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
    set_train_mode(net, False)
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
