"""The cluster target: pre-flight on the client, submit through the Ray Jobs API, follow.

The job carries its own code and spec: tlctl's `jobs` package travels as a runtime_env
py_module and the resolved spec in a small working_dir, and the entrypoint is the module
command `python -m jobs.entrypoint`. The submission id is `tlctl-<run>-<attempt>`, one
attempt per submission of the run, so a second submit of a run that is still active is
refused (and two racing submits collide on the same id instead of both running).

Credentials: by default nothing is passed (the nodes' IAM role or environment is used).
`pass_credentials` writes the client's resolved AWS key pair into the working_dir package
as an AWS shared-credentials file (see `jobs.storage.credentials`): not in the entrypoint,
the metadata, the runtime_env's env_vars, the logs, the CLI output or the stored spec.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jobs
from jobs.driver.cluster_job import ERROR_PREFIX, SUMMARY_PREFIX
from jobs.driver.preflight import Prepared, preflight
from jobs.errors import TlctlError
from jobs.models.task import TASK_FILE, ModelTask, PreparedTask
from jobs.redact import clip, redact_data
from jobs.spec.load import spec_yaml
from jobs.spec.model import JobSpec
from jobs.storage.credentials import CREDENTIALS_FILE, ENV_VAR, credentials_text
from jobs.storage.errors import StorageError
from jobs.storage.layout import RunLayout
from jobs.storage.location import is_remote_safe
from orchestrator import display
from orchestrator.targets.base import SubmitOptions
from orchestrator.targets.jobs_api import (
    DEFAULT_CONNECT_TIMEOUT_S,
    TERMINAL,
    Cluster,
    api_errors,
    cluster_address,
    connect,
    get_job,
    is_loopback,
    job_logs,
    job_row,
    submit,
    tlctl_jobs,
)

ENTRYPOINT_MODULE = "jobs.entrypoint"
TASK_MODULE = "jobs.models.task"
TRAINING_KINDS = ("train", "search")  # a run's jobs that write its checkpoints
SPEC_FILE = "job.yaml"  # the resolved spec, in the job's working dir
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


def remote_path_errors(spec: JobSpec) -> list[str]:
    """Paths a remote cluster cannot read: local paths and file:// URIs name files on this
    machine only (valid there: s3:// URIs)."""
    fields = {
        "data.train": spec.data.train,
        "data.val": spec.data.val,
        "storage.uri": spec.storage.uri,
        "backbone.weights": spec.backbone.weights,
    }
    return [
        f"{name}: {clip(value)} is a path on this machine, which a remote cluster cannot read "
        "(valid: an s3:// URI; for weights also imagenet or none)"
        for name, value in fields.items()
        if value and value not in ("imagenet", "none") and not is_remote_safe(value)
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
    spec: JobSpec, workdir: Path, *, pass_credentials: bool, pip: list[str]
) -> dict[str, Any]:
    """The job's code (jobs package), resolved spec, env and pip needs; writes `workdir`."""
    (workdir / SPEC_FILE).write_text(spec_yaml(spec))  # redacted, as every stored spec
    needs = list(pip)
    if (
        spec.search is not None
        and spec.search.search_alg == "optuna"
        and not any(p.startswith("optuna") for p in needs)
    ):
        needs.append("optuna>=3")
    return package_env(workdir, pass_credentials=pass_credentials, pip=needs)


def package_env(workdir: Path, *, pass_credentials: bool, pip: list[str]) -> dict[str, Any]:
    """Any tlctl job's runtime_env: the jobs package, `workdir` (already holding what the
    job reads) with the shipped credentials if asked for, the region, pip needs."""
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
    env: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(Path(jobs.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": env_vars,
    }
    if pip:
        env["pip"] = list(pip)
    return env


def entrypoint(submitted_at: float, verbose: bool) -> str:
    cmd = f"python -m {ENTRYPOINT_MODULE} --spec {SPEC_FILE} --submitted-at {submitted_at:.3f}"
    return cmd + (" --verbose" if verbose else "")


def submit_job(cluster: Cluster, prepared: Prepared, options: SubmitOptions) -> str:
    """Submit the prepared job; returns its submission id."""
    spec = prepared.spec
    run = spec.name
    training = [j for j in tlctl_jobs(cluster, run) if job_row(j)["kind"] in TRAINING_KINDS]
    attempt = next_attempt(training, run)
    job_id = submission_id(run, attempt)
    metadata = redact_data(  # the Jobs API shows metadata to anyone who can list jobs
        {
            "tlctl": tlctl_version(),
            "run": run,
            "kind": "search" if spec.search else "train",
            "run_uri": prepared.layout.uri,
            "storage_endpoint": spec.storage.endpoint or "",
            "attempt": str(attempt),
        }
    )
    _quiet_uploads(options.verbose)
    workdir = Path(tempfile.mkdtemp(prefix="tlctl-job-"))
    try:
        env = runtime_env(
            spec, workdir, pass_credentials=options.pass_credentials, pip=list(options.pip)
        )
        with api_errors(cluster.address):
            try:
                submit(  # waits out a head whose job agent is still starting
                    cluster,
                    entrypoint=entrypoint(options.submitted_at, options.verbose),
                    submission_id=job_id,
                    runtime_env=env,
                    metadata=metadata,
                    **_driver_resources(options),
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    raise TlctlError(
                        f"run '{run}' was just submitted by someone else as job {job_id}; "
                        f"follow it with `tlctl jobs logs {job_id} --follow`"
                    ) from exc
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return job_id


def _quiet_uploads(verbose: bool) -> None:
    if not verbose:  # "Uploading package gcs://…" lines: noise for a tlctl user
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _driver_resources(options: SubmitOptions) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if options.driver_cpus > 0:
        resources["entrypoint_num_cpus"] = options.driver_cpus
    if options.driver_memory_mb > 0:
        resources["entrypoint_memory"] = options.driver_memory_mb * 1024 * 1024
    return resources


class ClusterTarget:
    """Submit to a Ray cluster through its Jobs API; with `wait`, follow it to the end."""

    local = False

    def __init__(
        self, address: str | None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> None:
        self.address = cluster_address(address)
        self.connect_timeout_s = connect_timeout_s

    def submit(self, spec: JobSpec, options: SubmitOptions) -> int:
        """Validate and pre-flight from here, submit; the exit code (with `wait`: the job's)."""
        if not is_loopback(self.address):
            errors = remote_path_errors(spec)
            if errors:
                raise TlctlError("invalid job spec for a remote cluster:\n" + "\n".join(errors))
        # imagenet weights are downloaded (and checked) by the job on the cluster.
        prepared = preflight(spec, check_weights=spec.backbone.weights != "imagenet")
        if prepared.complete:
            display.already_complete(prepared, json_out=options.json_out)
            return 0
        cluster = connect(self.address, connect_timeout_s=self.connect_timeout_s)
        job_id = submit_job(cluster, prepared, options)
        if not options.wait:
            display.submitted(job_id, self.address, prepared, json_out=options.json_out)
            return 0
        return follow(cluster, job_id, prepared, json_out=options.json_out)


def follow(cluster: Cluster, job_id: str, prepared: Prepared, *, json_out: bool) -> int:
    """Follow a submitted job like --local shows a run; the exit code is the job's outcome."""
    if not json_out:
        display.console.print(
            f"job {job_id} submitted to {cluster.address}; following (Ctrl-C detaches)",
            markup=False,
        )

    def on_status(row: dict[str, Any]) -> None:
        if not json_out:
            display.console.print(f"job {job_id}: {row['status']}", markup=False)

    try:
        with display.progress_display(prepared.spec, json_out) as progress:
            row = wait_for_job(cluster, job_id, prepared, progress.update, on_status)
    except KeyboardInterrupt:
        display.err_console.print(
            f"detached: job {job_id} keeps running on the cluster "
            f"(tlctl jobs logs {job_id} --follow; tlctl jobs stop {job_id})"
        )
        return 130
    logs = job_logs(cluster, job_id)
    summary = _last_json(logs, SUMMARY_PREFIX)
    if json_out:
        display.emit_json({"job": row, "summary": summary})
    elif summary:
        display.print_summary(summary)
    return outcome(job_id, row, logs)


def outcome(job_id: str, row: dict[str, Any], logs: str) -> int:
    """An ended job's exit code (tlctl's own, from its entrypoint), its error line shown."""
    if row["status"] == "SUCCEEDED":
        return 0
    reason = _last_line(logs, ERROR_PREFIX) or row.get("message") or row["status"]
    display.err_console.print(f"[bold red]error:[/] job {job_id} {row['status']}: ", end="")
    display.err_console.print(reason, markup=False, soft_wrap=True)
    code = row.get("exit_code")
    if row["status"] == "STOPPED" or not isinstance(code, int) or code <= 0:
        return 1
    return code


def _last_line(text: str, prefix: str) -> str | None:
    lines = [ln[len(prefix) :] for ln in text.splitlines() if ln.startswith(prefix)]
    return lines[-1] if lines else None


def _last_json(text: str, prefix: str) -> dict[str, Any] | None:
    line = _last_line(text, prefix)
    try:
        return json.loads(line) if line else None
    except ValueError:
        return None


def wait_for_job(
    cluster: Cluster,
    job_id: str,
    prepared: Prepared,
    on_progress,
    on_status=None,
    *,
    poll_s: float = 2.0,
) -> dict[str, Any]:
    """Poll the job's status and feed its metrics.jsonl (from storage) to `on_progress`
    until it ends; returns its final row."""
    feed = MetricsFeed(prepared)

    def on_poll() -> None:
        for item in feed.new_items():
            on_progress(item)

    return poll_job(cluster, job_id, on_poll, on_status, poll_s=poll_s)


def poll_job(
    cluster: Cluster, job_id: str, on_poll, on_status=None, *, poll_s: float = 2.0
) -> dict[str, Any]:
    """Poll the job's status, calling `on_poll()` each time (once more at the end), until
    it ends; returns its final row."""
    last_status = None
    while True:
        row = job_row(get_job(cluster, job_id))
        if row["status"] != last_status:
            last_status = row["status"]
            if on_status is not None:
                on_status(row)
        on_poll()
        if row["status"] in TERMINAL:
            on_poll()
            return row
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------
# evaluate and predict as cluster jobs (jobs.models.task).


def check_task_paths(task: ModelTask, address: str) -> None:
    """Exit 2 when a remote cluster is asked to read or write paths on this machine."""
    if not is_loopback(address):
        errors = task.remote_path_errors()
        if errors:
            raise TlctlError("; ".join(errors))  # each names its flag: one line


def submit_task(cluster: Cluster, prepared: PreparedTask, options: SubmitOptions) -> str:
    """Submit a pre-flighted evaluate/predict; returns its submission id."""
    task = prepared.task
    run = prepared.ref.layout.name
    job_id = f"tlctl-{task.command}-{run}-{uuid.uuid4().hex[:8]}"
    metadata = redact_data(
        {
            "tlctl": tlctl_version(),
            "run": run,
            "kind": task.command,
            "run_uri": prepared.ref.layout.uri,
            "model_ref": prepared.ref.text,
            "output_uri": prepared.output_uri,
            "storage_endpoint": task.endpoint or "",
        }
    )
    _quiet_uploads(options.verbose)
    workdir = Path(tempfile.mkdtemp(prefix="tlctl-job-"))
    try:
        (workdir / TASK_FILE).write_text(task.to_json())
        env = package_env(workdir, pass_credentials=options.pass_credentials, pip=list(options.pip))
        command = f"python -m {TASK_MODULE} --request {TASK_FILE}"
        with api_errors(cluster.address):
            submit(
                cluster,
                entrypoint=command + (" --verbose" if options.verbose else ""),
                submission_id=job_id,
                runtime_env=env,
                metadata=metadata,
                **_driver_resources(options),
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return job_id


def follow_task(
    cluster: Cluster, job_id: str, *, json_out: bool
) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    """Follow an evaluate/predict job, showing its `tlctl:` progress lines (on stderr with
    --json); returns (exit code, the job's row, its result)."""
    shown = [0]

    def say(line: str) -> None:
        (display.err_console if json_out else display.console).print(line, markup=False)

    def on_poll() -> None:
        lines = [ln for ln in job_logs(cluster, job_id).splitlines() if ln.startswith("tlctl: ")]
        for line in lines[shown[0] :]:
            say(line)
        shown[0] = max(shown[0], len(lines))

    say(f"job {job_id} submitted to {cluster.address}; following (Ctrl-C detaches)")
    try:
        row = poll_job(cluster, job_id, on_poll, lambda r: say(f"job {job_id}: {r['status']}"))
    except KeyboardInterrupt:
        display.err_console.print(
            f"detached: job {job_id} keeps running on the cluster "
            f"(tlctl jobs logs {job_id} --follow; tlctl jobs stop {job_id})"
        )
        return 130, {}, None
    logs = job_logs(cluster, job_id)
    return outcome(job_id, row, logs), row, _last_json(logs, SUMMARY_PREFIX)


class MetricsFeed:
    """New lines of a run's metrics.jsonl as progress items (the `--local` display's).

    Storage that fails for a moment (a transient error) is read again at the next poll, with
    one warning; storage that keeps failing for `give_up_s`, or fails in a way a retry
    cannot fix, ends the follow with its error (the job itself goes on).
    """

    def __init__(self, prepared: Prepared, *, give_up_s: float = 300.0) -> None:
        self.layout: RunLayout = prepared.layout
        self.search = prepared.spec.search is not None
        self.seen: set[tuple] = set()
        self.ended: dict[str, str] = {}  # trial id -> its end status
        self.give_up_s = give_up_s
        self._failing_since: float | None = None

    def new_items(self) -> list[dict[str, Any]]:
        try:
            lines = self.layout.read_log()
        except StorageError as exc:
            if not exc.transient:
                raise
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                display.err_console.print(
                    f"warning: cannot read the run's progress ({exc}); retrying", markup=False
                )
            elif now - self._failing_since > self.give_up_s:
                raise
            return []
        self._failing_since = None
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
            if kind == "epoch":  # merged after the trial's end: it stays ended
                return {"search": True, **m, "status": self.ended.get(m.get("trial_id"), "running")}
            event = str(m.get("event", ""))
            if event.startswith("trial_") and m.get("trial_id"):
                status = {"trial_started": "running"}.get(event, event.removeprefix("trial_"))
                if status != "running":
                    self.ended[m["trial_id"]] = status
                return {"search": True, **m, "status": status}
            return None
        if kind == "epoch":
            return {"epoch_done": m.get("epoch"), **m}
        return None
