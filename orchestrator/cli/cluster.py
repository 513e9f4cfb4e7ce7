"""`tlctl cluster …`: a real multi-node Ray cluster (+ S3 server) on this machine."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from jobs.errors import TlctlError
from orchestrator.cli.common import JsonOpt, guarded

cluster_app = typer.Typer(
    no_args_is_help=True, help="A real multi-node Ray cluster (+ S3 server) on this machine."
)
DirOpt = Annotated[
    Path,
    typer.Option("--dir", envvar="TLCTL_CLUSTER_DIR", help="Where the local cluster keeps state."),
]


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
