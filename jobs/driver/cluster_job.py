"""A tlctl job's driver on a Ray cluster (`python -m jobs.entrypoint --spec spec.yaml`).

`tlctl submit --address …` ships this package and the resolved spec (`tlctl validate SPEC
--resolved`) through the Ray Jobs API and runs this module as the job's entrypoint; a
KubeRay RayJob runs it the same way. It connects to the cluster it runs on, resolves
`scaling.num_workers: auto` against the cluster's GPUs, pre-flights storage and data from
the cluster's side, then trains (or searches) and prints one plain line per epoch (the job's
logs) and a final `tlctl-summary {json}` line that `tlctl submit --wait` reads back.

Exit codes are tlctl's: 0 success, 1 the job failed, 2 invalid input; errors are one
`error: …` line on stderr, never a Ray traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from jobs.driver.progress import progress_line
from jobs.driver.settings import apply_process_settings
from jobs.errors import TlctlError
from jobs.spec.load import load_resolved_spec

SUMMARY_PREFIX = "tlctl-summary "
ERROR_PREFIX = "error: "
INTERRUPTED = 130


def _stay_in(workdir: str) -> None:
    """Ray may re-extract the job's working dir while the driver connects (seen with
    py_modules): step back into the fresh copy so relative paths keep working."""
    try:
        os.getcwd()
    except FileNotFoundError:
        if os.path.isdir(workdir):
            os.chdir(workdir)


def connect_ray(verbose: bool) -> None:
    """Join the cluster this job runs on, Ray's own logs only with `verbose`."""
    import ray

    from jobs.driver.drive import quiet_ray

    workdir = os.getcwd()
    ray.init(log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")
    _stay_in(workdir)
    quiet_ray(verbose)


def run(spec_path: str, submitted_at: float | None, verbose: bool) -> dict[str, Any]:
    """Connect to this cluster, pre-flight, drive the job; returns the summary."""
    import ray

    from jobs.driver.drive import drive
    from jobs.driver.preflight import preflight
    from jobs.driver.scaling import INGEST_CPUS, resolve_num_workers
    from jobs.storage.credentials import load_into_environment

    spec = load_resolved_spec(spec_path)
    load_into_environment()  # --pass-credentials: read before Ray touches the working dir
    connect_ray(verbose)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    spec = resolve_num_workers(spec, gpus=gpus, where="the cluster")
    prepared = preflight(spec)
    verb = "resuming" if prepared.resuming else "starting"
    print(
        f"tlctl: {verb} {spec.name}: {spec.backbone.name}, "
        f"{prepared.plan.num_classes} classes, {prepared.plan.train_rows} train images, "
        f"{spec.scaling.workers} workers ({spec.scaling.placement}) → {prepared.layout.uri}",
        flush=True,
    )
    epochs = spec.train.epochs

    def on_progress(item: dict[str, Any]) -> None:
        line = progress_line(item, epochs)
        if line:
            print(line, flush=True)

    return drive(
        prepared,
        on_progress=on_progress,
        submitted_at=submitted_at,
        ingest_cpus=INGEST_CPUS,
        job=job_name(),
    )


def job_name() -> str:
    """This job as the run's lease names it: `Ray job <submission id>` under the Jobs API
    (its job supervisor passes the job's metadata in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        submission = (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        submission = None
    return f"Ray job {submission}" if submission else "a cluster job (python -m jobs.entrypoint)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.entrypoint", description=__doc__)
    parser.add_argument("--spec", required=True, help="resolved job spec YAML")
    parser.add_argument("--submitted-at", type=float, default=None, help="client's submit time")
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs too")
    args = parser.parse_args(argv)
    return report(lambda: run(args.spec, args.submitted_at, args.verbose))


def report(work: Callable[[], dict[str, Any]]) -> int:
    """Run a cluster job's `work`: its summary as the last line, or one `error: …` line;
    the exit code tlctl's."""
    apply_process_settings()
    try:
        summary = work()
    except TlctlError as exc:
        print(ERROR_PREFIX + exc.message, file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(ERROR_PREFIX + "interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as exc:  # the traceback for the logs, one line for tlctl
        import traceback

        traceback.print_exc()
        print(f"{ERROR_PREFIX}job failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    summary["finished_at"] = time.time()
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0


def exit_after(code: int) -> None:
    """Hard exit: after Ctrl-C a normal interpreter exit can crash in Ray's atexit while the
    training thread is still inside Ray calls; the cluster cleans up the job's actors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
