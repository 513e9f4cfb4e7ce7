"""`tlctl export`: a run's model as one self-contained file for a serving runtime, verified
against the eager model before anything is written.

The exported program takes what a camera or a decoder gives: uint8 RGB images, NHWC, at
the model's image size, any batch size; the normalization (the model's own mean/std) is
inside, so a consumer only resizes. Two formats:

- `pt2`: `torch.export` + `torch.export.save` (load it with `torch.export.load`).
- `onnx`: `torch.onnx.export(dynamo=True)`, one file (below protobuf's 2 GB), checked by
  running it in onnxruntime; needs the extra `tlctl[onnx]`.

Verification is part of the command: eager vs exported on random batches of 1, 2 and 7
images and on up to 64 real images of the run's validation data (decoded and resized as in
training); the logits must agree within `ATOL` + `RTOL`·|eager| and the top-1 class on every
image, or the command fails and uploads nothing. The result is `export.json` next to the
file; `manifest.json` (written last) holds both files' sizes and SHA-256.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.data.pipeline import decode_image, row_bytes
from jobs.data.plan import plan_data
from jobs.errors import EXIT_FAILED, TlctlError
from jobs.models.ref import ModelRef
from jobs.storage.layout import EXPORT_FILES, EXPORT_INFO, LEASE, MANIFEST
from jobs.storage.lease import acquire
from jobs.storage.location import Location, delete_tree, exists, list_dir, write_bytes
from jobs.storage.manifest import describe

FORMAT = "tlctl-export/1"
FORMATS = tuple(EXPORT_FILES)  # pt2, onnx
# Modules each format needs beyond torch, and the extra that installs them.
NEEDS = {"pt2": (), "onnx": ("onnx", "onnxscript", "onnxruntime")}
ATOL, RTOL = 1e-4, 1e-3
RANDOM_BATCHES = (1, 2, 7)
MAX_REAL = 64
TRACE_BATCH = 2  # a batch of 1 would let the tracer specialize the batch dimension
MAX_BATCH = 65_536
ONNX_LIMIT = 2**31  # protobuf's limit for a single-file model


@dataclass(frozen=True)
class ExportPlan:
    fmt: str
    out: Location
    overwrite: bool


def check_format(fmt: str) -> None:
    """An unknown format, or one whose extra is not installed: exit 2 before any work."""
    if fmt not in FORMATS:
        raise TlctlError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise TlctlError(
            f"--format {fmt}: needs {', '.join(missing)}, which are not installed "
            f"(pip install 'tlctl[{fmt}]')"
        )


def plan_export(ref: ModelRef, fmt: str, out: Location | None, overwrite: bool) -> ExportPlan:
    """Where the export goes: `<run>/export/<fmt>/` (replaced by a new export of the same
    model), or `--out`, which must be new unless `overwrite`."""
    check_format(fmt)
    if out is None:
        return ExportPlan(fmt, ref.layout.export(fmt), True)
    from jobs.models.predict import check_new_output

    check_new_output(out, "--out", overwrite)
    return ExportPlan(fmt, out, overwrite)


def normalized(net, mean, std):  # -> torch.nn.Module: uint8 NHWC → logits
    """`net` behind the training input transform (jobs.training.steps.to_input, the same
    operations in the same order, so eager numbers are the training numbers)."""
    import torch

    class Normalized(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).float().div(255.0)
            return self.net(x.sub(self.mean).div(self.std).contiguous())

    return Normalized().eval()


def write_program(model, fmt: str, image_size: int, path: str) -> dict[str, Any]:
    """Export `model` (uint8 NHWC → logits) to `path` with a dynamic batch dimension."""
    import torch

    example = torch.zeros((TRACE_BATCH, image_size, image_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = {"images": {0: batch}}
    if fmt == "pt2":
        program = torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)
        torch.export.save(program, path)
        return {"torch": torch.__version__}
    import onnxruntime

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=shapes,
        input_names=["images"],
        output_names=["logits"],
        verbose=False,
    )
    program.save(path, external_data=False)
    if os.path.getsize(path) >= ONNX_LIMIT:
        raise TlctlError(f"--format onnx: the model is {os.path.getsize(path):,} bytes, over 2 GB")
    opsets = {imp.domain or "ai.onnx": imp.version for imp in program.model_proto.opset_import}
    return {
        "torch": torch.__version__,
        "opset": opsets.get("ai.onnx"),
        "onnxruntime": onnxruntime.__version__,
    }


def load_program(fmt: str, path: str):  # -> Callable[[np.ndarray], np.ndarray]
    """The exported file as a function uint8 NHWC → logits, in its own runtime.

    The pt2 file is one this command has just written: `torch.export.load` unpickles, so
    tlctl never loads a pt2 file it did not write itself."""
    if fmt == "pt2":
        import torch

        module = torch.export.load(path).module()

        def run(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(images)).numpy()

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": images})[0]


def compare(expected: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """How exported logits differ from eager ones, and whether they pass.

    Top-1 agrees when the classes are equal, or when eager's own logits for the two classes
    are within the tolerance of each other (a tie that float rounding may break either way;
    counted in `top1_ties`)."""
    n = int(expected.shape[0])
    got = np.asarray(got, dtype=np.float64).reshape(expected.shape)
    expected = expected.astype(np.float64)
    diff = np.abs(got - expected)
    bound = ATOL + RTOL * np.abs(expected)
    rows = np.arange(n)
    eager_top, their_top = expected.argmax(1), got.argmax(1)
    tie = np.abs(expected[rows, their_top] - expected[rows, eager_top]) <= bound[rows, eager_top]
    agree = (eager_top == their_top) | tie
    return {
        "n": n,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(expected), 1e-12)).max()),
        "within_tolerance": bool((diff <= bound).all()),
        "top1_agree": int(agree.sum()),
        "top1_ties": int((tie & (eager_top != their_top)).sum()),
        "passed": bool((diff <= bound).all() and agree.all()),
    }


def verify(eager, exported, batches: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each named uint8 batch through both; the comparison of each."""
    import torch

    results = []
    for name, images in batches.items():
        with torch.no_grad():
            expected = eager(torch.from_numpy(images)).numpy()
        results.append({"batch": name, **compare(expected, exported(images))})
    return results


