"""What the CLI's command modules share: the error guard and the common options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import typer.exceptions

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.redact import redact

F = TypeVar("F", bound=Callable[..., Any])
MAX_LINE_CHARS = 1000  # one error line; the whole message is capped at MAX_LINES of them
MAX_LINES = 200
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # click's order: the first set wins
# Exits and usage errors (typer has its own copy of click: these are its classes).
_PASS_THROUGH = (typer.Exit, typer.Abort, typer.exceptions.TyperException)


def _source_name(ctx: typer.Context, param: typer.CallbackParam, envvars: tuple[str, ...]) -> str:
    """The option's name in messages: the environment variable when the value came from one."""
    source = ctx.get_parameter_source(param.name or "")
    if getattr(source, "name", None) == "ENVIRONMENT":
        return next((name for name in envvars if os.environ.get(name)), envvars[0])
    return (param.opts or [f"--{param.name}"])[0]


def _check_storage(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """--storage / TLCTL_STORAGE, by the rule every storage URI follows (before any work)."""
    if value is not None:
        from jobs.storage.location import parse_uri

        _or_exit(parse_uri, value, _source_name(ctx, param, ("TLCTL_STORAGE",)))
    return value


def _check_endpoint(
    ctx: typer.Context, param: typer.CallbackParam, value: str | None
) -> str | None:
    """--endpoint / AWS_ENDPOINT_URL(_S3), by the rule every endpoint follows."""
    if value is None:
        return None
    from jobs.storage.location import normalize_endpoint

    return _or_exit(normalize_endpoint, value, _source_name(ctx, param, ENDPOINT_VARS))


def _check_address(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """--address / RAY_ADDRESS: checked (no credentials, a valid port) before it is used or
    printed anywhere; the value itself stays as given (`cluster_address` completes it)."""
    if value is not None and value.strip():
        from orchestrator.targets.jobs_api import cluster_address

        _or_exit(cluster_address, value, _source_name(ctx, param, ("RAY_ADDRESS",)))
    return value


def _or_exit(check: Callable[[str, str], Any], value: str, field: str) -> Any:
    try:
        return check(value, field)
    except TlctlError as exc:
        fail(exc.message, exc.exit_code)


StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage",
        envvar="TLCTL_STORAGE",
        callback=_check_storage,
        help="Runs root: s3://bucket/prefix or a local dir.",
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        envvar=list(ENDPOINT_VARS),
        callback=_check_endpoint,
        help="S3 endpoint URL (MinIO, SeaweedFS); omit for AWS.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
YesOpt = Annotated[
    bool, typer.Option("--yes", "-y", help="Accept a search grid of more than 1,000 trials.")
]


def error_message(text: str) -> str:
    """What the CLI prints of an error: redacted (no credentials or secret values) and
    bounded (MAX_LINES lines of at most MAX_LINE_CHARS)."""
    lines = redact(text).splitlines() or [""]
    kept = [ln if len(ln) <= MAX_LINE_CHARS else ln[: MAX_LINE_CHARS - 1] + "…" for ln in lines]
    if len(kept) > MAX_LINES:
        kept = [*kept[:MAX_LINES], f"… ({len(lines) - MAX_LINES} more lines)"]
    return "\n".join(kept)


def fail(message: str, exit_code: int) -> NoReturn:
    """`error: <message>` on stderr (redacted, never read as Rich markup), then exit."""
    from rich.markup import escape

    from orchestrator.display import err_console

    # Messages hold literal brackets ("[lo, hi]", a run name "a[/]b"): never markup.
    err_console.print(f"[bold red]error:[/] {escape(error_message(message))}", soft_wrap=True)
    raise typer.Exit(exit_code)


def guarded(fn: F) -> F:
    """Turn TlctlError into `error: …` on stderr and its exit code; Ctrl-C into 130; any
    other exception into one redacted `error: …` line and exit 1 (never a traceback, which
    could hold a secret in a local variable's repr or an echoed URL)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlctlError as exc:
            fail(exc.message, exc.exit_code)
        except _PASS_THROUGH:
            raise  # typer.Exit and usage errors: already what the user should see
        except KeyboardInterrupt:
            from orchestrator.display import err_console

            run = kwargs.get("name") or _run_name(kwargs.get("spec"))
            err_console.print(
                f"interrupted: submit the same spec again (or `tlctl resume {run}`) to resume "
                "from the last checkpoint",
                markup=False,
            )
            # A hard exit: Ray may still be mid-call in the training thread, where a normal
            # interpreter exit (atexit ray.shutdown) can crash. Ray's processes share ours.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except Exception as exc:  # a bug or an unmapped library error: one line, no traceback
            detail = " ".join(str(exc).split()) or "(no message)"
            fail(f"unexpected {type(exc).__name__}: {detail}", EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def _run_name(spec: Any) -> str:
    """The run name in a spec file, for messages (RUN if it cannot be read)."""
    try:
        from jobs.redact import clip_text
        from jobs.spec.load import load_yaml

        with open(spec, encoding="utf-8") as f:
            return clip_text(load_yaml(f.read(1_000_000)).get("name") or "RUN")
    except Exception:  # only for a hint
        return "RUN"


AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        callback=_check_address,
        help="Ray cluster dashboard address (http://HEAD:8265).",
    ),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="Run on an embedded local Ray.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Cluster: show progress until the job ends.")]
PassCredentialsOpt = Annotated[
    bool,
    typer.Option(
        "--pass-credentials",
        help="Cluster: ship this machine's AWS key pair to the job (dev clusters).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's logs.")]
ConnectTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--connect-timeout",
        min=0,
        help="Cluster: seconds to wait for a head that is still starting (its Jobs API "
        "refusing connections or answering 'No available agent', 502/503/504).",
    ),
]


def check_one_place(local: bool, address: str | None) -> None:
    """--local and an explicit --address contradict each other (RAY_ADDRESS in the
    environment does not: --local wins over it)."""
    if local and address and "RAY_ADDRESS" not in os.environ:
        raise TlctlError("--local and --address: choose one (this machine, or a cluster)")
