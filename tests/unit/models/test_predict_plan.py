"""predict's plan for Parquet input (jobs.models.predict.plan_prediction): column types are
checked on the schema before any value is read, every refusal names the flag and the
column, nothing is unpickled."""

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
from jobs.models.predict import plan_prediction

CLASSES = ["a", "b", "c"]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def plan(tmp_path: Path, source: Path, **kwargs):
    return plan_prediction(
        str(source),
        str(tmp_path / "out"),
        None,
        classes=CLASSES,
        top_k=2,
        fmt="parquet",
        overwrite=False,
        **kwargs,
    )


def test_parquet_files_are_planned_by_rows_with_their_columns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pa.table({"image": [png(i) for i in range(5)], "key": list("vwxyz")}), data / "a.parquet"
    )
    structs = pa.array([{"bytes": png(9), "path": "p.png"}] * 3)
    pq.write_table(pa.table({"image": structs, "key": ["1", "2", "3"]}), data / "b.parquet")
    done = plan(tmp_path, data, id_column="key")
    assert done.parquet is not None and done.parquet.rows == 8
    assert done.parquet.image_column == "image" and done.parquet.id_column == "key"
    assert [Path(f).name for f in done.files] == ["a.parquet", "b.parquet"]
    single = plan(tmp_path, data / "a.parquet")
    assert single.parquet.rows == 5 and single.parquet.id_column is None


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickled_id_column_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    import ray.data  # noqa: F401  registers Ray's pickled-object extension type
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    marker = tmp_path / "unpickled"
    storage = pa.array([pickle.dumps(_Marker(str(marker)))] * 2, pa.large_binary())
    table = pa.table(
        {"image": [png(1), png(2)], "key": ArrowPythonObjectType().wrap_array(storage)}
    )
    pq.write_table(table, tmp_path / "evil.parquet")
    with pytest.raises(
        TlctlError, match=r"--id-column: column 'key' in .* extension<ray.data.arrow_pickled"
    ):
        plan(tmp_path, tmp_path / "evil.parquet", id_column="key")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("table", "kwargs", "words"),
    [
        (pa.table({"pixels": [b"x"]}), {}, "--image-column: column 'image' not in"),
        (pa.table({"image": [1, 2]}), {}, "--image-column: column 'image' in"),
        (pa.table({"image": [b"x"]}), {"id_column": "key"}, "--id-column: column 'key' not in"),
        (pa.table({"image": [b"x"], "key": [[1]]}), {"id_column": "key"}, "has type list"),
        (pa.table({"image": pa.array([], pa.binary())}), {}, "holds no rows"),
    ],
)
def test_bad_parquet_input_is_one_line_naming_the_flag(
    tmp_path: Path, table: pa.Table, kwargs: dict, words: str
) -> None:
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(TlctlError) as info:
        plan(tmp_path, tmp_path / "in.parquet", **kwargs)
    assert info.value.exit_code == 2 and words in info.value.message
    assert "\n" not in info.value.message and not (tmp_path / "out").exists()


def test_a_batch_of_errors_only_keeps_the_output_schema() -> None:
    """Part files are written batch by batch: a batch with no good image must have the
    same column types as any other, or the Parquet writer would refuse it."""
    from jobs.models.predict import _table

    def batch(errors: list[str]) -> dict:
        n = len(errors)
        return {
            "path": np.asarray([f"x{i}.png" for i in range(n)], dtype=object),
            "error": np.asarray(errors, dtype=object),
            "prediction": np.zeros(n, dtype=np.int64),
            "confidence": np.full(n, 0.5),
            "topk_index": np.zeros((n, 2), dtype=np.int64),
            "topk_prob": np.full((n, 2), 0.5),
            "probs": np.full((n, 3), 1 / 3),
        }

    good = _table(batch(["", ""]), CLASSES, "", True)
    bad = _table(batch(["x0.png: broken"]), CLASSES, "", True)
    assert bad.schema == good.schema
    assert bad.to_pylist()[0]["prediction"] is None and bad.to_pylist()[0]["topk_labels"] is None
    assert good.to_pylist()[0]["topk_labels"] == ["a", "a"]
