"""A run's model as a scorer: the eager network built from model.json and loaded from the
verified weights (never unpickled: `weights_only=True`), fed exactly as in training (the
same decode and resize, the model's own mean/std), in fp32.

`Scorer` is the callable class Ray Data runs in an actor pool; each actor reads and
verifies the model itself, so nothing but the run's URI and manifest digest travels.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from jobs.errors import TlctlError
from jobs.models.ref import ModelRef
from jobs.models.registry import RunModel
from jobs.storage.layout import MODEL_INFO, WEIGHTS, RunLayout


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
    """uint8 NHWC images → per-image predictions (Ray Data `map_batches` callable class)."""

    def __init__(self, run_uri: str, endpoint: str | None, manifest_sha256: str, k: int):
        import torch

        run = RunModel.read(RunLayout.at(run_uri, endpoint))
        if run.manifest_sha256 != manifest_sha256:
            raise TlctlError(f"{run_uri}: the model changed while it was being used")
        self.net = build_net(run)
        self.mean = torch.tensor(run.info["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(run.info["std"]).view(1, 3, 1, 1)
        self.k = k

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from jobs.training.steps import to_input

        with torch.no_grad():
            x = to_input(torch.from_numpy(batch["image"]), self.mean, self.std, False)
            logp = torch.log_softmax(self.net(x).float(), dim=1)
        top_logp, top_idx = logp.topk(self.k, dim=1)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["prediction"] = top_idx[:, 0].numpy().astype(np.int64)
        out["confidence"] = top_logp[:, 0].exp().numpy().astype(np.float64)
        out["topk_index"] = top_idx.numpy().astype(np.int64)
        out["topk_prob"] = top_logp.exp().numpy().astype(np.float64)
        if "label" in batch:
            labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
            out["nll"] = (-logp.gather(1, labels[:, None])[:, 0]).numpy().astype(np.float64)
            out["topk_hit"] = (top_idx == labels[:, None]).any(dim=1).numpy()
        return out


def scored(ds, ref: ModelRef, k: int, *, actors: int, batch_size: int):  # -> ray.data.Dataset
    """`ds` (decoded images) through a pool of `actors` Scorers of `ref`'s model, top `k`."""
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "run_uri": ref.layout.uri,
            "endpoint": ref.layout.root.endpoint,
            "manifest_sha256": ref.model.manifest_sha256,
            "k": k,
        },
        concurrency=actors,
        num_cpus=1,
        batch_size=batch_size,
        batch_format="numpy",
    )
