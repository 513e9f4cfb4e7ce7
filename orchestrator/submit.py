"""`tlctl submit --address …`: pre-flight on the client, then submit through the Ray Jobs API.

The job carries its own code and spec: tlctl's `jobs` package travels as a runtime_env
py_module and the resolved spec in a small working_dir, and the entrypoint is the module
command `python -m jobs.entrypoint`. The submission id is `tlctl-<run>-<attempt>`, one
attempt per submission of the run, so a second submit of a run that is still active is
refused (and two racing submits collide on the same id instead of both running).

Credentials: by default nothing is passed (the nodes' IAM role or environment is used).
`pass_credentials` writes the client's resolved AWS key pair into the working_dir package
as an AWS shared-credentials file (see `jobs.credentials`): not in the entrypoint, the
metadata, the runtime_env's env_vars, the logs, the CLI output or the stored spec.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

import jobs
from jobs.credentials import CREDENTIALS_FILE, ENV_VAR, credentials_text
from jobs.errors import TlctlError
from jobs.run import Prepared
from orchestrator.jobs_api import api_errors, job_row, tlctl_jobs

ENTRYPOINT_MODULE = "jobs.entrypoint"
SPEC_FILE = "spec.yaml"
_ATTEMPT_RE = re.compile(r"-(\d+)$")


def tlctl_version() -> str:
    try:
        return version("tlctl")
    except PackageNotFoundError:
        return "dev"


def submission_id(run: str, attempt: int) -> str:
    return f"tlctl-{run}-{attempt}"


def next_attempt(existing: list, run: str) -> int:
    """1 + the highest attempt of this run's earlier submissions; refuse while one is active."""
    active = [j for j in existing if job_row(j)["status"] not in ("SUCCEEDED", "FAILED", "STOPPED")]
    if active:
        row = job_row(active[-1])
        raise TlctlError(
            f"run '{run}' is already {row['status']} on this cluster as job {row['id']}: "
            f"follow it with `tlctl jobs logs {row['id']} --follow`, or stop it with "
            f"`tlctl jobs stop {row['id']}` before submitting again"
        )
    attempts = [0]
    for job in existing:
        match = _ATTEMPT_RE.search(job.submission_id or "")
        if match and job.submission_id == submission_id(run, int(match.group(1))):
            attempts.append(int(match.group(1)))
    return max(attempts) + 1


def remote_path_errors(spec: dict[str, Any]) -> list[str]:
    """Local paths a remote cluster cannot read (valid there: s3:// URIs)."""
    fields = {
        "data.train": spec["data"]["train"],
        "data.val": spec["data"].get("val"),
        "storage.uri": spec["storage"]["uri"],
        "backbone.weights": spec["backbone"]["weights"],
    }
    return [
        f"{name}: '{value}' is a path on this machine, which a remote cluster cannot read "
        "(valid: an s3:// URI; for weights also imagenet or none)"
        for name, value in fields.items()
        if value and "://" not in value and value not in ("imagenet", "none")
    ]


def client_credentials() -> tuple[str, str, str | None]:
    """The key pair the client's AWS chain resolves (env, profile, SSO…), for shipping."""
    import boto3

    creds = boto3.Session().get_credentials()
    if creds is None:
        raise TlctlError(
            "--pass-credentials: no AWS credentials found on this machine (set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile), or drop the flag to use "
            "the cluster nodes' own credentials"
        )
    frozen = creds.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


