"""`tlctl predict`: batch inference with a run's model over a folder or prefix of images.

An actor pool (jobs.models.scoring) reads, decodes (the training decode and resize) and
scores the files; an image that does not decode becomes a row with its `error`, not a
failed job. The rows stream back to this process, which writes them as Parquet or CSV part
files under the output location, which must be new (or `overwrite`: its old files are
removed first, so a re-run never duplicates rows); `_meta.json` is written last: the
model, its digest, row counts.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.data.plan import IMAGE_EXTENSIONS
from jobs.errors import TlctlError
from jobs.models.ref import ModelRef
from jobs.models.scoring import ParquetInput, is_parquet, scored
from jobs.storage.lease import acquire
from jobs.storage.location import Location, delete_tree, exists, list_dir, resolve, write_text

PREDICT_META = "_meta.json"
PREDICT_LEASE = "_lease.json"  # "_": Parquet and CSV readers skip it while it is there
FORMATS = ("parquet", "csv")
MAX_LISTED = 5
ROWS_PER_PART = 100_000


@dataclass(frozen=True)
class PredictPlan:
    source: Location
    files: list[str]
    output: Location
    fmt: str
    top_k: int
    all_probs: bool = False
    parquet: ParquetInput | None = None  # Parquet rows instead of image files


def _check_parquet(
    loc: Location, files: list[str], image_column: str, id_column: str | None
) -> ParquetInput:
    """Column types checked on each file's schema, before any value is read (nothing
    is unpickled: an extension type is refused, naming the column)."""
    import pyarrow.parquet as pq

    from jobs.data.plan import VALID_IMAGE_TYPES, image_leaf, is_plain_scalar, type_text

    rows = 0
    for path in files:
        with loc.fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
            rows += meta.metadata.num_rows
        for column, flag in ((image_column, "--image-column"), (id_column, "--id-column")):
            if column is not None and column not in schema.names:
                raise TlctlError(
                    f"{flag}: column '{column}' not in {path} (valid: {', '.join(schema.names)})"
                )
        if image_leaf(schema.field(image_column)) is None:
            raise TlctlError(
                f"--image-column: column '{image_column}' in {path} has type "
                f"{type_text(schema.field(image_column))} (valid: {VALID_IMAGE_TYPES})"
            )
        if id_column is not None and not is_plain_scalar(schema.field(id_column)):
            raise TlctlError(
                f"--id-column: column '{id_column}' in {path} has type "
                f"{type_text(schema.field(id_column))} (valid: a string, integer or other "
                "plain scalar)"
            )
    if rows == 0:
        raise TlctlError(f"--input: {loc.uri} holds no rows")
    return ParquetInput(image_column, id_column, rows)


def _local_images(root: str, field: str) -> list[str]:
    """Image files under `root` (directory symlinks are not followed: no loops); an entry
    that is not a regular file (a device behind a symlink) is refused by name."""
    found, odd = [], []
    for directory, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(directory, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                odd.append(f"{path} (unreadable)")
                continue
            if not stat.S_ISREG(mode):
                odd.append(f"{path} (not a regular file)")
            else:
                found.append(path)
    if odd:
        raise TlctlError(
            f"{field}: {len(odd)} image entr{'y is' if len(odd) == 1 else 'ies are'} not "
            f"readable regular files: {', '.join(odd[:MAX_LISTED])} (remove or replace them)"
        )
    return found


def _remote_images(loc: Location) -> list[str]:
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True, recursive=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith(".")
        and i.base_name.lower().endswith(IMAGE_EXTENSIONS)
    )


def list_images(loc: Location, field: str) -> list[str]:
    """The image files under a folder or prefix, recursively; none is an error naming
    `field` (the flag that gave it)."""
    if loc.is_s3:
        files = _remote_images(loc)
    elif os.path.isdir(loc.path):
        files = _local_images(loc.path, field)
    else:
        raise TlctlError(f"{field}: {loc.uri} is not a directory")
    if not files:
        raise TlctlError(
            f"{field}: no images under {loc.uri} ({', '.join(IMAGE_EXTENSIONS)}; hidden "
            "files are skipped)"
        )
    return files


def check_new_output(loc: Location, flag: str, overwrite: bool) -> None:
    """An output location must be new or empty unless `overwrite` (its files are then
    replaced, never appended to): exit 2 naming `flag`."""
    if exists(loc) and list_dir(loc) and not overwrite:
        raise TlctlError(
            f"{flag}: {loc.uri} exists already; choose a new location or pass --overwrite "
            "(its files are then replaced)"
        )


def plan_prediction(
    input_uri: str,
    output_uri: str,
    endpoint: str | None,
    *,
    classes: list[str],
    top_k: int,
    fmt: str,
    overwrite: bool,
    all_probs: bool = False,
    image_column: str = "image",
    id_column: str | None = None,
) -> PredictPlan:
    """Everything checked before Ray starts: the input has images (files, or a Parquet
    column of a type tlctl reads), top-k fits, the output is new (or may be overwritten)
    and is not inside the input."""
    if fmt not in FORMATS:
        raise TlctlError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not 1 <= top_k <= len(classes):
        raise TlctlError(
            f"--top-k: {top_k} is out of range for a model of {len(classes)} classes "
            f"(valid: 1..{len(classes)})"
        )
    source = resolve(input_uri, endpoint, field="--input", endpoint_field="--endpoint")
    output = resolve(output_uri, endpoint, field="--output", endpoint_field="--endpoint")
    if source.is_s3 == output.is_s3 and (output.path.rstrip("/") + "/").startswith(
        source.path.rstrip("/") + "/"
    ):
        raise TlctlError(f"--output: {output.uri} is inside --input {source.uri}; choose another")
    parquet = None
    if is_parquet(source):
        from jobs.data.plan import parquet_files

        files = parquet_files(source, "--input")
        parquet = _check_parquet(source, files, image_column, id_column)
    else:
        files = list_images(source, "--input")
    check_new_output(output, "--output", overwrite)
    return PredictPlan(source, files, output, fmt, top_k, all_probs, parquet)


def _table(batch: dict[str, Any], classes: list[str], scheme: str, all_probs: bool):
    """Scorer output → the output columns (pyarrow); a row with an error has no prediction.
    Image files are named by `path`; Parquet rows by `id`."""
    import pyarrow as pa

    names = np.asarray(classes, dtype=object)
    good = batch["error"] == ""
    index = batch["prediction"].astype(np.int64)
    mask = ~good

    def listed(values: np.ndarray, of, item: pa.DataType) -> pa.Array:
        # typed: a batch of errors only must not make a column of nulls (a schema change)
        rows = [of(v) if g else None for g, v in zip(good, values, strict=True)]
        return pa.array(rows, type=pa.list_(item))

    key = "id" if "id" in batch else "path"
    columns = {
        key: pa.array([scheme + str(p) for p in batch[key]], type=pa.string()),
        "prediction": pa.array(names[index].astype(str), type=pa.string(), mask=mask),
        "index": pa.array(index, type=pa.int64(), mask=mask),
        "confidence": pa.array(batch["confidence"], type=pa.float64(), mask=mask),
        "topk_labels": listed(
            batch["topk_index"], lambda t: [str(n) for n in names[t]], pa.string()
        ),
        "topk_probs": listed(batch["topk_prob"], lambda v: [float(x) for x in v], pa.float64()),
    }
    if all_probs:
        columns["probs"] = listed(batch["probs"], lambda v: [float(x) for x in v], pa.float64())
    columns["error"] = pa.array(
        [None if g else str(e) for g, e in zip(good, batch["error"], strict=True)],
        type=pa.string(),
    )
    return pa.table(columns)


def _as_csv(table):  # -> pyarrow.Table with the list columns joined by "|"
    import pyarrow as pa

    for i, name in enumerate(table.column_names):
        if pa.types.is_list(table.schema.field(name).type):
            joined = [
                "" if v is None else "|".join(map(str, v)) for v in table.column(name).to_pylist()
            ]
            table = table.set_column(i, name, pa.array(joined, type=pa.string()))
    return table


class _PartWriter:
    """The output as part files of at most ROWS_PER_PART rows, written by this process
    alone (the only writer of --output), in the order the batches arrive."""

    def __init__(self, out: Location, fmt: str) -> None:
        self.out, self.fmt, self.part, self.writer, self.rows = out, fmt, 0, None, 0

    def write(self, table) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if self.writer is None:
            if not self.out.is_s3:
                self.out.fs.create_dir(self.out.path, recursive=True)
            loc = self.out.join(f"part-{self.part:05d}.{self.fmt}")
            self.stream = loc.fs.open_output_stream(loc.path)
            self.writer = (
                pq.ParquetWriter(self.stream, table.schema)
                if self.fmt == "parquet"
                else pacsv.CSVWriter(self.stream, _as_csv(table).schema)
            )
        self.writer.write_table(table if self.fmt == "parquet" else _as_csv(table))
        self.rows += table.num_rows
        if self.rows >= ROWS_PER_PART:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            self.writer, self.rows, self.part = None, 0, self.part + 1


def predict(
    ref: ModelRef,
    plan: PredictPlan,
    *,
    actors: int | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the inference and write the output under the output's lease (two predicts into
    one location: the second is refused, exit 2); returns what `_meta.json` holds.
    `on_rows(done)` after each batch written."""
    lease = acquire(
        plan.output.join(PREDICT_LEASE),
        job="tlctl predict",
        what=f"the predictions at {plan.output.uri}",
        prune_empty_parent=True,
    )
    with lease.start():
        return _predict(ref, plan, actors, on_rows)


