"""The model of a job: a registry backbone with a new head, weights loaded, stages frozen.

`freeze_depth = k` freezes the first k stages of `jobs.training.backbones` (requires_grad
False) and marks their modules so that `set_train_mode` keeps their BatchNorm layers in eval
mode: frozen stages then keep their running statistics. `freeze_depth = num_stages` trains
the head only. Dropout and stochastic depth inside frozen stages stay active in training:
they hold no state.

Weights are `imagenet` (torchvision's weights API), `none`, or a file: a plain state_dict,
or a tlctl `model/`, checkpoint or run prefix, whose manifest is checked before the bytes
are unpickled (always with `weights_only=True`). A weights file is looked at before it is
read: one that is not a regular file (a FIFO, a device) or is over `MAX_WEIGHTS_BYTES` is
refused without reading it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from jobs.errors import TlctlError
from jobs.storage.layout import MANIFEST, MODEL, WEIGHTS
from jobs.storage.location import describe_error, read_bytes, resolve
from jobs.training.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    freeze_depth_error,
    get_backbone,
)

if TYPE_CHECKING:
    from jobs.spec.model import JobSpec

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an offline host fails instead of hanging
FROZEN_ATTR = "_tlctl_frozen"  # set on every module of a frozen stage
# The largest weights file read. The largest backbone tlctl supports (efficientnet_b7) has
# a ~255 MB state_dict and even a checkpoint dict holding AdamW's state beside it is ~1 GB;
# a file past 2 GiB is not weights for these backbones and is refused before it is read.
MAX_WEIGHTS_BYTES = 2 * 1024**3


def read_uri(uri: str, endpoint: str | None = None) -> bytes:
    """Bytes of a local path or s3:// object (weights given as `backbone.weights`), after
    checking that it is a regular file of a plausible size (`check_weights_file`)."""
    loc = resolve(uri, endpoint)
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise describe_error(exc, loc) from exc
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(uri)
    kind = "file" if info.type == pafs.FileType.File else "not a regular file"
    check_weights_file(uri, kind, info.size)
    return read_bytes(loc)


class WeightsRefused(TlctlError):
    """A weights file refused unread: no other candidate location is tried after it."""


def check_weights_file(uri: str, kind: str, size: int | None) -> None:
    """Refuse a weights entry that is not a regular file, or too large to be one."""
    if kind != "file":
        raise WeightsRefused(
            f"backbone.weights: {uri} is {kind}; it was not read "
            "(valid: a regular .pt/.pth file, or a tlctl model/, checkpoint or run prefix)"
        )
    if size is not None and size > MAX_WEIGHTS_BYTES:
        raise WeightsRefused(
            f"backbone.weights: {uri} is {size:,} bytes, over the {MAX_WEIGHTS_BYTES:,}-byte "
            "limit for a weights file (the largest supported backbone's is about 255 MB); "
            "it was not read"
        )


def build_job_model(spec: JobSpec, num_classes: int) -> nn.Module:
    """The job's model, frozen and with its weights loaded (s3:// through the job's endpoint).

    The driver's pre-flight and every worker build it the same way.
    """
    return build_model(
        spec.backbone.name,
        num_classes,
        weights=spec.backbone.weights,
        freeze_depth=spec.backbone.freeze_depth,
        hidden=spec.head.hidden,
        dropout=spec.head.dropout,
        load_bytes=functools.partial(read_uri, endpoint=spec.storage.endpoint),
    )


def normalization(
    name: str, weights: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Input (mean, std): from the ImageNet weights' own transforms, else ImageNet defaults.

    Weights from a file come from an earlier tlctl run, which used these same values.
    """
    get_backbone(name)
    if weights != "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    preset = _imagenet_weights(name).transforms()
    mean, std = getattr(preset, "mean", IMAGENET_MEAN), getattr(preset, "std", IMAGENET_STD)
    return _triple(mean), _triple(std)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should see: frozen stages excluded."""
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: nn.Module, mode: bool = True) -> None:
    """`model.train(mode)`, but BatchNorm layers of frozen stages stay in eval mode.

    Walks `.modules()`, so a DDP-wrapped model works too.
    """
    model.train(mode)
    if not mode:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm) and getattr(module, FROZEN_ATTR, False):
            module.eval()


def freeze_stages(model: nn.Module, name: str, depth: int) -> None:
    """Freeze the first `depth` stages: no gradients, BatchNorm statistics kept.

    Call before DDP wraps the model; freezing never changes afterwards.
    """
    problem = freeze_depth_error(name, depth)
    if problem:
        raise TlctlError(f"backbone.freeze_depth: {problem}")
    for stage in get_backbone(name).stages(_unwrap(model))[:depth]:
        for top in stage:
            for module in top.modules():
                setattr(module, FROZEN_ATTR, True)
            for param in top.parameters():
                param.requires_grad_(False)


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    freeze_depth: int = 0,
    hidden: Sequence[int] = (),
    dropout: float = 0.2,
    load_bytes: Callable[[str], bytes] | None = None,
) -> nn.Module:
    """A torchvision classifier for `num_classes`, initialised and frozen as asked.

    With `hidden == ()` its state_dict matches `torchvision.models.get_model(name,
    num_classes=num_classes)` key for key, so the saved model loads into plain torchvision.
    `weights` is "none", "imagenet", or a local path / URI read with `load_bytes`.
    """
    backbone = get_backbone(name)
    _check_head_args(num_classes, hidden, dropout)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _build_head(model, backbone, num_classes, list(hidden), dropout)
    if weights == "imagenet":
        _load_matching(model, backbone, _download_imagenet(name), f"ImageNet weights of {name}")
    elif weights != "none":
        source, state = _read_state_dict(weights, load_bytes)
        _load_matching(model, backbone, state, source)
    freeze_stages(model, name, freeze_depth)
    return model


# --- head ---------------------------------------------------------------------------


class _InputDropout:
    """Forward pre-hook: dropout on a layer's input without adding state-dict keys."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (nn.functional.dropout(args[0], self.p, module.training), *args[1:])


