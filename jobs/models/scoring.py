"""A run's model as a scorer: the eager network built from model.json and loaded from the
verified weights (never unpickled: `weights_only=True`), fed exactly as in training (the
same decode and resize, the model's own mean/std), in fp32.

`Scorer` is the callable class Ray Data runs in an actor pool; each actor reads and
verifies the model itself, so nothing but the run's URI and manifest digest travels, and
reads its images itself, so nothing but their paths does.
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from jobs.data.pipeline import decode_image
from jobs.errors import CORRUPT_MARKER, TlctlError
from jobs.models.ref import ModelRef
from jobs.models.registry import RunModel
from jobs.storage.layout import MODEL_INFO, WEIGHTS, RunLayout
from jobs.storage.location import Location, resolve

SCORE_BATCH = 64  # images per scorer call (and per input block)


def build_net(run: RunModel):  # -> torch.nn.Module in eval mode
    import torch

    from jobs.training.model import build_model

    info = run.info
    head = info.get("head") or {}
    net = build_model(
        info["backbone"],
        len(info["classes"]),
        hidden=tuple(head.get("hidden") or ()),
        dropout=float(head.get("dropout", 0.2)),
    )
    state = torch.load(io.BytesIO(run.files[WEIGHTS]), map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise TlctlError(
            f"{run.layout.model.uri}: the weights do not fit the model {MODEL_INFO} describes "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    return net.eval()


class Scorer:
    """Image files → per-image predictions: the Ray Data `map_batches` callable class.

    One fused stage reads each file, decodes it as training does and scores the batch, so
    an image crosses no process boundary as pixels: on a few CPUs, extra stages cost more
    than the work they would spread. `strict` (evaluate): an image that does not decode
    fails the job, naming it. Otherwise (predict) it becomes its row's `error`."""

    def __init__(
        self,
        run_uri: str,
        endpoint: str | None,
        manifest_sha256: str,
        k: int,
        source_uri: str,
        source_endpoint: str | None,
        strict: bool,
        all_probs: bool = False,
    ):
        import torch

        run = RunModel.read(RunLayout.at(run_uri, endpoint))
        if run.manifest_sha256 != manifest_sha256:
            raise TlctlError(f"{run_uri}: the model changed while it was being used")
        self.net = build_net(run)
        self.mean = torch.tensor(run.info["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(run.info["std"]).view(1, 3, 1, 1)
        self.size = int(run.info["image_size"])
        self.k, self.strict, self.all_probs = k, strict, all_probs
        self.fs = resolve(source_uri, source_endpoint).fs

    def _decoded(self, paths: list[str]) -> tuple[np.ndarray, list[str], list[int]]:
        images, errors, crcs = [], [], []
        for path in paths:
            try:
                with self.fs.open_input_file(path) as f:
                    raw = f.read()
            except OSError as exc:
                if self.strict:
                    raise
                images.append(np.zeros((self.size, self.size, 3), dtype=np.uint8))
                errors.append(f"{path}: cannot be read ({str(exc).splitlines()[0]})")
                crcs.append(0)
                continue
            crcs.append(zlib.crc32(raw))
            try:
                images.append(decode_image(raw, self.size, path))
                errors.append("")
            except ValueError as exc:
                if self.strict:
                    raise
                images.append(np.zeros((self.size, self.size, 3), dtype=np.uint8))
                errors.append(str(exc).replace(f"{CORRUPT_MARKER} ", "", 1))
        return np.stack(images), errors, crcs

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from jobs.training.steps import to_input

        paths = [str(p) for p in batch["path"]]
        images, errors, crcs = self._decoded(paths)
        with torch.no_grad():
            x = to_input(torch.from_numpy(images), self.mean, self.std, False)
            logp = torch.log_softmax(self.net(x).float(), dim=1)
        top_logp, top_idx = logp.topk(self.k, dim=1)
        out = {k: v for k, v in batch.items()}
        out["path"] = np.asarray(paths, dtype=object)
        out["crc"] = np.asarray(crcs, dtype=np.int64)
        out["error"] = np.asarray(errors, dtype=object)
        out["prediction"] = top_idx[:, 0].numpy().astype(np.int64)
        out["confidence"] = top_logp[:, 0].exp().numpy().astype(np.float64)
        out["topk_index"] = top_idx.numpy().astype(np.int64)
        out["topk_prob"] = top_logp.exp().numpy().astype(np.float64)
        if self.all_probs:
            out["probs"] = logp.exp().numpy().astype(np.float64)
        if "label" in batch:
            labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
            out["nll"] = (-logp.gather(1, labels[:, None])[:, 0]).numpy().astype(np.float64)
            out["topk_hit"] = (top_idx == labels[:, None]).any(dim=1).numpy()
        return out


def actor_count() -> int:
    """Scorer actors: one per CPU Ray offers (each scores with one thread)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def scored(
    source: Location,
    files: list[str],
    ref: ModelRef,
    k: int,
    *,
    labels: list[int] | None = None,
    strict: bool,
    all_probs: bool = False,
    actors: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """`files` of `source` (with their `labels`, if any) through a pool of Scorers of
    `ref`'s model: batches of per-image results, in no particular order."""
    import pyarrow as pa
    import ray.data

    columns: dict[str, Any] = {"path": files}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    table = pa.table(columns)
    blocks = [table.slice(i, SCORE_BATCH) for i in range(0, table.num_rows, SCORE_BATCH)]
    with warnings.catch_warnings():
        # max_restarts has no named parameter in Ray 2.60 (pinned <2.61); passed through.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_arrow(blocks).map_batches(
            Scorer,
            fn_constructor_kwargs={
                "run_uri": ref.layout.uri,
                "endpoint": ref.layout.root.endpoint,
                "manifest_sha256": ref.model.manifest_sha256,
                "k": k,
                "source_uri": source.uri,
                "source_endpoint": source.endpoint,
                "strict": strict,
                "all_probs": all_probs,
            },
            compute=ray.data.ActorPoolStrategy(size=actors or actor_count()),
            num_cpus=1,
            batch_size=SCORE_BATCH,
            batch_format="numpy",
            # No restarts: a lost scorer fails the command, which is re-run as a whole (and
            # Ray's warning that a restart could not re-read the arguments stays away).
            max_restarts=0,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
