"""What the CLI's command modules share: the error guard and the common options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from jobs.errors import TlctlError

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

    return wrapper  # type: ignore[return-value]


def _run_name(spec: Any) -> str:
    """The run name in a spec file, for messages (RUN if it cannot be read)."""
    try:
        import yaml

        with open(spec) as f:
            return str(yaml.safe_load(f).get("name") or "RUN")
    except Exception:  # only for a hint
        return "RUN"


AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", envvar="RAY_ADDRESS", help="Ray cluster dashboard address (http://HEAD:8265)."
    ),
]
