"""`tlctl jobs …` (jobs on a Ray cluster) and `tlctl cluster …` (a local multi-node cluster)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.errors import TlctlError
from orchestrator.cli_common import AddressOpt, JsonOpt, guarded

jobs_app = typer.Typer(
    no_args_is_help=True, help="tlctl jobs on a Ray cluster (Ray Jobs API): list, status, logs."
)
cluster_app = typer.Typer(
    no_args_is_help=True, help="A real multi-node Ray cluster (+ S3 server) on this machine."
)

JobIdArg = Annotated[str, typer.Argument(help="Job id (tlctl-<run>-<attempt>).")]
DirOpt = Annotated[
    Path,
    typer.Option("--dir", envvar="TLCTL_CLUSTER_DIR", help="Where the local cluster keeps state."),
]


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- jobs ----------------------------------------------------------------------------------


@jobs_app.command("list")
@guarded
def jobs_list(
    address: AddressOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run's jobs.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """tlctl's jobs on the cluster, newest first: id, run, status, start, duration."""
    from rich.table import Table

    from orchestrator.display import console
    from orchestrator.jobs_api import connect, job_row, tlctl_jobs

    rows = [job_row(j) for j in reversed(tlctl_jobs(connect(address), run))]
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        console.print("no tlctl jobs on this cluster")
        return
    table = Table()
    for col in ("job id", "run", "kind", "status", "start", "duration"):
        table.add_column(col, overflow="fold")  # ids are copied from here: never cut them
    for r in rows:
        table.add_row(
            r["id"],
            r["run"] or "-",
            r["kind"] or "-",
            r["status"],
            _when(r["start"]),
            _duration(r["duration_s"]),
        )
    console.print(table)


@jobs_app.command("status")
@guarded
def jobs_status(job_id: JobIdArg, address: AddressOpt = None, json_out: JsonOpt = False) -> None:
    """A job's status, times, exit code and its run's progress in storage."""
    from orchestrator.jobs_api import connect, get_job, job_row

    row = job_row(get_job(connect(address), job_id))
    row["progress"] = _run_progress(row)
    if json_out:
        typer.echo(json.dumps(row, indent=1, default=str))
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
    """Epochs done so far, from the run's metrics.jsonl (None if storage is not readable)."""
    if not row.get("run_uri"):
        return None
    try:
        from jobs.metrics import epoch_lines, read_metrics
        from jobs.storage import resolve

        run = resolve(row["run_uri"], row.get("storage_endpoint"))
        lines = epoch_lines(read_metrics(run.join("metrics.jsonl")))
    except (OSError, TlctlError):
        return None
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
    from orchestrator.jobs_api import connect, follow_logs, job_logs

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
    from orchestrator.jobs_api import connect, stop_job

    status = stop_job(connect(address), job_id, wait_s=wait_s)
    typer.echo(f"{job_id}: {status}")
    if status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        raise TlctlError(f"job {job_id} is still {status} after {wait_s:.0f} s", exit_code=1)


# --- cluster -------------------------------------------------------------------------------


def _require_local(local: bool) -> None:
    if not local:
        raise TlctlError(
            "--local: tlctl starts and stops only clusters on this machine; for KubeRay and "
            "the AWS cluster launcher use the configs in cluster/ (see cluster/README.md)"
        )


@cluster_app.command("up")
@guarded
def cluster_up(
    local: Annotated[bool, typer.Option("--local", help="A cluster on this machine.")] = False,
    nodes: Annotated[int, typer.Option("--nodes", help="Ray nodes (head included).")] = 2,
    cpus_per_node: Annotated[float, typer.Option("--cpus-per-node", help="Logical CPUs.")] = 2,
    s3: Annotated[
        bool, typer.Option("--s3/--no-s3", help="Also start a local SeaweedFS S3 server.")
    ] = True,
    dashboard_port: Annotated[
        int | None,
        typer.Option("--dashboard-port", help="Head's dashboard port (default 8265, or free)."),
    ] = None,
    directory: DirOpt = Path(".tlctl/cluster"),
) -> None:
    """Start a Ray head and N-1 worker nodes (token auth on) and a local S3 server."""
    _require_local(local)
    import time

    from cluster.local.raycluster import start_cluster

    started = time.monotonic()
    cluster = start_cluster(
        directory,
        nodes=nodes,
        cpus_per_node=cpus_per_node,
        with_s3=s3,
        dashboard_port=dashboard_port,
    )
    typer.echo(
        f"local Ray cluster up in {time.monotonic() - started:.0f} s: {nodes} node(s) × "
        f"{cpus_per_node:g} CPUs, dashboard {cluster.dashboard_url}, state in {cluster.directory}",
        err=True,
    )
    if cluster.s3_dir:
        typer.echo("S3 server up (bucket tlctl); its credentials are on the nodes", err=True)
    typer.echo(
        f'to use it: eval "$(tlctl cluster env --dir {shlex.quote(str(directory))})"', err=True
    )


@cluster_app.command("down")
@guarded
def cluster_down(directory: DirOpt = Path(".tlctl/cluster")) -> None:
    """Stop the local cluster's nodes (by pid) and its S3 server."""
    from cluster.local.raycluster import stop_cluster

    cluster = stop_cluster(directory)
    if cluster is None:
        typer.echo(f"no local cluster recorded in {directory.resolve()}", err=True)
        return
    typer.echo(f"stopped {len(cluster.nodes)} node(s) and their processes", err=True)


@cluster_app.command("status")
@guarded
def cluster_status_cmd(directory: DirOpt = Path(".tlctl/cluster"), json_out: JsonOpt = False):
    """Nodes (alive?), dashboard address, S3 endpoint."""
    from cluster.local.raycluster import cluster_status

    status = cluster_status(directory)
    if json_out:
        typer.echo(json.dumps(status, indent=1))
    elif not status.get("nodes"):
        typer.echo(f"no local cluster recorded in {status['directory']}")
    else:
        alive = sum(1 for n in status["nodes"] if n["alive"])
        typer.echo(
            f"{'running' if status['running'] else 'down'}: {alive}/{len(status['nodes'])} "
            f"node processes alive, {status['nodes_alive_in_ray']} nodes alive in Ray; "
            f"dashboard {status['dashboard']}"
        )
        for n in status["nodes"]:
            role = "head" if n["head"] else "worker"
            typer.echo(
                f"  node {n['index']} ({role}) pid {n['pid']} {n['cpus']:g} CPUs "
                f"{'alive' if n['alive'] else 'dead'}  log {n['log']}"
            )
        if status["s3"]:
            s3 = status["s3"]
            typer.echo(
                f"  S3 {s3['endpoint']} bucket {s3['bucket']} "
                f"{'running' if s3['running'] else 'down'}"
            )
    if not status["running"]:
        raise typer.Exit(1)


@cluster_app.command("env")
@guarded
def cluster_env(directory: DirOpt = Path(".tlctl/cluster")) -> None:
    """`export` lines for a shell: RAY_ADDRESS, the token's path, the S3 server's AWS_*."""
    from cluster.local.raycluster import read_cluster

    cluster = read_cluster(directory)
    if cluster is None:
        raise TlctlError(f"no local cluster recorded in {directory.resolve()} (tlctl cluster up)")
    for name, value in cluster.env().items():
        typer.echo(f"export {name}={shlex.quote(value)}")
