"""A job spec from YAML: `--set` overrides, validation, and the defaults that depend on
other fields or on where the job runs.

Every problem is reported as one line `field: what is wrong (valid: …)`, all of them at
once, before Ray starts. Relative local paths are made absolute (against the working
directory) so the stored spec and a cluster job mean the same files. A *resolved* spec has
every default filled in: it is what `tlctl validate --resolved` prints, what is stored with
a run and what a cluster job runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from jobs.errors import TlctlError
from jobs.spec.model import JobSpec, semantic_errors
from jobs.spec.search import resolve_search

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def _valid_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = models[0] if models else ann  # `SearchSpec | None` → SearchSpec
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_errors(exc: ValidationError) -> list[str]:
    """One `field.path: message (valid: …)` line per pydantic error."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "spec"
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            valid = _valid_fields(loc)
            msg = "unknown field" + (f" (valid: {', '.join(valid)})" if valid else "")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            msg = f"{err['input']!r} is not allowed (valid: {expected.replace(' or ', ', ')})"
            msg = msg.replace("'", "") if isinstance(err["input"], str) else msg
        elif kind == "missing":
            msg = "required field is missing"
        elif kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        else:
            msg = f"{msg} (got {err.get('input')!r})" if "input" in err else msg
        lines.append(f"{where}: {msg}")
    return lines


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.lr=0.01` → raw["train"]["lr"] = 0.01 (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TlctlError(f"--set {item}: expected key.path=value (e.g. train.epochs=5)")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TlctlError(f"--set {item}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return raw


def _absolute(path: str, base: Path) -> str:
    """Relative local paths become absolute; URIs and special values stay as they are."""
    if "://" in path or path in ("imagenet", "none"):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _validated(raw: Any) -> JobSpec:
    if not isinstance(raw, dict):
        raise TlctlError("spec: expected a YAML mapping of sections (name, backbone, data, …)")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise TlctlError("invalid job spec:\n" + "\n".join(format_errors(exc))) from exc


def parse_spec(
    raw: Any,
    *,
    base_dir: Path | None = None,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Validate a raw mapping and resolve it; raises TlctlError (exit 2) with every problem.

    `local` picks the defaults of a job on this machine (failure.max_failures 0) or on a
    cluster (2). `allow_large_grid` (the CLI's `--yes`) lets a grid of more than
    MAX_GRID_TRIALS run.
    """
    spec = _validated(raw)
    errors = semantic_errors(spec, allow_large_grid=allow_large_grid)
    if errors:
        raise TlctlError("invalid job spec:\n" + "\n".join(errors))
    base = base_dir or Path.cwd()
    spec.data.train = _absolute(spec.data.train, base)
    if spec.data.val:
        spec.data.val = _absolute(spec.data.val, base)
    spec.storage.uri = _absolute(spec.storage.uri, base)
    spec.backbone.weights = _absolute(spec.backbone.weights, base)
    resolve_defaults(spec, local=local)
    return spec


def resolve_defaults(spec: JobSpec, *, local: bool) -> None:
    """Fill the defaults that depend on other fields or on where the job runs (in place)."""
    if spec.checkpoint.mode is None:
        spec.checkpoint.mode = "min" if spec.checkpoint.metric.endswith("loss") else "max"
    resolve_search(spec.search)
    if spec.checkpoint.max_pending is None:
        spec.checkpoint.max_pending = 1 if spec.search else 4
    if spec.failure.max_failures is None:
        spec.failure.max_failures = 0 if local else 2
    if spec.storage.endpoint is None and "://" in spec.storage.uri:
        name = next((n for n in ENDPOINT_VARS if os.environ.get(n)), None)
        if name is not None:
            try:
                spec.storage.endpoint = os.environ[name]
            except ValidationError as exc:
                detail = format_errors(exc)[0].removeprefix("endpoint: ")
                raise TlctlError(f"{name} (the storage endpoint): {detail}") from exc


def unresolved_fields(spec: JobSpec) -> list[str]:
    """The fields that resolution fills and `spec` leaves unset."""
    fields = {
        "checkpoint.mode": spec.checkpoint.mode,
        "checkpoint.max_pending": spec.checkpoint.max_pending,
        "failure.max_failures": spec.failure.max_failures,
    }
    if spec.search is not None:
        fields["search.mode"] = spec.search.mode
        fields["search.num_samples"] = spec.search.num_samples
    return [name for name, value in fields.items() if value is None]


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing, unreadable or malformed file is one clear line."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise TlctlError(f"cannot read {path}: no such spec file") from exc
    except OSError as exc:
        raise TlctlError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TlctlError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from exc


def load_spec(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Read a YAML spec file, apply `--set` overrides, validate and resolve."""
    raw = read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    return parse_spec(raw, local=local, allow_large_grid=allow_large_grid)


def load_resolved_spec(path: str | Path) -> JobSpec:
    """A resolved spec file (what a cluster job runs); anything else is refused with the fix."""
    fix = "make one with `tlctl validate SPEC --resolved > resolved.yaml`"
    raw = read_yaml(Path(path))
    try:
        spec = _validated(raw)
    except TlctlError as exc:
        problems = exc.message.replace("\n", "; ")
        raise TlctlError(f"{path}: not a resolved tlctl spec ({problems}); {fix}") from exc
    missing = unresolved_fields(spec)
    if missing:
        raise TlctlError(f"{path}: not a resolved tlctl spec (unset: {', '.join(missing)}); {fix}")
    return spec


def stored_spec(text: str, where: str) -> JobSpec:
    """The spec stored with a run (resolved when it was written)."""
    try:
        return _validated(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise TlctlError(f"{where}: not valid YAML ({exc})") from exc
    except TlctlError as exc:
        raise TlctlError(f"{where}: not a tlctl job spec ({exc.message})") from exc


def spec_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML: what is stored with a run and shipped to a cluster."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
