"""Benchmarks of using a model, measured side by side in one run (the machine is noisy).

    python -m benchmarks.models [--images 2400] [--rounds 3] [--out benchmarks/results]

1. `tlctl predict` throughput vs a hand-written plain-torch loop over the same files and
   model (read + decode + resize + forward, the same number of threads). Predict's
   throughput is over its whole pipeline (the `wall_s` it records: starting the scorer
   actors, reading, decoding, scoring, writing the output and _meta.json), and again
   after its first result (`first_result_s`: the actors' start-up, reported separately,
   like the command's own start-up: process, imports, `ray.init`). The plain loop is timed
   from its first file read to its last logit (it writes nothing).
2. `tlctl evaluate` vs `tlctl predict` on the same images, whole command wall time each.
3. Export: eager vs `pt2` (torch.export) vs onnxruntime (CPU provider) latency per batch at
   batch 1 and 32, 224 px, resnet18 and mobilenet_v3_large (random weights: latency does
   not depend on them).

Arms alternate within each round; medians are reported, every round is kept in the JSON.
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
import pyarrow.fs as pafs
import yaml

from jobs.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
SIZE, SOURCE_PX, CLASSES = 128, 160, 6
THREADS = os.cpu_count() or 1


def tlctl(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"tlctl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout), wall


def train_model(work: Path) -> str:
    """A small resnet18 at SIZE px (from scratch: its accuracy is not what is measured)."""
    fs = pafs.LocalFileSystem()
    synthesize(fs, str(work / "train"), variant="target", classes=CLASSES, per_class=40, size=SIZE)
    spec = {
        "name": "bench",
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
        "data": {"train": str(work / "train"), "image_size": SIZE},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"uri": str(work / "runs")},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    tlctl("submit", str(path), "--local")
    return "bench"


def plain_loop(model_dir: Path, images: Path) -> dict:
    """What a user would write by hand: read, decode, resize, normalize, forward."""
    import torch
    from PIL import Image

    from jobs.training.model import build_model

    torch.set_num_threads(THREADS)
    info = json.loads((model_dir / "model.json").read_text())
    net = build_model(info["backbone"], len(info["classes"]), hidden=(), dropout=0.2)
    net.load_state_dict(torch.load(model_dir / "model.pt", weights_only=True))
    net.eval()
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    files = sorted(str(p) for p in images.rglob("*.png"))
    start = time.perf_counter()
    preds = []
    with torch.no_grad():
        for i in range(0, len(files), 64):
            batch = []
            for f in files[i : i + 64]:
                with Image.open(f) as img:
                    rgb = img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
                batch.append(np.asarray(rgb, dtype=np.uint8))
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255)
            preds.append(net(((x - mean) / std).contiguous()).argmax(1))
    wall = time.perf_counter() - start
    return {"images": len(files), "wall_s": wall, "images_per_s": len(files) / wall}


def inference_round(work: Path, run: str, images: Path, n: int, r: int) -> dict:
    storage = ["--storage", str(work / "runs")]
    out = str(work / f"preds-{r}")
    meta, wall = tlctl("predict", run, "--input", str(images), "--output", out, *storage)
    assert meta["rows"] == n, meta
    predict = {
        "images": n,
        "command_wall_s": wall,
        "pipeline_wall_s": meta["wall_s"],
        "startup_s": wall - meta["wall_s"],
        "pool_startup_s": meta["first_result_s"],
        "images_per_s": n / meta["wall_s"],
        "images_per_s_after_first_result": n / (meta["wall_s"] - meta["first_result_s"]),
        "images_per_s_whole_command": n / wall,
    }
    plain = plain_loop(work / "runs" / run / "model", images)
    metrics, ev_wall = tlctl("evaluate", run, "--data", str(images), "--name", f"r{r}", *storage)
    assert metrics["n"] == n, metrics
    return {
        "predict": predict,
        "plain_torch": plain,
        "evaluate": {"command_wall_s": ev_wall, "wall_s": metrics["wall_s"]},
        "predict_vs_plain": predict["images_per_s"] / plain["images_per_s"],
        "predict_vs_plain_after_first_result": predict["images_per_s_after_first_result"]
        / plain["images_per_s"],
        "evaluate_vs_predict": ev_wall / wall,
    }


def latency(fn, x, repeats: int) -> float:
    fn(x)  # warm-up (allocations, onnxruntime's first-run optimizations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_latency(work: Path, repeats: int) -> dict:
    import torch

    from jobs.models.export import load_program, normalized, write_program
    from jobs.training.model import build_model

    torch.set_num_threads(THREADS)
    out: dict = {}
    for name in ("resnet18", "mobilenet_v3_large"):
        model = normalized(
            build_model(name, 10, hidden=(), dropout=0.2).eval(), (0.5,) * 3, (0.25,) * 3
        )
        runners = {"eager": lambda x, m=model: m(torch.from_numpy(x)).detach().numpy()}
        for fmt in ("pt2", "onnx"):
            path = str(work / f"{name}.{fmt}")
            write_program(model, fmt, 224, path)
            runners[fmt] = load_program(fmt, path)
        rng = np.random.default_rng(0)
        for batch in (1, 32):
            x = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
            reps = repeats if batch == 1 else max(3, repeats // 6)
            with torch.no_grad():
                for arm, fn in runners.items():
                    s = latency(fn, x, reps)
                    out.setdefault(name, {}).setdefault(f"batch{batch}", {})[arm] = {
                        "batch_s": s,
                        "ms_per_image": 1000 * s / batch,
                    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30, help="latency repeats at batch 1")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlctl-bench-models-") as tmp:
        work = Path(tmp)
        per_class = args.images // CLASSES
        synthesize(
            pafs.LocalFileSystem(),
            str(work / "images"),
            variant="target",
            classes=CLASSES,
            per_class=per_class,
            size=SOURCE_PX,  # resized to the model's size on the way, as real inputs are
            seed=7,
        )
        run = train_model(work)
        rounds = [
            inference_round(work, run, work / "images", per_class * CLASSES, r)
            for r in range(args.rounds)
        ]
        export = export_latency(work, args.repeats)
    result = {
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "workload": {
            "backbone": "resnet18",
            "image_size": SIZE,
            "source_px": SOURCE_PX,
            "images": per_class * CLASSES,
            "threads": THREADS,
        },
        "rounds": rounds,
        "median": {
            "predict_vs_plain": statistics.median(r["predict_vs_plain"] for r in rounds),
            "predict_vs_plain_after_first_result": statistics.median(
                r["predict_vs_plain_after_first_result"] for r in rounds
            ),
            "predict_pool_startup_s": statistics.median(
                r["predict"]["pool_startup_s"] for r in rounds
            ),
            "evaluate_vs_predict": statistics.median(r["evaluate_vs_predict"] for r in rounds),
            "predict_images_per_s": statistics.median(r["predict"]["images_per_s"] for r in rounds),
            "plain_images_per_s": statistics.median(
                r["plain_torch"]["images_per_s"] for r in rounds
            ),
            "predict_startup_s": statistics.median(r["predict"]["startup_s"] for r in rounds),
        },
        "export_latency": export,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "models.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"], indent=1))
    print(json.dumps(export, indent=1))


if __name__ == "__main__":
    main()
