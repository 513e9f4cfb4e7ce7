"""`python -m jobs.entrypoint --spec spec.yaml`: a tlctl job's driver on a Ray cluster.

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
from typing import Any

import yaml

from jobs.errors import TlctlError

SUMMARY_PREFIX = "tlctl-summary "
ERROR_PREFIX = "error: "
REQUIRED_SECTIONS = ("name", "backbone", "head", "data", "train", "scaling", "storage")


def load_resolved_spec(path: str) -> dict[str, Any]:
    """The resolved spec file; a hand-written (unresolved) one is refused with the fix."""
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except OSError as exc:
        raise TlctlError(f"{path}: cannot read the job spec ({exc.strerror})") from None
    except yaml.YAMLError:
        raise TlctlError(f"{path}: not valid YAML") from None
    missing = [k for k in REQUIRED_SECTIONS if not isinstance(spec, dict) or k not in spec]
    checkpoint = (spec or {}).get("checkpoint") if isinstance(spec, dict) else None
    if missing or not isinstance(checkpoint, dict) or checkpoint.get("mode") is None:
        raise TlctlError(
            f"{path}: not a resolved tlctl spec (missing: {', '.join(missing) or 'defaults'}); "
            "make one with `tlctl validate SPEC --resolved > spec.yaml`"
        )
    return spec


def progress_line(item: dict[str, Any], epochs: int) -> str | None:
    """One log line per finished epoch (plain runs) or trial epoch/status (searches)."""

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"

    def num(v: Any, fmt: str = ".4f") -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    if item.get("search"):
        trial = item.get("trial_id", "?")
        if "epoch" in item:
            return (
                f"trial {trial} epoch {int(item['epoch']) + 1}/{epochs}  "
                f"train acc {pct(item.get('train_acc'))}  val loss {num(item.get('val_loss'))} "
                f"acc {pct(item.get('val_acc'))}"
            )
        return f"trial {trial} {item.get('status', '')}".rstrip()
    if "epoch_done" not in item:
        return None
    return (
        f"epoch {int(item['epoch']) + 1}/{epochs}  train loss {num(item.get('train_loss'))} "
        f"acc {pct(item.get('train_acc'))}  val loss {num(item.get('val_loss'))} acc "
        f"{pct(item.get('val_acc'))}  {num(item.get('images_per_s'), '.0f')} img/s  "
        f"{num(item.get('epoch_time_s'), '.1f')} s"
    )


def _stay_in(workdir: str) -> None:
    """Ray may re-extract the job's working dir while the driver connects (seen with
    py_modules): step back into the fresh copy so relative paths keep working."""
    try:
        os.getcwd()
    except FileNotFoundError:
        if os.path.isdir(workdir):
            os.chdir(workdir)


def run(spec_path: str, submitted_at: float | None, verbose: bool) -> dict[str, Any]:
    """Connect to this cluster, pre-flight, drive the job; returns the summary."""
    import ray

    from jobs.credentials import load_into_environment
    from jobs.driver import INGEST_CPUS, drive, quiet_ray_data, quiet_ray_logs
    from jobs.run import preflight
    from jobs.scaling import resolve_num_workers

    spec = load_resolved_spec(spec_path)
    load_into_environment()  # --pass-credentials: read before Ray touches the working dir
    workdir = os.getcwd()
    ray.init(log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")
    _stay_in(workdir)
    if not verbose:
        quiet_ray_logs()
    quiet_ray_data(verbose)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    spec = resolve_num_workers(spec, gpus=gpus, where="the cluster")
    prepared = preflight(spec)
    verb = "resuming" if prepared.resuming else "starting"
    print(
        f"tlctl: {verb} {spec['name']}: {spec['backbone']['name']}, "
        f"{prepared.plan.num_classes} classes, {prepared.plan.train_rows} train images, "
        f"{spec['scaling']['num_workers']} workers ({spec['scaling'].get('placement', 'pack')})"
        f" → {prepared.run.uri}",
        flush=True,
    )
    epochs = int(spec["train"]["epochs"])

    def on_progress(item: dict[str, Any]) -> None:
        line = progress_line(item, epochs)
        if line:
            print(line, flush=True)

    return drive(
        prepared,
        on_progress=on_progress,
        submitted_at=submitted_at,
        ingest_cpus=INGEST_CPUS,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.entrypoint", description=__doc__)
    parser.add_argument("--spec", required=True, help="resolved job spec YAML")
    parser.add_argument("--submitted-at", type=float, default=None, help="client's submit time")
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs too")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        summary = run(args.spec, args.submitted_at, args.verbose)
    except TlctlError as exc:
        print(ERROR_PREFIX + exc.message, file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(ERROR_PREFIX + "interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the traceback for the logs, one line for tlctl
        import traceback

        traceback.print_exc()
        print(f"{ERROR_PREFIX}job failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    summary["finished_at"] = time.time()
    print(SUMMARY_PREFIX + json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Hard exit: after Ctrl-C a normal interpreter exit can crash in Ray's atexit while the
    # training thread is still inside Ray calls; the cluster cleans up the job's actors.
    os._exit(code)
