"""`tlctl data synth` and `tlctl backbones`: datasets to try tlctl on, and what it trains."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.common import EndpointOpt, JsonOpt, guarded

data_app = typer.Typer(no_args_is_help=True, help="Datasets: make synthetic ones for demos/tests.")


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
    from jobs.data.synth import check_params, synthesize
    from jobs.storage.location import resolve

    check_params(variant, classes, per_class, size, seed, flags=True)
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


@guarded
def list_backbones(json_out: JsonOpt = False) -> None:
    """Backbones in the registry and their number of freezable stages."""
    from jobs.training.backbones import backbone_names, get_backbone
    from orchestrator.display import emit_json

    rows = [{"name": n, "stages": get_backbone(n).num_stages} for n in backbone_names()]
    if json_out:
        emit_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['name']:<22} freeze_depth 0..{r['stages']}")
