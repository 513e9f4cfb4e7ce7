"""Checkpoint/model manifests: written last, and any missing, short, long or altered file
makes a directory "not a checkpoint" (locally, in storage, and for weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from jobs.errors import TlctlError
from jobs.storage.layout import MANIFEST, RunLayout, checkpoint_name
from jobs.storage.location import resolve
from jobs.storage.manifest import verify, verify_local, write_local_manifest
from jobs.training.model import build_model


def checkpoint_dirs(run: Path) -> list:
    return RunLayout(resolve(str(run))).checkpoint_dirs()


def checkpoint(directory: Path, payload: bytes = b"x" * 1000) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(payload)
    (directory / "state.pt").write_bytes(b"state")
    (directory / "meta.json").write_text('{"epoch": 0}')
    write_local_manifest(str(directory))
    return directory


def test_a_complete_checkpoint_verifies_locally_and_in_storage(tmp_path: Path) -> None:
    d = checkpoint(tmp_path / "epoch-0000")
    manifest = json.loads((d / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["meta.json", "model.pt", "state.pt"]
    assert manifest["files"]["model.pt"]["size"] == 1000
    assert verify_local(str(d)) is None
    assert verify(resolve(str(d))) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "model.pt").write_bytes(b"x" * 500), "model.pt has 500 bytes"),
        (lambda d: (d / "model.pt").write_bytes(b"x" * 1001), "model.pt has 1001 bytes"),
        (lambda d: (d / "model.pt").write_bytes(b"y" * 1000), "model.pt does not match its SHA"),
        (lambda d: (d / "state.pt").unlink(), "state.pt is missing"),
        (lambda d: (d / MANIFEST).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST).write_text("{"), "not valid JSON"),
    ],
)
def test_any_damage_is_found_with_its_reason(tmp_path: Path, damage, reason: str) -> None:
    d = checkpoint(tmp_path / "epoch-0001")
    damage(d)
    assert reason in (verify_local(str(d)) or "")
    assert reason in (verify(resolve(str(d))) or "")


def test_checkpoint_dirs_are_listed_newest_first(tmp_path: Path) -> None:
    for epoch in (0, 2, 1):
        checkpoint(tmp_path / "checkpoints" / f"epoch-{epoch:04d}")
    (tmp_path / "checkpoints" / "checkpoint_manager_snapshot.json").write_text("{}")
    found = checkpoint_dirs(tmp_path)
    assert [epoch for epoch, _ in found] == [2, 1, 0]
    assert found[0][1].uri.endswith("epoch-0002")
    assert checkpoint_dirs(tmp_path / "none") == []


def test_a_checkpoint_name_is_never_reused(tmp_path: Path) -> None:
    """Ray Train deletes an evicted checkpoint by path: a re-run epoch must not take the
    name of the (broken) checkpoint it replaces."""
    assert checkpoint_name(3, []) == "epoch-0003"
    assert checkpoint_name(1, ["epoch-0000", "epoch-0001"]) == "epoch-0001-r2"
    assert checkpoint_name(1, ["epoch-0001", "epoch-0001-r2"]) == "epoch-0001-r3"
    for name in ("epoch-0001", "epoch-0001-r2", "epoch-0001-r3"):
        checkpoint(tmp_path / "checkpoints" / name)
    found = checkpoint_dirs(tmp_path)
    assert [loc.uri.rsplit("/", 1)[-1] for _, loc in found] == [
        "epoch-0001-r3",
        "epoch-0001-r2",
        "epoch-0001",
    ]


def test_truncated_model_weights_are_reported_never_loaded(tmp_path: Path) -> None:
    model = torchvision.models.get_model("resnet18", num_classes=3)
    d = tmp_path / "run" / "model"
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / "model.pt")
    write_local_manifest(str(d))
    built = build_model("resnet18", 4, weights=str(tmp_path / "run"))
    assert built is not None  # intact: loads (through the run prefix)

    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TlctlError) as err:
        build_model("resnet18", 4, weights=str(tmp_path / "run"))
    assert "truncated or corrupt" in err.value.message and "model.pt" in err.value.message
    os.remove(d / MANIFEST)  # a plain weights file without a manifest is only unpickled
    with pytest.raises(TlctlError, match="is not a PyTorch weights file"):
        build_model("resnet18", 4, weights=str(tmp_path / "run"))
