"""The job spec: YAML → a validated pydantic model, with `--set key.path=value` overrides.

Every problem is reported as one line `field: what is wrong (valid: …)`, all of them at
once, before Ray starts. Unknown keys are errors so that typos are never silently ignored.
Relative local paths are made absolute (against the working directory) so the stored spec
and a cluster job mean the same files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from jobs import backbones
from jobs.errors import TlctlError
from orchestrator.search_spec import SearchSpec, resolve_search, search_errors

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9\-_.]{0,62}$")
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
PositiveInt = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneSpec(_Section):
    name: str = "mobilenet_v3_large"
    weights: str = "imagenet"
    freeze_depth: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in backbones.BACKBONES:
            raise ValueError(
                f"unknown backbone '{v}' (valid: {', '.join(backbones.backbone_names())})"
            )
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty (valid: imagenet, none, a local path or s3:// URI)")
        return v


class HeadSpec(_Section):
    hidden: list[PositiveInt] = Field(default_factory=list)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class DataSpec(_Section):
    train: str
    val: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    image_size: int = Field(224, ge=16, le=1024)
    augment: bool = True
    shuffle: bool = True
    cache: Literal["auto", "true", "false"] = "auto"
    image_column: str = "image"
    label_column: str = "label"
    endpoint: str | None = None  # S3 endpoint for the data; defaults to storage.endpoint

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class TrainSpec(_Section):
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    optimizer: Literal["adamw", "sgd", "adam"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0


class ScalingSpec(_Section):
    # auto: one worker per GPU with use_gpu (resolved where the job runs), else 2
    num_workers: int | str = "auto"
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement: Literal["pack", "spread"] = "pack"  # spread: workers on different nodes

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> int | str:
        if v == "auto":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096:
            return v
        raise ValueError(
            f"{v!r} is not allowed (valid: auto = one worker per GPU with use_gpu, else 2; "
            "or 1..4096)"
        )


class StorageSpec(_Section):
    uri: str
    endpoint: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        url = urlparse(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"'{v}' is not an http(s)://host[:port] URL")
        if url.username or url.password:
            raise ValueError("must not contain credentials; use the AWS credential chain")
        return v.rstrip("/")


class CheckpointSpec(_Section):
    keep: int = Field(2, ge=1)
    every_epochs: int = Field(1, ge=1)  # the last epoch is always checkpointed
    # Checkpoints saved but not yet uploaded before training waits for storage; default 4,
    # 1 in a search (the metrics ASHA decides on arrive with each upload).
    max_pending: int | None = Field(None, ge=1)
    metric: Literal["val_acc", "val_loss", "train_acc", "train_loss"] = "val_acc"
    mode: Literal["max", "min"] | None = None  # default: min for losses, max otherwise


class FailureSpec(_Section):
    max_failures: int | None = Field(None, ge=-1)  # default: 0 for --local, 2 on a cluster
    storage_retry_s: float = Field(300.0, ge=0)  # how long a storage outage is waited out


class JobSpec(_Section):
    name: str
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    head: HeadSpec = Field(default_factory=HeadSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    search: SearchSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v) or ".." in v:
            raise ValueError(
                f"'{v}' is not a valid run name (valid: 1-63 chars of a-z 0-9 - _ . "
                "starting with a letter or digit; it becomes a storage key)"
            )
        return v


def _semantic_errors(spec: JobSpec, *, allow_large_grid: bool = False) -> list[str]:
    """Checks that span fields (pydantic validates each field alone)."""
    errors = []
    stages = backbones.num_stages(spec.backbone.name)
    if spec.backbone.freeze_depth > stages:
        errors.append(
            f"backbone.freeze_depth: {spec.backbone.freeze_depth} is out of range for "
            f"{spec.backbone.name} (valid: 0..{stages}; {stages} freezes the whole backbone)"
        )
    if spec.train.precision == "fp16" and not spec.scaling.use_gpu:
        errors.append(
            "train.precision: fp16 needs scaling.use_gpu: true (valid on CPU: auto, fp32, bf16)"
        )
    return errors + search_errors(
        spec.search,
        backbone=spec.backbone.name,
        epochs=spec.train.epochs,
        allow_large_grid=allow_large_grid,
    )


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


def parse_spec(
    raw: Any,
    *,
    base_dir: Path | None = None,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Validate a raw mapping; raises TlctlError (exit 2) with every problem listed.

    `allow_large_grid` (the CLI's `--yes`) lets a grid of more than MAX_GRID_TRIALS run.
    """
    if not isinstance(raw, dict):
        raise TlctlError("spec: expected a YAML mapping of sections (name, backbone, data, …)")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise TlctlError("invalid job spec:\n" + "\n".join(format_errors(exc))) from None
    errors = _semantic_errors(spec, allow_large_grid=allow_large_grid)
    if errors:
        raise TlctlError("invalid job spec:\n" + "\n".join(errors))
    base = base_dir or Path.cwd()
    spec.data.train = _absolute(spec.data.train, base)
    if spec.data.val:
        spec.data.val = _absolute(spec.data.val, base)
    spec.storage.uri = _absolute(spec.storage.uri, base)
    spec.backbone.weights = _absolute(spec.backbone.weights, base)
    if spec.checkpoint.mode is None:
        spec.checkpoint.mode = "min" if spec.checkpoint.metric.endswith("loss") else "max"
    resolve_search(spec.search)
    if spec.checkpoint.max_pending is None:
        spec.checkpoint.max_pending = 1 if spec.search else 4
    if spec.failure.max_failures is None:
        spec.failure.max_failures = 0 if local else 2
    if spec.storage.endpoint is None and "://" in spec.storage.uri:
        spec.storage.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
    return spec


def load_spec(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Read a YAML spec file, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TlctlError(f"{path}: no such spec file") from None
    except OSError as exc:
        raise TlctlError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TlctlError(
            f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    return parse_spec(raw, local=local, allow_large_grid=allow_large_grid)
