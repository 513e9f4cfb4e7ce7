"""Procedural image-classification datasets, so tests, the quickstart and benchmarks need
no download.

Two variants share every low-level ingredient (textured fills, cluttered textured
backgrounds, outlines, random pose, colour jitter, noise) but have disjoint class sets:
`source` classes are one family of shapes, `target` classes another. Colour and texture
are drawn independently of the class, so only shape separates classes. A backbone
pre-trained on `source` has therefore learnt exactly what `target` needs (find a figure on
clutter, read its outline), which is what makes the transfer-learning demo honest.

A dataset is an ImageFolder tree `<root>/<class>/<NNNNN>.png` plus `<root>/_synth.json`
(its parameters). Every image has its own random stream, keyed by (seed, variant, class,
index), so the same parameters give byte-identical files in any order or thread count.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from jobs.errors import TlctlError

VARIANTS = ("source", "target")
MARKER = "_synth.json"
# Bumped whenever rendering changes, so an old tree is never taken for a new one.
GENERATOR_VERSION = 1
MIN_SIZE, MAX_SIZE = 16, 512

Array = np.ndarray
Sdf = Callable[[Array, Array], Array]  # local x, y (unit = shape radius) -> signed distance


# ---------------------------------------------------------------------------------------
# Signed distance fields in the shape's own frame (radius about 1); negative inside.


def _polygon(verts: list[tuple[float, float]]) -> Sdf:
    """Exact SDF of any simple polygon (Inigo Quilez's sdPolygon), vectorised over pixels."""
    v = np.asarray(verts, dtype=np.float32)

    def sdf(x: Array, y: Array) -> Array:
        d = (x - v[0, 0]) ** 2 + (y - v[0, 1]) ** 2
        inside = np.zeros(x.shape, dtype=bool)
        for i in range(len(v)):
            (xi, yi), (xj, yj) = v[i], v[i - 1]
            ex, ey = xj - xi, yj - yi
            wx, wy = x - xi, y - yi
            t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            bx, by = wx - ex * t, wy - ey * t
            np.minimum(d, bx * bx + by * by, out=d)
            c1, c2, c3 = y >= yi, y < yj, ex * wy > ey * wx
            inside ^= (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d)

    return sdf


def _circle(r: float, cx: float = 0.0, cy: float = 0.0) -> Sdf:
    return lambda x, y: np.hypot(x - cx, y - cy) - r


def _ellipse(a: float, b: float) -> Sdf:
    # Not exact, but close enough near the edge, which is all anti-aliasing needs.
    return lambda x, y: (np.hypot(x / a, y / b) - 1.0) * min(a, b)


def _union(*parts: Sdf) -> Sdf:
    def sdf(x: Array, y: Array) -> Array:
        out = parts[0](x, y)
        for p in parts[1:]:
            out = np.minimum(out, p(x, y))
        return out

    return sdf


def _minus(a: Sdf, b: Sdf) -> Sdf:
    return lambda x, y: np.maximum(a(x, y), -b(x, y))


def _intersect(a: Sdf, b: Sdf) -> Sdf:
    return lambda x, y: np.maximum(a(x, y), b(x, y))


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> Sdf:
    step = 2 * math.pi / n
    return _polygon(
        [(r * math.cos(phase + k * step), r * math.sin(phase + k * step)) for k in range(n)]
    )


def _star(n: int, outer: float, inner: float) -> Sdf:
    step = math.pi / n
    return _polygon(
        [
            (
                (outer if k % 2 == 0 else inner) * math.cos(k * step - math.pi / 2),
                (outer if k % 2 == 0 else inner) * math.sin(k * step - math.pi / 2),
            )
            for k in range(2 * n)
        ]
    )


def _rect(x0: float, y0: float, x1: float, y1: float) -> Sdf:
    return _polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


# Source: one family of shapes. Order matters: `classes=k` takes the first k.
_SOURCE: dict[str, Sdf] = {
    "circle": _circle(0.9),
    "square": _rect(-0.72, -0.72, 0.72, 0.72),
    "triangle": _regular(3, 1.0, -math.pi / 2),
    "star": _star(5, 1.0, 0.42),
    "cross": _union(_rect(-0.95, -0.3, 0.95, 0.3), _rect(-0.3, -0.95, 0.3, 0.95)),
    "ring": _minus(_circle(0.92), _circle(0.5)),
    "hexagon": _regular(6, 0.95),
    "semicircle": _intersect(_circle(1.0, 0.0, -0.4), lambda x, y: -(y + 0.4)),
    "trapezoid": _polygon([(-1.0, 0.55), (1.0, 0.55), (0.45, -0.55), (-0.45, -0.55)]),
    "lshape": _polygon(
        [(-0.7, -0.95), (-0.1, -0.95), (-0.1, 0.35), (0.75, 0.35), (0.75, 0.95), (-0.7, 0.95)]
    ),
}

# Target: different categories built from the same primitives.
_TARGET: dict[str, Sdf] = {
    "ellipse": _ellipse(1.0, 0.5),
    "diamond": _polygon([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]),
    "pentagon": _regular(5, 0.95, -math.pi / 2),
    "heart": _union(
        _circle(0.5, -0.42, -0.3),
        _circle(0.5, 0.42, -0.3),
        _polygon([(-0.86, -0.1), (0.86, -0.1), (0.0, 0.95)]),
    ),
    "crescent": _minus(_circle(0.9), _circle(0.75, 0.45, -0.1)),
    "arrow": _polygon(
        [
            (-1.0, -0.2),
            (0.15, -0.2),
            (0.15, -0.6),
            (1.0, 0.0),
            (0.15, 0.6),
            (0.15, 0.2),
            (-1.0, 0.2),
        ]
    ),
    "frame": _minus(_rect(-0.8, -0.8, 0.8, 0.8), _rect(-0.45, -0.45, 0.45, 0.45)),
    "bowtie": _polygon(
        [(-0.95, -0.75), (0.0, -0.12), (0.95, -0.75), (0.95, 0.75), (0.0, 0.12), (-0.95, 0.75)]
    ),
    "tee": _polygon(
        [
            (-0.9, -0.9),
            (0.9, -0.9),
            (0.9, -0.45),
            (0.22, -0.45),
            (0.22, 0.95),
            (-0.22, 0.95),
            (-0.22, -0.45),
            (-0.9, -0.45),
        ]
    ),
    "hexagram": _union(_regular(3, 1.0, -math.pi / 2), _regular(3, 1.0, math.pi / 2)),
}

_SHAPES = {"source": _SOURCE, "target": _TARGET}


def _check_variant(variant: str) -> dict[str, Sdf]:
    if variant not in _SHAPES:
        raise TlctlError(
            f"unknown synthetic variant {variant!r}; choose one of: " + ", ".join(VARIANTS)
        )
    return _SHAPES[variant]


def class_names(variant: str, classes: int) -> list[str]:
    """The first `classes` class names of `variant` (also the ImageFolder directory names)."""
    shapes = _check_variant(variant)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise TlctlError(f"classes must be an integer of at least 2, got {classes!r}")
    if classes > len(shapes):
        raise TlctlError(
            f"variant {variant!r} has at most {len(shapes)} classes, asked for {classes}"
        )
    return list(shapes)[:classes]


# ---------------------------------------------------------------------------------------
# Rendering. Everything is float32 in [0, 1] on an (H, W) pixel grid.


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    c = np.arange(size, dtype=np.float32) + 0.5
    x, y = np.meshgrid(c, c)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _hsv(rng: np.random.Generator, lo: float, hi: float) -> Array:
    """A random colour with value in [lo, hi]: only brightness polarity is constrained."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.9), rng.uniform(lo, hi)
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _texture(rng: np.random.Generator, size: int) -> Array:
    """A pattern in [0, 1]: stripes, checker, dots, waves, blotches or a gradient."""
    x, y = _grid(size)
    a = rng.uniform(0, math.pi)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    period = size * rng.uniform(0.07, 0.22)
    kind = rng.integers(6)
    if kind == 0:  # stripes, soft-edged
        t = np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
        return np.clip(t * 2.0 + 0.5, 0.0, 1.0)
    if kind == 1:  # checker
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == 2:  # dots on a lattice
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return np.clip((rng.uniform(0.2, 0.4) - np.hypot(fu, fv)) * period + 0.5, 0.0, 1.0)
    if kind == 3:  # waves
        w = np.sin(2 * math.pi * (u + period * np.sin(2 * math.pi * v / (2.5 * period))) / period)
        return w * 0.5 + 0.5
    if kind == 4:  # blotches: coarse value noise, bilinearly upsampled
        n = int(rng.integers(3, 7))
        g = rng.random((n + 1, n + 1)).astype(np.float32)
        gx, gy = x / size * n, y / size * n
        ix, iy = np.minimum(gx.astype(int), n - 1), np.minimum(gy.astype(int), n - 1)
        fx, fy = gx - ix, gy - iy
        top = g[iy, ix] * (1 - fx) + g[iy, ix + 1] * fx
        bot = g[iy + 1, ix] * (1 - fx) + g[iy + 1, ix + 1] * fx
        return top * (1 - fy) + bot * fy
    return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)  # gradient


def _paint(rng: np.random.Generator, size: int, lo: float, hi: float, contrast: float) -> Array:
    """A textured two-colour layer (H, W, 3), brightness in [lo, hi], texture at `contrast`."""
    t = _texture(rng, size)[..., None] * np.float32(contrast)
    c1, c2 = _hsv(rng, lo, hi), _hsv(rng, lo, hi)
    return c1 * (1.0 - t) + c2 * t


def _blend(img: Array, layer: Array | np.floating, alpha: Array) -> Array:
    a = alpha[..., None]
    return img * (1.0 - a) + layer * a


def _strokes(img: Array, rng: np.random.Generator, size: int, count: int) -> Array:
    """Clutter: random line segments, so edges alone do not give the figure away."""
    x, y = _grid(size)
    for _ in range(count):
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        e = p1 - p0
        t = np.clip(((x - p0[0]) * e[0] + (y - p0[1]) * e[1]) / max(float(e @ e), 1e-6), 0, 1)
        d = np.hypot(x - p0[0] - e[0] * t, y - p0[1] - e[1] * t)
        half = rng.uniform(0.4, 1.2) * size / 64
        img = _blend(img, _hsv(rng, 0.0, 1.0), np.clip(half + 0.5 - d, 0.0, 1.0))
    return img


def render_image(variant: str, class_index: int, rng: np.random.Generator, size: int) -> Array:
    """One image (uint8, size x size x 3) of class `class_index`; all else comes from `rng`."""
    shapes = list(_check_variant(variant).values())
    if not 0 <= class_index < len(shapes):
        raise TlctlError(
            f"class_index {class_index} out of range for variant {variant!r} (0..{len(shapes) - 1})"
        )
    x, y = _grid(size)
    dark_bg = rng.random() < 0.5
    bg_lo, bg_hi, fg_lo, fg_hi = (0.0, 0.5, 0.5, 1.0) if dark_bg else (0.5, 1.0, 0.0, 0.5)
    img = _paint(rng, size, bg_lo, bg_hi, rng.uniform(0.3, 1.0))
    img = _strokes(img, rng, size, int(rng.integers(0, 4)))

    # Pose: radius, centre (kept inside the frame), rotation, slight anisotropy.
    radius = size * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(radius, size - radius, 2)
    a = rng.uniform(0, 2 * math.pi)
    sx, sy = radius * rng.uniform(0.85, 1.15, 2)
    dx, dy = x - cx, y - cy
    lx = (dx * math.cos(a) + dy * math.sin(a)) / sx
    ly = (-dx * math.sin(a) + dy * math.cos(a)) / sy
    sdf = shapes[class_index](lx, ly) * min(sx, sy)  # back to pixels, for anti-aliasing

    img = _blend(
        img, _paint(rng, size, fg_lo, fg_hi, rng.uniform(0.0, 0.6)), np.clip(0.5 - sdf, 0.0, 1.0)
    )
    if rng.random() < 0.5:  # an outline, sometimes
        half = rng.uniform(0.5, 1.5) * size / 64
        img = _blend(img, _hsv(rng, 0.0, 1.0), np.clip(half + 0.5 - np.abs(sdf), 0.0, 1.0))
    img = _strokes(img, rng, size, int(rng.random() < 0.3))  # an occluder, sometimes

    # Photometric jitter and sensor noise.
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * rng.uniform(0.7, 1.2) + mean + rng.uniform(-0.1, 0.1)
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.05), img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Writing a dataset.


def _rng(seed: int, variant: str, class_index: int, index: int) -> np.random.Generator:
    # Keyed per image: output does not depend on order, threads, or how many images are made.
    return np.random.default_rng([seed, VARIANTS.index(variant), class_index, index])


def _png(arr: Array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise TlctlError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def _existing_params(fs: pafs.FileSystem, root: str) -> dict | None:
    """Marker parameters at `root`: {} if empty or absent, None if it holds other files."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return {}
    if info.type != pafs.FileType.Directory:
        raise TlctlError(f"cannot write a synthetic dataset to {root}: it is a file")
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if not entries:
        return {}
    if not any(e.base_name == MARKER for e in entries):
        return None
    with fs.open_input_stream(f"{root}/{MARKER}") as f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None


def check_params(
    variant: str, classes: int, per_class: int, size: int, seed: int, *, flags: bool = False
) -> list[str]:
    """The one check of a synthetic dataset's parameters (the CLI's flags use it too, with
    `flags` naming them as `--per-class`); returns the class names."""

    def name(param: str) -> str:
        return "--" + param.replace("_", "-") if flags else param

    names = class_names(variant, classes)
    _check_int(name("per_class"), per_class, 1)
    _check_int(name("size"), size, MIN_SIZE, MAX_SIZE)
    _check_int(name("seed"), seed, 0)
    return names


def synthesize(
    fs: pafs.FileSystem,
    root: str,
    *,
    variant: str = "source",
    classes: int = 6,
    per_class: int = 200,
    size: int = 64,
    seed: int = 0,
) -> dict:
    """Write a synthetic ImageFolder dataset under `root` on `fs` and describe it.

    An existing dataset written with the same parameters is kept as is (it would be
    byte-identical); any other non-empty `root` is refused, never overwritten.
    """
    names = check_params(variant, classes, per_class, size, seed)
    root = root.rstrip("/")
    params = {
        "generator": "tlctl.synth",
        "version": GENERATOR_VERSION,
        "variant": variant,
        "classes": names,
        "per_class": per_class,
        "size": size,
        "seed": seed,
    }
    summary = {
        "root": root,
        "variant": variant,
        "classes": names,
        "per_class": per_class,
        "size": size,
        "images": len(names) * per_class,
    }
    found = _existing_params(fs, root)
    if found == params:
        return summary
    if found is None or found:
        what = (
            "a synthetic dataset with other parameters"
            if found
            else "files that synth did not write"
        )
        raise TlctlError(
            f"refusing to write a synthetic dataset into {root}: it already "
            f"holds {what}; pick an empty directory or remove it first"
        )
    _write_tree(fs, root, params)
    return summary


def _write_tree(fs: pafs.FileSystem, root: str, params: dict) -> None:
    """Every image, then the marker (its presence means the tree is complete)."""
    variant, names, seed, size = (
        params["variant"],
        params["classes"],
        params["seed"],
        params["size"],
    )
    for name in names:
        fs.create_dir(f"{root}/{name}", recursive=True)

    def write(path: str, data: bytes) -> None:
        with fs.open_output_stream(path) as out:
            out.write(data)

    # Rendering stays on this thread (small numpy ops gain nothing from threads, they fight
    # over the GIL); the pool only overlaps writes, which matters for S3 round trips.
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending: list[Future[None]] = []
        for c, name in enumerate(names):
            for i in range(params["per_class"]):
                data = _png(render_image(variant, c, _rng(seed, variant, c, i), size))
                pending.append(pool.submit(write, f"{root}/{name}/{i:05d}.png", data))
                if len(pending) >= 64:
                    pending.pop(0).result()
        for f in pending:
            f.result()
    with fs.open_output_stream(f"{root}/{MARKER}") as out:
        out.write(json.dumps(params, indent=1).encode())
