"""Foundation benchmarks, measured side by side in one run (the machine is noisy).

    python -m benchmarks.foundation [--rounds 2] [--epochs 4] [--out benchmarks/results]

1. Orchestration overhead: `tlctl submit --local` steady-state training images/s vs a
   hand-written PyTorch DDP loop (torch.multiprocessing + gloo, in-memory tensors).
2. Data path: the same Ray Train loop fed by Ray Data (`get_dataset_shard`) vs fed from
   in-memory tensors.
3. Freeze depth: step time with the whole backbone frozen vs nothing frozen
   (mobilenet_v3_large, 64 px).
4. Start-up: seconds from launching `tlctl submit --local` to the first training step.

Same model, data, batch and worker count in every arm; arms alternate across rounds.
Steady state = epochs after the first, and steps after each epoch's first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs.data.pipeline import build_datasets, decode_image
from jobs.data.plan import DataPlan, plan_data
from jobs.data.synth import synthesize
from jobs.spec.model import DataSpec
from jobs.storage.location import resolve
from jobs.training import backbones
from jobs.training.model import build_model, set_train_mode, trainable_parameters
from jobs.training.steps import make_optimizer, to_input, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]

BACKBONE, SIZE, BATCH, WORKERS, CLASSES, PER_CLASS = "resnet18", 32, 32, 2, 6, 200
OPTIMIZER = {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}  # the spec's defaults


def data_plan(data_dir: str) -> DataPlan:
    return plan_data(DataSpec(train=data_dir, val_fraction=0.1), endpoint=None, seed=0)


def load_arrays(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The train split decoded into memory, exactly as tlctl splits and decodes it."""
    plan = data_plan(data_dir)
    images = np.stack([decode_image(open(f, "rb").read(), SIZE, f) for f in plan.train.files])
    return images, np.asarray(plan.train.labels, dtype=np.int64)


# --- arm 1: hand-written DDP ---------------------------------------------------------


def _plain_worker(rank: int, world: int, port: int, data_dir: str, epochs: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    images, labels = load_arrays(data_dir)
    images, labels = torch.from_numpy(images[rank::world]), torch.from_numpy(labels[rank::world])
    model = build_model(BACKBONE, CLASSES, weights="none", dropout=0.2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(trainable_parameters(model), **OPTIMIZER)
    mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(labels))
        ddp.train()
        seen, t0 = 0, None
        for step, i in enumerate(range(0, len(perm), BATCH)):
            idx = perm[i : i + BATCH]
            x, y = to_input(images[idx], mean, std, False), labels[idx]
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == 1:
                t0, seen = time.perf_counter(), 0
            elif t0 is not None:
                seen += len(idx)
        elapsed = time.perf_counter() - t0
        total = torch.tensor([seen / elapsed])
        dist.all_reduce(total)
        if epoch > 0:
            rates.append(float(total))
    if rank == 0:
        Path(out).write_text(json.dumps(rates))
    dist.destroy_process_group()


def plain_ddp(data_dir: str, epochs: int) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_plain_worker, args=(WORKERS, port, data_dir, epochs, out), nprocs=WORKERS)
    return statistics.median(json.loads(Path(out).read_text()))


# --- arm 2: tlctl submit --local -------------------------------------------------------


def write_spec(path: Path, name: str, data_dir: str, storage: str, epochs: int, **extra) -> None:
    import yaml

    spec = {
        "name": name,
        "backbone": {"name": extra.get("backbone", BACKBONE), "weights": "none", "freeze_depth": 0},
        "data": {
            "train": data_dir,
            "image_size": SIZE,
            "val_fraction": 0.1,
            "augment": extra.get("augment", False),
        },
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": 1e-3, "lr_schedule": "constant"},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
        "storage": {"uri": storage},
    }
    path.write_text(yaml.safe_dump(spec))


def tlctl_submit(work: Path, data_dir: str, epochs: int, tag: str) -> dict:
    spec = work / f"{tag}.yaml"
    storage = str(work / "runs")
    write_spec(spec, tag, data_dir, storage, epochs)
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--local", "--json"],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    text = (work / "runs" / tag / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    epochs_m = [m for m in lines if m.get("kind") == "epoch"]
    return {
        "steady_images_per_s": statistics.median(m["steady_images_per_s"] for m in epochs_m[1:]),
        "startup_s": epochs_m[0]["first_step_at"] - t0,
    }


# --- arm 3: the same Ray Train loop, Ray Data vs in-memory -----------------------------


