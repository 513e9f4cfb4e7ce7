"""Pre-flight refuses data that could unpickle, hang or mislead; decoding handles every mode.

Real files, real pyarrow and PIL; local directories stand in for storage.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.data.pipeline import MAX_IMAGE_PIXELS, _decode_rows, decode_image
from jobs.data.plan import DataPlan, plan_data
from jobs.errors import TlctlError
from jobs.spec.model import DataSpec
from jobs.storage.layout import RunLayout

PICKLED = "ray.data.arrow_pickled_object"


def make_plan(data: dict) -> DataPlan:
    return plan_data(DataSpec.model_validate(data), endpoint=None, seed=0)


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


class _Marker:
    """Unpickling this creates a file: proof that something unpickled user data."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _pickled_column(marker: Path, n: int) -> pa.ExtensionArray:
    """Ray's pickled-object column, built as Ray builds one (large_binary of pickles)."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    storage = pa.array([pickle.dumps(_Marker(str(marker))) for _ in range(n)], pa.large_binary())
    return ArrowPythonObjectType().wrap_array(storage)


# --- 1: never unpickle user data --------------------------------------------------------


def test_pickled_label_column_is_refused_unread(tmp_path: Path) -> None:
    import ray.data  # noqa: F401  registers Ray's extension type, as in a driver

    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.parquet"
    table = pa.table({"image": [png()] * 4, "label": _pickled_column(marker, 4)})
    pq.write_table(table, path)
    assert isinstance(pq.read_schema(path).field("label").type, pa.BaseExtensionType)
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(path)})
    assert info.value.exit_code == 2
    message = info.value.message
    assert message.startswith("data.label_column: column 'label' in ")
    assert str(path) in message and PICKLED in message
    assert "valid: string, integer, or dictionary of strings" in message
    assert not marker.exists()
    # The check is real: reading the values the old way runs the payload.
    pq.read_table(path, columns=["label"]).column("label").to_pylist()
    assert marker.exists()


def test_pickled_image_column_is_refused_even_when_ray_is_not_imported(tmp_path: Path) -> None:
    """An unregistered extension type reads as large_binary; its field metadata names it."""
    path = tmp_path / "evil.parquet"
    field = pa.field(
        "image",
        pa.large_binary(),
        metadata={b"ARROW:extension:name": PICKLED.encode(), b"ARROW:extension:metadata": b""},
    )
    schema = pa.schema([field, pa.field("label", pa.string())])
    pq.write_table(pa.table({"image": [b"x", b"y"], "label": ["a", "b"]}, schema=schema), path)
    with pytest.raises(TlctlError, match=rf"data.image_column: .*{PICKLED}") as info:
        make_plan({"train": str(path)})
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("labels", "type_text"),
    [
        (pa.array([[1], [2], [1], [2]]), "list<element: int64>"),
        (pa.array([{"c": "a"}, {"c": "b"}] * 2), "struct<c: string>"),
        (pa.array([0.0, 1.0, float("nan"), 1.0]), "double"),
    ],
)
def test_labels_of_other_types_are_refused(tmp_path: Path, labels, type_text: str) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [png()] * 4, "label": labels}), path)
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(path)})
    assert info.value.message == (
        f"data.label_column: column 'label' in {path} has type {type_text} "
        "(valid: string, integer, or dictionary of strings)"
    )


@pytest.mark.parametrize(
    "image",
    [
        pa.array([[1, 2]] * 4),
        pa.array([{"data": b"x"}] * 4),
        pa.array(["not bytes"] * 4),
    ],
)
def test_images_of_other_types_are_refused(tmp_path: Path, image) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": image, "label": ["a", "b"] * 2}), path)
    with pytest.raises(TlctlError, match=r"data.image_column: column 'image' in .* has type"):
        make_plan({"train": str(path)})
    # What Ray and Hugging Face write stays readable: {bytes, path} images, dictionary labels.
    images = pa.array([{"bytes": png(value=i), "path": f"{i}.png"} for i in range(6)])
    labels = pa.array(["a", "b", "a", "b", "a", "b"]).dictionary_encode()
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    assert make_plan({"train": str(path), "val_fraction": 0.4}).classes == ["a", "b"]


def test_trials_table_of_pickled_objects_is_refused_unread(tmp_path: Path) -> None:
    import ray.data  # noqa: F401

    marker = tmp_path / "unpickled"
    layout = RunLayout.at(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    table = pa.table({"trial_id": ["t1"], "status": _pickled_column(marker, 1)})
    pq.write_table(table, layout.trials_table.path)
    with pytest.raises(TlctlError) as info:
        layout.read_trials_table()
    assert info.value.exit_code == 2
    assert "trials.parquet is not one tlctl wrote: column 'status'" in info.value.message
    assert not marker.exists()


def test_trials_table_tlctl_writes_reads_back(tmp_path: Path) -> None:
    layout = RunLayout.at(str(tmp_path))
    rows = [{"trial_id": "t1", "lr": 0.1, "epochs_run": 2, "error": None, "ok": True}]
    pq.write_table(pa.Table.from_pylist(rows), layout.trials_table.path)
    assert layout.read_trials_table() == rows
    pq.write_table(pa.table({"values": [[1, 2]]}), layout.trials_table.path)
    with pytest.raises(TlctlError, match=r"column 'values' has type list<element: int64>"):
        layout.read_trials_table()


# --- 2: Parquet nulls and splits --------------------------------------------------------


def test_null_labels_are_refused_with_the_count(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [png()] * 5, "label": ["a", None, "b", None, "a"]}), path)
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(path)})
    assert info.value.message == (
        f"data.label_column: column 'label' in {path} has 2 null labels of 5 rows "
        "(every row needs a class: drop those rows or label them)"
    )


@pytest.mark.parametrize("struct", [False, True])
def test_null_images_are_refused_with_the_count(tmp_path: Path, struct: bool) -> None:
    path = tmp_path / "d.parquet"
    raw = [png(), None, png(), png()]
    images = pa.array([{"bytes": r} if r else None for r in raw]) if struct else pa.array(raw)
    pq.write_table(pa.table({"image": images, "label": ["a", "b"] * 2}), path)
    with pytest.raises(TlctlError, match=r"data.image_column: .* has 1 null image of 4 rows"):
        make_plan({"train": str(path)})


def test_a_split_without_validation_or_training_rows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [png()] * 3, "label": ["a", "b", "a"]}), path)
    with pytest.raises(TlctlError, match=r"data.val_fraction: 0.9 of the 3 rows .* no training"):
        make_plan({"train": str(path), "val_fraction": 0.9})
    with pytest.raises(TlctlError, match=r"leaves no validation rows; raise it or set data.val"):
        make_plan({"train": str(path), "val_fraction": 1e-17})
    empty = tmp_path / "val.parquet"
    pq.write_table(
        pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], "string")}), empty
    )
    with pytest.raises(TlctlError, match=r"data.val: .* holds no rows"):
        make_plan({"train": str(path), "val": str(empty)})


def test_train_rows_match_ray_data_split(tmp_path: Path) -> None:
    """Ray's train_test_split keeps int(n * (1 - f)) rows for training."""
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [png()] * 10, "label": ["a", "b"] * 5}), path)
    assert make_plan({"train": str(path), "val_fraction": 0.01}).train_rows == 9


