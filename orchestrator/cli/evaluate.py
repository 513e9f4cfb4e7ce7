"""`tlctl evaluate`: measure a run's model (RUN, run URI or MODEL@ALIAS) on labelled images."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

import typer

from orchestrator.cli.common import EndpointOpt, JsonOpt, StorageOpt, guarded


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
        str, typer.Option("--data", help="Labelled images: an ImageFolder tree (dir or s3://).")
    ],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Evaluation name: <run>/eval/<name>/ (default: data's)."),
    ] = None,
    json_out: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Ray's own logs.")] = False,
) -> None:
    """Exact metrics of a model on labelled images, every image once, fp32, on local Ray;
    metrics.json, predictions, plots and the most confident mistakes go to <run>/eval/."""
    from jobs.models.evaluate import check_name, default_name, evaluate, plan_evaluation
    from jobs.models.ref import resolve_ref
    from orchestrator.display import emit_json

    name = name or default_name(data)
    check_name(name)
    ref = resolve_ref(run, storage, endpoint)  # verified before anything runs
    plan = plan_evaluation(data, endpoint, list(ref.model.info["classes"]))
    started = _start_ray(verbose)
    try:
        metrics = evaluate(ref, plan, name, data_uri=data)
    finally:
        if started:
            import ray

            ray.shutdown()
    if json_out:
        emit_json(metrics)
    else:
        _print_metrics(metrics, ref.layout.evaluation(name).uri)


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
    json_out: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Ray's own logs.")] = False,
) -> None:
    """Batch inference on local Ray: one row per image (path, label, confidence, top-k, or
    the image's error), written to --output with a _meta.json."""
    from jobs.models.predict import plan_prediction, predict
    from jobs.models.ref import resolve_ref
    from orchestrator.display import console, emit_json

    ref = resolve_ref(run, storage, endpoint)
    classes = list(ref.model.info["classes"])
    top_k = min(5, len(classes)) if top_k is None else top_k
    plan = plan_prediction(
        input_uri,
        output,
        endpoint,
        classes=classes,
        top_k=top_k,
        fmt=fmt,
        overwrite=overwrite,
        all_probs=all_probs,
        image_column=image_column,
        id_column=id_column,
    )
    started = _start_ray(verbose)
    try:
        meta = predict(ref, plan)
    finally:
        if started:
            import ray

            ray.shutdown()
    if json_out:
        emit_json(meta)
        return
    console.print(
        f"{meta['rows']} images predicted with {meta['model_ref']} in {meta['wall_s']:.1f} s "
        f"({meta['errors']} unreadable) → {meta['output']}",
        soft_wrap=True,
        markup=False,
    )
