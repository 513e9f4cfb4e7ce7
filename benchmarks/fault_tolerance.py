"""Fault-tolerance benchmarks, measured side by side in one run (the machine is noisy).

    python -m benchmarks.fault_tolerance [--rounds 2] [--epochs 5] [--per-class 600]
                                         [--kills 5] [--out benchmarks/results]

One local SeaweedFS server holds the runs; the data is on local disk (so that only the
checkpoints touch S3), on this machine: the S3 server shares the training's cores.
Workload: resnet18 from scratch (a 133 MB checkpoint: 45 MB weights + 88 MB optimizer
state), synthetic target shapes, 6 classes x 600 images (3,240 train), 32 px, batch 32 per
worker, 2 workers x 1 CPU, no augmentation. Every run is a real `tlctl submit --local`.

1. Checkpoint stall: the training loop's cycle (one epoch's start to the next's: train,
   evaluate, save, report) with a checkpoint every epoch uploaded in the background (the
   default, Ray Train's ASYNC mode) vs checkpointing off (`checkpoint.every_epochs` past
   the run's end: only the last epoch is saved) vs a checkpoint every epoch uploaded
   synchronously (save + upload block the loop). Throughput = train images / median cycle
   over epochs 1..N-2 (epoch 0 warms up; the last epoch has no next start). Blocking time
   per checkpoint = cycle - epoch_time_s (train + evaluate), compared with the off arm's.
   Arms rotate order each round.
2. Recovery cost: one run with `failure.max_failures` = kills + 1; after each resume has
   trained a full epoch, rank 1's process (pid from the run's latest `workers` event) is
   SIGKILLed at a random point of the next epoch. Per kill: seconds from the kill to the
   `resumed` event (workers replaced, checkpoint loaded) and to the first training step
   after it; epochs of work lost = (kill time - end of the epoch resumed from) / median
   cycle, and completed epochs run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cluster.local.s3server import start_s3_server
from jobs.data.synth import synthesize
from jobs.storage.layout import RunLayout
from jobs.storage.location import resolve
from jobs.storage.manifest import verify

ROOT = Path(__file__).resolve().parents[1]

SIZE, CLASSES, BATCH, WORKERS, BUCKET = 32, 6, 32, 2, "bench"
ARMS = ("async", "off", "sync")


class Bench:
    def __init__(self, work: Path, data: Path, endpoint: str, env: dict, per_class: int) -> None:
        self.work, self.data, self.endpoint, self.env = work, data, endpoint, env
        self.train_images = int(CLASSES * per_class * 0.9)
        self.storage = f"s3://{BUCKET}/runs"

    def spec(self, name: str, epochs: int, **sections) -> Path:
        body = {
            "name": name,
            "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
            "data": {
                "train": str(self.data),
                "image_size": SIZE,
                "val_fraction": 0.1,
                "augment": False,
            },
            "train": {"epochs": epochs, "batch_size": BATCH, "lr": 1e-3, "lr_schedule": "constant"},
            "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
            "storage": {"uri": self.storage, "endpoint": self.endpoint},
            **sections,
        }
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    def run(self, name: str) -> RunLayout:
        return RunLayout(resolve(self.storage, self.endpoint).join(name))

    def lines(self, name: str) -> list[dict]:
        return self.run(name).read_log()

    def submit(self, spec: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--local", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=self.env,
        )


def finish(proc: subprocess.Popen, what: str, timeout: float = 1800) -> None:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")


def epochs_of(lines: list[dict]) -> list[dict]:
    return sorted((m for m in lines if m.get("kind") == "epoch"), key=lambda m: m["epoch"])


# --- 1. checkpoint stall ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stall_arm(b: Bench, arm: str, name: str, epochs: int) -> dict:
    every = epochs + 1 if arm == "off" else 1
    upload = "sync" if arm == "sync" else "async"
    spec = b.spec(name, epochs, checkpoint={"every_epochs": every, "keep": 2, "upload": upload})
    t0, s3_cpu = time.time(), cpu_seconds(b.s3_pid)
    finish(b.submit(spec), f"{arm} run {name}")
    wall, s3_cpu = time.time() - t0, cpu_seconds(b.s3_pid) - s3_cpu
    ep = epochs_of(b.lines(name))
    cycles = [ep[i + 1]["epoch_start"] - ep[i]["epoch_start"] for i in range(1, len(ep) - 1)]
    blocks = [
        ep[i + 1]["epoch_start"] - ep[i]["epoch_start"] - ep[i]["epoch_time_s"]
        for i in range(1, len(ep) - 1)
    ]
    cycle = statistics.median(cycles)
    return {
        "cycle_s": cycle,
        "images_per_s": b.train_images / cycle,
        "block_s": statistics.median(blocks),
        "epoch_time_s": statistics.median(ep[i]["epoch_time_s"] for i in range(1, len(ep) - 1)),
        "steady_step_images_per_s": statistics.median(
            ep[i]["steady_images_per_s"] for i in range(1, len(ep) - 1)
        ),
        "checkpoint_wait_s": statistics.median(
            ep[i].get("checkpoint_wait_s", 0.0) for i in range(1, len(ep) - 1)
        ),
        # The S3 server's CPU over the whole run (every checkpoint, metrics, data listing):
        # on this machine it shares the training's cores.
        "s3_server_cpu_s": s3_cpu,
        "checkpoints": epochs if arm != "off" else 1,
        "cycles_s": cycles,
        "wall_s": wall,
    }


def stall_summary(rounds: list[dict]) -> dict:
    arms = [arm for arm in ARMS if arm in rounds[0]]

    def med(arm: str, key: str) -> float:
        return statistics.median(r[arm][key] for r in rounds)

    off_block = med("off", "block_s")
    out: dict = {
        "images_per_s": {arm: med(arm, "images_per_s") for arm in arms},
        "block_s": {arm: med(arm, "block_s") for arm in arms},
    }
    for arm in arms:
        if arm == "off":
            continue
        out[f"ratio_{arm}_over_off"] = med(arm, "images_per_s") / med("off", "images_per_s")
        out[f"per_round_ratio_{arm}_over_off"] = [
            r[arm]["images_per_s"] / r["off"]["images_per_s"] for r in rounds
        ]
        out[f"checkpoint_block_s_{arm}"] = med(arm, "block_s") - off_block
        # S3 server CPU per checkpoint beyond the off arm's (which saves one checkpoint)
        out.setdefault("s3_server_cpu_s_per_checkpoint", {})[arm] = (
            med(arm, "s3_server_cpu_s") - med("off", "s3_server_cpu_s")
        ) / (rounds[0][arm]["checkpoints"] - 1)
    return out


# --- 2. recovery cost ---------------------------------------------------------------------


def wait_until(check, proc: subprocess.Popen, what: str, timeout: float = 600) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise SystemExit(f"run ended while waiting for {what}: {proc.communicate()}")
        time.sleep(0.2)
    raise SystemExit(f"no {what} after {timeout} s")


def recovery(b: Bench, kills: int, epochs: int, rng: random.Random) -> dict:
    name = "recovery"
    spec = b.spec(name, epochs, checkpoint={"keep": 2}, failure={"max_failures": kills + 1})
    proc = b.submit(spec)
    injected = []
    for k in range(kills):

        def progressed(k=k):
            """An epoch ended after the latest (re)start: training is running again."""
            lines = b.lines(name)
            placed = [m for m in lines if m.get("event") == "workers"]
            if len(placed) <= k:
                return None
            after = [m for m in epochs_of(lines) if m["time"] > placed[-1]["time"]]
            return (lines, placed[-1], after[-1]) if after else None

        lines, placed, last = wait_until(progressed, proc, f"an epoch after restart {k}")
        cycle = last["epoch_time_s"]
        time.sleep(rng.uniform(0.1, 0.9) * cycle)
        victim = next(w["pid"] for w in placed["workers"] if w["rank"] == 1)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        done = epochs_of(b.lines(name))
        injected.append(
            {
                "killed_at": killed_at,
                "pid": victim,
                "last_epoch_done": done[-1]["epoch"],
                "epoch_ends": {m["epoch"]: m["time"] for m in done},
            }
        )
        print(f"kill {k + 1}: pid {victim} after epoch {done[-1]['epoch']}", flush=True)
        if len(done) >= epochs - 2:
            raise SystemExit("the run is too short for the kills asked for: raise --epochs")
    finish(proc, "recovery run")
    lines = b.lines(name)
    ep = epochs_of(lines)
    resumed = [m for m in lines if m.get("event") == "resumed"]
    failures = [m for m in lines if m.get("event") == "worker_failure"]
    cycle = statistics.median(m["epoch_time_s"] for m in ep[1:])
    out = []
    for kill in injected:
        after = next(m for m in resumed if m["time"] > kill["killed_at"])
        first = next(
            m["first_step_at"] for m in ep if m["epoch"] == after["epoch"] and "first_step_at" in m
        )
        base = after["from_checkpoint_epoch"]
        base_end = kill["epoch_ends"].get(base)
        out.append(
            {
                "kill_to_resumed_s": after["time"] - kill["killed_at"],
                "kill_to_training_s": first - kill["killed_at"],
                "resumed_from_epoch": base,
                "last_epoch_done_at_kill": kill["last_epoch_done"],
                "completed_epochs_rerun": kill["last_epoch_done"] - base,
                "epochs_lost": (kill["killed_at"] - base_end) / cycle if base_end else None,
            }
        )
    intact = all(verify(loc) is None for _, loc in b.run(name).checkpoint_dirs())
    return {
        "kills": out,
        "worker_failure_events": len(failures),
        "epochs_logged": [m["epoch"] for m in ep],
        "all_checkpoints_verify": intact,
        "model_verifies": verify(b.run(name).join("model")) is None,
        "median_kill_to_training_s": statistics.median(k["kill_to_training_s"] for k in out),
        "median_kill_to_resumed_s": statistics.median(k["kill_to_resumed_s"] for k in out),
        "mean_epochs_lost": statistics.mean(k["epochs_lost"] for k in out if k["epochs_lost"]),
        "max_epochs_lost": max(k["epochs_lost"] for k in out if k["epochs_lost"]),
        "median_epoch_time_s": cycle,
    }


def renice(pid: int, niceness: int) -> None:
    """Set every thread of `pid` to `niceness` (Linux nice values are per thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def machine() -> dict:
    import ray
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--recovery-epochs", type=int, default=12)
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument(
        "--arms",
        default=",".join(ARMS),
        help="stall arms to run, comma-separated (off is always run: the others' baseline)",
    )
    ap.add_argument("--skip-stall", action="store_true")
    ap.add_argument("--skip-recovery", action="store_true")
    ap.add_argument(
        "--s3-niceness",
        type=int,
        default=15,
        help="nice value of the local S3 server: Ray runs its workers at 15, so 15 makes the "
        "server an equal competitor for the cores instead of preempting training (remote S3 "
        "would use none of them); 0 = as started",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="fault_tolerance.json")
    args = ap.parse_args()
    arms = tuple(arm for arm in ARMS if arm in args.arms.split(",") or arm == "off")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tlctl-bench-ft-"))
    s3 = start_s3_server(work / "s3")
    if args.s3_niceness:
        renice(s3.pid, args.s3_niceness)
    try:
        s3.create_bucket(BUCKET)
        os.environ.update(s3.env())
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        data = work / "data"
        loc = resolve(str(data))
        synthesize(
            loc.fs, loc.path, variant="target", classes=CLASSES, per_class=args.per_class,
            size=SIZE, seed=0,
        )  # fmt: skip
        b = Bench(work, data, s3.endpoint, dict(os.environ), args.per_class)
        b.s3_pid = s3.pid
        rounds: list[dict] = []
        for r in range(0 if args.skip_stall else args.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            row = {}
            for arm in order:
                row[arm] = stall_arm(b, arm, f"stall-{arm}-{r}", args.epochs)
                print(
                    f"round {r} {arm}: {row[arm]['images_per_s']:.1f} img/s, "
                    f"block {row[arm]['block_s']:.2f} s",
                    flush=True,
                )
            rounds.append(row)
        stall = stall_summary(rounds) if rounds else None
        if stall:
            print(json.dumps(stall, indent=1), flush=True)
        rec = None
        if not args.skip_recovery:
            rec = recovery(b, args.kills, args.recovery_epochs, random.Random(0))
            print(json.dumps({k: v for k, v in rec.items() if k != "kills"}, indent=1), flush=True)
        result = {
            "machine": machine(),
            "setup": {
                "storage": "local SeaweedFS S3 (runs); data on local disk",
                "s3_niceness": args.s3_niceness,
                "backbone": "resnet18 (scratch), checkpoint 133 MB",
                "image_size": SIZE,
                "train_images": b.train_images,
                "workers": f"{WORKERS} x 1 CPU",
                "batch_per_worker": BATCH,
                "stall_epochs": args.epochs,
                "stall_arms": list(arms),
                "rounds": args.rounds,
                "kills": None if args.skip_recovery else args.kills,
                "recovery_epochs": None if args.skip_recovery else args.recovery_epochs,
            },
            "checkpoint_stall": stall,
            "stall_rounds": rounds,
            "recovery": rec,
            "total_wall_s": time.monotonic() - started,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / args.name).write_text(json.dumps(result, indent=1))
    finally:
        s3.stop(grace=2.0)


if __name__ == "__main__":
    main()
