"""`tlctl predict`: batch inference with a run's model over a folder or prefix of images.

Ray Data reads the files, decodes them in CPU tasks (the training decode and resize; an
image that does not decode becomes a row with its `error`, not a failed job), scores them
in an actor pool (jobs.models.scoring) and writes Parquet or CSV files under the output
location, which must be new (or `overwrite`: its old files are removed first, so a re-run
never duplicates rows); `_meta.json` is written last: the model, its digest, row counts.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.data.pipeline import DECODE_BATCH, decode_image
from jobs.data.plan import IMAGE_EXTENSIONS
from jobs.errors import CORRUPT_MARKER, TlctlError
from jobs.models.ref import ModelRef
from jobs.models.scoring import scored
from jobs.storage.location import Location, delete_tree, exists, list_dir, resolve, write_text

PREDICT_META = "_meta.json"
FORMATS = ("parquet", "csv")
MAX_LISTED = 5


@dataclass(frozen=True)
class PredictPlan:
    source: Location
    files: list[str]
    output: Location
    fmt: str
    top_k: int


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


def plan_prediction(
    input_uri: str,
    output_uri: str,
    endpoint: str | None,
    *,
    classes: list[str],
    top_k: int,
    fmt: str,
    overwrite: bool,
) -> PredictPlan:
    """Everything checked before Ray starts: the input has images, top-k fits, the output
    is new (or may be overwritten) and is not inside the input."""
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
    files = list_images(source, "--input")
    if exists(output) and list_dir(output) and not overwrite:
        raise TlctlError(
            f"--output: {output.uri} exists already; choose a new location or pass --overwrite "
            "(its files are then replaced)"
        )
    return PredictPlan(source, files, output, fmt, top_k)


def _decode_or_error(batch: dict[str, Any], size: int) -> dict[str, Any]:
    images, errors = [], []
    for raw, path in zip(batch["bytes"], batch["path"], strict=True):
        try:
            images.append(decode_image(raw, size, str(path)))
            errors.append("")
        except ValueError as exc:
            images.append(np.zeros((size, size, 3), dtype=np.uint8))
            errors.append(str(exc).replace(f"{CORRUPT_MARKER} ", "", 1))
    return {
        "image": np.stack(images),
        "path": np.asarray([str(p) for p in batch["path"]], dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


def _rows(batch: dict[str, Any], classes: list[str], scheme: str):  # -> pandas.DataFrame
    """Scorer output → the output columns; a row with an error has no prediction."""
    import pandas as pd

    names = np.asarray(classes, dtype=object)
    bad = batch["error"] != ""
    index = batch["prediction"].astype(np.int64)
    return pd.DataFrame(
        {
            "path": [scheme + str(p) for p in batch["path"]],
            "prediction": pd.Series(np.where(bad, None, names[index]), dtype=object),
            "index": pd.array(np.where(bad, None, index), dtype="Int64"),
            "confidence": pd.array(np.where(bad, None, batch["confidence"]), dtype="Float64"),
            "topk_labels": [
                None if b else [str(n) for n in names[t]]
                for b, t in zip(bad, batch["topk_index"], strict=True)
            ],
            "topk_probs": [
                None if b else [float(v) for v in p]
                for b, p in zip(bad, batch["topk_prob"], strict=True)
            ],
            "error": pd.Series(np.where(bad, batch["error"], None), dtype=object),
        }
    )


def predict(ref: ModelRef, plan: PredictPlan, *, actors: int = 1) -> dict[str, Any]:
    """Run the inference and write the output; returns what `_meta.json` holds."""
    import ray.data

    start = time.time()
    if exists(plan.output):
        delete_tree(plan.output)  # --overwrite (checked in the plan)
    info = ref.model.info
    classes = list(info["classes"])
    ds = ray.data.read_binary_files(
        plan.files,
        filesystem=plan.source.fs,
        include_paths=True,
        override_num_blocks=max(1, min(200, len(plan.files) // DECODE_BATCH)),
    )
    ds = ds.map_batches(
        _decode_or_error,
        fn_kwargs={"size": int(info["image_size"])},
        batch_size=DECODE_BATCH,
        batch_format="numpy",
    )
    ds = scored(ds, ref, plan.top_k, actors=actors, batch_size=DECODE_BATCH)
    scheme = "s3://" if plan.source.is_s3 else ""
    ds = ds.map_batches(
        _rows, fn_kwargs={"classes": classes, "scheme": scheme}, batch_format="numpy"
    ).materialize()  # the results are small; inference runs once, then write and count
    if plan.fmt == "csv":
        ds = ds.map_batches(_flatten_lists, batch_format="pandas")
        ds.write_csv(plan.output.path, filesystem=plan.output.fs)
    else:
        ds.write_parquet(plan.output.path, filesystem=plan.output.fs)
    stats = ds.map_batches(_count, batch_format="pandas").sum(["rows", "errors"]) or {}
    meta = {
        "model_ref": ref.text,
        "run_uri": ref.layout.uri,
        "model_manifest_sha256": ref.model.manifest_sha256,
        "input": plan.source.uri,
        "output": plan.output.uri,
        "format": plan.fmt,
        "top_k": plan.top_k,
        "images": len(plan.files),
        "rows": int(stats.get("sum(rows)", 0)),
        "errors": int(stats.get("sum(errors)", 0)),
        "wall_s": round(time.time() - start, 3),
        "finished_at": time.time(),
    }
    write_text(plan.output.join(PREDICT_META), json.dumps(meta, indent=1, sort_keys=True))
    return meta


def _flatten_lists(df):
    for col in ("topk_labels", "topk_probs"):
        df[col] = df[col].map(
            lambda v: "|".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else ""
        )
    return df


def _count(df):
    import pandas as pd

    return pd.DataFrame({"rows": [len(df)], "errors": [int(df["error"].notna().sum())]})