def _ingest_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = ray.train.torch.prepare_model(
        build_model(BACKBONE, CLASSES, weights="none", dropout=0.2)
    )
    opt = make_optimizer(trainable_parameters(model), **OPTIMIZER)
    mean = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)
    if config["source"] == "memory":
        images = torch.from_numpy(config["images"][rank::world])
        labels = torch.from_numpy(config["labels"][rank::world])

        def batches():
            perm = torch.randperm(len(labels))
            for i in range(0, len(perm), BATCH):
                yield {"image": images[perm[i : i + BATCH]], "label": labels[perm[i : i + BATCH]]}
    else:
        shard = ray.train.get_dataset_shard("train")

        def batches():
            return shard.iter_torch_batches(
                batch_size=BATCH, prefetch_batches=2, local_shuffle_buffer_size=BATCH * 4
            )

    rates = []
    for epoch in range(config["epochs"]):
        m = train_one_epoch(
            model,
            opt,
            batches(),
            mean=mean,
            std=std,
            device=torch.device("cpu"),
            precision="fp32",
            channels_last=False,
            label_smoothing=0.0,
        )
        if epoch > 0:
            rates.append(m["steady_images_per_s"])
    if rank == 0:  # Train V2 keeps only metrics reported with a checkpoint: use a file
        Path(config["out"]).write_text(json.dumps(statistics.median(rates)))
    ray.train.report({"rate": statistics.median(rates)})


def ingest_arms(data_dir: str, epochs: int, storage: str) -> dict[str, float]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    images, labels = load_arrays(data_dir)
    plan = data_plan(data_dir)
    out = {}
    ray.init(address="local", num_cpus=WORKERS + 2, include_dashboard=False, log_to_driver=False)
    try:
        for source in ("raydata", "memory"):
            datasets = {}
            if source == "raydata":
                ds = build_datasets(plan, DataSpec(train=data_dir, image_size=SIZE, augment=False))
                datasets = {"train": ds["train"]}
            trainer = TorchTrainer(
                _ingest_loop,
                train_loop_config={
                    "source": source,
                    "epochs": epochs,
                    "images": images,
                    "labels": labels,
                    "out": f"{storage}-{source}.json",
                },
                scaling_config=ray.train.ScalingConfig(num_workers=WORKERS),
                run_config=ray.train.RunConfig(
                    name=f"ingest-{source}-{time.time_ns()}", storage_path=storage
                ),
                datasets=datasets,
            )
            trainer.fit()
            out[source] = json.loads(Path(f"{storage}-{source}.json").read_text())
    finally:
        ray.shutdown()
    return out


# --- arm 4: freeze depth ----------------------------------------------------------------


def freeze_step_times(reps: int = 12) -> dict[str, float]:
    import torch.nn.functional as F

    torch.set_num_threads(2)
    name = "mobilenet_v3_large"
    depth_max = backbones.num_stages(name)
    x = torch.randn(32, 3, 64, 64)
    y = torch.randint(0, 10, (32,))
    models = {}
    for depth in (0, depth_max):
        m = build_model(name, 10, weights="none", freeze_depth=depth)
        set_train_mode(m, True)
        models[depth] = (m, torch.optim.AdamW(trainable_parameters(m), lr=1e-3))
    times: dict[int, list[float]] = {0: [], depth_max: []}
    for rep in range(reps + 2):
        for depth, (m, opt) in models.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rep >= 2:  # warm-up
                times[depth].append(time.perf_counter() - t0)
    full, frozen = statistics.median(times[0]), statistics.median(times[depth_max])
    return {
        "step_s_freeze_0": full,
        f"step_s_freeze_{depth_max}": frozen,
        "ratio_frozen_over_full": frozen / full,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tlctl-bench-"))
    data_dir = str(work / "data")
    loc = resolve(data_dir)
    synthesize(
        loc.fs, loc.path, variant="source", classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=0
    )
    rounds = []
    for r in range(args.rounds):
        row = {"plain_ddp_images_per_s": plain_ddp(data_dir, args.epochs)}
        tl = tlctl_submit(work, data_dir, args.epochs, f"bench-{r}")
        row["tlctl_images_per_s"] = tl["steady_images_per_s"]
        row["startup_s"] = tl["startup_s"]
        print(f"round {r}: {row}", flush=True)
        ing = ingest_arms(data_dir, args.epochs, str(work / "ingest"))
        row["raydata_images_per_s"], row["memory_images_per_s"] = ing["raydata"], ing["memory"]
        row.update(freeze_step_times())
        rounds.append(row)
        print(json.dumps(row), flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    freeze_key = next(
        k for k in rounds[0] if k.startswith("step_s_freeze_") and k != "step_s_freeze_0"
    )
    result = {
        "setup": {
            "backbone": BACKBONE,
            "image_size": SIZE,
            "batch_per_worker": BATCH,
            "workers": WORKERS,
            "train_images": int(CLASSES * PER_CLASS * 0.9),
            "epochs": args.epochs,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "rounds": rounds,
        "overhead_ratio_tlctl_over_plain": med("tlctl_images_per_s")
        / med("plain_ddp_images_per_s"),
        "data_path_ratio_raydata_over_memory": med("raydata_images_per_s")
        / med("memory_images_per_s"),
        "freeze_ratio_full_frozen_over_none": med(freeze_key) / med("step_s_freeze_0"),
        "startup_s": med("startup_s"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "foundation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