def _check_head_args(num_classes: int, hidden: Sequence[int], dropout: float) -> None:
    if num_classes < 1:
        raise TlctlError(f"num_classes: must be at least 1, got {num_classes}")
    if any(h < 1 for h in hidden):
        raise TlctlError(f"head.hidden: sizes must be at least 1, got {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise TlctlError(f"head.dropout: must be in [0, 1), got {dropout}")


def _build_head(
    model: nn.Module, backbone: Backbone, num_classes: int, hidden: list[int], dropout: float
) -> None:
    """Replace the head for `hidden` sizes and apply `dropout` where the family has it."""
    linear = model.get_submodule(backbone.head)
    if hidden:
        layers: list[nn.Module] = []
        width = linear.in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        model.set_submodule(backbone.head, nn.Sequential(*layers))
    head = model.get_submodule(backbone.head)
    if backbone.dropout is not None:
        model.get_submodule(backbone.dropout).p = dropout
    elif dropout > 0:
        head.register_forward_pre_hook(_InputDropout(dropout))


# --- weights ------------------------------------------------------------------------


def _imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(name).DEFAULT


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every blocking socket call made inside (torch.hub offers no timeout)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_imagenet(name: str) -> Mapping[str, torch.Tensor]:
    """ImageNet weights via torchvision's weights API, cached in $TORCH_HOME/hub/checkpoints."""
    weights = _imagenet_weights(name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(
                progress=False, check_hash=True, map_location="cpu", weights_only=True
            )
    except (OSError, RuntimeError) as exc:  # URLError and timeouts are OSErrors
        file_name = os.path.basename(urlparse(weights.url).path)
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise TlctlError(
            f"backbone.weights: ImageNet weights for {name} could not be downloaded "
            f"from {weights.url} ({exc}). Without network access, put {file_name} in "
            f"$TORCH_HOME/hub/checkpoints/ (here: {cache}), or set backbone.weights to a "
            f"local path or s3:// URI of a {name} state_dict."
        ) from exc


def _candidates(uri: str) -> list[str]:
    """The weights file itself, or model.pt inside a tlctl model/ dir or run prefix."""
    if uri.endswith((".pt", ".pth")):
        return [uri]
    base = uri.rstrip("/")
    return [uri, f"{base}/{WEIGHTS}", f"{base}/{MODEL}/{WEIGHTS}"]


def _read_local(path: str) -> bytes:
    local = path.removeprefix("file://")
    st = os.stat(local)  # follows symlinks; FileNotFoundError tries the next candidate
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(local)
    kind = "file" if stat.S_ISREG(st.st_mode) else "not a regular file"
    check_weights_file(path, kind, st.st_size)
    with open(local, "rb") as f:
        return f.read()


def _read_bytes(uri: str, load_bytes: Callable[[str], bytes] | None) -> tuple[str, bytes]:
    """The first readable candidate for `uri`, with its location."""
    read = load_bytes or _read_local
    candidates = _candidates(uri)
    for candidate in candidates:
        try:
            data = read(candidate)
        except WeightsRefused:  # not a regular file, or too large: no other candidate
            raise
        except Exception as exc:  # the caller's reader may raise anything
            error = exc
            continue
        _check_against_manifest(candidate, data, read)
        return candidate, data
    if len(candidates) == 1:
        raise TlctlError(f"backbone.weights: cannot read {uri}: {error}")
    raise TlctlError(
        f"backbone.weights: no weights file at {uri} "
        f"(tried {', '.join(candidates)}; last error: {error})"
    )


def _check_against_manifest(source: str, data: bytes, read: Callable[[str], bytes]) -> None:
    """A tlctl model/ or checkpoint lists its files' sizes and SHA-256 in manifest.json:
    weights that do not match it (a truncated copy) are reported, never loaded. Without a
    manifest beside it, the file is a plain weights file; a manifest that cannot be read
    is an error, not a reason to skip the check."""
    base, _, name = source.rpartition("/")
    where = f"{base}/{MANIFEST}"
    try:
        text = read(where)
    except FileNotFoundError:
        return
    except Exception as exc:  # the caller's reader may raise anything
        raise TlctlError(f"backbone.weights: cannot read {where} to check {source}: {exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise TlctlError(f"backbone.weights: {where} is not valid JSON ({exc})") from exc
    want = ((manifest.get("files") or {}) if isinstance(manifest, dict) else {}).get(name)
    if not want:
        return
    if len(data) != want.get("size") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
        raise TlctlError(
            f"backbone.weights: {source} is truncated or corrupt: {len(data)} bytes that do "
            f"not match its manifest ({want.get('size')} bytes and a SHA-256); it was not "
            "loaded (use another checkpoint, or export the run again)"
        )


def _read_state_dict(
    uri: str, load_bytes: Callable[[str], bytes] | None
) -> tuple[str, Mapping[str, torch.Tensor]]:
    """A state_dict from a file: plain, or a tlctl checkpoint dict under "model"."""
    source, data = _read_bytes(uri, load_bytes)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise TlctlError(
            f"backbone.weights: {source} is not a PyTorch weights file ({exc})"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TlctlError(f"backbone.weights: {source} does not hold a state_dict")
    if obj and all(str(k).startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}  # saved from DDP
    return source, obj


def _in_head(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _load_matching(
    model: nn.Module, backbone: Backbone, state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load every non-head tensor whose name and shape match; refuse foreign files."""
    own = model.state_dict()
    matched = {
        k: v
        for k, v in state.items()
        if not _in_head(k, backbone.head) and k in own and own[k].shape == v.shape
    }
    wanted = [k for k, _ in model.named_parameters() if not _in_head(k, backbone.head)]
    hits = sum(k in matched for k in wanted)
    if hits * 2 < len(wanted):
        raise TlctlError(
            f"backbone.weights: {source} does not look like a {backbone.name} state_dict "
            f"(only {hits} of {len(wanted)} backbone parameters match by name and shape)"
        )
    model.load_state_dict(matched, strict=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / FSDP-style wrappers."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c
