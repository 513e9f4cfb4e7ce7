"""`tlctl models …`: the registry of named models and their aliases (jobs.models.registry)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from orchestrator.cli.common import EndpointOpt, JsonOpt, StorageOpt, guarded
from orchestrator.cli.jobs import _when

models_app = typer.Typer(
    no_args_is_help=True,
    help="The model registry: aliases (champion, …) that point at runs' models.",
)

ModelArg = Annotated[str, typer.Argument(help="Model name in the registry.")]
AliasOpt = Annotated[str, typer.Option("--alias", help="Alias to move.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the history).")]


def _registry(storage: str, endpoint: str | None):
    from jobs.models.registry import Registry
    from jobs.storage.location import resolve

    return Registry(resolve(storage, endpoint))


def _acc(pointer: dict[str, Any]) -> str:
    value = (pointer.get("metrics") or {}).get("val_acc")
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _moved(pointer: dict[str, Any]) -> str:
    line = f"{pointer['model']}@{pointer['alias']} → run {pointer['run']} ({pointer['run_uri']})"
    return f"{line}, {pointer['action']} #{pointer['seq']} by {pointer['by']}"


@models_app.command("promote")
@guarded
def promote(
    run: Annotated[str, typer.Argument(help="RUN name, run URI, or MODEL@ALIAS.")],
    model: Annotated[str, typer.Option("--model", help="Registry model name.")],
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    alias: AliasOpt = "champion",
    reason: ReasonOpt = "",
    allow_class_change: Annotated[
        bool,
        typer.Option("--allow-class-change", help="Accept a run whose classes differ."),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Point MODEL@ALIAS at a run's model (verified first); recorded in the history."""
    from jobs.models.ref import resolve_ref
    from jobs.models.registry import check_alias, check_model_name
    from orchestrator.display import emit_json

    check_model_name(model)
    check_alias(alias)
    ref = resolve_ref(run, storage, endpoint)
    pointer = _registry(storage, endpoint).promote(
        model, alias, ref.model, reason=reason, allow_class_change=allow_class_change
    )
    if json_out:
        emit_json(pointer)
    else:
        typer.echo(_moved(pointer))


@models_app.command("rollback")
@guarded
def rollback(
    model: ModelArg,
    storage: StorageOpt,
    endpoint: EndpointOpt = None,
    alias: AliasOpt = "champion",
    to: Annotated[
        str | None, typer.Option("--to", help="A run the alias pointed at before.")
    ] = None,
    reason: ReasonOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Move MODEL@ALIAS back to the run it pointed at before (or --to RUN)."""
    from orchestrator.display import emit_json

    pointer = _registry(storage, endpoint).rollback(model, alias, to_run=to, reason=reason)
    if json_out:
        emit_json(pointer)
    else:
        typer.echo(_moved(pointer))


@models_app.command("list")
@guarded
def models_list(storage: StorageOpt, endpoint: EndpointOpt = None, json_out: JsonOpt = False):
    """Every model in the registry, one row per alias."""
    from rich.markup import escape
    from rich.table import Table

    from orchestrator.display import console, emit_json, show

    registry = _registry(storage, endpoint)
    rows = [p for m in registry.models() for p in registry.aliases(m).values()]
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print(f"no models in the registry at {escape(registry.base.uri)}")
        return
    table = Table()
    for col in ("model", "alias", "run", "val acc", "moved", "by"):
        table.add_column(col, overflow="fold")
    for p in rows:
        table.add_row(
            escape(p["model"]),
            escape(p["alias"]),
            escape(p["run"]),
            _acc(p),
            _when(p.get("at")),
            escape(p.get("by", "-")),
        )
    show(table)


@models_app.command("show")
@guarded
def models_show(
    model: ModelArg, storage: StorageOpt, endpoint: EndpointOpt = None, json_out: JsonOpt = False
) -> None:
    """A model's aliases: the run each points at, its classes and metrics."""
    from jobs.errors import TlctlError
    from orchestrator.display import emit_json

    registry = _registry(storage, endpoint)
    aliases = registry.aliases(model)
    if not aliases:
        registry.resolve(model, "champion")  # names the models that exist
        raise TlctlError(f"model: {model!r} has no aliases")
    if json_out:
        emit_json(aliases)
        return
    for alias, p in sorted(aliases.items()):
        typer.echo(f"{model}@{alias}: run {p['run']} ({p['run_uri']})")
        typer.echo(f"  val acc {_acc(p)}, backbone {p.get('backbone')}, classes {p['classes']}")
        typer.echo(f"  {p['action']} by {p['by']} at {_when(p.get('at'))}: {p['reason'] or '-'}")
        typer.echo(f"  model manifest sha256 {p['manifest_sha256']}")


@models_app.command("history")
@guarded
def models_history(
    model: ModelArg, storage: StorageOpt, endpoint: EndpointOpt = None, json_out: JsonOpt = False
) -> None:
    """Every move of the model's aliases, oldest first: who pointed what where, when, why."""
    from rich.markup import escape
    from rich.table import Table

    from jobs.models.registry import check_model_name
    from orchestrator.display import emit_json, show

    check_model_name(model)
    registry = _registry(storage, endpoint)
    moves = registry.history(model)
    if not moves:
        registry.resolve(model, "champion")
    if json_out:
        emit_json(moves)
        return
    table = Table()
    for col in ("#", "when", "alias", "action", "run", "previous", "by", "reason"):
        table.add_column(col, overflow="fold")
    for h in moves:
        table.add_row(
            str(h["seq"]),
            _when(h.get("at")),
            escape(h["alias"]),
            h["action"],
            escape(h["run"]),
            escape((h.get("previous") or {}).get("run") or "-"),
            escape(h.get("by", "-")),
            escape(h.get("reason") or "-"),
        )
    show(table)
