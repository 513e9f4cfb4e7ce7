"""Training data: ImageFolder trees and Parquet tables, local or s3://, read with Ray Data.

The driver only *lists* files (and, for Parquet, reads the label column) to validate the
data and fix the class map before any compute starts. Image bytes are read, decoded,
resized and augmented by Ray Data tasks and streamed to each training worker through
`ray.train.get_dataset_shard`; they never pass through the driver. Small datasets are
decoded once and kept in the object store (`data.cache`), so later epochs pay nothing.
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from jobs.errors import TlctlError
from jobs.storage import Location, describe_error, resolve

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PARQUET_EXTENSIONS = (".parquet", ".pq")
CORRUPT_MARKER = "tlctl: corrupt image"
# Decoded datasets up to this size are kept in the object store after the first pass.
CACHE_LIMIT_BYTES = 2 * 1024**3


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
    except FileNotFoundError:
        raise TlctlError(f"{loc.uri}: no such directory") from None
    except OSError as exc:
        raise describe_error(exc, loc) from None


def _kind_of(loc: Location, field_name: str) -> str:
    try:
        info = loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise describe_error(exc, loc) from None
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
        except Exception as exc:  # noqa: BLE001 - any parquet failure names the file
            raise TlctlError(
                f"{field_name}: {path} is not a readable Parquet file ({exc})"
            ) from None
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


def plan_data(data: dict[str, Any], *, seed: int = 0) -> DataPlan:
    """Validate the data section against what is really there; fix classes and splits."""
    endpoint = data.get("endpoint")
    train_loc = resolve(data["train"], endpoint)
    kind = _kind_of(train_loc, "data.train")
    val_loc = resolve(data["val"], endpoint) if data.get("val") else None
    val_fraction = float(data.get("val_fraction", 0.1))
    if kind == "imagefolder":
        classes, by_class = scan_imagefolder(train_loc, "data.train")
        index = {c: i for i, c in enumerate(classes)}
        if val_loc is None:
            tr, va = stratified_split(by_class, val_fraction, seed)
            train = Split(kind, train_loc, [f for f, _ in tr], [index[c] for _, c in tr], len(tr))
            val = Split(kind, train_loc, [f for f, _ in va], [index[c] for _, c in va], len(va))
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
            pairs = [(f, c) for c in val_classes for f in val_by_class[c]]
            train_pairs = [(f, c) for c in classes for f in by_class[c]]
            random.Random(seed).shuffle(train_pairs)  # class-mixed blocks
            train = Split(
                kind,
                train_loc,
                [f for f, _ in train_pairs],
                [index[c] for _, c in train_pairs],
                len(train_pairs),
            )
            val = Split(
                kind, val_loc, [f for f, _ in pairs], [index[c] for _, c in pairs], len(pairs)
            )
        if val.rows == 0:
            raise TlctlError(
                "data.val_fraction: leaves no validation images; raise it or set data.val"
            )
        return DataPlan(classes, train, val, val_fraction, seed)

    image_column = data.get("image_column", "image")
    label_column = data.get("label_column", "label")
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
    return DataPlan(classes, train, val, val_fraction, seed)


# --- Ray Data side -------------------------------------------------------------------


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Bytes → uint8 HxWx3 at `size`x`size`; a corrupt file is named in the error."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"{CORRUPT_MARKER} {where}: {exc}") from None


def _keys(raws: Sequence[bytes]) -> np.ndarray:
    """A stable per-image key (CRC-32 of its bytes): lets each worker evaluate a disjoint,
    complete share of the val set whatever order the batches arrive in."""
    return np.asarray([zlib.crc32(r) for r in raws], dtype=np.int64)


def _decode_files(batch: dict[str, Any], size: int, label_of: dict[str, int]) -> dict[str, Any]:
    raws = list(batch["bytes"])
    images = [decode_image(b, size, p) for b, p in zip(raws, batch["path"], strict=True)]
    labels = [label_of[_norm(p)] for p in batch["path"]]
    return {
        "image": np.stack(images),
        "label": np.asarray(labels, dtype=np.int64),
        "key": _keys(raws),
    }


def _decode_rows(
    batch: dict[str, Any], size: int, image_column: str, label_column: str, index: dict[str, int]
) -> dict[str, Any]:
    raws = [bytes(v.get("bytes") if isinstance(v, dict) else v) for v in batch[image_column]]
    images = [
        decode_image(raw, size, f"parquet row (column {image_column}, #{i})")
        for i, raw in enumerate(raws)
    ]
    labels = [index[str(v)] for v in batch[label_column]]
    return {
        "image": np.stack(images),
        "label": np.asarray(labels, dtype=np.int64),
        "key": _keys(raws),
    }


def augment_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random horizontal flip and a random shift (reflect-pad then crop) per image."""
    images = batch["image"]
    n, h, w, _ = images.shape
    pad = max(1, h // 16)
    rng = np.random.default_rng()
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(images)
    flips = rng.random(n) < 0.5
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    for i in range(n):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return {**batch, "image": out}


def _norm(path: str) -> str:
    return path.split("://", 1)[-1].lstrip("/")


def _imagefolder_dataset(split: Split, size: int):  # -> ray.data.Dataset
    import ray.data

    label_of = {_norm(f): lab for f, lab in zip(split.files, split.labels, strict=True)}
    ds = ray.data.read_binary_files(
        split.files,
        filesystem=split.location.fs,
        include_paths=True,
        override_num_blocks=max(1, min(64, len(split.files) // 64)),
    )
    return ds.map_batches(
        _decode_files,
        fn_kwargs={"size": size, "label_of": label_of},
        batch_size=64,
        batch_format="numpy",
    )


def _parquet_dataset(split: Split, size: int, data: dict[str, Any], classes: list[str]):
    import ray.data

    image_column = data.get("image_column", "image")
    label_column = data.get("label_column", "label")
    ds = ray.data.read_parquet(
        split.files, filesystem=split.location.fs, columns=[image_column, label_column]
    )
    index = {c: i for i, c in enumerate(classes)}
    return ds.map_batches(
        _decode_rows,
        fn_kwargs={
            "size": size,
            "image_column": image_column,
            "label_column": label_column,
            "index": index,
        },
        batch_size=64,
        batch_format="numpy",
    )


AUGMENT_TASK_CPUS = 0.25


def should_cache(plan: DataPlan, size: int, cache: str | bool) -> bool:
    """`auto`: keep decoded images when they fit comfortably in the object store."""
    if cache in (True, "true"):
        return True
    if cache in (False, "false"):
        return False
    rows = plan.train.rows + (plan.val.rows if plan.val else 0)
    return rows * size * size * 3 <= CACHE_LIMIT_BYTES


def build_datasets(plan: DataPlan, data: dict[str, Any]) -> dict[str, Any]:
    """Ray Datasets {"train", "val"} of uint8 NHWC images and int64 labels.

    Decoding runs here (eagerly when cached) so corrupt images fail before training starts.
    """
    size = int(data.get("image_size", 224))
    cache = should_cache(plan, size, data.get("cache", "auto"))

    def build(split: Split):
        if split.kind == "imagefolder":
            return _imagefolder_dataset(split, size)
        return _parquet_dataset(split, size, data, plan.classes)

    train = build(plan.train)
    if plan.val is not None:
        val = build(plan.val)
    else:  # Parquet without an explicit val: a seeded row split
        train, val = train.train_test_split(
            test_size=plan.val_fraction, shuffle=True, seed=plan.seed
        )
    if cache:
        train, val = materialize(train), materialize(val)
    if data.get("shuffle", True):
        # Blocks are class-mixed already; a new block order every epoch, and the workers'
        # local shuffle buffer mixes rows within it. (A full random_shuffle per epoch would
        # cost a shuffle stage on the CPUs training needs.)
        train = train.randomize_block_order()
    if data.get("augment", True):
        # A cheap per-epoch map: a quarter CPU fits beside a search trial's token-CPU driver
        # on any node (whole-CPU tasks would not, and the trial would wait forever).
        train = train.map_batches(
            augment_batch, batch_size=256, batch_format="numpy", num_cpus=AUGMENT_TASK_CPUS
        )
    return {"train": train, "val": val}


def materialize(ds):  # -> ray.data.MaterializedDataset
    """Run the decode now; turn a corrupt-image failure into a message naming the file."""
    try:
        return ds.materialize()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the task error
        message = corrupt_image_message(str(exc))
        if message:
            raise TlctlError(message) from None
        raise


def corrupt_image_message(text: str) -> str | None:
    """`data: corrupt image <file>: <why>` out of a (wrapped) Ray error text, if it is one."""
    for line in text.splitlines():
        if CORRUPT_MARKER in line:
            return (
                "data: corrupt image "
                + line[line.index(CORRUPT_MARKER) + len(CORRUPT_MARKER) :].strip()
            )
    return None
