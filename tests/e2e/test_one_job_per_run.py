"""End to end: one run, one job. Real `tlctl submit --local` subprocesses (each its own Ray)
against real SeaweedFS: two submits of the same run at once train it once (the other exits
2 naming the holder); a SIGKILLed holder's lease expires and the next submit takes over,
recorded in the run's log. And a worker killed while its group is still starting is
recorded as a `worker_failure` like any other restart.
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
from jobs.data.synth import synthesize
from jobs.storage.location import exists, read_text, resolve

pytestmark = pytest.mark.slow
SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lease-data")
    fs = resolve(str(root)).fs
    synthesize(fs, str(root / "train"), variant="target", classes=2, per_class=40, size=SIZE)
    synthesize(fs, str(root / "val"), variant="target", classes=2, per_class=8, size=SIZE, seed=1)
    return root


@pytest.fixture
def s3(s3_env: S3Server, s3_bucket: str) -> dict:
    return {
        "env": dict(os.environ),
        "storage": f"s3://{s3_bucket}/lease",
        "endpoint": s3_env.endpoint,
    }


def write_spec(tmp: Path, data: Path, s3: dict, name: str, epochs: int = 1, **failure) -> Path:
    spec = {
        "name": name,
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
        "data": {"train": str(data / "train"), "val": str(data / "val"), "image_size": SIZE},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.001},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"uri": s3["storage"], "endpoint": s3["endpoint"]},
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
        start_new_session=True,  # its Ray's processes too: killed as one group
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
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout} s")


def test_two_submits_of_one_run_train_it_once(tmp_path, data, s3) -> None:
    spec = write_spec(tmp_path, data, s3, "twice", epochs=2)
    run = resolve(s3["storage"], s3["endpoint"]).join("twice")
    procs = [start(spec, s3["env"]), start(spec, s3["env"])]
    results = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [err[-2000:] for _, err in results])
    winner = procs[codes.index(0)]
    _, refused_err = results[codes.index(2)]
    assert "run 'twice'" in refused_err
    assert "is being trained by tlctl submit --local" in refused_err
    assert f"pid {winner.pid}" in refused_err and "last heartbeat" in refused_err
    epochs = [m["epoch"] for m in lines_of(run) if m.get("kind") == "epoch"]
    assert epochs == [0, 1]  # trained once: no epoch twice
    assert not exists(run.join("lease.json"))  # released when the job ended


def test_a_killed_holders_lease_expires_and_is_taken_over(tmp_path, data, s3) -> None:
    ttl = 4.0
    env = {**s3["env"], "TLCTL_LEASE_TTL_S": str(ttl)}
    spec = write_spec(tmp_path, data, s3, "taken", epochs=2)
    run = resolve(s3["storage"], s3["endpoint"]).join("taken")
    holder = start(spec, env)
    wait_for(holder, lambda: any(m.get("event") == "workers" for m in lines_of(run)), "training")
    os.killpg(holder.pid, signal.SIGKILL)  # the CLI and its Ray: no release, no last beat
    holder.communicate(timeout=60)
    assert exists(run.join("lease.json"))

    early = start(spec, env)  # its heartbeat may be fresh still: then refused
    _, err = early.communicate(timeout=300)
    if early.returncode != 0:  # refused (a slow start may find it expired already)
        assert early.returncode == 2 and f"pid {holder.pid}" in err, err[-2000:]
        time.sleep(ttl + 1.5)
        taker = start(spec, env)
        out, err = taker.communicate(timeout=600)
        assert taker.returncode == 0, (out[-2000:], err[-3000:])
    assert "took over the lease" in err and f"pid {holder.pid}" in err
    lines = lines_of(run)
    takeovers = [m for m in lines if m.get("event") == "lease_takeover"]
    assert len(takeovers) == 1 and takeovers[0]["previous"]["pid"] == holder.pid
    assert takeovers[0]["heartbeat_age_s"] > ttl - 1  # server clock, second resolution
    assert {m["epoch"] for m in lines if m.get("kind") == "epoch"} == {0, 1}
    assert not exists(run.join("lease.json"))


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        frontier += kids
    return found


def _train_worker(root: int) -> int | None:
    """A Ray Train worker process under `root` (its title names the actor class)."""
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    return pid
        except OSError:
            continue
    return None


def test_a_worker_killed_while_its_group_starts_is_recorded(tmp_path, data, s3) -> None:
    spec = write_spec(tmp_path, data, s3, "startup-kill", max_failures=2)
    run = resolve(s3["storage"], s3["endpoint"]).join("startup-kill")
    proc = start(spec, s3["env"])
    deadline = time.monotonic() + 240
    while (victim := _train_worker(proc.pid)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)  # as soon as it exists: the group is still starting
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    lines = lines_of(run)
    failures = [m for m in lines if m.get("event") == "worker_failure"]
    assert failures, [m.get("event") for m in lines]
    # Ray Train retries a failed start from ReschedulingState, which
    # UserCallback.after_exception never sees: FailureLog records it all the same.
    assert failures[0]["cause"] and failures[0]["phase"] == "starting"
    assert [m["epoch"] for m in lines if m.get("kind") == "epoch"] == [0]
