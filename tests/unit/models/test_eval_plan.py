"""evaluate's plan for Parquet data (jobs.models.evaluate.plan_evaluation): labels read
only after the column types are checked, named as training names Parquet classes, each a
class of the model; every refusal one line naming the flag."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.errors import TlctlError
from jobs.models.evaluate import plan_evaluation

CLASSES = ["0", "1", "cat", "dog"]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_rows_of_every_file_get_their_labels_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pa.table({"image": [png(1), png(2)], "label": ["dog", "cat"]}), data / "a.parquet"
    )
    structs = pa.array([{"bytes": png(3), "path": "p.png"}] * 3)
    pq.write_table(pa.table({"img": structs, "label": ["cat"] * 3}), data / "b.parquet")
    with pytest.raises(TlctlError, match="--image-column: column 'image' not in .*b.parquet"):
        plan_evaluation(str(data), None, CLASSES)
    (data / "b.parquet").unlink()
    pq.write_table(pa.table({"image": structs, "label": ["cat"] * 3}), data / "b.parquet")
    plan = plan_evaluation(str(data), None, CLASSES)
    assert plan.parquet is not None and plan.parquet.rows == 5
    assert plan.labels == [3, 2, 2, 2, 2] and plan.data_classes == ["cat", "dog"]


def test_integer_labels_are_the_classes_training_named_from_them(tmp_path: Path) -> None:
    pq.write_table(pa.table({"im": [png(1), png(2)], "y": [1, 0]}), tmp_path / "d.parquet")
    plan = plan_evaluation(
        str(tmp_path / "d.parquet"), None, CLASSES, image_column="im", label_column="y"
    )
    assert plan.labels == [1, 0]


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickled_label_column_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    import ray.data  # noqa: F401  registers Ray's pickled-object extension type
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    marker = tmp_path / "unpickled"
    storage = pa.array([pickle.dumps(_Marker(str(marker)))] * 2, pa.large_binary())
    labels = ArrowPythonObjectType().wrap_array(storage)
    pq.write_table(pa.table({"image": [png(1), png(2)], "label": labels}), tmp_path / "e.parquet")
    with pytest.raises(TlctlError, match=r"--label-column: column 'label' in .* extension"):
        plan_evaluation(str(tmp_path / "e.parquet"), None, CLASSES)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("table", "words"),
    [
        (pa.table({"image": [png(1)], "label": ["bird"]}), "class bird is unknown to the model"),
        (pa.table({"image": [png(1)], "tag": ["cat"]}), "--label-column: column 'label' not in"),
        (pa.table({"image": [png(1)], "label": [[1]]}), "--label-column: column 'label' in"),
        (pa.table({"image": [png(1), None], "label": ["cat", "dog"]}), "--image-column:"),
        (
            pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())}),
            "holds no rows",
        ),
    ],
)
def test_bad_parquet_data_is_one_line_naming_the_flag(
    tmp_path: Path, table: pa.Table, words: str
) -> None:
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(TlctlError) as info:
        plan_evaluation(str(tmp_path / "d.parquet"), None, CLASSES)
    assert info.value.exit_code == 2 and words in info.value.message, info.value.message
    assert "\n" not in info.value.message
