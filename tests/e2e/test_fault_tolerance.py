"""End to end: a run survives a killed training worker and an S3 outage, and fails cleanly,
checkpoints intact, when failures exceed `failure.max_failures`.

Each run is a real `tlctl submit --local` subprocess (its own Ray, 2 workers) against real
SeaweedFS; a worker is killed with SIGKILL by the pid its run recorded. Every checkpoint is
checked against its manifest.
"""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.local.s3server import S3Server, start_s3_server
from jobs.data.synth import synthesize
from jobs.storage.layout import RunLayout
from jobs.storage.location import exists, list_dir, read_text, resolve
from jobs.storage.manifest import verify

pytestmark = pytest.mark.slow
SIZE = 32
EPOCHS = 5
OUTAGE_S = 20.0


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
    """Epochs of the run's complete checkpoints. Every dir with a manifest must verify; the
    only other kind allowed is an upload cut short by the failure (no manifest yet), which
    is never taken for a checkpoint."""
    epochs = []
    for epoch, loc in RunLayout(run).checkpoint_dirs():
        reason = verify(loc)
        if reason is None:
            epochs.append(epoch)
        else:
            assert reason.startswith("no manifest.json"), (loc.uri, reason)
    return sorted(epochs)


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
    assert set(all_intact(run)) == set(range(EPOCHS))  # every epoch's checkpoint, whole
    assert verify(run.join("model")) is None
    # The run's report tells the same story: the failure and the resume on its timeline.
    from orchestrator.report import build_report
    from orchestrator.report.run import run_context

    report = build_report(s3["storage"], s3["endpoint"], "killed", tmp_path / "report")
    assert report["kind"] == "train" and report["epochs"] == EPOCHS
    marks = [e["event"] for e in run_context(RunLayout(run), RunLayout(run).read_spec())["events"]]
    assert "worker_failure" in marks and marks.index("resumed") > marks.index("worker_failure")
    page = (tmp_path / "report" / "index.html").read_text()
    assert html.escape(failures[0]["cause"], quote=True) in page


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


def test_a_search_trial_whose_worker_dies_is_retried_the_same_way(tmp_path, data, s3) -> None:
    """Tune: each trial's Train run has the job's FailureConfig, so a trial resumes from its
    own latest complete checkpoint instead of failing the search."""
    spec = write_spec(
        tmp_path, data, "search-killed", s3["storage"], s3["endpoint"], max_failures=2
    )
    body = yaml.safe_load(spec.read_text())
    body["search"] = {
        "freeze_depth": [0],
        "lr": [0.001],
        "search_alg": "grid",
        "scheduler": "fifo",
        "metric": "train_acc",
    }
    spec.write_text(yaml.safe_dump(body))
    run = resolve(s3["storage"], s3["endpoint"]).join("search-killed")
    proc = start(spec, s3["env"])

    def trial():
        names = list_dir(run.join("trials"))
        return run.join("trials", names[0]) if names else None

    wait_for(
        proc,
        lambda: (
            trial() is not None
            and exists(trial().join("checkpoints", "epoch-0000", "manifest.json"))
        ),
        "the trial's first checkpoint",
        timeout=300,
    )
    workers = [m for m in lines_of(trial()) if m.get("event") == "workers"][-1]["workers"]
    os.kill(next(w["pid"] for w in workers if w["rank"] == 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])

    lines = lines_of(trial())
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == list(range(EPOCHS))
    assert any(m.get("event") == "worker_failure" for m in lines)
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert resumed and resumed[0]["from_checkpoint_epoch"] >= 0
    assert set(all_intact(trial())) >= {EPOCHS - 1}
    assert verify(run.join("model")) is None


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory) -> S3Server:
    """A SeaweedFS server of this module's own: the outage test stops and restarts it."""
    server = start_s3_server(tmp_path_factory.mktemp("outage-s3"))
    server.create_bucket("outage")
    try:
        yield server
    finally:
        server.stop(grace=2.0)


def test_an_s3_outage_mid_run_is_waited_out(tmp_path, data, own_s3: S3Server, monkeypatch) -> None:
    """S3 down for 20 s after the first checkpoint: training goes on, uploads land after."""
    for name, value in own_s3.env().items():
        monkeypatch.setenv(name, value)
    env = dict(os.environ)
    spec = write_spec(
        tmp_path, data, "outage", "s3://outage/ft", own_s3.endpoint, storage_retry_s=120
    )
    proc = start(spec, env)
    run = resolve("s3://outage/ft", own_s3.endpoint).join("outage")
    wait_for(
        proc,
        lambda: exists(run.join("checkpoints", "epoch-0000", "manifest.json")),
        "first checkpoint",
    )
    down_at = time.time()
    # A clean stop (~17 s): SIGKILLed, SeaweedFS can lose writes it had acknowledged, which
    # S3 never does; the run must not be blamed for that.
    own_s3.stop(grace=30.0)
    time.sleep(max(0.0, down_at + OUTAGE_S - time.time()))
    assert proc.poll() is None, proc.communicate()  # still running through the outage
    own_s3.restart()
    up_at = time.time()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])

    lines = lines_of(run)
    epochs = [m for m in lines if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == list(range(EPOCHS))
    # Training went on while storage was down: an epoch ended during the outage.
    assert any(down_at < m["time"] < up_at for m in epochs), [m["time"] for m in epochs]
    assert not any(m.get("event") == "worker_failure" for m in lines)
    assert set(all_intact(run)) == set(range(EPOCHS))
    assert verify(run.join("model")) is None


def test_an_outage_past_the_window_fails_cleanly(tmp_path, data, own_s3: S3Server, monkeypatch):
    """`failure.storage_retry_s: 3` and S3 down for good: exit 1 naming the storage error,
    no traceback; once S3 is back, what was written before verifies."""
    for name, value in own_s3.env().items():
        monkeypatch.setenv(name, value)
    spec = write_spec(
        tmp_path, data, "outage-long", "s3://outage/ft", own_s3.endpoint, storage_retry_s=3
    )
    proc = start(spec, dict(os.environ))
    run = resolve("s3://outage/ft", own_s3.endpoint).join("outage-long")
    wait_for(
        proc,
        lambda: exists(run.join("checkpoints", "epoch-0000", "manifest.json")),
        "first checkpoint",
    )
    own_s3.stop(grace=30.0)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        own_s3.restart()
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    assert "error: training failed" in err and "still failing after 3 s" in err, err[-3000:]
    assert "Traceback" not in err
    reasons = {epoch: verify(loc) for epoch, loc in RunLayout(run).checkpoint_dirs()}
    assert reasons[0] is None  # landed before the outage: intact
    # An upload cut off by the outage left no manifest: never taken for a checkpoint.
    assert all(r is None or r.startswith("no manifest.json") for r in reasons.values()), reasons
    assert not exists(run.join("model", "model.json"))
