"""End to end: tlctl jobs on a real two-node Ray cluster (token auth on) through the Ray
Jobs API, against real SeaweedFS S3.

The module starts `ray start --head` plus one `ray start --address` node on this machine
(cluster.local.raycluster, what `tlctl cluster up --local` runs), or uses the one CI
started (TLCTL_TEST_RAY_DIR). The nodes have no S3 credentials: every job gets them with
`--pass-credentials`, and the tests check the secret never shows up anywhere a user or
another cluster user could read it. Every CLI call is a real `tlctl` subprocess.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pyarrow.fs import FileSelector

from cluster.local.raycluster import LocalRayCluster, read_cluster, start_cluster
from cluster.local.s3server import S3Server, free_port_pair
from jobs.data.synth import synthesize
from jobs.storage.location import exists, list_dir, read_bytes, resolve

pytestmark = pytest.mark.slow
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_INFO = """
import json, sys
from ray.job_submission import JobSubmissionClient
info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(json.dumps(info.dict() if hasattr(info, "dict") else info.model_dump(), default=str))
"""


def free_port() -> int:
    return free_port_pair()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> LocalRayCluster:
    external = os.environ.get("TLCTL_TEST_RAY_DIR")
    if external:
        cluster = read_cluster(external)
        assert cluster is not None and cluster.alive_nodes(), f"no cluster in {external}"
        yield cluster
        return
    cluster = start_cluster(
        tmp_path_factory.mktemp("raycluster"),
        nodes=2,
        cpus_per_node=2,
        with_s3=False,
        clean_aws=True,
        dashboard_port=free_port(),  # not 8265: leave that to the user's own cluster
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def env(ray_cluster: LocalRayCluster, s3_env_module: S3Server, s3_bucket: str, tmp_path_factory):
    """Data in S3 and the environment of a user who has the cluster's token and S3 keys."""
    s3_server = s3_env_module
    data = resolve(f"s3://{s3_bucket}/data", s3_server.endpoint)
    synthesize(data.fs, data.path, variant="target", classes=3, per_class=30, size=32, seed=3)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    user = {
        **base,
        **ray_cluster.env(),
        **s3_server.env(),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return {
        "user": user,
        "secret": s3_server.secret_key,
        "token": Path(ray_cluster.token_path).read_text().strip(),
        "endpoint": s3_server.endpoint,
        "storage": f"s3://{s3_bucket}/runs",
        "data": data.uri,
        "tmp": tmp_path_factory.mktemp("cluster-specs"),
        "cluster": ray_cluster,
    }


def write_spec(env: dict, name: str, **over) -> Path:
    spec = {
        "name": name,
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 1},
        "data": {"train": env["data"], "image_size": 32, "val_fraction": 0.2},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.002},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement": "spread"},
        "storage": {"uri": env["storage"], "endpoint": env["endpoint"]},
        "checkpoint": {"keep": 5},
    }
    for key, value in over.items():
        section, field = key.split("__")
        spec[section][field] = value
    path = env["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def tlctl(env: dict, *args: str, extra: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env["user"], **(extra or {})},
    )