def runtime_env(
    spec: dict[str, Any], workdir: Path, *, pass_credentials: bool, pip: list[str]
) -> dict[str, Any]:
    """The job's code (jobs package), resolved spec, env and pip needs; writes `workdir`."""
    (workdir / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    if pass_credentials:
        path = workdir / CREDENTIALS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credentials_text(*client_credentials()))
        env_vars[ENV_VAR] = CREDENTIALS_FILE  # a file name, relative to the working dir
    needs = list(pip)
    if (spec.get("search") or {}).get("search_alg") == "optuna" and not any(
        p.startswith("optuna") for p in needs
    ):
        needs.append("optuna>=3")
    env: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(Path(jobs.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": env_vars,
    }
    if needs:
        env["pip"] = needs
    return env


def entrypoint(submitted_at: float, verbose: bool) -> str:
    cmd = f"python -m {ENTRYPOINT_MODULE} --spec {SPEC_FILE} --submitted-at {submitted_at:.3f}"
    return cmd + (" --verbose" if verbose else "")


def submit_job(
    client,
    prepared: Prepared,
    *,
    submitted_at: float,
    pass_credentials: bool = False,
    pip: list[str] | None = None,
    driver_cpus: float = 0.0,
    driver_memory_mb: int = 0,
    verbose: bool = False,
) -> str:
    """Submit the prepared job; returns its submission id."""
    spec = prepared.spec
    run = spec["name"]
    attempt = next_attempt(tlctl_jobs(client, run), run)
    job_id = submission_id(run, attempt)
    metadata = {
        "tlctl": tlctl_version(),
        "run": run,
        "kind": "search" if spec.get("search") else "train",
        "run_uri": prepared.run.uri,
        "storage_endpoint": spec["storage"].get("endpoint") or "",
        "attempt": str(attempt),
    }
    if not verbose:  # "Uploading package gcs://…" lines: noise for a tlctl user
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="tlctl-job-"))
    try:
        env = runtime_env(spec, workdir, pass_credentials=pass_credentials, pip=pip or [])
        resources: dict[str, Any] = {}
        if driver_cpus > 0:
            resources["entrypoint_num_cpus"] = driver_cpus
        if driver_memory_mb > 0:
            resources["entrypoint_memory"] = driver_memory_mb * 1024 * 1024
        with api_errors(client.tlctl_address):
            try:
                client.submit_job(
                    entrypoint=entrypoint(submitted_at, verbose),
                    submission_id=job_id,
                    runtime_env=env,
                    metadata=metadata,
                    **resources,
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    raise TlctlError(
                        f"run '{run}' was just submitted by someone else as job {job_id}; "
                        f"follow it with `tlctl jobs logs {job_id} --follow`"
                    ) from None
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return job_id


def wait_for_job(
    client,
    job_id: str,
    prepared: Prepared,
    on_progress,
    on_status=None,
    *,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Poll the job's status and feed its metrics.jsonl (from storage) to `on_progress`
    until it ends; returns its final row."""
    from orchestrator.jobs_api import get_job

    feed = MetricsFeed(prepared)
    last_status = None
    while True:
        row = job_row(get_job(client, job_id))
        if row["status"] != last_status:
            last_status = row["status"]
            if on_status is not None:
                on_status(row)
        for item in feed.new_items():
            on_progress(item)
        if row["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            for item in feed.new_items():
                on_progress(item)
            return row
        time.sleep(poll_s)


class MetricsFeed:
    """New lines of a run's metrics.jsonl as progress items (the `--local` display's)."""

    def __init__(self, prepared: Prepared) -> None:
        self.loc = prepared.run.join("metrics.jsonl")
        self.search = bool(prepared.spec.get("search"))
        self.seen: set[tuple] = set()

    def new_items(self) -> list[dict[str, Any]]:
        from jobs.metrics import read_metrics

        try:
            lines = read_metrics(self.loc)
        except (OSError, TlctlError):
            return []  # storage hiccup: the next poll reads again
        items = []
        for m in lines:
            key = (m.get("kind"), m.get("event"), m.get("trial_id"), m.get("epoch"), m.get("time"))
            if key in self.seen:
                continue
            self.seen.add(key)
            item = self._item(m)
            if item is not None:
                items.append(item)
        return items

    def _item(self, m: dict[str, Any]) -> dict[str, Any] | None:
        kind = m.get("kind", "epoch")
        if self.search:
            if kind == "epoch":
                return {"search": True, **m, "status": "running"}
            event = str(m.get("event", ""))
            if event.startswith("trial_") and m.get("trial_id"):
                status = {"trial_started": "running"}.get(event, event.removeprefix("trial_"))
                return {"search": True, **m, "status": status}
            return None
        if kind == "epoch":
            return {"epoch_done": m.get("epoch"), **m}
        return None
