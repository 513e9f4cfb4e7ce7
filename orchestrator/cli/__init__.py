"""The `tlctl` command line (Typer): thin commands over keyword-only functions, one module
per command group.

`TlctlError` is turned into a one-line message and an exit code here (cli.common.guarded),
and only here.
"""

from __future__ import annotations

import sys

import typer

from jobs.driver.settings import apply_process_settings
from jobs.errors import TlctlError
from orchestrator.cli.cluster import cluster_app
from orchestrator.cli.data import data_app, list_backbones
from orchestrator.cli.evaluate import evaluate, predict
from orchestrator.cli.export import export
from orchestrator.cli.jobs import jobs_app
from orchestrator.cli.models import models_app
from orchestrator.cli.runs import report, runs_app
from orchestrator.cli.train import resume, submit, validate

app = typer.Typer(
    name="tlctl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune pretrained torchvision backbones data-parallel on Ray; stream checkpoints, "
    "metrics and models to S3.",
)


@app.callback()
def _settings() -> None:
    """Ray's and Tune's process settings, before any command can start Ray."""
    apply_process_settings()


app.command()(submit)
app.command()(resume)
app.command()(validate)
app.command("backbones")(list_backbones)
app.command()(report)
app.command()(evaluate)
app.command()(predict)
app.command()(export)
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")
app.add_typer(models_app, name="models")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except TlctlError as exc:  # raised outside a command (should not happen)
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
