"""The data plan: what the driver learns about the data before any compute.

The driver only *lists* files (and, for Parquet, reads the label column) to validate the
data, fix the class map and split train/val; image bytes are read and decoded by Ray Data
tasks later (`jobs.data.pipeline`), never by the driver.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from jobs.errors import TlctlError
from jobs.spec.model import DataSpec
from jobs.storage.location import Location, describe_error, resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PARQUET_EXTENSIONS = (".parquet", ".pq")


@dataclass
class Split:
    """One side of the data (train or val): where it lives and what it holds."""

    kind: str  # "imagefolder" | "parquet"
    location: Location
    files: list[str] = field(default_factory=list)  # image paths (imagefolder) or parquet files
    labels: list[int] = field(default_factory=list)  # per image (imagefolder only)
    rows: int = 0


@dataclass
class DataPlan:
    """What the driver learned about the data before any compute: classes and splits."""

    classes: list[str]
    train: Split
    val: Split | None  # None: val_fraction of train, split inside Ray Data (Parquet)
    val_fraction: float
    seed: int
    image_column: str = "image"  # Parquet only
    label_column: str = "label"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_rows(self) -> int:
        """Images trained on per epoch (Parquet without `val` gives up val_fraction)."""
        if self.val is None:
            return self.train.rows - int(round(self.train.rows * self.val_fraction))
        return self.train.rows


def _file_infos(loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    except FileNotFoundError as exc:
        raise TlctlError(f"{loc.uri}: no such directory") from exc
    except OSError as exc:
        raise describe_error(exc, loc) from exc


def _kind_of(loc: Location, field_name: str) -> str:
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise describe_error(exc, loc) from exc
    if info.type == pafs.FileType.NotFound:
        raise TlctlError(f"{field_name}: {loc.uri} does not exist")
    if info.type == pafs.FileType.File:
        if loc.path.endswith(PARQUET_EXTENSIONS):
            return "parquet"
        raise TlctlError(
            f"{field_name}: {loc.uri} is a file but not Parquet "
            f"(valid: an ImageFolder directory root/<class>/*.png|jpg, or a .parquet file/dir)"
        )
    children = _file_infos(loc, recursive=False)
    if any(c.type == pafs.FileType.File and c.path.endswith(PARQUET_EXTENSIONS) for c in children):
        return "parquet"
    return "imagefolder"


def scan_imagefolder(loc: Location, field_name: str) -> tuple[list[str], dict[str, list[str]]]:
    """List `root/<class>/<image>`: returns sorted class names and the images of each."""
    by_class: dict[str, list[str]] = {}
    base = loc.path.rstrip("/")
    for info in _file_infos(loc, recursive=True):
        rel = info.path[len(base) + 1 :] if info.path.startswith(base + "/") else info.path
        parts = rel.split("/")
        if info.type == pafs.FileType.Directory and len(parts) == 1:
            if not parts[0].startswith((".", "_")):
                by_class.setdefault(parts[0], [])
            continue
        if info.type != pafs.FileType.File or len(parts) != 2:
            continue
        cls, name = parts
        if cls.startswith((".", "_")) or name.startswith("."):
            continue
        if name.lower().endswith(IMAGE_EXTENSIONS):
            by_class.setdefault(cls, []).append(info.path)
    if not by_class:
        raise TlctlError(
            f"{field_name}: {loc.uri} has no class directories "
            "(expected an ImageFolder tree: root/<class>/*.png|jpg)"
        )
    empty = sorted(c for c, files in by_class.items() if not files)
    if empty:
        raise TlctlError(
            f"{field_name}: class director{'y' if len(empty) == 1 else 'ies'} "
            f"{', '.join(loc.join(c).uri for c in empty)} "
            f"contain{'s' if len(empty) == 1 else ''} no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted(by_class)
    if len(classes) < 2:
        raise TlctlError(
            f"{field_name}: {loc.uri} has only 1 class ({classes[0]}); "
            "a classifier needs at least 2 class directories"
        )
    return classes, {c: sorted(by_class[c]) for c in classes}


def _parquet_files(loc: Location) -> list[str]:
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        return [loc.path]
    files = sorted(
        i.path
        for i in _file_infos(loc, recursive=True)
        if i.type == pafs.FileType.File and i.path.endswith(PARQUET_EXTENSIONS)
    )
    return files


def _parquet_labels(
    loc: Location, files: list[str], image_column: str, label_column: str, field_name: str
) -> list[Any]:
    import pyarrow.parquet as pq

    labels: list[Any] = []
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=loc.fs)
        except Exception as exc:  # any parquet failure names the file
            raise TlctlError(
                f"{field_name}: {path} is not a readable Parquet file ({exc})"
            ) from exc
        for column, key in ((image_column, "image_column"), (label_column, "label_column")):
            if column not in schema.names:
                raise TlctlError(
                    f"data.{key}: column '{column}' not in {path} "
                    f"(valid: {', '.join(schema.names)})"
                )
        table = pq.read_table(path, columns=[label_column], filesystem=loc.fs)
        labels.extend(table.column(label_column).to_pylist())
    return labels


def _label_names(values: Sequence[Any]) -> list[str]:
    uniq = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    return [str(v) for v in uniq]


def stratified_split(
    files_by_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split each class with a fixed seed so reruns (and resumes) see the same val set."""
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for cls in sorted(files_by_class):
        files = list(files_by_class[cls])
        rng.shuffle(files)
        n_val = int(round(len(files) * val_fraction))
        if val_fraction > 0 and len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)
        val += [(f, cls) for f in files[:n_val]]
        train += [(f, cls) for f in files[n_val:]]
    rng.shuffle(train)  # class-mixed blocks: batches must not be runs of one class
    return train, val