def test_decode_rows_names_a_null_image() -> None:
    batch = {"image": [png(), None], "label": np.array(["a", "b"])}
    with pytest.raises(ValueError, match=r"corrupt image parquet row \(column image, #1\)"):
        _decode_rows(batch, 8, "image", "label", {"a": 0, "b": 1})


# --- 3: ImageFolder entries -------------------------------------------------------------


def test_zero_byte_images_are_refused_by_name(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"a": 2, "b": 2})
    (root / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(root)})
    assert info.value.message == (
        f"data.train: 1 image file is empty (0 bytes): {root / 'b' / 'empty.png'} "
        "(remove them or copy them again)"
    )


def test_entries_that_are_not_regular_files_are_refused_by_name(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"a": 2, "b": 2})
    os.symlink("/dev/zero", root / "a" / "zero.png")
    os.mkfifo(root / "b" / "fifo.jpg")
    os.symlink(root / "nowhere.png", root / "b" / "broken.png")
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(root)})
    message = info.value.message
    assert message.startswith("data.train: 3 image entries are not regular files: ")
    assert f"{root / 'a' / 'zero.png'} (a device)" in message
    assert f"{root / 'b' / 'fifo.jpg'} (a FIFO)" in message
    assert f"{root / 'b' / 'broken.png'} (a broken symlink)" in message