def random_batches(image_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"random-{n}": rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
        for n in RANDOM_BATCHES
    }


def _spread(items: list[str], limit: int) -> list[str]:
    """At most `limit` of `items`, evenly spaced (ImageFolder lists are class by class, so
    every class is sampled)."""
    return items[:: max(1, len(items) // limit)][:limit]


def validation_images(ref: ModelRef, limit: int = MAX_REAL) -> tuple[np.ndarray, str]:
    """Up to `limit` images of the run's validation data (its training data when validation
    is a split inside Ray Data), spread over the classes, decoded as in training."""
    spec = ref.layout.read_spec()
    size = int(ref.model.info["image_size"])
    try:
        plan = plan_data(spec.data, endpoint=spec.data_endpoint, seed=spec.train.seed)
    except TlctlError as exc:
        raise TlctlError(
            f"export: the run's data is needed to verify the export and cannot be read "
            f"({exc.message}); pass --images with a folder of the task's images"
        ) from exc
    split = plan.val or plan.train
    fs = split.location.fs
    raws: list[tuple[str, bytes]] = []
    if split.kind == "imagefolder":
        for path in _spread(split.files, limit):
            with fs.open_input_file(path) as f:
                raws.append((path, f.read()))
    else:
        import pyarrow.parquet as pq

        for file in split.files:  # column types were checked by plan_data before any value
            with fs.open_input_file(file) as f:
                for batch in pq.ParquetFile(f).iter_batches(
                    batch_size=limit, columns=[plan.image_column]
                ):
                    for i, value in enumerate(batch.column(0).to_pylist()):
                        raws.append((f"{file}#{i}", row_bytes(value, plan.image_column, i)))
                    break
            if len(raws) >= limit:
                break
    images = [decode_image(data, size, where) for where, data in raws[:limit]]
    return np.stack(images), split.location.uri


def folder_images(loc: Location, size: int, limit: int = MAX_REAL) -> np.ndarray:
    """Up to `limit` images of a folder or prefix (`--images`), decoded as in training."""
    from jobs.models.predict import list_images

    files = list_images(loc, "--images")
    images = []
    for path in _spread(files, limit):
        with loc.fs.open_input_file(path) as f:
            images.append(decode_image(f.read(), size, path))
    return np.stack(images)


def export(
    ref: ModelRef, plan: ExportPlan, *, images: np.ndarray, images_from: str
) -> dict[str, Any]:
    """Export, verify and write `plan.out`: the file, export.json, manifest.json last."""
    from jobs.models.scoring import build_net

    start = time.time()
    info = ref.model.info
    size = int(info["image_size"])
    model = normalized(build_net(ref.model), info["mean"], info["std"])
    name = EXPORT_FILES[plan.fmt]
    with tempfile.TemporaryDirectory(prefix="tlctl-export-") as tmp:
        path = os.path.join(tmp, name)
        try:
            versions = write_program(model, plan.fmt, size, path)
        except TlctlError:
            raise
        except Exception as exc:  # the exporters raise many types; name the step
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TlctlError(
                f"export: {plan.fmt} export of {info['backbone']} failed ({first})",
                exit_code=EXIT_FAILED,
            ) from exc
        batches = {**random_batches(size), f"validation-{len(images)}": images}
        checks = verify(model, load_program(plan.fmt, path), batches)
        with open(path, "rb") as f:
            data = f.read()
    record = {
        "format": FORMAT,
        "export_format": plan.fmt,
        "file": name,
        "run": ref.layout.name,
        "run_uri": ref.layout.uri,
        "model_ref": ref.text,
        "model_manifest_sha256": ref.model.manifest_sha256,
        "backbone": info["backbone"],
        "classes": list(info["classes"]),
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": ["batch", size, size, 3],
            "channels": "RGB, 0..255; resize to the size, normalization is inside",
            "batch": [1, MAX_BATCH],
        },
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(info["classes"])]},
        "normalization": {"mean": list(info["mean"]), "std": list(info["std"])},
        "versions": versions,
        "verification": {
            "atol": ATOL,
            "rtol": RTOL,
            "images_from": images_from,
            "batches": checks,
            "passed": all(c["passed"] for c in checks),
        },
        "exported_at": time.time(),
        "wall_s": round(time.time() - start, 3),
    }
    failed = [c for c in checks if not c["passed"]]
    if failed:
        worst = max(failed, key=lambda c: c["max_abs_diff"])
        raise TlctlError(
            f"export: the {plan.fmt} program disagrees with the eager model on batch "
            f"{worst['batch']} (max |Δlogit| {worst['max_abs_diff']:.3g}, top-1 agrees on "
            f"{worst['top1_agree']}/{worst['n']}; allowed {ATOL:g} + {RTOL:g}·|logit|); "
            "nothing was written",
            exit_code=EXIT_FAILED,
        )
    _write(plan, {name: data, EXPORT_INFO: _json(record).encode()}, ref)
    return {**record, "uri": plan.out.join(name).uri}


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True)


def _write(plan: ExportPlan, files: dict[str, bytes], ref: ModelRef) -> None:
    lease = acquire(
        plan.out.join(LEASE),
        job="tlctl export",
        what=f"export {plan.out.uri} of run {ref.layout.uri}",
        prune_empty_parent=True,
    )
    with lease.start():
        for old in list_dir(plan.out) if exists(plan.out) else []:
            if old != LEASE and plan.overwrite:
                delete_tree(plan.out.join(old))
        for name, data in files.items():
            write_bytes(plan.out.join(name), data)
        write_bytes(plan.out.join(MANIFEST), _json(describe(files)).encode())
