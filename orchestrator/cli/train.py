"""`tlctl submit`, `tlctl resume` and `tlctl validate`: a spec in, a run (or a check) out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from jobs.errors import TlctlError
from orchestrator.cli.common import (
    AddressOpt,
    ConnectTimeoutOpt,
    EndpointOpt,
    JsonOpt,
    LocalOpt,
    PassCredentialsOpt,
    StorageOpt,
    VerboseOpt,
    WaitOpt,
    YesOpt,
    check_one_place,
    guarded,
)
from orchestrator.targets.base import SubmitOptions, Target
from orchestrator.targets.jobs_api import DEFAULT_CONNECT_TIMEOUT_S

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a spec field: key.path=value (repeatable)."),
]


def target_for(
    *, local: bool, address: str | None, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> Target:
    """`--local`, or the cluster at `--address` / RAY_ADDRESS: chosen once, here."""
    check_one_place(local, address)
    if local:
        from orchestrator.targets.local import LocalTarget

        return LocalTarget()
    from orchestrator.targets.cluster import ClusterTarget

    return ClusterTarget(address, connect_timeout_s)


@guarded
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    local: LocalOpt = False,
    address: AddressOpt = None,
    wait: WaitOpt = False,
    pass_credentials: PassCredentialsOpt = False,
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
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    connect_timeout: ConnectTimeoutOpt = DEFAULT_CONNECT_TIMEOUT_S,
) -> None:
    """Validate, pre-flight, then train or resume: --local here, or on a Ray cluster (--address)."""
    from jobs.spec.load import load_spec

    options = SubmitOptions(
        submitted_at=time.time(),
        verbose=verbose,
        json_out=json_out,
        wait=wait,
        pass_credentials=pass_credentials,
        pip=tuple(pip or ()),
        driver_cpus=driver_cpus,
        driver_memory_mb=driver_memory_mb,
    )
    target = target_for(local=local, address=address, connect_timeout_s=connect_timeout)
    job = load_spec(spec, set_ or [], local=target.local, allow_large_grid=yes)
    raise typer.Exit(target.submit(job, options))


@guarded
def resume(
    name: Annotated[str, typer.Argument(help="Run name.")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    local: LocalOpt = False,
    address: AddressOpt = None,
    wait: WaitOpt = False,
    pass_credentials: PassCredentialsOpt = False,
    verbose: VerboseOpt = False,
    json_out: JsonOpt = False,
    connect_timeout: ConnectTimeoutOpt = DEFAULT_CONNECT_TIMEOUT_S,
) -> None:
    """Resume a run from its stored spec alone (after a lost driver or a Ctrl-C).

    Same as submitting that spec again: training goes on from the newest verified checkpoint."""
    from jobs.spec.load import load_yaml, parse_spec
    from jobs.storage.layout import RunLayout
    from jobs.storage.location import read_text, resolve

    options = SubmitOptions(
        submitted_at=time.time(),
        verbose=verbose,
        json_out=json_out,
        wait=wait,
        pass_credentials=pass_credentials,
    )
    target = target_for(local=local, address=address, connect_timeout_s=connect_timeout)
    layout = RunLayout(resolve(storage, endpoint).join(name))
    if not layout.has_spec():
        raise TlctlError(
            f"run '{name}' has no stored spec at {layout.spec.uri} "
            "(`tlctl runs list` shows the runs)"
        )
    raw = load_yaml(read_text(layout.spec))  # the same safe loader as a spec file
    # The stored spec was accepted once already (a large grid too).
    job = parse_spec(raw, local=target.local, allow_large_grid=True)
    raise typer.Exit(target.submit(job, options))


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
    from jobs.spec.load import load_spec, spec_yaml

    job = load_spec(spec, set_ or [], local=not resolved, allow_large_grid=yes)
    if preflight_:
        from jobs.driver.preflight import preflight

        prepared = preflight(job)
        typer.echo(
            f"ok: {job.name}: {prepared.plan.num_classes} classes, "
            f"{prepared.plan.train_rows} train images, storage {prepared.layout.uri} writable",
            err=resolved,
        )
    if resolved:
        typer.echo(spec_yaml(job), nl=False)
    elif not preflight_:
        typer.echo(f"ok: {job.name}")