def plan_data(data: DataSpec, *, endpoint: str | None, seed: int) -> DataPlan:
    """Validate the data section against what is really there; fix classes and splits.

    `endpoint` is the one the data is read through (JobSpec.data_endpoint).
    """
    train_loc = resolve(data.train, endpoint)
    val_loc = resolve(data.val, endpoint) if data.val else None
    if _kind_of(train_loc, "data.train") == "imagefolder":
        return _plan_imagefolder(train_loc, val_loc, data.val_fraction, seed)
    return _plan_parquet(data, train_loc, val_loc, seed)


def _split(kind: str, loc: Location, pairs: list[tuple[str, str]], index: dict[str, int]) -> Split:
    """A split of (file, class) pairs, labelled by the class index."""
    return Split(kind, loc, [f for f, _ in pairs], [index[c] for _, c in pairs], len(pairs))


def _plan_imagefolder(
    train_loc: Location, val_loc: Location | None, val_fraction: float, seed: int
) -> DataPlan:
    classes, by_class = scan_imagefolder(train_loc, "data.train")
    index = {c: i for i, c in enumerate(classes)}
    if val_loc is None:
        tr, va = stratified_split(by_class, val_fraction, seed)
        train = _split("imagefolder", train_loc, tr, index)
        val = _split("imagefolder", train_loc, va, index)
    else:
        if _kind_of(val_loc, "data.val") != "imagefolder":
            raise TlctlError("data.val: must be an ImageFolder directory like data.train")
        val_classes, val_by_class = scan_imagefolder(val_loc, "data.val")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise TlctlError(
                f"data.val: classes not in data.train: {', '.join(unknown)} "
                f"(valid: {', '.join(classes)})"
            )
        train_pairs = [(f, c) for c in classes for f in by_class[c]]
        random.Random(seed).shuffle(train_pairs)  # class-mixed blocks
        train = _split("imagefolder", train_loc, train_pairs, index)
        val_pairs = [(f, c) for c in val_classes for f in val_by_class[c]]
        val = _split("imagefolder", val_loc, val_pairs, index)
    if val.rows == 0:
        raise TlctlError("data.val_fraction: leaves no validation images; raise it or set data.val")
    return DataPlan(classes, train, val, val_fraction, seed)


def _plan_parquet(
    data: DataSpec, train_loc: Location, val_loc: Location | None, seed: int
) -> DataPlan:
    image_column, label_column = data.image_column, data.label_column
    files = _parquet_files(train_loc)
    if not files:
        raise TlctlError(f"data.train: {train_loc.uri} holds no .parquet files")
    labels = _parquet_labels(train_loc, files, image_column, label_column, "data.train")
    classes = _label_names(labels)
    if len(classes) < 2:
        raise TlctlError(f"data.train: {train_loc.uri} has fewer than 2 distinct labels")
    train = Split("parquet", train_loc, files, rows=len(labels))
    val = None
    if val_loc is not None:
        vfiles = _parquet_files(val_loc)
        if not vfiles:
            raise TlctlError(f"data.val: {val_loc.uri} holds no .parquet files")
        vlabels = _parquet_labels(val_loc, vfiles, image_column, label_column, "data.val")
        unknown = sorted(set(_label_names(vlabels)) - set(classes))
        if unknown:
            raise TlctlError(f"data.val: labels not in data.train: {', '.join(unknown)}")
        val = Split("parquet", val_loc, vfiles, rows=len(vlabels))
    return DataPlan(classes, train, val, data.val_fraction, seed, image_column, label_column)