def job_status(env: dict, job_id: str) -> dict:
    out = tlctl(env, "jobs", "status", job_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_terminal(env: dict, job_id: str, timeout: float = 420) -> list[str]:
    """Poll `tlctl jobs status` until the job ends; returns every status seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(env, job_id)["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in TERMINAL:
            return seen
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} still {seen[-1:]} after {timeout} s")


def no_secret(env: dict, *texts: str) -> None:
    for text in texts:
        assert env["secret"] not in text
        assert env["token"] not in text


def run_objects(env: dict, name: str) -> dict[str, bytes]:
    root = resolve(env["storage"], env["endpoint"]).join(name)
    out = {}
    for info in root.fs.get_file_info(FileSelector(root.path, recursive=True)):
        if info.type.name == "File":
            out[info.path] = read_bytes(dataclasses.replace(root, path=info.path))
    return out


def test_job_trains_across_both_nodes_and_never_shows_the_secret(env: dict) -> None:
    spec = write_spec(env, "two-nodes")
    submitted = tlctl(env, "submit", str(spec), "--pass-credentials")
    assert submitted.returncode == 0, submitted.stderr
    job_id = "tlctl-two-nodes-1"
    assert job_id in submitted.stdout
    seen = wait_terminal(env, job_id)
    assert seen[-1] == "SUCCEEDED", (seen, tlctl(env, "jobs", "logs", job_id).stdout[-3000:])
    assert "RUNNING" in seen and seen.index("RUNNING") < seen.index("SUCCEEDED")

    # The run record says where each worker ran: two ranks on two different Ray nodes.
    shown = tlctl(env, "runs", "show", "two-nodes", "--storage", env["storage"], "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "complete" and len(record["metrics"]) == 2
    assert sorted(w["rank"] for w in record["workers"]) == [0, 1]
    assert len({w["node_id"] for w in record["workers"]}) == 2

    logs = tlctl(env, "jobs", "logs", job_id)
    assert logs.returncode == 0
    assert "epoch 1/2" in logs.stdout and "epoch 2/2" in logs.stdout
    assert "tlctl-summary " in logs.stdout
    listed = tlctl(env, "jobs", "list", "--json")
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows[job_id]["run"] == "two-nodes" and rows[job_id]["status"] == "SUCCEEDED"
    status = tlctl(env, "jobs", "status", job_id)
    assert "SUCCEEDED" in status.stdout and "2 epoch(s) recorded" in status.stdout
    # Piped: one plain row per job, never wrapped, so grep finds the whole row.
    plain = tlctl(env, "jobs", "list").stdout.splitlines()
    row = [line for line in plain if line.split()[:1] == [job_id]]
    assert len(row) == 1 and "two-nodes" in row[0] and "SUCCEEDED" in row[0], plain

    # The secret: not in any CLI output, `ray job list`, the job's info, or storage.
    ray_list = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list"],
        capture_output=True,
        text=True,
        env=env["user"],
        timeout=120,
    )
    assert ray_list.returncode == 0 and job_id in ray_list.stdout, ray_list.stderr
    # The Jobs API's own record of the job, as any client of the cluster gets it.
    info = subprocess.run(
        [sys.executable, "-c", JOB_INFO, env["cluster"].dashboard_url, job_id],
        capture_output=True,
        text=True,
        env=env["user"],
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    info_text = info.stdout
    assert "AWS_SHARED_CREDENTIALS_FILE" in info_text  # the file's name only
    objects = run_objects(env, "two-nodes")
    assert any(p.endswith("spec.yaml") for p in objects)
    no_secret(
        env,
        submitted.stdout + submitted.stderr,
        logs.stdout + logs.stderr,
        listed.stdout + status.stdout + shown.stdout,
        ray_list.stdout + ray_list.stderr,
        info_text,
        *(blob.decode(errors="replace") for blob in objects.values()),
    )


def test_evaluate_and_predict_run_as_cluster_jobs(env: dict) -> None:
    """The model commands go through the Jobs API like submit: pre-flight here, again on
    the cluster, credentials shipped, progress and the result read back with --wait."""
    storage = ["--storage", env["storage"], "--pass-credentials", "--wait", "--json"]
    if not exists(resolve(env["storage"], env["endpoint"]).join("two-nodes", "model")):
        done = tlctl(env, "submit", str(write_spec(env, "two-nodes")), "--pass-credentials")
        assert done.returncode == 0 and wait_terminal(env, "tlctl-two-nodes-1")[-1] == "SUCCEEDED"
    evaluated = tlctl(
        env, "evaluate", "two-nodes", "--data", env["data"], "--name", "all", *storage
    )
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["n"] == 90 and sum(r["support"] for r in metrics["per_class"].values()) == 90
    assert "SUCCEEDED" in evaluated.stderr  # the follow's lines: on stderr with --json
    stored = resolve(env["storage"], env["endpoint"]).join("two-nodes", "eval", "all")
    assert json.loads(read_bytes(stored.join("metrics.json")))["top1"] == metrics["top1"]

    out = env["storage"].rsplit("/", 1)[0] + "/preds/two-nodes"
    predicted = tlctl(
        env, "predict", "two-nodes", "--input", env["data"], "--output", out, *storage
    )
    assert predicted.returncode == 0, predicted.stdout[-2000:] + predicted.stderr
    meta = json.loads(predicted.stdout)
    assert meta["rows"] == meta["images"] == 90 and meta["errors"] == 0
    assert "tlctl: predict: 90/90 images" in predicted.stderr
    # The same model on the same images: predict's top-1 is evaluate's, image by image.
    import pyarrow.parquet as pq

    evaluated_rows = pq.read_table(io.BytesIO(read_bytes(stored.join("predictions.parquet"))))
    outputs = resolve(out, env["endpoint"])
    parts = [n for n in list_dir(outputs) if n.endswith(".parquet")]
    rows = [
        r for n in parts for r in pq.read_table(io.BytesIO(read_bytes(outputs.join(n)))).to_pylist()
    ]
    by_path = {r["path"]: r["prediction"] for r in evaluated_rows.to_pylist()}
    assert len(rows) == 90 and all(
        by_path[r["path"].removeprefix("s3://")] == r["prediction"] for r in rows
    )
    assert not exists(outputs.join("_lease.json"))

    # A second predict into the same output: refused here, before anything is submitted.
    again = tlctl(env, "predict", "two-nodes", "--input", env["data"], "--output", out, *storage)
    assert (
        again.returncode == 2 and "--output:" in again.stderr and "exists already" in again.stderr
    )
    listed = {r["id"]: r for r in json.loads(tlctl(env, "jobs", "list", "--json").stdout)}
    kinds = [r["kind"] for r in listed.values() if r["run"] == "two-nodes"]
    assert "evaluate" in kinds and "predict" in kinds
    no_secret(env, evaluated.stdout, evaluated.stderr, predicted.stdout, predicted.stderr)


def test_wait_shows_progress_and_exits_with_the_jobs_outcome(env: dict) -> None:
    ok = tlctl(env, "submit", str(write_spec(env, "waited")), "--pass-credentials", "--wait")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr
    assert "RUNNING" in ok.stdout and "SUCCEEDED" in ok.stdout
    assert "epoch 2/2" in ok.stdout and "best val acc" in ok.stdout
    no_secret(env, ok.stdout + ok.stderr)

    # Fails on the cluster's side (it has no GPU for `auto` workers): exit 2, its reason.
    gpu = write_spec(env, "no-gpu", scaling__num_workers="auto", scaling__use_gpu=True)
    failed = tlctl(env, "submit", str(gpu), "--pass-credentials", "--wait")
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr
    assert "FAILED" in failed.stdout
    assert "scaling.num_workers: auto means one worker per GPU" in failed.stderr


def test_duplicate_submit_is_refused_and_stop_keeps_checkpoints(env: dict) -> None:
    spec = write_spec(env, "long", train__epochs=40)
    first = tlctl(env, "submit", str(spec), "--pass-credentials")
    assert first.returncode == 0, first.stderr
    job_id = "tlctl-long-1"
    run = resolve(env["storage"], env["endpoint"]).join("long")
    deadline = time.monotonic() + 300
    while not exists(run.join("checkpoints", "epoch-0000", "meta.json")):
        assert time.monotonic() < deadline, tlctl(env, "jobs", "logs", job_id).stdout[-3000:]
        assert job_status(env, job_id)["status"] not in TERMINAL
        time.sleep(1.0)

    # The cluster job's driver holds the run's lease, naming its Ray job.
    lease = json.loads(read_bytes(run.join("lease.json")))
    assert lease["job"] == f"Ray job {job_id}" and lease["renewed_at"] > time.time() - 120
    again = tlctl(env, "submit", str(spec), "--pass-credentials")
    assert again.returncode == 2
    # Refused by the run's lease (or the Jobs API's list of jobs), naming the job.
    assert f"Ray job {job_id}" in again.stderr or f"as job {job_id}" in again.stderr
    local = tlctl(env, "submit", str(spec), "--local")  # a local job on the same run
    assert local.returncode == 2 and f"Ray job {job_id}" in local.stderr, local.stderr

    follow = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "jobs", "logs", job_id, "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env["user"],
    )
    time.sleep(3.0)
    assert follow.poll() is None  # still tailing: the job runs
    stopped = tlctl(env, "jobs", "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id}: STOPPED"
    assert job_status(env, job_id)["status"] == "STOPPED"
    assert not exists(run.join("lease.json"))  # released by jobs stop
    followed, _ = follow.communicate(timeout=60)  # --follow ends with the job
    assert follow.returncode == 0 and "epoch 1/40" in followed

    # Every complete checkpoint loads. (A stop during an upload can leave a partial
    # directory behind; resume never uses it: Ray Train never registered it.)
    epochs = sorted(c for c in list_dir(run.join("checkpoints")) if c.startswith("epoch-"))
    assert epochs and len(epochs) < 40
    files = ("model.pt", "state.pt", "meta.json")
    complete = [e for e in epochs if all(exists(run.join("checkpoints", e, f)) for f in files)]
    assert complete
    for name in complete:
        state = torch.load(
            io.BytesIO(read_bytes(run.join("checkpoints", name, "model.pt"))), weights_only=True
        )
        assert "fc.weight" in state

    # The same spec again is attempt 2 and resumes from those checkpoints.
    last = max(int(e.split("-")[1]) for e in complete)
    resumed = tlctl(
        env,
        "submit",
        str(spec),
        "--pass-credentials",
        "--wait",
        "--set",
        f"train.epochs={last + 2}",
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert "tlctl-long-2" in resumed.stdout
    assert not exists(run.join("lease.json"))  # released when the job ended
    record = json.loads(
        tlctl(env, "runs", "show", "long", "--storage", env["storage"], "--json").stdout
    )
    assert [int(m["epoch"]) for m in record["metrics"]] == list(range(last + 2))
    assert any(e.get("event") == "resumed" for e in record["events"])


def test_cluster_errors_are_one_clear_line(env: dict, tmp_path: Path) -> None:
    unknown = tlctl(env, "jobs", "status", "tlctl-nope-1")
    assert unknown.returncode == 2
    assert "unknown job id 'tlctl-nope-1'" in unknown.stderr

    bad_token = tmp_path / "token"
    bad_token.write_text("not-the-token")
    wrong = tlctl(env, "jobs", "list", extra={"RAY_AUTH_TOKEN_PATH": str(bad_token)})
    assert wrong.returncode == 2
    assert "rejected the auth token" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "not-the-token" not in wrong.stderr

    no_token = {**env["user"], "HOME": str(tmp_path)}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        no_token.pop(name, None)
    missing = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "jobs", "list"],
        capture_output=True,
        text=True,
        env=no_token,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "requires an auth token and tlctl sent none" in missing.stderr

    # The token as a value, RAY_AUTH_MODE unset: tlctl turns token mode on, as `ray start` does.
    by_value = {**no_token, "RAY_AUTH_TOKEN": env["token"]}
    listed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "jobs", "list", "--json"],
        capture_output=True,
        text=True,
        env=by_value,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)

    down = tlctl(env, "jobs", "list", "--address", "http://127.0.0.1:9")
    assert down.returncode == 2 and "cannot reach the Ray cluster" in down.stderr
    spec = write_spec(env, "unreachable")
    refused = tlctl(
        env, "submit", str(spec), "--address", "http://127.0.0.1:9", "--connect-timeout", "3"
    )
    assert refused.returncode == 2 and "cannot reach the Ray cluster" in refused.stderr
    assert not exists(resolve(env["storage"], env["endpoint"]).join("unreachable"))


def test_cluster_status_and_env_of_the_running_cluster(env: dict) -> None:
    directory = env["cluster"].directory
    status = tlctl(env, "cluster", "status", "--dir", directory, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["running"] and info["nodes_alive_in_ray"] == 2
    assert [n["head"] for n in info["nodes"]] == [True, False]
    exported = tlctl(env, "cluster", "env", "--dir", directory)
    assert f"export RAY_ADDRESS={env['cluster'].dashboard_url}" in exported.stdout
    assert "RAY_AUTH_MODE=token" in exported.stdout
    assert env["token"] not in exported.stdout  # the token's path, not the token
    refused = tlctl(env, "cluster", "up", "--nodes", "2")
    assert refused.returncode == 2 and "--local" in refused.stderr
