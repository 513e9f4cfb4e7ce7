"""`tlctl evaluate`: a run's model measured on a labelled dataset, every image exactly once.

An actor pool reads, decodes (the training decode and resize) and scores the image files
or Parquet rows (jobs.models.scoring, fp32); the per-image results (a few numbers each)
come back to this process, which computes the metrics (jobs.models.metrics) and writes
`<run>/eval/<name>/` under the run's evaluation lease.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.data.pipeline import decode_image
from jobs.data.plan import label_names, parquet_files, parquet_labels, scan_imagefolder
from jobs.errors import TlctlError
from jobs.models.metrics import calibration_bins, classification_metrics
from jobs.models.ref import ModelRef
from jobs.models.registry import NAME_RE
from jobs.models.scoring import ParquetInput, is_parquet, scored
from jobs.storage.layout import EVAL_FILES, EVAL_METRICS, EVAL_PREDICTIONS, LEASE
from jobs.storage.lease import acquire
from jobs.storage.location import Location, read_bytes, resolve, write_bytes, write_text

TOP_K = 5
ERRORS_SHOWN = 24
CONFUSION_GRID_MAX = 30  # classes; above it, the most confused pairs


@dataclass(frozen=True)
class EvalPlan:
    """The labelled images to evaluate, labels as indices of the model's classes (one per
    file, or for Parquet one per row of all files, in order)."""

    data: Location
    files: list[str]
    labels: list[int]
    data_classes: list[str]
    parquet: ParquetInput | None = None


def plan_evaluation(
    data_uri: str,
    endpoint: str | None,
    classes: list[str],
    *,
    image_column: str = "image",
    label_column: str = "label",
) -> EvalPlan:
    """List an ImageFolder tree, or read a Parquet dataset's labels (column types checked
    first: nothing is unpickled); a class the model does not know is exit 2, naming it."""
    loc = resolve(data_uri, endpoint, field="--data", endpoint_field="--endpoint")
    if is_parquet(loc):
        return _plan_parquet(loc, classes, image_column, label_column)
    data_classes, by_class = scan_imagefolder(loc, "--data")
    _check_known(data_classes, classes)
    index = {c: i for i, c in enumerate(classes)}
    files = [f for c in data_classes for f in by_class[c]]
    labels = [index[c] for c in data_classes for _ in by_class[c]]
    return EvalPlan(loc, files, labels, data_classes)


def _plan_parquet(
    loc: Location, classes: list[str], image_column: str, label_column: str
) -> EvalPlan:
    files = parquet_files(loc, "--data")
    keys = ("--image-column", "--label-column")
    values = parquet_labels(loc, files, image_column, label_column, "--data", keys)
    if not values:
        raise TlctlError(f"--data: {loc.uri} holds no rows")
    names = [str(v) for v in values]  # as training names Parquet classes
    data_classes = label_names(values)
    _check_known(data_classes, classes)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[n] for n in names]
    return EvalPlan(loc, files, labels, data_classes, ParquetInput(image_column, None, len(labels)))


def _check_known(data_classes: list[str], classes: list[str]) -> None:
    unknown = [c for c in data_classes if c not in classes]
    if unknown:
        raise TlctlError(
            f"--data: class{'es' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} unknown to the model (it knows: "
            f"{', '.join(classes)})"
        )


def default_name(data_uri: str) -> str:
    """The evaluation's name from the data's last path part (`…/flowers/test` → `test`)."""
    tail = data_uri.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9\-_.]+", "-", tail).strip("-.") or "eval"
    return name if NAME_RE.fullmatch(name) else "eval"


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise TlctlError(f"--name: {name!r} is not a valid name ([a-z0-9][a-z0-9-_.]{{0,62}})")


def _relative(path: str, root: str) -> str:
    """`path` under the data root `root` (either with or without a scheme or leading /)."""

    def norm(p: str) -> str:
        return p.split("://", 1)[-1].lstrip("/")

    return norm(path).removeprefix(norm(root).rstrip("/") + "/")


def score(ref: ModelRef, plan: EvalPlan, *, actors: int | None = None) -> dict[str, np.ndarray]:
    """Every image of the plan, scored once; columns as numpy arrays in file order."""
    k = min(TOP_K, len(ref.model.info["classes"]))
    parts = list(
        scored(
            plan.data,
            plan.files,
            ref,
            k,
            labels=plan.labels,
            strict=True,
            actors=actors,
            parquet=plan.parquet,
        )
    )
    if not parts:
        raise TlctlError("--data: no images were read")
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if "id" in cols:  # Parquet rows: `<file>#<row>` stands where a file's path would
        cols["path"] = cols.pop("id")
    order = np.argsort(cols["path"].astype(str), kind="stable")
    return {name: values[order] for name, values in cols.items()}


def fingerprint(data_root: str, paths: np.ndarray, crcs: np.ndarray) -> str:
    """SHA-256 over each image's path under the data root and the CRC-32 of its bytes."""
    lines = sorted(
        f"{_relative(str(p), data_root)}\t{int(c)}" for p, c in zip(paths, crcs, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def evaluate(
    ref: ModelRef, plan: EvalPlan, name: str, *, actors: int | None = None, data_uri: str
) -> dict[str, Any]:
    """Score, measure, and write `<run>/eval/<name>/`; returns what metrics.json holds."""
    start = time.time()
    out = ref.layout.evaluation(name)
    lease = acquire(
        out.join(LEASE),
        job="tlctl evaluate",
        what=f"evaluation '{name}' of run {ref.layout.uri}",
        prune_empty_parent=True,
    )
    with lease.start():
        cols = score(ref, plan, actors=actors)
        classes = list(ref.model.info["classes"])
        k = int(cols["topk_index"].shape[1])
        metrics = classification_metrics(
            cols["label"],
            cols["prediction"],
            cols["confidence"],
            cols["topk_hit"],
            cols["nll"],
            classes,
            k=k,
        )
        metrics.update(
            name=name,
            run=ref.layout.name,
            run_uri=ref.layout.uri,
            model_ref=ref.text,
            model_manifest_sha256=ref.model.manifest_sha256,
            data=data_uri,
            data_fingerprint=fingerprint(plan.data.path, cols["path"], cols["crc"]),
            precision_mode="fp32",
            calibration=calibration_bins(cols["confidence"], cols["label"] == cols["prediction"]),
            evaluated_at=time.time(),
            wall_s=round(time.time() - start, 3),
        )
        _write_outputs(out, cols, metrics, classes, ref, plan)
        write_text(out.join(EVAL_METRICS), json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def _write_outputs(
    out: Location,
    cols: dict[str, np.ndarray],
    metrics: dict[str, Any],
    classes: list[str],
    ref: ModelRef,
    plan: EvalPlan,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.asarray(classes, dtype=object)
    table = pa.table(
        {
            "path": cols["path"].astype(str),
            "label": names[cols["label"]].astype(str),
            "prediction": names[cols["prediction"]].astype(str),
            "confidence": cols["confidence"],
            "correct": cols["label"] == cols["prediction"],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(out.join(EVAL_PREDICTIONS), buf.getvalue())
    confusion, reliability, errors = EVAL_FILES
    write_bytes(out.join(confusion), _confusion_png(metrics))
    write_bytes(out.join(reliability), _reliability_png(metrics))
    size = int(ref.model.info["image_size"])
    write_text(out.join(errors), _errors_html(cols, classes, plan, size, ref.text))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def _confusion_png(metrics: dict[str, Any]) -> bytes:
    """Row-normalized confusion matrix; for many classes, the most confused pairs."""
    plt = _figure()
    classes = metrics["classes"]
    m = np.asarray(metrics["confusion"], dtype=np.float64)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    if len(classes) <= CONFUSION_GRID_MAX:
        side = max(4.0, 0.4 * len(classes) + 2)
        fig, ax = plt.subplots(figsize=(side, side))
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=90)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion (row-normalized), top-1 {metrics['top1']:.1%}")
        return _png(fig)
    off = rows.copy()
    np.fill_diagonal(off, 0)
    pairs = np.dstack(np.unravel_index(np.argsort(off, axis=None)[::-1][:20], off.shape))[0]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.barh(
        [f"{classes[i]} → {classes[j]}" for i, j in pairs][::-1],
        [off[i, j] for i, j in pairs][::-1],
    )
    ax.set_xlabel("share of the true class predicted as the other")
    ax.set_title("most confused pairs")
    return _png(fig)


def _reliability_png(metrics: dict[str, Any]) -> bytes:
    plt = _figure()
    bins = metrics["calibration"]
    fig, ax = plt.subplots(figsize=(5, 5))
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], width=1 / len(bins), edgecolor="k", alpha=0.7)
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, ECE {metrics['ece']:.3f} ({metrics['ece_bins']} bins)")
    return _png(fig)


def _image_bytes(plan: EvalPlan, path: str) -> bytes:
    """One evaluated image's bytes again: its file, or its Parquet row (`<file>#<row>`,
    the column's type checked in the plan)."""
    if plan.parquet is None:
        return read_bytes(plan.data.join(_relative(path, plan.data.path)))
    import pyarrow.parquet as pq

    from jobs.data.pipeline import row_bytes

    file, _, row = path.rpartition("#")
    with plan.data.fs.open_input_file(file) as f:
        column = pq.read_table(f, columns=[plan.parquet.image_column]).column(0)
    return row_bytes(column[int(row)].as_py(), plan.parquet.image_column, int(row))


def _errors_html(
    cols: dict[str, np.ndarray], classes: list[str], plan: EvalPlan, size: int, title: str
) -> str:
    """The most confident mistakes, as thumbnails (decoded as the model saw them)."""
    from PIL import Image

    wrong = np.flatnonzero(cols["label"] != cols["prediction"])
    wrong = wrong[np.argsort(-cols["confidence"][wrong], kind="stable")][:ERRORS_SHOWN]
    cells = []
    for i in wrong:
        path = str(cols["path"][i])
        png = io.BytesIO()
        Image.fromarray(decode_image(_image_bytes(plan, path), size, path)).save(png, format="PNG")
        src = base64.b64encode(png.getvalue()).decode()
        cells.append(
            f'<figure><img src="data:image/png;base64,{src}" width="96" height="96">'
            f"<figcaption>{html.escape(path.rsplit('/', 1)[-1])}<br>true "
            f"{html.escape(classes[cols['label'][i]])}<br>predicted "
            f"{html.escape(classes[cols['prediction'][i]])} "
            f"({cols['confidence'][i]:.1%})</figcaption></figure>"
        )
    body = "".join(cells) or "<p>No mistakes.</p>"
    return (
        "<!doctype html><meta charset='utf-8'><title>errors</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;"
        "font-size:12px;width:120px}img{image-rendering:pixelated}</style>"
        f"<h1>Most confident mistakes: {html.escape(title)}</h1>{body}"
    )
