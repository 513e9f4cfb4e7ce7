"""Single-GPU training throughput through tlctl's own training step.

    python -m benchmarks.gpu_throughput            # on a GPU machine: < 5 minutes
    python -m benchmarks.gpu_throughput --smoke    # anywhere (CPU, tiny): checks the script

For mobilenet_v3_large and resnet50 at 224 px with bf16 autocast and channels_last (what
`precision: auto` does on a GPU), it runs `jobs.training.steps.train_one_epoch` — the same
function Ray Train workers run — over synthetic uint8 batches already on the device, and
reports steady-state images/s (the first steps are warm-up: cuDNN autotuning, allocator
growth). It needs torch and torchvision only (no Ray, no pydantic), as on the GPU image.
Results go to benchmarks/results/gpu_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from jobs.training.backbones import IMAGENET_MEAN, IMAGENET_STD
from jobs.training.model import build_model, trainable_parameters
from jobs.training.steps import make_optimizer, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batches(n: int, batch: int, size: int, classes: int, device: torch.device):
    """`n` batches of uint8 NHWC images + labels, resident on the device (no input cost)."""
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    for _ in range(n):
        yield {"image": images, "label": labels}


def measure(
    name: str,
    *,
    batch: int,
    size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    precision: str,
) -> dict:
    torch.manual_seed(0)
    model = build_model(name, 100, weights="none", freeze_depth=0)
    channels_last = device.type == "cuda"
    model = model.to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    opt = make_optimizer(trainable_parameters(model), name="adamw", lr=1e-3, weight_decay=1e-4)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    kwargs = dict(
        mean=mean,
        std=std,
        device=device,
        precision=precision,
        channels_last=channels_last,
        label_smoothing=0.0,
    )
    train_one_epoch(model, opt, synthetic_batches(warmup, batch, size, 100, device), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    m = train_one_epoch(model, opt, synthetic_batches(steps, batch, size, 100, device), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "backbone": name,
        "image_size": size,
        "batch": batch,
        "steps": steps,
        "precision": precision,
        "channels_last": channels_last,
        "images_per_s": steps * batch / elapsed,
        "steady_images_per_s_in_loop": m["steady_images_per_s"],
        "peak_mem_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Single-GPU training images/s through tlctl's step.")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_throughput.json"))
    args = ap.parse_args()
    if args.smoke:
        device, size, batch, steps, warmup, precision = torch.device("cpu"), 32, 4, 3, 2, "fp32"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke to check the script on CPU")
        torch.backends.cudnn.benchmark = True
        device, size, batch, steps, warmup = torch.device("cuda"), 224, args.batch, args.steps, 15
        precision = "auto"  # bf16 autocast on GPU: what a tlctl job uses
    rows = [
        measure(
            n,
            batch=batch,
            size=size,
            steps=steps,
            warmup=warmup,
            device=device,
            precision=precision,
        )
        for n in ("mobilenet_v3_large", "resnet50")
    ]
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "smoke": args.smoke,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": rows,
    }
    print(json.dumps(result, indent=1))
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
