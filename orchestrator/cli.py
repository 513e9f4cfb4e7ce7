"""The `tlctl` command line (Typer): thin commands over keyword-only functions.

`TlctlError` is turned into a one-line message and an exit code here, and only here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.errors import TlctlError
from orchestrator.cli_cluster import cluster_app, jobs_app
from orchestrator.cli_common import (
    AddressOpt,
    EndpointOpt,
    JsonOpt,
    StorageOpt,
    YesOpt,
    guarded,
)

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
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")


@app.command()
@guarded
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    local: Annotated[bool, typer.Option("--local", help="Run on an embedded local Ray.")] = False,
    address: AddressOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Cluster: show progress until the job ends.")
    ] = False,
    pass_credentials: Annotated[
        bool,
        typer.Option(
            "--pass-credentials",
            help="Cluster: ship this machine's AWS key pair to the job (dev clusters).",
        ),
    ] = False,
    pip: Annotated[
        list[str] | None,
        typer.Option("--pip", help="Cluster: extra pip requirement for the job (repeatable)."),
    ] = None,
    driver_cpus: Annotated[
        float,
        typer.Option(
            "--driver-cpus",
            help="Cluster: CPUs reserved for the job's driver (0: it runs on the head node).",
        ),
    ] = 0.0,
    driver_memory_mb: Annotated[
        int, typer.Option("--driver-memory-mb", help="Cluster: memory reserved for the driver.")
    ] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a spec field: key.path=value (repeatable)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")] = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Validate, pre-flight, then train or resume: --local here, or on a Ray cluster (--address)."""
    submitted_at = time.time()
    if local and address and "RAY_ADDRESS" not in os.environ:
        raise TlctlError("--local and --address: choose one (this machine, or a cluster)")
    if not local:
        code = _submit_to_cluster(
            spec,
            address=address,
            overrides=set_ or [],
            wait=wait,
            pass_credentials=pass_credentials,
            pip=pip or [],
            driver_cpus=driver_cpus,
            driver_memory_mb=driver_memory_mb,
            verbose=verbose,
            yes=yes,
            json_out=json_out,
            submitted_at=submitted_at,
        )
        raise typer.Exit(code)
    job = load_spec_cli(spec, set_ or [], local=True, yes=yes)
    from jobs.run import preflight
    from jobs.scaling import resolve_num_workers
    from orchestrator.display import console, print_summary, start_line
    from orchestrator.local import _gpu_count, run_local

    raw = job.model_dump()
    gpus = _gpu_count() if raw["scaling"]["use_gpu"] else 0
    prepared = preflight(resolve_num_workers(raw, gpus=gpus, where="this machine"))
    if not json_out:
        console.print(start_line(prepared), soft_wrap=True)
    with _progress_display(prepared.spec, json_out) as progress:
        summary = run_local(
            prepared, verbose=verbose, submitted_at=submitted_at, on_progress=progress.update
        )
    if json_out:
        typer.echo(json.dumps(summary, indent=1))
    else:
        print_summary(summary)