def _predict(
    ref: ModelRef, plan: PredictPlan, actors: int | None, on_rows: Callable[[int], None] | None
) -> dict[str, Any]:
    start = time.time()
    for name in list_dir(plan.output):  # --overwrite (checked in the plan): all but the lease
        if name != PREDICT_LEASE:
            delete_tree(plan.output.join(name))
    classes = list(ref.model.info["classes"])
    scheme = "s3://" if plan.source.is_s3 and plan.parquet is None else ""
    writer = _PartWriter(plan.output, plan.fmt)
    rows = errors = 0
    first: float | None = None
    try:
        for batch in scored(
            plan.source,
            plan.files,
            ref,
            plan.top_k,
            strict=False,
            all_probs=plan.all_probs,
            actors=actors,
            parquet=plan.parquet,
        ):
            first = first or time.time()
            table = _table(batch, classes, scheme, plan.all_probs)
            writer.write(table)
            rows += table.num_rows
            errors += table.num_rows - table.column("error").null_count
            if on_rows is not None:
                on_rows(rows)
    finally:
        writer.close()
    meta = {
        "model_ref": ref.text,
        "run_uri": ref.layout.uri,
        "model_manifest_sha256": ref.model.manifest_sha256,
        "input": plan.source.uri,
        "output": plan.output.uri,
        "format": plan.fmt,
        "top_k": plan.top_k,
        "all_probs": plan.all_probs,
        "images": plan.parquet.rows if plan.parquet else len(plan.files),
        "rows": rows,
        "errors": errors,
        "wall_s": round(time.time() - start, 3),
        # until the scorer pool returned its first batch (actor start, model load)
        "first_result_s": round((first or time.time()) - start, 3),
        "finished_at": time.time(),
    }
    write_text(plan.output.join(PREDICT_META), json.dumps(meta, indent=1, sort_keys=True))
    return meta
