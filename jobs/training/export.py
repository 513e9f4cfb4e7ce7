"""A run's `model/`: the best complete checkpoint's weights, model.json and a manifest.

`model/model.pt` is a plain state_dict (with the default head it loads into
`torchvision.models.get_model`); model.json says how to use it (backbone, classes, image
size, mean/std); model/'s manifest is written last, so a model/ whose files do not match
it is never loaded as weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from jobs.errors import EXIT_FAILED, TlctlError
from jobs.storage.layout import MANIFEST, MODEL_INFO, WEIGHTS, RunLayout
from jobs.storage.location import Location, read_text, write_text
from jobs.storage.manifest import describe, verify
from jobs.training.loop import WorkerJob

MODEL_FORMAT = "tlctl-model/1"


def model_info(job: WorkerJob, metrics: dict[str, Any], checkpoint_uri: str) -> dict[str, Any]:
    """model.json: what a user of the weights needs to know."""
    spec = job.spec
    return {
        "format": MODEL_FORMAT,
        "run": spec.name,
        "backbone": spec.backbone.name,
        "weights": spec.backbone.weights,
        "freeze_depth": spec.backbone.freeze_depth,
        "num_classes": len(job.classes),
        "classes": job.classes,
        "image_size": spec.data.image_size,
        "mean": list(job.mean),
        "std": list(job.std),
        "head": spec.head.model_dump(),
        "loads_into_torchvision": not spec.head.hidden,
        "metrics": public_metrics(metrics),
        "checkpoint": checkpoint_uri,
        "exported_at": time.time(),
    }


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def export_model(job: WorkerJob, layout: RunLayout, result) -> dict[str, Any]:
    """The best checkpoint of a finished Train run that verifies → `model/`; its model.json."""
    cp = job.spec.checkpoint
    sign = 1 if cp.mode == "max" else -1
    ranked = sorted(
        result.best_checkpoints, key=lambda item: sign * item[1].get(cp.metric, 0), reverse=True
    )
    for checkpoint, metrics in ranked:
        ckpt = _location_of(layout.root, checkpoint.path)
        if verify(ckpt) is None:
            info = model_info(job, metrics, ckpt.uri)
            publish_model(layout, ckpt, info)
            return info
    raise TlctlError("training produced no complete checkpoint to export", exit_code=EXIT_FAILED)


def _location_of(root: Location, path: str) -> Location:
    """A path Ray Train reports (bucket/key, no scheme) on `root`'s filesystem."""
    path = path.rstrip("/")
    return dataclasses.replace(root, path=path, uri=f"s3://{path}" if root.is_s3 else path)


def publish_model(layout: RunLayout, checkpoint: Location, info: dict[str, Any]) -> None:
    """model/model.pt (copied from a verified checkpoint), model.json, then model/'s own
    manifest, last."""
    model = layout.model
    model.fs.create_dir(model.path)
    model.fs.copy_file(checkpoint.join(WEIGHTS).path, model.join(WEIGHTS).path)
    text = json.dumps(info, indent=1, sort_keys=True)
    write_text(model.join(MODEL_INFO), text)
    entry = json.loads(read_text(checkpoint.join(MANIFEST)))["files"][WEIGHTS]
    manifest = describe({MODEL_INFO: text.encode()})
    manifest["files"][WEIGHTS] = entry
    write_text(model.join(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
