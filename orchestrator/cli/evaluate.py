"""`tlctl evaluate`: measure a run's model (RUN, run URI or MODEL@ALIAS) on labelled images."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

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
    check_one_place,
    guarded,
)
from orchestrator.targets.jobs_api import DEFAULT_CONNECT_TIMEOUT_S

if TYPE_CHECKING:
    from jobs.models.task import ModelTask


def _print_metrics(m: dict[str, Any], where: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    from orchestrator.display import console, show

    k = m["k"]
    console.print(
        f"evaluated {m['n']} images of {escape(m['data'])} with {escape(m['model_ref'])}: "
        f"top-1 {m['top1']:.1%}  top-{k} {m[f'top{k}']:.1%}  NLL {m['nll']:.3f}  "
        f"ECE {m['ece']:.3f}  macro F1 {m['f1']['macro']:.3f}",
        soft_wrap=True,
    )
    table = Table()
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right", overflow="fold")
    for name, row in m["per_class"].items():
        table.add_row(
            escape(name),
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        )
    show(table)
    console.print(f"written to {escape(where)}", soft_wrap=True)


@guarded
def evaluate(
    run: Annotated[str, typer.Argument(help="RUN name, run URI, or MODEL@ALIAS.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Labelled images: an ImageFolder tree, or Parquet file(s) (dir or s3://).",
        ),
    ],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Evaluation name: <run>/eval/<name>/ (default: data's)."),
    ] = None,
    image_column: Annotated[
        str, typer.Option("--image-column", help="Parquet data: the image bytes column.")
    ] = "image",
    label_column: Annotated[
        str, typer.Option("--label-column", help="Parquet data: the class column.")
    ] = "label",
    local: LocalOpt = False,
    address: AddressOpt = None,
    wait: WaitOpt = False,
    pass_credentials: PassCredentialsOpt = False,
    connect_timeout: ConnectTimeoutOpt = DEFAULT_CONNECT_TIMEOUT_S,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Exact metrics of a model on labelled images, every image once, fp32, on local Ray
    (or a cluster with --address); metrics.json, predictions, plots and the most confident
    mistakes go to <run>/eval/<name>/."""
    from jobs.models.task import ModelTask

    args = {
        "data": data,
        "name": name,
        "image_column": image_column,
        "label_column": label_column,
    }
    task = ModelTask("evaluate", run, storage, endpoint, args)
    where = Where(local, address, wait, pass_credentials, connect_timeout, verbose, json_out)
    metrics, out = _run(task, where)
    if metrics is None:
        return
    if json_out:
        from orchestrator.display import emit_json

        emit_json(metrics)
    else:
        _print_metrics(metrics, out)


@dataclass(frozen=True)
class Where:
    """Where a task runs, and how the CLI follows it."""

    local: bool
    address: str | None
    wait: bool
    pass_credentials: bool
    connect_timeout: float
    verbose: bool
    json_out: bool

    @property
    def on_cluster(self) -> bool:
        """--address (or RAY_ADDRESS without --local) sends it to a cluster."""
        check_one_place(self.local, self.address)
        return bool(self.address) and not self.local


def _run(task: ModelTask, where: Where) -> tuple[dict[str, Any] | None, str]:
    """Pre-flight here, then run on local Ray or as a cluster job; (result, where it went).
    The result is None when a cluster job was submitted without --wait."""
    if not where.on_cluster:
        prepared = task.prepare()
        started = _start_ray(where.verbose)
        try:
            result = prepared.run()
        finally:
            if started:
                import ray

                ray.shutdown()
        return result, prepared.output_uri
    from orchestrator.targets.base import SubmitOptions
    from orchestrator.targets.cluster import check_task_paths, follow_task, submit_task
    from orchestrator.targets.jobs_api import cluster_address, connect

    address = cluster_address(where.address)
    check_task_paths(task, address)
    prepared = task.prepare()  # here: exit 2 before anything is submitted
    cluster = connect(address, connect_timeout_s=where.connect_timeout)
    options = SubmitOptions(
        submitted_at=time.time(),
        verbose=where.verbose,
        json_out=where.json_out,
        pass_credentials=where.pass_credentials,
    )
    job_id = submit_task(cluster, prepared, options)
    out = prepared.output_uri
    if not where.wait:
        _submitted(job_id, cluster.address, out, where.json_out)
        return None, out
    code, row, result = follow_task(cluster, job_id, json_out=where.json_out)
    if code != 0 or result is None:
        raise typer.Exit(code or 1)
    return result, out


def _submitted(job_id: str, address: str, out: str, json_out: bool) -> None:
    from orchestrator.display import console, emit_json

    if json_out:
        emit_json({"job_id": job_id, "address": address, "output": out})
        return
    console.print(
        f"submitted job {job_id} to {address}; results go to {out} "
        f"(follow: tlctl jobs logs {job_id} --follow)",
        markup=False,
        soft_wrap=True,
    )


def _start_ray(verbose: bool) -> bool:
    import ray

    from jobs.driver.drive import quiet_ray

    if ray.is_initialized():
        return False
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    quiet_ray(verbose)
    return True


@guarded
def predict(
    run: Annotated[str, typer.Argument(help="RUN name, run URI, or MODEL@ALIAS.")],
    input_uri: Annotated[
        str,
        typer.Option(
            "--input",
            help="Images: a folder or prefix (dir or s3://, recursive), or Parquet file(s).",
        ),
    ],
    output: Annotated[str, typer.Option("--output", help="Where the predictions go (new).")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Labels and probabilities kept (default 5, or all if fewer)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv.")] = "parquet",
    all_probs: Annotated[
        bool, typer.Option("--all-probs", help="Also a probs column: every class's probability.")
    ] = False,
    image_column: Annotated[
        str, typer.Option("--image-column", help="Parquet input: the image bytes column.")
    ] = "image",
    id_column: Annotated[
        str | None,
        typer.Option("--id-column", help="Parquet input: each row's id (default <file>#<row>)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what is at --output.")
    ] = False,
    local: LocalOpt = False,
    address: AddressOpt = None,
    wait: WaitOpt = False,
    pass_credentials: PassCredentialsOpt = False,
    connect_timeout: ConnectTimeoutOpt = DEFAULT_CONNECT_TIMEOUT_S,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Batch inference on local Ray (or a cluster with --address): one row per image
    (path, label, confidence, top-k, or the image's error), written to --output with a
    _meta.json."""
    from jobs.models.task import ModelTask

    args = {
        "input": input_uri,
        "output": output,
        "top_k": top_k,
        "fmt": fmt,
        "all_probs": all_probs,
        "image_column": image_column,
        "id_column": id_column,
        "overwrite": overwrite,
    }
    task = ModelTask("predict", run, storage, endpoint, args)
    where = Where(local, address, wait, pass_credentials, connect_timeout, verbose, json_out)
    meta, _ = _run(task, where)
    if meta is None:
        return
    from orchestrator.display import console, emit_json

    if json_out:
        emit_json(meta)
        return
    console.print(
        f"{meta['rows']} images predicted with {meta['model_ref']} in {meta['wall_s']:.1f} s "
        f"({meta['errors']} unreadable) → {meta['output']}",
        soft_wrap=True,
        markup=False,
    )
