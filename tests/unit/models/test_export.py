"""tlctl export's core (jobs.models.export): every backbone family exported to pt2 and to
ONNX (run in onnxruntime) with a dynamic batch, verified against eager; the comparison
rule; a wrong program is caught and nothing is written; the bad-input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.errors import TlctlError
from jobs.models.export import (
    ATOL,
    check_format,
    compare,
    load_program,
    normalized,
    random_batches,
    verify,
    write_program,
)
from jobs.training.model import build_model
from jobs.training.steps import to_input

SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The smallest member of each family in the registry (jobs.training.backbones).
FAMILIES = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "convnext_tiny",
]


def _net(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init classifier whose head gives well-separated logits (a torchvision head
    at init gives logits ~1e-16 apart for some families, which proves nothing)."""
    torch.manual_seed(seed)
    net = build_model(name, 4, hidden=(), dropout=0.2)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight, std=1.0)
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_with_a_dynamic_batch_and_matches_eager(
    name: str, fmt: str, tmp_path: Path
) -> None:
    net = _net(name)
    model = normalized(net, MEAN, STD)
    path = str(tmp_path / f"model.{fmt}")
    versions = write_program(model, fmt, SIZE, path)
    assert versions["torch"] == torch.__version__
    run = load_program(fmt, path)  # onnx: onnxruntime's CPU provider
    batches = random_batches(SIZE)
    checks = verify(model, run, batches)
    assert [c["n"] for c in checks] == [1, 2, 7]
    assert all(c["passed"] and c["top1_ties"] == 0 for c in checks), checks
    # The wrapper is the training input path: uint8 NHWC in, the training transform inside.
    images = batches["random-7"]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        trained_path = net(to_input(torch.from_numpy(images), mean, std, False)).numpy()
    assert np.array_equal(model(torch.from_numpy(images)).detach().numpy(), trained_path)
    # A batch size never traced runs too.
    assert run(np.zeros((13, SIZE, SIZE, 3), dtype=np.uint8)).shape == (13, 4)


def test_a_different_program_fails_verification(tmp_path: Path) -> None:
    exported = normalized(_net("resnet18", seed=1), MEAN, STD)
    path = str(tmp_path / "model.pt2")
    write_program(exported, "pt2", SIZE, path)
    checks = verify(
        normalized(_net("resnet18", seed=0), MEAN, STD),
        load_program("pt2", path),
        random_batches(SIZE),
    )
    assert not any(c["passed"] for c in checks)


def test_compare_applies_abs_and_rel_tolerance_and_top1() -> None:
    eager = np.array([[10.0, 0.0, -1.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    ok = compare(eager, eager + np.array([[9e-3, 0, 0], [0, 5e-5, 0]]))  # 1e-4 + 1e-3·10
    assert ok["passed"] and ok["within_tolerance"] and ok["top1_agree"] == 2
    far = compare(eager, eager + np.array([[0, 0, 0], [3 * ATOL, 0, 0]]))  # where eager is 0
    assert not far["passed"] and not far["within_tolerance"]
    assert far["max_abs_diff"] == pytest.approx(3 * ATOL)
    flipped = compare(eager, np.array([[10.0, 0.0, -1.0], [0.0, 1.0, 2.0]]))
    assert not flipped["passed"] and flipped["top1_agree"] == 1


def test_a_tie_within_tolerance_is_not_a_disagreement() -> None:
    eager = np.array([[1.0, 1.0 + ATOL / 2, 0.0]])
    got = np.array([[1.0 + ATOL / 2, 1.0, 0.0]])  # float rounding broke the tie the other way
    result = compare(eager, got)
    assert result["passed"] and result["top1_ties"] == 1


def test_unknown_formats_are_refused_naming_the_choices() -> None:
    with pytest.raises(TlctlError, match=r"--format: 'tflite' is not one of pt2, onnx"):
        check_format("tflite")
    check_format("onnx")  # the test environment installs the extra


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    with pytest.raises(TlctlError, match=r"needs onnxruntime.*pip install 'tlctl\[onnx\]'") as e:
        check_format("onnx")
    assert e.value.exit_code == 2


def test_the_cli_refuses_bad_input_in_one_line_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    runner = CliRunner()
    storage = ["--storage", str(tmp_path)]
    for args, words in (
        (["export", "nope", "--format", "tflite"], "--format: 'tflite' is not one of pt2, onnx"),
        (["export", "nope"], "nope"),
    ):
        out = runner.invoke(app, [*args, *storage])
        assert out.exit_code == 2, out.output
        assert out.output.count("\n") == 1 and words in out.output, out.output
    assert list(tmp_path.iterdir()) == []
