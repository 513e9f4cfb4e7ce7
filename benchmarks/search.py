"""Search benchmarks, measured side by side in one run (the machine is noisy).

    python -m benchmarks.search [--epochs 8] [--out benchmarks/results]

Workload (the quickstart's pair): resnet18 pre-trained by tlctl on the synthetic *source*
shapes, fine-tuned on the *target* shapes, 32 px, 1 worker per trial, trials side by side.

1. ASHA efficiency: the same random search (freeze_depth in 0..4, lr log-uniform, the same
   seed, so both arms sample the same `--samples` trials) with ASHA (reduction factor 4,
   grace 1 epoch, max `--epochs`) vs FIFO: total trial-epochs ratio, and the best val
   accuracy of each.
2. Tune overhead: each search's wall time ÷ (sum of its trials' times ÷ concurrency),
   trial time = from Tune starting the trial to its end, as the run's metrics record.
3. Freeze depth and transfer: best val accuracy and time per epoch for each freeze depth,
   from the pre-trained source model (the FIFO search) and from scratch (a FIFO grid over
   the freeze depths at lr 1e-3, same epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from jobs.data.synth import synthesize
from jobs.storage.layout import RunLayout
from jobs.storage.location import resolve

ROOT = Path(__file__).resolve().parents[1]

SIZE, CLASSES = 32, 6
FREEZE = [0, 1, 2, 3, 4]


def tlctl(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise SystemExit(f"tlctl {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def spec(work: Path, name: str, *, weights: str, epochs: int, search: dict | None) -> Path:
    body = {
        "name": name,
        "backbone": {"name": "resnet18", "weights": weights, "freeze_depth": 0},
        "data": {"train": str(work / "target/train"), "val": str(work / "target/val")},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 1e-3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"uri": str(work / "runs")},
        "checkpoint": {"keep": 1},
    }
    body["data"]["image_size"] = SIZE
    if search is not None:
        body["search"] = search
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def trial_times(run_dir: Path) -> dict[str, float]:
    """Seconds from Tune starting each trial to its end, from the run's metrics.jsonl."""
    lines = RunLayout.at(str(run_dir)).read_log()
    start: dict[str, float] = {}
    spans: dict[str, float] = {}
    ends = ("trial_completed", "trial_stopped", "trial_error")
    for m in lines:
        if m.get("event") == "trial_started":
            start[m["trial_id"]] = m["time"]
        elif m.get("event") in ends and m["trial_id"] in start:
            spans[m["trial_id"]] = (
                spans.get(m["trial_id"], 0.0) + m["time"] - start.pop(m["trial_id"])
            )
    return spans


def search_arm(work: Path, name: str, weights: str, epochs: int, search: dict) -> dict:
    path = spec(work, name, weights=weights, epochs=epochs, search=search)
    t0 = time.perf_counter()
    summary = tlctl("submit", str(path), "--local")
    wall = time.perf_counter() - t0
    run = RunLayout.at(str(work / "runs" / name))
    rows = run.read_trials_table()
    spans = trial_times(work / "runs" / name)
    concurrency = int(search["max_concurrent_trials"])
    ideal = sum(spans.values()) / concurrency
    epoch_times = {}
    for m in run.read_log():
        if m.get("kind") == "epoch" and m.get("epoch", 0) > 0:  # steady epochs
            epoch_times.setdefault(m["freeze_depth"], []).append(m["epoch_time_s"])
    return {
        "name": name,
        "trials": len(rows),
        "trial_epochs": sum(r["epochs_run"] for r in rows),
        "best_val_acc": max(r["val_acc"] for r in rows if r["val_acc"] is not None),
        "best_values": summary["hyperparameters"],
        "search_s": summary["wall_time_s"],
        "cli_wall_s": wall,
        "sum_trial_s": sum(spans.values()),
        "ideal_s": ideal,
        "overhead": summary["wall_time_s"] / ideal,
        "rows": rows,
        "epoch_time_by_freeze": {
            str(k): sum(v) / len(v) for k, v in sorted(epoch_times.items()) if v
        },
    }


def best_by_freeze(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        if r["val_acc"] is not None:
            key = str(r["freeze_depth"])
            out[key] = max(out.get(key, 0.0), r["val_acc"])
    return out


def _values(rows: list[dict]) -> list[tuple]:
    return sorted((r["freeze_depth"], round(r["lr"], 12)) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(tempfile.mkdtemp(prefix="tlctl-bench-search-"))
    fs = resolve(str(work)).fs
    synthesize(
        fs,
        str(work / "source"),
        variant="source",
        classes=CLASSES,
        per_class=200,
        size=SIZE,
        seed=1,
    )
    for split, per, seed in (("train", 60, 2), ("val", 40, 3)):
        synthesize(
            fs,
            str(work / "target" / split),
            variant="target",
            classes=CLASSES,
            per_class=per,
            size=SIZE,
            seed=seed,
        )
    source = spec(work, "source", weights="none", epochs=6, search=None)
    body = yaml.safe_load(source.read_text())
    body["data"] = {"train": str(work / "source"), "val_fraction": 0.1, "image_size": SIZE}
    body["scaling"]["num_workers"] = 2
    source.write_text(yaml.safe_dump(body))
    t0 = time.perf_counter()
    src = tlctl("submit", str(source), "--local")
    print(f"source pre-train: {src['best_val_acc']:.3f} in {time.perf_counter() - t0:.0f} s")
    weights = str(work / "runs" / "source" / "model")

    space = {
        "freeze_depth": {"range": [min(FREEZE), max(FREEZE)]},
        "lr": {"loguniform": [1e-4, 3e-2]},
        "search_alg": "random",
        "num_samples": args.samples,
        "grace_period": 1,
        "reduction_factor": 4,
        "max_concurrent_trials": 2,
    }
    arms = {}
    for name in ("asha", "fifo"):
        arms[name] = search_arm(work, name, weights, args.epochs, {**space, "scheduler": name})
        a = arms[name]
        print(
            f"{name}: {a['trials']} trials, {a['trial_epochs']} trial-epochs, best "
            f"{a['best_val_acc']:.3f}, {a['search_s']:.0f} s (ideal {a['ideal_s']:.0f} s)",
            flush=True,
        )
    scratch_grid = {
        "freeze_depth": FREEZE,
        "lr": [1e-3],
        "search_alg": "grid",
        "scheduler": "fifo",
        "max_concurrent_trials": 2,
    }
    scratch = search_arm(work, "scratch", "none", args.epochs, scratch_grid)
    asha, fifo = arms["asha"], arms["fifo"]
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.processor()}",
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
        "epochs": args.epochs,
        "samples": args.samples,
        "same_trials_in_both_arms": _values(arms["asha"]["rows"]) == _values(arms["fifo"]["rows"]),
        "source_val_acc": src["best_val_acc"],
        "asha_epochs_ratio": asha["trial_epochs"] / fifo["trial_epochs"],
        "asha_best_minus_fifo_best": asha["best_val_acc"] - fifo["best_val_acc"],
        "overhead_asha": asha["overhead"],
        "overhead_fifo": fifo["overhead"],
        "overhead_scratch": scratch["overhead"],
        "transfer": {
            "pretrained_best_val_acc": best_by_freeze(fifo["rows"]),
            "scratch_best_val_acc": best_by_freeze(scratch["rows"]),
            "pretrained_epoch_s": fifo["epoch_time_by_freeze"],
            "scratch_epoch_s": scratch["epoch_time_by_freeze"],
        },
        "arms": {"asha": asha, "fifo": fifo, "scratch": scratch},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