@app.command()
@guarded
def resume(
    name: Annotated[str, typer.Argument(help="Run name.")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Run on an embedded local Ray.")] = False,
    address: AddressOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Cluster: show progress until the job ends.")
    ] = False,
    pass_credentials: Annotated[
        bool,
        typer.Option("--pass-credentials", help="Cluster: ship this machine's AWS key pair."),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Resume a run from its stored spec alone (after a lost driver or a Ctrl-C).

    Same as submitting that spec again: training goes on from the newest verified checkpoint."""
    import tempfile

    from jobs.storage import exists, read_text, resolve

    root = resolve(storage, endpoint)
    stored = root.join(name, "spec.yaml")
    if not exists(stored):
        raise TlctlError(
            f"run '{name}' has no stored spec at {stored.uri} (`tlctl runs list` shows the runs)"
        )
    with tempfile.TemporaryDirectory(prefix="tlctl-resume-") as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(read_text(stored))
        submit(
            spec=path,
            local=local,
            address=address,
            wait=wait,
            pass_credentials=pass_credentials,
            pip=None,
            driver_cpus=0.0,
            driver_memory_mb=0,
            set_=None,
            verbose=verbose,
            yes=True,  # the stored spec was accepted once already
            json_out=json_out,
        )


def load_spec_cli(spec: Path, overrides: list[str], *, local: bool, yes: bool):
    from orchestrator.spec import load_spec

    return load_spec(spec, overrides, local=local, allow_large_grid=yes)


def _progress_display(spec: dict[str, Any], json_out: bool) -> Any:
    from orchestrator.display import QuietProgress, SearchProgress, TrainingProgress

    if json_out:
        return QuietProgress()
    if spec.get("search"):
        return SearchProgress(int(spec["train"]["epochs"]), spec["search"]["metric"])
    return TrainingProgress(int(spec["train"]["epochs"]))


def _submit_to_cluster(
    spec_path: Path,
    *,
    address: str | None,
    overrides: list[str],
    wait: bool,
    pass_credentials: bool,
    pip: list[str],
    driver_cpus: float,
    driver_memory_mb: int,
    verbose: bool,
    yes: bool,
    json_out: bool,
    submitted_at: float,
) -> int:
    """Validate, pre-flight from here, submit; with --wait follow to the end (exit = outcome)."""
    from jobs.run import preflight
    from orchestrator.display import console
    from orchestrator.jobs_api import cluster_address, connect, is_loopback
    from orchestrator.submit import remote_path_errors, submit_job

    url = cluster_address(address)
    job = load_spec_cli(spec_path, overrides, local=False, yes=yes)
    spec = job.model_dump()
    if not is_loopback(url):
        errors = remote_path_errors(spec)
        if errors:
            raise TlctlError("invalid job spec for a remote cluster:\n" + "\n".join(errors))
    # imagenet weights are downloaded (and checked) by the job on the cluster.
    prepared = preflight(spec, check_weights=spec["backbone"]["weights"] != "imagenet")
    if prepared.complete:
        if json_out:
            typer.echo(json.dumps({"run": spec["name"], "already_complete": True}))
        else:
            console.print(
                f"run {spec['name']} is already complete at {prepared.run.uri}: nothing "
                "submitted (choose a new name to train again)"
            )
        return 0
    client = connect(url)
    job_id = submit_job(
        client,
        prepared,
        submitted_at=submitted_at,
        pass_credentials=pass_credentials,
        pip=pip,
        driver_cpus=driver_cpus,
        driver_memory_mb=driver_memory_mb,
        verbose=verbose,
    )
    if not wait:
        if json_out:
            typer.echo(json.dumps({"job_id": job_id, "address": url, "run": spec["name"]}))
        else:
            verb = "resumes" if prepared.resuming else "starts"
            console.print(
                f"submitted job [bold]{job_id}[/] to {url}: run {spec['name']} {verb} → "
                f"{prepared.run.uri}\n  follow: tlctl jobs logs {job_id} --follow   "
                f"status: tlctl jobs status {job_id}   stop: tlctl jobs stop {job_id}",
                soft_wrap=True,
            )
        return 0
    return _wait(client, job_id, prepared, json_out=json_out, url=url)


def _wait(client, job_id: str, prepared, *, json_out: bool, url: str) -> int:
    """Follow a submitted job like --local shows a run; the exit code is the job's outcome."""
    from jobs.entrypoint import ERROR_PREFIX, SUMMARY_PREFIX
    from orchestrator.display import console, err_console, print_summary
    from orchestrator.jobs_api import job_logs
    from orchestrator.submit import wait_for_job

    if not json_out:
        console.print(f"job [bold]{job_id}[/] submitted to {url}; following (Ctrl-C detaches)")

    def on_status(row: dict[str, Any]) -> None:
        if not json_out:
            console.print(f"job {job_id}: {row['status']}")

    try:
        with _progress_display(prepared.spec, json_out) as progress:
            row = wait_for_job(client, job_id, prepared, progress.update, on_status)
    except KeyboardInterrupt:
        err_console.print(
            f"detached: job {job_id} keeps running on the cluster "
            f"(tlctl jobs logs {job_id} --follow; tlctl jobs stop {job_id})"
        )
        return 130
    logs = job_logs(client, job_id)
    summary = _last_json(logs, SUMMARY_PREFIX)
    if json_out:
        typer.echo(json.dumps({"job": row, "summary": summary}, indent=1, default=str))
    elif summary:
        print_summary(summary)
    if row["status"] == "SUCCEEDED":
        return 0
    reason = _last_line(logs, ERROR_PREFIX) or row.get("message") or row["status"]
    err_console.print(f"[bold red]error:[/] job {job_id} {row['status']}: ", end="")
    err_console.print(reason, markup=False, soft_wrap=True)
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


@app.command()
@guarded
def validate(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="key.path=value")] = None,
    preflight_: Annotated[
        bool, typer.Option("--preflight", help="Also check storage, data and weights for real.")
    ] = False,
    resolved: Annotated[
        bool,
        typer.Option(
            "--resolved",
            help="Print the resolved spec (every default filled in, paths absolute): the "
            "spec file `python -m jobs.entrypoint` runs, e.g. in a KubeRay RayJob.",
        ),
    ] = False,
    yes: YesOpt = False,
) -> None:
    """Check a job spec (and optionally storage/data/weights) without training."""
    job = load_spec_cli(spec, set_ or [], local=not resolved, yes=yes)
    if preflight_:
        from jobs.run import preflight

        prepared = preflight(job.model_dump())
        typer.echo(
            f"ok: {job.name}: {prepared.plan.num_classes} classes, "
            f"{prepared.plan.train_rows} train images, storage {prepared.run.uri} writable",
            err=resolved,
        )
    if resolved:
        import yaml

        typer.echo(yaml.safe_dump(job.model_dump(), sort_keys=False), nl=False)
    elif not preflight_:
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
