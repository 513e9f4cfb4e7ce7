"""The job spec as one pydantic model: what the client validates and the cluster runs.

The same `JobSpec` object travels from the CLI through pre-flight, the driver and the
trainer into every worker, so a default is stated once, here. Field descriptions are the
spec reference (docs/spec.md is generated from them). Unknown keys are errors, so typos are
never silently ignored. Rules that span fields are `semantic_errors`; loading, overrides
and defaults that depend on other fields are `jobs.spec.load`'s.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from jobs.errors import TlctlError
from jobs.redact import clip
from jobs.spec.search import Metric, SearchSpec, search_errors
from jobs.storage.location import normalize_endpoint, parse_uri
from jobs.training.backbones import backbone_names, freeze_depth_error

NAME_RE = re.compile(r"[a-z0-9][a-z0-9\-_.]{0,62}")  # always with fullmatch: no "name\n"
PositiveInt = Annotated[int, Field(gt=0)]
CPU_WORKERS = 2  # `num_workers: auto` without GPUs: two data-parallel CPU workers


class _Section(BaseModel):
    # inf/nan pass every `ge`/`gt` bound (storage_retry_s: inf would wait forever).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _endpoint(value: str | None, field: str) -> str | None:
    """An endpoint field, checked by the one rule storage resolves endpoints with."""
    if value is None:
        return None
    try:
        return normalize_endpoint(value, field)
    except TlctlError as exc:
        raise ValueError(exc.message.removeprefix(f"{field}: ")) from exc


def _location(value: str | None, field: str) -> str | None:
    """A URI/path field, checked by the one rule storage resolves locations with (the value
    stays as written: relative paths are made absolute when the spec is resolved)."""
    if value is None:
        return None
    try:
        parse_uri(value, field, bucket_names=False)  # bucket names: checked in pre-flight
    except TlctlError as exc:
        raise ValueError(exc.message.removeprefix(f"{field}: ")) from exc
    return value.strip()


class BackboneSpec(_Section):
    """The pretrained model and how much of it stays frozen.

    Each backbone is cut into stages at its spatial downsamplings (stride 2, 4, 8, 16, 32;
    the stem is stage 1), so `freeze_depth: k` means "the first k resolution stages" in
    every family: ResNet, MobileNet and EfficientNet have 5 stages, ConvNeXt 4 (its stem is
    stride 4); `freeze_depth` = the number of stages trains the head only. Frozen stages have
    `requires_grad=False` and their BatchNorm layers stay in eval mode, so their running
    statistics do not drift on your data.

    `weights: imagenet` uses torchvision's weights API (and its normalization). Offline,
    tlctl fails fast and says which file to put where (`$TORCH_HOME/hub/checkpoints/` on
    every node), or set `weights` to a path or s3:// URI of a state_dict. A previous run's
    `model/` (or its run prefix) works too: that is how a model trained on one task becomes
    the pretrained backbone of the next. Keys whose names and shapes match are loaded; the
    classification head is always new.
    """

    name: str = Field("mobilenet_v3_large", description="a registry backbone (`tlctl backbones`)")
    weights: str = Field(
        "imagenet",
        description="imagenet | none | a path or s3:// URI of a state_dict or a tlctl model/",
    )
    freeze_depth: int = Field(
        0, ge=0, description="leading backbone stages frozen; 0 = train everything"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in backbone_names():
            raise ValueError(f"unknown backbone '{v}' (valid: {', '.join(backbone_names())})")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty (valid: imagenet, none, a local path or s3:// URI)")
        if v.strip() in ("imagenet", "none"):
            return v.strip()
        return _location(v, "backbone.weights") or v


class HeadSpec(_Section):
    """The new classification head."""

    hidden: list[PositiveInt] = Field(
        default_factory=list,
        description="hidden layer sizes before the classifier ([] = torchvision's own head)",
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the classifier")


class DataSpec(_Section):
    """Where the images are and how they are prepared (decoded, resized and augmented in
    Ray Data tasks, never on the driver)."""

    train: str = Field(
        description="ImageFolder dir (root/<class>/*.jpg) or Parquet file/dir; local or s3://"
    )
    val: str | None = Field(
        None, description="optional; else a stratified val_fraction split of train, fixed seed"
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="used without data.val")
    image_size: int = Field(224, ge=16, le=1024, description="images are resized to this square")
    augment: bool = Field(True, description="random flip + shift, in Ray Data")
    shuffle: bool = Field(True, description="new block order each epoch + a local shuffle buffer")
    cache: Literal["auto", "true", "false"] = Field(
        "auto", description="keep decoded images in the object store (auto: when < 2 GiB)"
    )
    image_column: str = Field("image", description="Parquet only: image bytes (or {bytes: …})")
    label_column: str = Field("label", description="Parquet only: class names or ids")
    endpoint: str | None = Field(None, description="S3 endpoint of the data (default: storage's)")

    @field_validator("cache", mode="before")
    @classmethod
    def _cache(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return _endpoint(v, "data.endpoint")

    @field_validator("train", "val")
    @classmethod
    def _location(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _location(v, f"data.{info.field_name}")


class TrainSpec(_Section):
    """The optimization: epochs, batch, optimizer and schedule."""

    epochs: int = Field(10, ge=1, le=10000, description="passes over the training data")
    batch_size: int = Field(64, ge=1, description="per worker")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="peak learning rate")
    optimizer: Literal["adamw", "sgd", "adam"] = Field(
        "adamw", description="sgd: Nesterov momentum 0.9; only trainable parameters are optimized"
    )
    weight_decay: float = Field(1e-4, ge=0.0, description="the optimizer's weight decay")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU; fp16 needs a GPU"
    )
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="per epoch: cosine decay to 1% of lr, or constant"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the cross-entropy loss")
    seed: int = Field(0, description="model init, data split and searcher sampling")


class ScalingSpec(_Section):
    """How many data-parallel workers, and on what."""

    num_workers: int | str = Field(
        "auto",
        description=f"auto: one per GPU with use_gpu (where the job runs), else {CPU_WORKERS}",
    )
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1, gt=0, description="also the worker's torch threads")
    placement: Literal["pack", "spread"] = Field(
        "pack", description="spread: workers on different nodes"
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> int | str:
        if v == "auto":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096:
            return v
        raise ValueError(
            f"{clip(v)} is not allowed (valid: auto = one worker per GPU with use_gpu, else "
            f"{CPU_WORKERS}; or 1..4096)"
        )

    @property
    def workers(self) -> int:
        """The number of workers, once `auto` is resolved (jobs.driver.scaling)."""
        if not isinstance(self.num_workers, int):
            raise TlctlError("scaling.num_workers: still auto; it is resolved where the job runs")
        return self.num_workers


class StorageSpec(_Section):
    """Where runs are written. Credentials come only from the standard AWS chain
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles), never the spec."""

    uri: str = Field(description="s3://bucket/prefix or a local directory: the runs root")
    endpoint: str | None = Field(
        None, description="S3 endpoint (MinIO, SeaweedFS); omit for AWS (or AWS_ENDPOINT_URL)"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return _endpoint(v, "storage.endpoint")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _location(v, "storage.uri") or v


class CheckpointSpec(_Section):
    """Which checkpoints are kept, how often they are written and how they are uploaded."""

    keep: int = Field(2, ge=1, description="best K by metric are kept (the latest too, for resume)")
    every_epochs: int = Field(
        1, ge=1, description="checkpoint every N epochs (the last epoch always)"
    )
    max_pending: int | None = Field(
        None,
        ge=1,
        description="saved, not yet uploaded, before training waits for storage (default 4; "
        "1 in a search, whose ASHA gets each epoch's metrics with its upload)",
    )
    upload: Literal["async", "sync"] = Field(
        "async", description="async: uploads run beside the next epoch; sync: they block it"
    )
    metric: Metric = Field("val_acc", description="what ranks checkpoints (and picks model/)")
    mode: Literal["max", "min"] | None = Field(
        None, description="default: min for losses, max otherwise"
    )


class FailureSpec(_Section):
    """What a job survives: lost workers and nodes, storage outages."""

    max_failures: int | None = Field(
        None, ge=-1, description="worker failures survived (default 0 for --local, 2 on a cluster)"
    )
    storage_retry_s: float = Field(
        300.0, ge=0, description="how long a storage outage is waited out before the job fails"
    )


class JobSpec(_Section):
    name: str = Field(
        description="[a-z0-9][a-z0-9-_.]{0,62}: the run's storage key; the same name resumes"
    )
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    head: HeadSpec = Field(default_factory=HeadSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    search: SearchSpec | None = Field(
        None, description="present: the job is a Ray Tune search (see below)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v) or ".." in v:
            raise ValueError(
                f"{clip(v)} is not a valid run name (valid: 1-63 chars of a-z 0-9 - _ . "
                "starting with a letter or digit; it becomes a storage key)"
            )
        return v

    @property
    def data_endpoint(self) -> str | None:
        """The endpoint the data is read through (defaults to storage's)."""
        return self.data.endpoint or self.storage.endpoint

    def copy_with(self, **sections: dict[str, Any]) -> JobSpec:
        """A validated copy with some fields of some sections replaced:
        `spec.copy_with(scaling={"num_workers": 2})`."""
        raw = self.model_dump()
        for section, fields in sections.items():
            raw[section] = fields if raw[section] is None else {**raw[section], **fields}
        return JobSpec.model_validate(raw)


def semantic_errors(spec: JobSpec, *, allow_large_grid: bool = False) -> list[str]:
    """Checks that span fields (pydantic validates each field alone)."""
    errors = []
    problem = freeze_depth_error(spec.backbone.name, spec.backbone.freeze_depth)
    if problem:
        errors.append(f"backbone.freeze_depth: {problem}")
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
