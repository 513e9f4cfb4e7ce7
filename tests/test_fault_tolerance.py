"""End to end: a run survives a killed training worker, and fails cleanly, checkpoints
intact, when failures exceed `failure.max_failures`.

Each run is a real `tlctl submit --local` subprocess (its own Ray, 2 workers) against real
SeaweedFS; a worker is killed with SIGKILL by the pid its run recorded. Every checkpoint is
checked against its manifest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.local.s3server import S3Server
from jobs.manifest import checkpoint_dirs, verify
from jobs.storage import exists, read_text, resolve
from jobs.synth import synthesize

pytestmark = pytest.mark.slow
SIZE = 32
EPOCHS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft-data")
    fs = resolve(str(root)).fs
    synthesize(fs, str(root / "train"), variant="target", classes=3, per_class=60, size=SIZE)
    synthesize(fs, str(root / "val"), variant="target", classes=3, per_class=10, size=SIZE, seed=1)
    return root


def write_spec(tmp: Path, data: Path, name: str, storage: str, endpoint: str, **failure) -> Path:
    spec = {
        "name": name,
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
        "data": {"train": str(data / "train"), "val": str(data / "val"), "image_size": SIZE},
        "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.001},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "storage": {"uri": storage, "endpoint": endpoint},
        "checkpoint": {"keep": EPOCHS},
        "failure": failure,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(spec: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def lines_of(run) -> list[dict]:
    loc = run.join("metrics.jsonl")
    return [json.loads(x) for x in read_text(loc).splitlines() if x.strip()] if exists(loc) else []


def wait_for(proc: subprocess.Popen, check, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}: {proc.communicate()}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout} s")


def all_intact(run) -> list[int]:
    """Epochs of the run's checkpoints; each must verify against its manifest."""
    found = checkpoint_dirs(run.join("checkpoints"))
    for epoch, loc in found:
        assert verify(loc) is None, (epoch, verify(loc))
    return sorted(epoch for epoch, _ in found)


@pytest.fixture
def s3(s3_env: S3Server, s3_bucket: str) -> dict:
    return {
        "env": dict(os.environ),
        "storage": f"s3://{s3_bucket}/ft",
        "endpoint": s3_env.endpoint,
    }


def kill_a_worker_after_first_checkpoint(run, proc) -> int:
    wait_for(
        proc,
        lambda: exists(run.join("checkpoints", "epoch-0000", "manifest.json")),
        "first checkpoint",
    )
    workers = [m for m in lines_of(run) if m.get("event") == "workers"][-1]["workers"]
    victim = next(w["pid"] for w in workers if w["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    return victim


def test_a_killed_worker_is_replaced_and_the_run_finishes(tmp_path, data, s3) -> None:
    spec = write_spec(tmp_path, data, "killed", s3["storage"], s3["endpoint"], max_failures=2)
    run = resolve(s3["storage"], s3["endpoint"]).join("killed")
    proc = start(spec, s3["env"])
    victim = kill_a_worker_after_first_checkpoint(run, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])

    lines = lines_of(run)
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == list(range(EPOCHS))
    failures = [m for m in lines if m.get("event") == "worker_failure"]
    assert failures and failures[0]["ranks"] and failures[0]["cause"]
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert resumed and resumed[0]["from_checkpoint_epoch"] >= 0
    assert resumed[0]["time"] > failures[0]["time"]
    placements = [m for m in lines if m.get("event") == "workers"]
    assert len(placements) >= 2 and victim not in {w["pid"] for w in placements[-1]["workers"]}
    assert all_intact(run)[-1] == EPOCHS - 1
    assert verify(run.join("model")) is None


def test_more_failures_than_allowed_fail_cleanly_with_checkpoints_intact(
    tmp_path, data, s3
) -> None:
    spec = write_spec(tmp_path, data, "no-retries", s3["storage"], s3["endpoint"], max_failures=0)
    run = resolve(s3["storage"], s3["endpoint"]).join("no-retries")
    proc = start(spec, s3["env"])
    kill_a_worker_after_first_checkpoint(run, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    assert "error: training failed" in err and "Traceback" not in err
    epochs = all_intact(run)
    assert epochs and epochs[0] == 0
    assert not exists(run.join("model", "model.json"))
    assert any(m.get("event") == "worker_failure" for m in lines_of(run))
