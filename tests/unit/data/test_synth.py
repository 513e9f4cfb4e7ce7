"""Synthetic datasets: names, rendering, the ImageFolder tree, determinism and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from jobs.data.synth import MARKER, VARIANTS, class_names, render_image, synthesize
from jobs.errors import TlctlError

FS = pafs.LocalFileSystem()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_class_names_per_variant() -> None:
    assert VARIANTS == ("source", "target")
    src, tgt = class_names("source", 8), class_names("target", 8)
    assert src[:3] == ["circle", "square", "triangle"]
    assert len(set(src)) == len(set(tgt)) == 8
    assert not set(src) & set(tgt), "source and target must not share classes"
    assert class_names("source", 6) == src[:6]


def test_class_names_errors_name_the_limit_and_choices() -> None:
    with pytest.raises(TlctlError, match="at most 10 classes"):
        class_names("source", 11)
    with pytest.raises(TlctlError, match="source, target"):
        class_names("imagenet", 6)
    with pytest.raises(TlctlError, match="at least 2"):
        class_names("target", 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_image_shape_dtype_and_determinism(variant: str) -> None:
    a = render_image(variant, 1, np.random.default_rng(7), 40)
    b = render_image(variant, 1, np.random.default_rng(7), 40)
    c = render_image(variant, 1, np.random.default_rng(8), 40)
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(TlctlError, match="out of range"):
        render_image(variant, 10, np.random.default_rng(0), 40)


def test_synthesize_writes_an_imagefolder_tree(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    info = synthesize(FS, str(root), variant="target", classes=3, per_class=4, size=32, seed=5)
    names = class_names("target", 3)
    assert info == {
        "root": str(root),
        "variant": "target",
        "classes": names,
        "per_class": 4,
        "size": 32,
        "images": 12,
    }
    assert sorted(p.name for p in root.iterdir()) == sorted([*names, MARKER])
    for name in names:
        pngs = sorted(p.name for p in (root / name).iterdir())
        assert pngs == [f"{i:05d}.png" for i in range(4)]
        with Image.open(root / name / "00003.png") as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    marker = json.loads((root / MARKER).read_text())
    assert marker["classes"] == names and marker["seed"] == 5 and marker["size"] == 32


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kw = {"classes": 2, "per_class": 3, "size": 24}
    synthesize(FS, str(tmp_path / "a"), seed=1, **kw)
    synthesize(FS, str(tmp_path / "b"), seed=1, **kw)
    synthesize(FS, str(tmp_path / "c"), seed=2, **kw)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_images_do_not_depend_on_dataset_size(tmp_path: Path) -> None:
    # Keyed per image: a bigger dataset extends a smaller one instead of reshuffling it.
    synthesize(FS, str(tmp_path / "small"), classes=2, per_class=2, size=24)
    synthesize(FS, str(tmp_path / "big"), classes=3, per_class=4, size=24)
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert all(big[k] == v for k, v in small.items())


def test_rerun_with_same_parameters_keeps_the_dataset(tmp_path: Path) -> None:
    kw = {"classes": 2, "per_class": 2, "size": 24, "seed": 3}
    first = synthesize(FS, str(tmp_path / "ds"), **kw)
    before = _files(tmp_path / "ds")
    assert synthesize(FS, str(tmp_path / "ds") + "/", **kw) == first
    assert _files(tmp_path / "ds") == before


def test_refuses_non_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(TlctlError, match="synth did not write"):
        synthesize(FS, str(tmp_path / "foreign"), classes=2, per_class=1, size=16)
    synthesize(FS, str(tmp_path / "ds"), classes=2, per_class=1, size=16, seed=0)
    with pytest.raises(TlctlError, match="other parameters"):
        synthesize(FS, str(tmp_path / "ds"), classes=2, per_class=1, size=16, seed=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TlctlError, match="is a file"):
        synthesize(FS, str(tmp_path / "file"), classes=2, per_class=1, size=16)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_empty_directory_is_fine(tmp_path: Path) -> None:
    info = synthesize(FS, str(tmp_path), classes=2, per_class=1, size=16)
    assert info["images"] == 2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"variant": "other"}, "choose one of"),
        ({"classes": 99}, "at most 10"),
        ({"per_class": 0}, "per_class"),
        ({"size": 8}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_raise_before_writing(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(TlctlError, match=match):
        synthesize(FS, str(tmp_path / "ds"), **kw)
    assert not (tmp_path / "ds").exists()
