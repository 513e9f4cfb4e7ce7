"""`tlctl export`: a run's model (RUN, run URI or MODEL@ALIAS) as a verified pt2 or ONNX file."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.common import EndpointOpt, JsonOpt, StorageOpt, guarded


@guarded
def export(
    run: Annotated[str, typer.Argument(help="RUN name, run URI, or MODEL@ALIAS.")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    fmt: Annotated[
        str, typer.Option("--format", help="pt2 (torch.export) or onnx (needs the onnx extra).")
    ] = "pt2",
    out: Annotated[
        str | None,
        typer.Option("--out", help="Where the files go (dir or s3://; default <run>/export/FMT/)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace what is at --out.")
    ] = False,
    images: Annotated[
        str | None,
        typer.Option("--images", help="Verify on these images (default: the run's val data)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export the model (uint8 NHWC images in, logits out, normalization inside, any batch
    size), verify it against the eager model, then write it with export.json and a manifest."""
    from jobs.models.export import check_format, folder_images, plan_export, validation_images
    from jobs.models.export import export as run_export
    from jobs.models.ref import resolve_ref
    from jobs.storage.location import resolve
    from orchestrator.display import console, emit_json

    check_format(fmt)  # before storage is touched
    ref = resolve_ref(run, storage, endpoint)
    where = resolve(out, endpoint, field="--out", endpoint_field="--endpoint") if out else None
    plan = plan_export(ref, fmt, where, overwrite)
    if images:
        loc = resolve(images, endpoint, field="--images", endpoint_field="--endpoint")
        sample, source = folder_images(loc, int(ref.model.info["image_size"])), loc.uri
    else:
        sample, source = validation_images(ref)
    record = run_export(ref, plan, images=sample, images_from=source)
    if json_out:
        emit_json(record)
        return
    checks = record["verification"]["batches"]
    n = sum(c["n"] for c in checks)
    worst = max(c["max_abs_diff"] for c in checks)
    agree = sum(c["top1_agree"] for c in checks)
    console.print(
        f"exported {record['backbone']} of {record['model_ref']} as {record['export_format']} "
        f"→ {record['uri']}\nverified against eager on {n} images "
        f"({', '.join(c['batch'] for c in checks)}): max |Δlogit| {worst:.2g}, "
        f"top-1 agrees on {agree}/{n}",
        soft_wrap=True,
        markup=False,
    )
