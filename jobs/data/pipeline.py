"""The Ray Data pipeline: read, decode, resize, augment, stream to the training workers.

Image bytes are read and decoded by Ray Data tasks and streamed to each training worker
through `ray.train.get_dataset_shard`; they never pass through the driver. Small datasets
are decoded once and kept in the object store (`data.cache`), so later epochs pay nothing.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.data.plan import DataPlan, Split
from jobs.errors import CORRUPT_MARKER, TlctlError, corrupt_image_message
from jobs.spec.model import DataSpec

# Decoded datasets up to this size are kept in the object store after the first pass.
CACHE_LIMIT_BYTES = 2 * 1024**3
AUGMENT_TASK_CPUS = 0.25
DECODE_BATCH = 64
# Images over this many pixels are refused, never decoded: PIL's own default (about a
# 9459x9459 image, 256 MiB as RGB at 24 bits), set explicitly so that it cannot be
# changed elsewhere in a worker; an image between 1x and 2x of it would only warn in PIL.
MAX_IMAGE_PIXELS = 89_478_485


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Bytes → uint8 HxWx3 at `size`x`size`; a corrupt or oversized file is named in the
    error (see `to_rgb` for how each image mode becomes RGB)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL's bomb guard, at our documented limit
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{width}x{height} = {width * height:,} pixels is over the limit of "
                    f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or an image far larger "
                    "than training needs: downscale it)"
                )
            rgb = to_rgb(img)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types (DecompressionBombError among them)
        raise ValueError(f"{CORRUPT_MARKER} {where}: {exc}") from exc


def to_rgb(img):  # PIL.Image.Image -> PIL.Image.Image
    """An image of any mode as 8-bit RGB.

    - 16-bit greyscale (I;16*, and I holding values in 0..65535, as PIL opens 16-bit
      PNGs): value / 65535 * 255, so 65535 is 255 (never clipped). Float (F): 0..1 when
      every value lies there, else the image's own min..max. Other I images: min..max.
    - Palette images (P, PA) with transparency, LA, RGBA and other alpha modes: the alpha
      is composited onto white (a transparent background reads as white, as in a browser),
      then the colour kept.
    - CMYK, YCbCr, LAB, HSV, 1 and L: PIL's own conversion to RGB.
    """
    from PIL import Image

    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(img) -> np.ndarray:
    """A high-bit-depth or float greyscale image as uint8 0..255 (see `to_rgb`)."""
    mode = img.mode
    values = np.asarray(img).astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0.0 and hi <= 65535.0):
        low, high = 0.0, 65535.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        low, high = 0.0, 1.0
    else:
        low, high = lo, hi
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


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
    raws = [row_bytes(v, image_column, i) for i, v in enumerate(batch[image_column])]
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


def row_bytes(value: Any, image_column: str, i: int) -> bytes:
    """A row's image bytes (plain or Ray/Hugging Face's {bytes: ...}); a null is named."""
    raw = value.get("bytes") if isinstance(value, dict) else value
    if raw is None:
        raise ValueError(f"{CORRUPT_MARKER} parquet row (column {image_column}, #{i}): null image")
    return bytes(raw)


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
        batch_size=DECODE_BATCH,
        batch_format="numpy",
    )


def _parquet_dataset(split: Split, size: int, plan: DataPlan):
    import ray.data

    image_column, label_column = plan.image_column, plan.label_column
    ds = ray.data.read_parquet(
        split.files, filesystem=split.location.fs, columns=[image_column, label_column]
    )
    index = {c: i for i, c in enumerate(plan.classes)}
    return ds.map_batches(
        _decode_rows,
        fn_kwargs={
            "size": size,
            "image_column": image_column,
            "label_column": label_column,
            "index": index,
        },
        batch_size=DECODE_BATCH,
        batch_format="numpy",
    )


def should_cache(plan: DataPlan, size: int, cache: str) -> bool:
    """`auto`: keep decoded images when they fit comfortably in the object store."""
    if cache != "auto":
        return cache == "true"
    rows = plan.train.rows + (plan.val.rows if plan.val else 0)
    return rows * size * size * 3 <= CACHE_LIMIT_BYTES


def build_datasets(plan: DataPlan, data: DataSpec) -> dict[str, Any]:
    """Ray Datasets {"train", "val"} of uint8 NHWC images and int64 labels.

    Decoding runs here (eagerly when cached) so corrupt images fail before training starts.
    """
    size = data.image_size
    cache = should_cache(plan, size, data.cache)

    def build(split: Split):
        if split.kind == "imagefolder":
            return _imagefolder_dataset(split, size)
        return _parquet_dataset(split, size, plan)

    train = build(plan.train)
    if plan.val is not None:
        val = build(plan.val)
    else:  # Parquet without an explicit val: a seeded row split
        train, val = train.train_test_split(
            test_size=plan.val_fraction, shuffle=True, seed=plan.seed
        )
    if cache:
        train, val = materialize(train), materialize(val)
    if data.shuffle:
        # Blocks are class-mixed already; a new block order every epoch, and the workers'
        # local shuffle buffer mixes rows within it. (A full random_shuffle per epoch would
        # cost a shuffle stage on the CPUs training needs.)
        train = train.randomize_block_order()
    if data.augment:
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
    except Exception as exc:  # Ray wraps the task error
        message = corrupt_image_message(str(exc))
        if message:
            raise TlctlError(message) from exc
        raise
