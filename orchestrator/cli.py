"""The `tlctl` command line (Typer): thin commands over keyword-only functions.

`TlctlError` is turned into a one-line message and an exit code here, and only here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from jobs.errors import TlctlError

app = typer.Typer(
    name="tlctl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune pretrained torchvision backbones data-parallel on Ray; stream checkpoints, "
    "metrics and models to S3.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: make synthetic ones for demos/tests.")
runs_app = typer.Typer(no_args_is_help=True, help="Runs recorded in storage (no Ray needed).")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")

F = TypeVar("F", bound=Callable[..., Any])

StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage", envvar="TLCTL_STORAGE", help="Runs root: s3://bucket/prefix or a local dir."
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        envvar=["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"],
        help="S3 endpoint URL (MinIO, SeaweedFS); omit for AWS.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Accept a search grid of more than 1,000 trials.")
]


def guarded(fn: F) -> F:
    """Turn TlctlError into `error: …` on stderr and its exit code; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlctlError as exc:
            from rich.markup import escape

            from orchestrator.display import err_console

            # Messages hold literal brackets ("[lo, hi]"): never read them as Rich markup.
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            from orchestrator.display import err_console

            err_console.print(
                "interrupted: submit the same spec again to resume from the last checkpoint"
            )
            # A hard exit: Ray may still be mid-call in the training thread, where a normal
            # interpreter exit (atexit ray.shutdown) can crash. Ray's processes share ours.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper  # type: ignore[return-value]


@app.command()
@guarded
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    local: Annotated[bool, typer.Option("--local", help="Run on an embedded local Ray.")] = False,
    address: Annotated[
        str | None,
        typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster dashboard address."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a spec field: key.path=value (repeatable)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")] = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Validate a job spec, pre-flight storage and data, then train (or resume)."""
    submitted_at = time.time()
    from orchestrator.spec import load_spec

    if not local:
        if address:
            raise TlctlError(
                "--address: cluster submission is not available in this tlctl "
                "version (valid: --local)"
            )
        raise TlctlError("no cluster given: pass --local to run on this machine")
    job = load_spec(spec, set_ or [], local=True, allow_large_grid=yes)
    from jobs.run import preflight
    from orchestrator.display import (
        QuietProgress,
        SearchProgress,
        TrainingProgress,
        console,
        print_summary,
        start_line,
    )
    from orchestrator.local import run_local

    prepared = preflight(job.model_dump())
    if not json_out:
        console.print(start_line(prepared), soft_wrap=True)
    if json_out:
        display: Any = QuietProgress()
    elif job.search is not None:
        display = SearchProgress(job.train.epochs, job.search.metric)
    else:
        display = TrainingProgress(job.train.epochs)
    with display as progress:
        summary = run_local(
            prepared, verbose=verbose, submitted_at=submitted_at, on_progress=progress.update
        )
    if json_out:
        typer.echo(json.dumps(summary, indent=1))
    else:
        print_summary(summary)


@app.command()
@guarded
def validate(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="key.path=value")] = None,
    preflight_: Annotated[
        bool, typer.Option("--preflight", help="Also check storage, data and weights for real.")
    ] = False,
    yes: YesOpt = False,
) -> None:
    """Check a job spec (and optionally storage/data/weights) without training."""
    from orchestrator.spec import load_spec

    job = load_spec(spec, set_ or [], allow_large_grid=yes)
    if preflight_:
        from jobs.run import preflight

        prepared = preflight(job.model_dump())
        typer.echo(
            f"ok: {job.name}: {prepared.plan.num_classes} classes, "
            f"{prepared.plan.train_rows} train images, storage {prepared.run.uri} writable"
        )
    else:
        typer.echo(f"ok: {job.name}")


@app.command("backbones")
@guarded
def list_backbones(json_out: JsonOpt = False) -> None:
    """Backbones in the registry and their number of freezable stages."""
    from jobs import backbones

    rows = [{"name": n, "stages": backbones.num_stages(n)} for n in backbones.backbone_names()]
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        typer.echo(f"{r['name']:<22} freeze_depth 0..{r['stages']}")


@data_app.command("synth")
@guarded
def data_synth(
    out: Annotated[str, typer.Argument(help="Output dir or s3://bucket/prefix.")],
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 6,
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    variant: Annotated[
        str, typer.Option(help="source | target: a backbone trained on source transfers to target.")
    ] = "source",
    endpoint: EndpointOpt = None,
) -> None:
    """Write a procedural ImageFolder dataset (no download needed)."""
    from jobs.storage import resolve
    from jobs.synth import synthesize

    if classes < 2 or per_class < 1 or not 8 <= size <= 1024:
        raise TlctlError("data synth: need --classes >= 2, --per-class >= 1, 8 <= --size <= 1024")
    loc = resolve(out, endpoint)
    info = synthesize(
        loc.fs,
        loc.path,
        variant=variant,
        classes=classes,
        per_class=per_class,
        size=size,
        seed=seed,
    )
    typer.echo(
        f"wrote {info['images']} images of {len(info['classes'])} classes "
        f"({', '.join(info['classes'])}) to {loc.uri}"
    )


@runs_app.command("list")
@guarded
def runs_list(storage: StorageOpt, endpoint: EndpointOpt = None, json_out: JsonOpt = False) -> None:
    """Runs under a storage root, newest first."""
    from orchestrator.display import print_runs
    from orchestrator.runs import list_runs

    records = sorted(list_runs(storage, endpoint), key=lambda r: r["updated_at"] or 0, reverse=True)
    if json_out:
        typer.echo(json.dumps(records, indent=1))
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
    from orchestrator.display import print_run
    from orchestrator.runs import show_run

    record = show_run(storage, endpoint, name)
    if json_out:
        typer.echo(json.dumps(record, indent=1, default=str))
    else:
        print_run(record)


@app.command()
@guarded
def report(
    name: Annotated[str, typer.Argument(help="Run name (a search run).")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output directory (default: report/<RUN>)."),
    ] = None,
) -> None:
    """Plots, trials.csv and a self-contained index.html of a hyperparameter search."""
    from orchestrator.report import build_report

    result = build_report(storage, endpoint, name, out or Path("report") / name)
    for path in result["files"]:
        typer.echo(path)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app()
    except TlctlError as exc:  # raised outside a command (should not happen)
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