def test_symlink_loops_do_not_hang_and_a_cycle_is_named(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"a": 2, "b": 2})
    for i in range(12):  # 12 loops per level: listing them recursively would never end
        os.symlink("..", root / "a" / f"up{i}")
    plan = make_plan({"train": str(root)})  # below the class level: not followed
    assert plan.classes == ["a", "b"]
    os.symlink(".", root / "loop")
    with pytest.raises(TlctlError) as info:
        make_plan({"train": str(root)})
    assert info.value.message.startswith(f"data.train: {root / 'loop'} is a symlink to ")
    assert "(a directory cycle)" in info.value.message


def test_a_parquet_directory_with_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "pq"
    (d / "part").mkdir(parents=True)
    pq.write_table(pa.table({"image": [png()] * 4, "label": ["a", "b"] * 2}), d / "p0.parquet")
    for i in range(12):
        os.symlink("..", d / "part" / f"up{i}")
    with pytest.raises(TlctlError, match=r"data.train: .*/part/up0 is a symlink to .*cycle"):
        make_plan({"train": str(d)})


def test_underscore_class_directories_are_classes_hidden_ones_are_not(tmp_path: Path) -> None:
    root = tree(tmp_path / "d", {"_unknown": 2, "cat": 2, ".cache": 2, "__MACOSX": 1})
    (root / "cat" / ".hidden.png").write_bytes(png())
    plan = make_plan({"train": str(root)})
    assert plan.classes == ["_unknown", "cat"]
    assert plan.train.rows + plan.val.rows == 4


# --- 3/4: decoding ----------------------------------------------------------------------


def _encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_oversized_image_is_named_and_never_decoded() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1  # over the limit, under PIL's 2x error
    data = _encoded(Image.new("L", (side, side)))
    with pytest.raises(ValueError, match=r"corrupt image /data/a/big.png: .* over the limit"):
        decode_image(data, 16, "/data/a/big.png")


def test_16_bit_and_float_images_are_scaled_not_clipped() -> None:
    deep = np.array([[0, 65535], [32768, 1000]], np.uint16)
    img = Image.fromarray(deep)
    assert img.mode == "I;16"
    out = decode_image(_encoded(img), 2, "x.png")
    assert out[..., 0].tolist() == [[0, 255], [128, 4]]
    assert (out[..., 0] == out[..., 1]).all()
    wide = Image.fromarray(deep.astype(np.int32))
    assert wide.mode == "I"
    assert decode_image(_encoded(wide, "TIFF"), 2, "x.tif")[..., 0].tolist() == [
        [0, 255],
        [128, 4],
    ]
    unit = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32))
    assert unit.mode == "F"
    assert decode_image(_encoded(unit, "TIFF"), 2, "x.tif")[..., 0].tolist() == [
        [0, 255],
        [128, 64],
    ]
    hdr = Image.fromarray(np.array([[-2.0, 6.0], [2.0, 0.0]], np.float32))
    assert decode_image(_encoded(hdr, "TIFF"), 2, "x.tif")[..., 0].tolist() == [
        [0, 255],
        [128, 64],
    ]


def test_alpha_palette_and_cmyk_become_rgb() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue: white background
    assert decode_image(_encoded(rgba), 2, "x.png")[0].tolist() == [
        [255, 0, 0],
        [255, 255, 255],
    ]
    la = Image.new("LA", (2, 2), (0, 128))  # half-transparent black over white
    assert decode_image(_encoded(la), 2, "x.png")[0, 0].tolist() == [127, 127, 127]
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1  # index 1 (red) is transparent
    assert decode_image(_encoded(pal), 2, "x.png")[0, 0].tolist() == [255, 255, 255]
    pal.info.pop("transparency")
    assert decode_image(_encoded(pal), 2, "x.png")[0, 0].tolist() == [255, 0, 0]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert decode_image(_encoded(cmyk, "JPEG"), 2, "x.jpg")[0, 0].tolist() == pytest.approx(
        [255, 0, 0], abs=3
    )
