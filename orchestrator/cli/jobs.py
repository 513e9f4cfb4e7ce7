"""`tlctl jobs …`: tlctl's jobs on a Ray cluster, through the Ray Jobs API."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Annotated, Any

import typer

from jobs.errors import TlctlError
from orchestrator.cli.common import AddressOpt, JsonOpt, guarded

jobs_app = typer.Typer(
    no_args_is_help=True, help="tlctl jobs on a Ray cluster (Ray Jobs API): list, status, logs."
)

JobIdArg = Annotated[str, typer.Argument(help="Job id (tlctl-<run>-<attempt>).")]


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@jobs_app.command("list")
@guarded
def jobs_list(
    address: AddressOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run's jobs.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """tlctl's jobs on the cluster, newest first: id, run, status, start, duration."""
    from rich.markup import escape
    from rich.table import Table

    from orchestrator.display import console, emit_json, show
    from orchestrator.targets.jobs_api import connect, job_row, tlctl_jobs

    rows = [job_row(j) for j in reversed(tlctl_jobs(connect(address), run))]
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print("no tlctl jobs on this cluster")
        return
    table = Table()
    for col in ("job id", "run", "kind", "status", "start", "duration"):
        table.add_column(col, overflow="fold")  # ids are copied from here: never cut them
    for r in rows:
        table.add_row(
            escape(r["id"]),
            escape(r["run"] or "-"),
            escape(r["kind"] or "-"),
            escape(r["status"]),
            _when(r["start"]),
            _duration(r["duration_s"]),
        )
    show(table)


@jobs_app.command("status")
@guarded
def jobs_status(job_id: JobIdArg, address: AddressOpt = None, json_out: JsonOpt = False) -> None:
    """A job's status, times, exit code and its run's progress in storage."""
    from orchestrator.display import emit_json
    from orchestrator.targets.jobs_api import connect, get_job, job_row

    row = job_row(get_job(connect(address), job_id))
    row["progress"] = _run_progress(row)
    if json_out:
        emit_json(row)
        return
    from orchestrator.display import console

    lines = [
        f"job       {row['id']}",
        f"run       {row['run']} ({row['kind']}) → {row['run_uri']}",
        f"status    {row['status']}"
        + (f" (exit code {row['exit_code']})" if row["exit_code"] is not None else ""),
        f"started   {_when(row['start'])}   duration {_duration(row['duration_s'])}",
    ]
    if row["message"]:
        lines.append(f"message   {row['message']}")
    progress = row["progress"]
    if progress:
        lines.append(f"progress  {progress}")
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)


def _run_progress(row: dict[str, Any]) -> str | None:
    """Epochs done so far, from the run's metrics.jsonl."""
    if not row.get("run_uri"):
        return None
    from jobs.storage.layout import RunLayout, epoch_lines

    try:
        lines = epoch_lines(RunLayout.at(row["run_uri"], row.get("storage_endpoint")).read_log())
    except (OSError, TlctlError) as exc:  # storage this client cannot read: say so
        return f"unknown (cannot read the run's metrics: {exc})"
    if not lines:
        return "no epoch finished yet"
    last = lines[-1]
    acc = last.get("val_acc")
    where = f" (trial {last['trial_id']})" if last.get("trial_id") else ""
    return f"{len(lines)} epoch(s) recorded; last: epoch {int(last.get('epoch', 0)) + 1}{where}" + (
        f", val acc {100 * acc:.1f}%" if isinstance(acc, (int, float)) else ""
    )


@jobs_app.command("logs")
@guarded
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """The job's driver output (one line per epoch, errors, the final summary)."""
    from orchestrator.targets.jobs_api import connect, follow_logs, job_logs

    client = connect(address)
    if follow:
        follow_logs(client, job_id, sys.stdout)
    else:
        sys.stdout.write(job_logs(client, job_id))


@jobs_app.command("stop")
@guarded
def jobs_stop(
    job_id: JobIdArg,
    address: AddressOpt = None,
    wait_s: Annotated[float, typer.Option("--wait-s", help="Seconds to wait for it.")] = 60.0,
) -> None:
    """Stop a job; its checkpoints stay in storage (submit the same spec again to resume)."""
    from orchestrator.targets.jobs_api import connect, get_job, job_row, stop_job

    cluster = connect(address)
    status = stop_job(cluster, job_id, wait_s=wait_s)
    typer.echo(f"{job_id}: {status}")
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise TlctlError(f"job {job_id} is still {status} after {wait_s:.0f} s", exit_code=1)
    _free_run(job_row(get_job(cluster, job_id)), job_id)


def _free_run(row: dict[str, Any], job_id: str) -> None:
    """The stopped job's driver was killed holding its run's lease: release it, so the same
    spec can be submitted again at once (not after the lease's TTL)."""
    from jobs.storage.layout import RunLayout
    from jobs.storage.lease import release_for
    from jobs.storage.location import resolve

    if not row.get("run_uri"):
        return
    try:
        run = RunLayout(resolve(row["run_uri"], row.get("storage_endpoint") or None))
        release_for(run.lease, f"Ray job {job_id}")
    except (TlctlError, OSError) as exc:  # the lease then expires by itself
        typer.echo(f"note: the run's lease stays until it expires ({exc})", err=True)
