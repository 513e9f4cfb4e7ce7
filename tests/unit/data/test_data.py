"""Data planning: what the driver checks before any compute (local trees, no Ray)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.data.pipeline import augment_batch, decode_image
from jobs.data.plan import DataPlan, plan_data, stratified_split
from jobs.errors import TlctlError
from jobs.spec.model import DataSpec


def make_plan(data: dict, seed: int = 0) -> DataPlan:
    return plan_data(DataSpec.model_validate(data), endpoint=None, seed=seed)


def png(size: int = 8, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tree(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(png(value=i))
    return root


def test_imagefolder_plan_classes_and_split(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"cat": 10, "dog": 20, "eel": 5})
    (root / "notes.txt").write_text("ignored")
    (root / "_synth.json").write_text("{}")
    plan = make_plan({"train": str(root), "val_fraction": 0.2})
    assert plan.classes == ["cat", "dog", "eel"]
    assert plan.train.rows + plan.val.rows == 35
    assert plan.val.rows == 2 + 4 + 1  # stratified: every class in val
    assert set(plan.train.files).isdisjoint(plan.val.files)
    again = make_plan({"train": str(root), "val_fraction": 0.2})
    assert again.val.files == plan.val.files  # fixed seed: the same val set every time
    other = make_plan({"train": str(root), "val_fraction": 0.2}, seed=1)
    assert other.val.files != plan.val.files


def test_labels_follow_class_directories(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"a": 3, "b": 3})
    plan = make_plan({"train": str(root), "val_fraction": 0.3})
    for f, label in zip(plan.train.files, plan.train.labels, strict=True):
        assert Path(f).parent.name == plan.classes[label]


def test_explicit_val_must_use_train_classes(tmp_path: Path) -> None:
    train = tree(tmp_path / "train", {"a": 3, "b": 3})
    ok = tree(tmp_path / "val", {"a": 2, "b": 1})
    plan = make_plan({"train": str(train), "val": str(ok)})
    assert (plan.train.rows, plan.val.rows) == (6, 3)
    bad = tree(tmp_path / "val2", {"a": 1, "zebra": 1})
    with pytest.raises(
        TlctlError, match=r"data.val: classes not in data.train: zebra \(valid: a, b\)"
    ):
        make_plan({"train": str(train), "val": str(bad)})


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"a": 3, "b": 0}, "contains no images"),
        ({"only": 4}, r"has only 1 class \(only\)"),
        ({}, "has no class directories"),
    ],
)
def test_bad_trees(tmp_path: Path, counts, expected) -> None:
    root = tree(tmp_path / "d", counts)
    root.mkdir(exist_ok=True)
    with pytest.raises(TlctlError, match=expected) as info:
        make_plan({"train": str(root)})
    assert info.value.exit_code == 2
    if counts.get("b") == 0:
        assert str(root / "b") in info.value.message  # names the directory


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(TlctlError, match=r"data.train: .*/nope does not exist"):
        make_plan({"train": str(tmp_path / "nope")})


def test_non_parquet_file_rejected(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("a,b")
    with pytest.raises(TlctlError, match="is a file but not Parquet"):
        make_plan({"train": str(f)})


def _parquet(path: Path, labels: list) -> Path:
    table = pa.table({"image": [png(value=i) for i in range(len(labels))], "label": labels})
    pq.write_table(table, path)
    return path


def test_parquet_plan(tmp_path: Path) -> None:
    f = _parquet(tmp_path / "d.parquet", ["b", "a", "b", "c"] * 5)
    plan = make_plan({"train": str(f), "val_fraction": 0.25})
    assert plan.classes == ["a", "b", "c"]
    assert plan.train.kind == "parquet" and plan.val is None
    assert plan.train_rows == 15  # 20 rows less a quarter held out for validation


def test_parquet_dir_and_missing_column(tmp_path: Path) -> None:
    d = tmp_path / "pq"
    d.mkdir()
    _parquet(d / "part-0.parquet", [0, 1, 1])
    _parquet(d / "part-1.parquet", [2, 0, 1])
    plan = make_plan({"train": str(d)})
    assert plan.classes == ["0", "1", "2"] and plan.train.rows == 6
    with pytest.raises(
        TlctlError, match=r"data.label_column: column 'y' not in .*valid: image, label"
    ):
        make_plan({"train": str(d), "label_column": "y"})


def test_decode_resizes_and_names_corrupt_files() -> None:
    img = decode_image(png(size=10, value=7), 16, "x.png")
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="corrupt image /data/cat/bad.png"):
        decode_image(b"not an image", 16, "/data/cat/bad.png")


def test_stratified_split_keeps_one_for_training() -> None:
    train, val = stratified_split({"a": ["1", "2"], "b": ["3", "4", "5"]}, 0.9, seed=0)
    assert {c for _, c in train} == {"a", "b"}
    assert len(val) == 3


def test_augment_keeps_shape_and_labels() -> None:
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    out = augment_batch({"image": images, "label": np.arange(8)})
    assert out["image"].shape == images.shape and out["image"].dtype == np.uint8
    assert (out["label"] == np.arange(8)).all()
    assert not np.array_equal(out["image"], images)  # flips/shifts actually happened
