"""Run one training job from a resolved spec: pre-flight, train with Ray Train, export.

This is the driver side of a job. It runs in the CLI process for `--local` and in the
job's entrypoint on a cluster, so it lives in `jobs` and takes the spec as a plain dict
(validated by `orchestrator.spec` on the client). Everything that can be wrong with the
input is checked in `preflight`, before Ray starts and before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

import yaml

from jobs import backbones
from jobs.data import DataPlan, build_datasets, corrupt_image_message, plan_data
from jobs.errors import EXIT_FAILED, TlctlError
from jobs.manifest import MANIFEST, describe, verify
from jobs.metrics import epoch_lines, read_metrics
from jobs.retry import retry_window
from jobs.retrying_fs import patient, retrying_fs
from jobs.storage import Location, check_writable, exists, read_text, resolve, write_text
from jobs.train import MODEL_FILE, build_job_model, train_loop_per_worker

# Fields that must match for a run of the same name to be resumed.
IDENTITY_FIELDS = (
    ("backbone", "name"),
    ("backbone", "freeze_depth"),
    ("head", "hidden"),
    ("data", "image_size"),
)


@dataclass
class Prepared:
    """What pre-flight learned: where the run lives, its data and whether it resumes."""

    spec: dict[str, Any]
    run: Location
    plan: DataPlan
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resuming: bool
    complete: bool


def data_section(spec: dict[str, Any]) -> dict[str, Any]:
    """The data section with the endpoint to read it through (defaults to storage's)."""
    data = dict(spec["data"])
    data["endpoint"] = data.get("endpoint") or spec["storage"].get("endpoint")
    return data


def _check_resume(spec: dict[str, Any], run: Location, classes: list[str]) -> tuple[bool, bool]:
    """(resuming, complete): refuse to resume a run with a different model or classes."""
    spec_loc = run.join("spec.yaml")
    if not exists(spec_loc):
        return False, False
    stored = yaml.safe_load(read_text(spec_loc)) or {}
    for section, key in IDENTITY_FIELDS:
        old, new = (stored.get(section) or {}).get(key), spec[section][key]
        if old != new:
            raise TlctlError(
                f"{section}.{key}: run '{spec['name']}' already exists at {run.uri} with "
                f"{section}.{key}={old!r}, not {new!r}; a run resumes only with the same model "
                "(choose a new name, or delete the old run)"
            )
    classes_loc = run.join("classes.json")
    if exists(classes_loc):
        old_classes = json.loads(read_text(classes_loc))
        if old_classes != classes:
            raise TlctlError(
                f"data.train: run '{spec['name']}' was trained on classes {old_classes}, "
                f"the data now has {classes} (choose a new name)"
            )
    if (stored.get("search") or None) != (spec.get("search") or None):
        raise TlctlError(
            f"search: run '{spec['name']}' already exists at {run.uri} with a different "
            "search block; a run resumes only with the same search (choose a new name)"
        )
    if spec.get("search"):
        complete = exists(run.join("model", "model.json")) and exists(run.join("trials.parquet"))
        return True, complete
    done = epoch_lines(read_metrics(run.join("metrics.jsonl")))
    last = max((int(m["epoch"]) for m in done), default=-1)
    complete = exists(run.join("model", "model.json")) and last + 1 >= int(spec["train"]["epochs"])
    return True, complete


def preflight(spec: dict[str, Any], *, check_weights: bool = True) -> Prepared:
    """Validate storage, data and weights against the real world; no compute, no writes.

    The writability probe on storage puts and deletes one small object. `check_weights`
    False skips building the model (a client submitting `weights: imagenet` to a cluster
    that downloads them itself; the job's own pre-flight on the cluster checks them).
    """
    root = resolve(spec["storage"]["uri"], spec["storage"].get("endpoint"))
    run = root.join(spec["name"])
    # Probe the storage root, not the run prefix: a run that fails pre-flight leaves no trace.
    check_writable(root)
    plan = plan_data(data_section(spec), seed=int(spec["train"].get("seed", 0)))
    if check_weights:
        # Builds the model once on the driver: checks freeze depth and that weights load.
        build_job_model(spec, plan.num_classes)
    mean, std = backbones.normalization(spec["backbone"]["name"], spec["backbone"]["weights"])
    resuming, complete = _check_resume(spec, run, plan.classes)
    return Prepared(spec, run, plan, mean, std, resuming, complete)


def error_text(exc: BaseException, depth: int = 0) -> str:
    """All the text of a Ray error: its traceback, causes and each worker's failure."""
    if depth > 5:
        return ""
    parts = ["".join(traceback.format_exception(exc))]
    for inner in (getattr(exc, "worker_failures", None) or {}).values():
        parts.append(error_text(inner, depth + 1))
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        parts.append(error_text(controller, depth + 1))
    return "\n".join(parts)


def root_cause(exc: BaseException) -> str:
    """The last `SomeError: message` line of a Ray error, not the whole traceback dump."""
    text = error_text(exc)
    corrupt = corrupt_image_message(text)
    if corrupt:
        return corrupt
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", line):
            return line
    return lines[-1] if lines else type(exc).__name__


def model_json(prepared: Prepared, metrics: dict[str, Any], checkpoint_uri: str) -> dict[str, Any]:
    spec = prepared.spec
    return {
        "format": "tlctl-model/1",
        "run": spec["name"],
        "backbone": spec["backbone"]["name"],
        "weights": spec["backbone"]["weights"],
        "freeze_depth": spec["backbone"]["freeze_depth"],
        "num_classes": prepared.plan.num_classes,
        "classes": prepared.plan.classes,
        "image_size": spec["data"]["image_size"],
        "mean": list(prepared.mean),
        "std": list(prepared.std),
        "head": spec["head"],
        "loads_into_torchvision": not spec["head"]["hidden"],
        "metrics": metrics,
        "checkpoint": checkpoint_uri,
        "exported_at": time.time(),
    }


def export_model(prepared: Prepared, result) -> dict[str, Any]:
    """Copy the best checkpoint's weights to `model/` and describe them in model.json."""
    cp = prepared.spec["checkpoint"]
    sign = 1 if cp["mode"] == "max" else -1
    ranked = sorted(
        result.best_checkpoints, key=lambda item: sign * item[1].get(cp["metric"], 0), reverse=True
    )
    run = prepared.run
    for checkpoint, metrics in ranked:  # the best checkpoint that verifies
        ckpt = dataclasses.replace(
            run, path=checkpoint.path.rstrip("/"), uri=_uri_of(run, checkpoint.path)
        )
        if verify(ckpt) is None:
            info = model_json(prepared, _public_metrics(metrics), ckpt.uri)
            publish_model(run, ckpt, info)
            return info
    raise TlctlError("training produced no complete checkpoint to export", exit_code=EXIT_FAILED)


def _uri_of(run: Location, path: str) -> str:
    path = path.rstrip("/")
    return f"s3://{path}" if run.is_s3 else path


def publish_model(run: Location, checkpoint: Location, info: dict[str, Any]) -> None:
    """model/model.pt (copied from a verified checkpoint), model.json, then model/'s own
    manifest, last: a model/ without a matching manifest is never loaded as weights."""
    model = run.join("model")
    run.fs.create_dir(model.path)
    run.fs.copy_file(checkpoint.join(MODEL_FILE).path, model.join(MODEL_FILE).path)
    text = json.dumps(info, indent=1, sort_keys=True)
    write_text(model.join("model.json"), text)
    entry = json.loads(read_text(checkpoint.join(MANIFEST)))["files"][MODEL_FILE]
    manifest = describe({"model.json": text.encode()})
    manifest["files"][MODEL_FILE] = entry
    write_text(model.join(MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def _public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def write_run_header(prepared: Prepared) -> None:
    """spec.yaml and classes.json: written once training is about to start."""
    run = prepared.run
    write_text(run.join("spec.yaml"), yaml.safe_dump(prepared.spec, sort_keys=False))
    write_text(run.join("classes.json"), json.dumps(prepared.plan.classes))


def build_trainer(
    prepared: Prepared,
    *,
    progress=None,
    submitted_at: float | None = None,
    datasets: dict[str, Any] | None = None,
    callbacks: list | None = None,
    metrics_tags: dict[str, Any] | None = None,
):
    """The TorchTrainer for this job. Tune builds the same one per trial, with the trial's
    spec and directory, datasets decoded once by the search driver, and Tune's callback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.failures import FailureLog

    spec, run = prepared.spec, prepared.run
    scaling = spec["scaling"]
    per_worker: dict[str, float] = {"CPU": float(scaling["cpus_per_worker"])}
    if scaling["use_gpu"]:
        per_worker["GPU"] = 1.0
    cp = spec["checkpoint"]
    config = {
        "spec": spec,
        "classes": prepared.plan.classes,
        "mean": list(prepared.mean),
        "std": list(prepared.std),
        "run_uri": run.uri,
        "train_rows": prepared.plan.train_rows,
        "progress": progress,
        "submitted_at": submitted_at,
        "metrics_tags": metrics_tags or {},
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(scaling["num_workers"]),
            use_gpu=bool(scaling["use_gpu"]),
            resources_per_worker=per_worker,
            placement_strategy=scaling.get("placement", "pack").upper(),
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=run.path,
            # Ray Train's own storage calls (snapshots, deletions, resume downloads) wait
            # out an outage as tlctl's writes do.
            storage_filesystem=retrying_fs(run.fs, retry_window(spec)),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=int(cp["keep"]),
                checkpoint_score_attribute=cp["metric"],
                checkpoint_score_order=cp["mode"],
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=int(spec["failure"]["max_failures"])
            ),
            callbacks=[
                FailureLog(
                    run.uri,
                    spec["storage"].get("endpoint"),
                    metrics_tags,
                    retry_window(spec),
                ),
                *(callbacks or []),
            ],
        ),
        datasets=datasets or build_datasets(prepared.plan, data_section(spec)),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def run_job(prepared: Prepared, *, progress=None, submitted_at: float | None = None) -> dict:
    """Train (or resume) and export; returns the summary. Ray must be initialized."""
    start = time.time()
    if prepared.complete:
        info = json.loads(read_text(prepared.run.join("model", "model.json")))
        return summary(prepared, info, time.time() - start, already_complete=True)
    trainer = build_trainer(prepared, progress=progress, submitted_at=submitted_at)
    write_run_header(prepared)
    try:
        result = trainer.fit()
    except TlctlError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; show the cause
        raise TlctlError(f"training failed: {root_cause(exc)}", exit_code=EXIT_FAILED) from exc
    # Training's outage tolerance holds for the export too.
    prepared = dataclasses.replace(prepared, run=patient(prepared.run, retry_window(prepared.spec)))
    info = export_model(prepared, result)
    return summary(prepared, info, time.time() - start)


def summary(
    prepared: Prepared, info: dict[str, Any], wall: float, *, already_complete: bool = False
) -> dict[str, Any]:
    lines = epoch_lines(read_metrics(prepared.run.join("metrics.jsonl")))
    return {
        "run": prepared.spec["name"],
        "best_val_acc": info["metrics"].get("val_acc"),
        "best_epoch": info["metrics"].get("epoch"),
        "epochs": len(lines),
        "wall_time_s": wall,
        "model_uri": prepared.run.join("model").uri,
        "run_uri": prepared.run.uri,
        "already_complete": already_complete,
    }
