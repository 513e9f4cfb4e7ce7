"""Backbone registry: which torchvision classifiers tlctl fine-tunes, and how they are cut.

A `Backbone` names a torchvision classification model and says how to cut it into
*stages*, so that `backbone.freeze_depth: k` means the same thing in every family.

Stage definition (the same for every family):

- A new stage starts at each spatial downsampling of the feature map: one stage per
  output stride 2, 4, 8, 16, 32. The stem is the first stage; where the stem itself
  reaches stride 4 (ConvNeXt's 4x4 patchify conv) there is no stride-2 stage.
- A stage holds everything that runs at its resolution, starting with the module that
  downsampled to it. ResNet's max-pool therefore opens stage 2 (with `layer1`), which
  changes nothing for freezing: pooling has no parameters.
- Trailing layers after the last downsampling belong to the last stage: MobileNet's and
  EfficientNet's final 1x1 conv, MobileNetV3's pre-logits Linear(+Hardswish) and
  ConvNeXt's pre-logits LayerNorm2d. They are pretrained, not class specific.
- The *head* is only the final, class-specific Linear (`head_state_prefix`): the layer
  rebuilt for `num_classes`. Every other parameter is in exactly one stage.

Resulting stage counts: ResNet / MobileNet / EfficientNet 5, ConvNeXt 4.

Pure data, no torch: the spec validates against it without loading torch
(`jobs.training.model` builds and freezes the models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jobs.errors import TlctlError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A torchvision classifier and where its stages, head and head dropout live.

    Paths are dotted submodule paths (`model.get_submodule(path)`).
    """

    name: str
    stage_paths: tuple[tuple[str, ...], ...]
    head: str  # the class-specific Linear, rebuilt for num_classes
    dropout: str | None = None  # the classifier's Dropout, if the family has one

    @property
    def num_stages(self) -> int:
        return len(self.stage_paths)

    def stages(self, model: Any) -> list[list[Any]]:
        """The model's stages in order, each a list of submodules (of a plain, unwrapped
        torch module)."""
        return [[model.get_submodule(p) for p in paths] for paths in self.stage_paths]


def _features(*groups: Sequence[int], extra_last: Sequence[str] = ()) -> tuple:
    """Stage paths from index groups of `model.features` (plus trailing extras)."""
    stages = [tuple(f"features.{i}" for i in group) for group in groups]
    stages[-1] = stages[-1] + tuple(extra_last)
    return tuple(stages)


_RESNET = (("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",))
_MOBILENET_V2 = _features([0, 1], [2, 3], [4, 5, 6], range(7, 14), range(14, 19))
_MNV3_PRELOGITS = ("classifier.0", "classifier.1")
_MOBILENET_V3_SMALL = _features(
    [0], [1], [2, 3], range(4, 9), range(9, 13), extra_last=_MNV3_PRELOGITS
)
_MOBILENET_V3_LARGE = _features(
    [0, 1], [2, 3], [4, 5, 6], range(7, 13), range(13, 17), extra_last=_MNV3_PRELOGITS
)
_EFFICIENTNET = _features([0, 1], [2], [3], [4, 5], [6, 7, 8])
_EFFICIENTNET_V2 = _features([0, 1], [2], [3], [4, 5], [6, 7])
_CONVNEXT = _features([0, 1], [2, 3], [4, 5], [6, 7], extra_last=("classifier.0",))


def _registry() -> dict[str, Backbone]:
    """Every supported backbone, by torchvision model name."""
    entries = [
        *(Backbone(n, _RESNET, "fc") for n in ("resnet18", "resnet34", "resnet50", "resnet101")),
        Backbone("mobilenet_v2", _MOBILENET_V2, "classifier.1", "classifier.0"),
        Backbone("mobilenet_v3_small", _MOBILENET_V3_SMALL, "classifier.3", "classifier.2"),
        Backbone("mobilenet_v3_large", _MOBILENET_V3_LARGE, "classifier.3", "classifier.2"),
        *(
            Backbone(f"efficientnet_b{i}", _EFFICIENTNET, "classifier.1", "classifier.0")
            for i in range(4)
        ),
        Backbone("efficientnet_v2_s", _EFFICIENTNET_V2, "classifier.1", "classifier.0"),
        *(Backbone(n, _CONVNEXT, "classifier.2") for n in ("convnext_tiny", "convnext_small")),
    ]
    return {b.name: b for b in entries}


BACKBONES: dict[str, Backbone] = _registry()


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def get_backbone(name: str) -> Backbone:
    """The registry entry, or an error that lists the valid choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        choices = ", ".join(backbone_names())
        raise TlctlError(f"backbone.name: unknown backbone {name!r} (valid: {choices})") from None


def num_stages(name: str) -> int:
    return get_backbone(name).num_stages


def head_state_prefix(name: str) -> str:
    """State-dict key prefix of the class-specific head (a dotted submodule path).

    Keys equal to it or starting with it plus "." belong to the head.
    """
    return get_backbone(name).head


def freeze_depth_error(name: str, depth: int) -> str | None:
    """The one rule for `freeze_depth`: 0..num_stages of the backbone (None when valid)."""
    stages = get_backbone(name).num_stages
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= stages:
        return f"{depth} is out of range for {name} (valid: 0..{stages})"
    return None
