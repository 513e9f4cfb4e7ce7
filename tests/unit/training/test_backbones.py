"""Unit tests of the backbone registry: stages, freezing, heads and weight loading.

Structural tests (stages, freezing, state-dict keys) build models on the meta device,
which skips weight init and costs almost nothing; tests that run a forward pass use real
random weights, 32-64 px inputs, and a cached model where they only read it.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from jobs.errors import TlctlError
from jobs.training import backbones
from jobs.training import model as models

NAMES = backbones.backbone_names()
REQUIRED = {
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_b1",
    "convnext_tiny",
}
EXPECTED_STAGES = {"resnet": 5, "mobilenet": 5, "efficientnet": 5, "convnext": 4}
NUM_CLASSES = 3


HIDDEN = (16, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-CPU box they spin."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _meta(name: str, **kwargs) -> nn.Module:
    """A model without storage: enough for structure, requires_grad and state-dict keys."""
    with torch.device("meta"):
        return models.build_model(name, NUM_CLASSES, **kwargs)


@functools.cache
def _real(name: str) -> nn.Module:
    """The one real model per backbone: hidden head layers, all but the last stage frozen.

    Shared by the forward-pass tests. They check shapes and BatchNorm statistics only,
    so the BatchNorm test updating running statistics does not disturb the others.
    """
    torch.manual_seed(0)
    depth = backbones.num_stages(name) - 1
    return models.build_model(
        name, NUM_CLASSES, hidden=HIDDEN, dropout=0.3, freeze_depth=depth
    ).eval()


def _head_keys(model: nn.Module, name: str) -> set[str]:
    prefix = backbones.head_state_prefix(name)
    return {k for k in model.state_dict() if k == prefix or k.startswith(prefix + ".")}


def _stage_params(model: nn.Module, name: str) -> list[set[int]]:
    stages = backbones.get_backbone(name).stages(model)
    return [{id(p) for m in stage for p in m.parameters()} for stage in stages]


def _head_params(model: nn.Module, name: str) -> set[int]:
    head = model.get_submodule(backbones.head_state_prefix(name))
    return {id(p) for p in head.parameters()}


# --- registry ---------------------------------------------------------------------------


def test_registry_has_required_backbones_sorted() -> None:
    assert REQUIRED <= set(backbones.BACKBONES)
    assert NAMES == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_stage_counts(name: str) -> None:
    family = next(f for f in EXPECTED_STAGES if name.startswith(f))
    assert backbones.num_stages(name) == EXPECTED_STAGES[family]


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(TlctlError) as info:
        backbones.get_backbone("resnet9000")
    message = str(info.value)
    assert message.startswith("backbone.name:")
    assert "resnet9000" in message
    assert all(name in message for name in NAMES)
    with pytest.raises(TlctlError, match="backbone.name"):
        models.build_model("resnet9000", 2)


@pytest.mark.parametrize("name", NAMES)
def test_stages_partition_backbone_params(name: str) -> None:
    model = _meta(name)
    stages, head = _stage_params(model, name), _head_params(model, name)
    assert head, "the head has parameters"
    seen: set[int] = set()
    for stage in stages:
        assert stage, "every stage has parameters"
        assert not stage & seen, "a parameter is in two stages"
        seen |= stage
    assert not seen & head
    assert seen | head == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_stages_start_at_each_downsampling(name: str) -> None:
    """Stage k runs at one resolution, reached by its first module; the last at stride 32.

    Pre-logits layers after pooling (`classifier.*`) are left out: they have no resolution.
    """
    model = _real(name)
    paths = backbones.get_backbone(name).stage_paths
    sizes: dict[str, int] = {}
    hooks = [
        model.get_submodule(p).register_forward_hook(
            lambda mod, i, out, p=p: sizes.__setitem__(p, out.shape[-1])
        )
        for stage in paths
        for p in stage
        if not p.startswith("classifier")
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    resolution = []
    for stage in paths:
        widths = [sizes[p] for p in stage if p in sizes]
        assert len(set(widths)) == 1, f"stage changes resolution inside: {stage} {widths}"
        resolution.append(widths[0])
    assert resolution[0] in (32, 16)  # stride 2 stem, or ConvNeXt's stride 4 stem
    assert resolution[1:] == [r // 2 for r in resolution[:-1]], resolution
    assert resolution[-1] == 2


# --- freezing ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_freeze_depth_freezes_exactly_the_first_stages(name: str) -> None:
    model = _meta(name)
    for depth in range(backbones.num_stages(name) + 1):
        models.freeze_stages(model, name, depth)  # cumulative: stages 0..depth-1 frozen
        stages = _stage_params(model, name)
        frozen_ids = set().union(*stages[:depth])
        for p in model.parameters():
            assert p.requires_grad == (id(p) not in frozen_ids)
        assert _head_params(model, name) <= {id(p) for p in model.parameters() if p.requires_grad}
        trainable = models.trainable_parameters(model)
        assert {id(p) for p in trainable} == {
            id(p) for p in model.parameters() if id(p) not in frozen_ids
        }


def test_build_model_freezes_everything_but_the_head_at_max_depth() -> None:
    name = "mobilenet_v3_small"
    model = _meta(name, freeze_depth=backbones.num_stages(name))
    trainable = {id(p) for p in models.trainable_parameters(model)}
    assert trainable == _head_params(model, name)


@pytest.mark.parametrize("depth", [-1, 6])
def test_freeze_depth_out_of_range(depth: int) -> None:
    with pytest.raises(TlctlError) as info:
        models.build_model("resnet18", 2, freeze_depth=depth)
    assert str(info.value) == (
        f"backbone.freeze_depth: {depth} is out of range for resnet18 (valid: 0..5)"
    )


BN_NAMES = [n for n in NAMES if not n.startswith("convnext")]


@pytest.mark.parametrize("name", BN_NAMES)
def test_frozen_batchnorm_keeps_running_stats(name: str) -> None:
    """At depth K-1 one train-mode pass shows both: frozen BN unchanged, trainable BN updated."""
    depth = backbones.num_stages(name) - 1
    model = _real(name)  # built with freeze_depth=depth
    stages = backbones.get_backbone(name).stages(model)
    frozen = [
        m for s in stages[:depth] for top in s for m in top.modules() if isinstance(m, _BatchNorm)
    ]
    free = [m for top in stages[-1] for m in top.modules() if isinstance(m, _BatchNorm)]
    before = [m.running_mean.clone() for m in frozen + free]

    models.set_train_mode(model, True)
    assert all(not m.training for m in frozen) and all(m.training for m in free)
    assert model.training and model.get_submodule(backbones.head_state_prefix(name)).training
    out = model(torch.randn(2, 3, 32, 32))

    assert out.shape == (2, NUM_CLASSES)
    bns = frozen + free
    changed = [not torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True)]
    assert not any(changed[: len(frozen)]), "a frozen BatchNorm updated its running mean"
    assert any(changed[len(frozen) :]), "no trainable BatchNorm updated its running mean"
    models.set_train_mode(model, False)


@pytest.mark.parametrize("name", BN_NAMES)
def test_max_depth_puts_every_batchnorm_in_eval(name: str) -> None:
    model = _meta(name, freeze_depth=backbones.num_stages(name))
    models.set_train_mode(model, True)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(not m.training for m in bns)
    models.set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


def test_unfrozen_batchnorm_updates_at_depth_zero() -> None:
    model = models.build_model("resnet18", NUM_CLASSES)
    models.set_train_mode(model, True)
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, model.bn1.running_mean)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_set_train_mode_through_ddp(tmp_path: Path) -> None:
    import torch.distributed as dist

    name = "mobilenet_v3_small"
    model = models.build_model(name, 2, freeze_depth=2)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        models.set_train_mode(ddp, True)
        stem_bn = model.features[0][1]
        late_bn = model.features[12][1]
        assert ddp.training and not stem_bn.training and late_bn.training
    finally:
        dist.destroy_process_group()


# --- heads ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_default_head_loads_strictly_into_torchvision(name: str) -> None:
    """Keys and shapes checked on meta models (assign=True); one real load below."""
    ours = _meta(name).state_dict()
    with torch.device("meta"):
        plain = torchvision.models.get_model(name, num_classes=NUM_CLASSES)
    plain.load_state_dict(ours, strict=True, assign=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in ours.items()
    }
    head = plain.get_submodule(backbones.head_state_prefix(name))
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES


@pytest.mark.parametrize("name", NAMES)
def test_hidden_layers_output_shape(name: str) -> None:
    model = _real(name)
    head = model.get_submodule(backbones.head_state_prefix(name))
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert head[2].p == 0.3
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_dropout_in_classifier_or_as_hook() -> None:
    mnv3 = models.build_model("mobilenet_v3_large", 2, dropout=0.4)
    assert mnv3.classifier[2].p == 0.4
    resnet = models.build_model("resnet18", 2, dropout=0.5)
    x = torch.ones(4, 512)
    resnet.train()
    assert not torch.equal(resnet.fc(x), resnet.fc(x))  # dropout on fc's input
    resnet.eval()
    assert torch.equal(resnet.fc(x), resnet.fc(x))
    no_drop = models.build_model("resnet18", 2, dropout=0.0).train()
    assert torch.equal(no_drop.fc(x), no_drop.fc(x))


def test_convnext_keeps_its_classifier_norm() -> None:
    model = _meta("convnext_tiny")
    assert [type(m).__name__ for m in model.classifier] == ["LayerNorm2d", "Flatten", "Linear"]
    hidden = _meta("convnext_tiny", hidden=(8,))
    assert type(hidden.classifier[0]).__name__ == "LayerNorm2d"


def test_real_default_model_loads_into_torchvision_and_runs() -> None:
    model = models.build_model("mobilenet_v3_small", NUM_CLASSES).eval()
    plain = torchvision.models.get_model("mobilenet_v3_small", num_classes=NUM_CLASSES).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"hidden": (0,)}, "head.hidden"),
        ({"dropout": 1.0}, "head.dropout"),
    ],
)
def test_bad_head_arguments(kwargs: dict, field: str) -> None:
    args = {"num_classes": 2, **kwargs}
    with pytest.raises(TlctlError, match=field):
        models.build_model("resnet18", args.pop("num_classes"), **args)


# --- weights ----------------------------------------------------------------------------


def _assert_backbone_transferred(source: dict, model: nn.Module, name: str) -> None:
    head = _head_keys(model, name)
    target = model.state_dict()
    for key, value in target.items():
        if key in head:
            assert key not in source or not torch.equal(source[key], value)
        else:
            assert torch.equal(source[key], value), key


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_weights_from_a_model_with_other_classes(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.build_model(name, 7).state_dict()
    path = tmp_path / "model.pt"
    torch.save(source, path)
    model = models.build_model(name, 2, weights=str(path), freeze_depth=2)
    _assert_backbone_transferred(source, model, name)
    assert model.get_submodule(backbones.head_state_prefix(name)).out_features == 2


def test_weights_same_classes_still_skip_the_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = models.build_model("resnet18", 3).state_dict()
    torch.save(source, tmp_path / "w.pth")
    model = models.build_model("resnet18", 3, weights=str(tmp_path / "w.pth"))
    _assert_backbone_transferred(source, model, "resnet18")


def test_weights_from_checkpoint_dict_in_a_run_dir(tmp_path: Path) -> None:
    """A tlctl run prefix (model/model.pt) and a checkpoint holding {"model": state_dict}."""
    source = models.build_model("mobilenet_v3_small", 4).state_dict()
    (tmp_path / "model").mkdir()
    torch.save({"model": source, "epoch": 3, "classes": ["a", "b"]}, tmp_path / "model/model.pt")
    for where in (tmp_path, tmp_path / "model"):
        model = models.build_model("mobilenet_v3_small", 2, weights=str(where))
        _assert_backbone_transferred(source, model, "mobilenet_v3_small")


def test_weights_through_load_bytes(tmp_path: Path) -> None:
    source = models.build_model("resnet18", 4).state_dict()
    torch.save(source, tmp_path / "model.pt")
    objects = {"s3://bucket/runs/r1/model/model.pt": (tmp_path / "model.pt").read_bytes()}
    asked: list[str] = []

    def load_bytes(uri: str) -> bytes:
        asked.append(uri)
        if uri not in objects:
            raise FileNotFoundError(uri)
        return objects[uri]

    model = models.build_model("resnet18", 2, weights="s3://bucket/runs/r1/", load_bytes=load_bytes)
    _assert_backbone_transferred(source, model, "resnet18")
    # The weights, then their manifest (absent here: a plain weights file is only unpickled).
    assert asked[-2:] == [
        "s3://bucket/runs/r1/model/model.pt",
        "s3://bucket/runs/r1/model/manifest.json",
    ]


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(TlctlError, match="backbone.weights") as info:
        models.build_model("resnet18", 2, weights=str(missing))
    assert str(missing) in str(info.value)


def test_garbage_weights_file(tmp_path: Path) -> None:
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(TlctlError, match="not a PyTorch weights file") as info:
        models.build_model("resnet18", 2, weights=str(garbage))
    assert str(garbage) in str(info.value)


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    torch.save(models.build_model("resnet18", 2).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(TlctlError, match="does not look like a mobilenet_v2 state_dict"):
        models.build_model("mobilenet_v2", 2, weights=str(tmp_path / "r18.pt"))


def _online() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return False
    return True


def test_imagenet_offline_error_says_how_to_stage(tmp_path, monkeypatch) -> None:
    if _online():
        pytest.skip("network available: the download would succeed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(models, "DOWNLOAD_TIMEOUT_S", 5.0)
    with pytest.raises(TlctlError) as info:
        models.build_model("mobilenet_v3_small", 2, weights="imagenet")
    message = str(info.value)
    assert "ImageNet weights for mobilenet_v3_small could not be downloaded" in message
    assert "$TORCH_HOME/hub/checkpoints/" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "mobilenet_v3_small-047dcff4.pth" in message
    assert "s3://" in message and "backbone.weights" in message


def test_imagenet_weights_staged_in_torch_home_load_offline(tmp_path, monkeypatch) -> None:
    """Following the error's advice works: a file in $TORCH_HOME/hub/checkpoints is used."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "mobilenet_v3_small"
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    staged = torchvision.models.get_model(name).state_dict()  # 1000 classes, like ImageNet
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(staged, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = models.build_model(name, 2, weights="imagenet")
    _assert_backbone_transferred(staged, model, name)


def test_normalization() -> None:
    mean, std = models.normalization("efficientnet_b1", "imagenet")
    assert mean == pytest.approx(backbones.IMAGENET_MEAN) and len(std) == 3
    assert models.normalization("resnet18", "none") == (
        backbones.IMAGENET_MEAN,
        backbones.IMAGENET_STD,
    )
    assert models.normalization("resnet18", "s3://b/model.pt")[1] == backbones.IMAGENET_STD
    with pytest.raises(TlctlError, match="backbone.name"):
        models.normalization("vgg0", "imagenet")
