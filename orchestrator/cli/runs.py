"""`tlctl runs list|show` and `tlctl report`: what storage says about runs (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import EndpointOpt, JsonOpt, StorageOpt, guarded

runs_app = typer.Typer(no_args_is_help=True, help="Runs recorded in storage (no Ray needed).")


@runs_app.command("list")
@guarded
def runs_list(storage: StorageOpt, endpoint: EndpointOpt = None, json_out: JsonOpt = False) -> None:
    """Runs under a storage root, newest first."""
    from orchestrator.display import emit_json, print_runs
    from orchestrator.runs import list_runs

    records = sorted(list_runs(storage, endpoint), key=lambda r: r["updated_at"] or 0, reverse=True)
    if json_out:
        emit_json(records)
    else:
        print_runs(records)


@runs_app.command("show")
@guarded
def runs_show(
    name: Annotated[str, typer.Argument(help="Run name.")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Per-epoch metrics, best checkpoint and model URI of one run."""
    from orchestrator.display import emit_json, print_run
    from orchestrator.runs import show_run

    record = show_run(storage, endpoint, name)
    if json_out:
        emit_json(record)
    else:
        print_run(record)


@guarded
def report(
    name: Annotated[str, typer.Argument(help="Run name (a plain run or a search).")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (default: report/<RUN>)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Plots, a CSV and a self-contained index.html of a run: a plain run's curves,
    throughput and restarts, or a search's trials compared. Prints the files written."""
    from orchestrator.display import emit_json
    from orchestrator.report import build_report

    result = build_report(storage, endpoint, name, out or Path("report") / name)
    if json_out:
        emit_json(result)
        return
    for path in result["files"]:
        typer.echo(path)
