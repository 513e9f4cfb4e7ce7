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
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.data.pipeline import decode_image, row_bytes
from jobs.errors import CORRUPT_MARKER, TlctlError
from jobs.models.ref import ModelRef
from jobs.models.registry import RunModel
from jobs.storage.layout import MODEL_INFO, WEIGHTS, RunLayout
from jobs.storage.location import Location, exists, list_dir, resolve

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
        image_column: str | None = None,
        id_column: str | None = None,
    ):
        import torch

        run = RunModel.read(RunLayout.at(run_uri, endpoint))
        if run.manifest_sha256 != manifest_sha256:
            raise TlctlError(f"{run_uri}: the model changed while it was being used")
        # A GPU when Ray gave this actor one (pool_shape), fp32 there too.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = build_net(run).to(self.device)
        self.mean = torch.tensor(run.info["mean"]).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(run.info["std"]).view(1, 3, 1, 1).to(self.device)
        self.size = int(run.info["image_size"])
        self.k, self.strict, self.all_probs = k, strict, all_probs
        self.fs = resolve(source_uri, source_endpoint).fs
        self.image_column, self.id_column = image_column, id_column
        self._group_key: tuple[str, int] | None = None
        self._group = None

    def _files(self, paths: list[str]) -> list[tuple[str, bytes | str]]:
        """(name, bytes) per file, or (name, why) for one that cannot be read."""
        items: list[tuple[str, bytes | str]] = []
        for path in paths:
            try:
                with self.fs.open_input_file(path) as f:
                    items.append((path, f.read()))
            except OSError as exc:
                if self.strict:
                    raise
                items.append((path, f"{path}: cannot be read ({str(exc).splitlines()[0]})"))
        return items

    def _rows(self, batch: dict[str, Any]) -> list[tuple[str, bytes | str]]:
        """(id, bytes) per row of one Parquet chunk (file, row group, offset, length)."""
        file, group = str(batch["file"][0]), int(batch["row_group"][0])
        offset, length, first = (int(batch[k][0]) for k in ("offset", "length", "first_row"))
        if self._group_key != (file, group):  # consecutive chunks share a row group
            import pyarrow.parquet as pq

            columns = [c for c in (self.image_column, self.id_column) if c]
            with self.fs.open_input_file(file) as f:
                self._group = pq.ParquetFile(f).read_row_group(group, columns=columns)
            self._group_key = (file, group)
        table = self._group.slice(offset, length)
        values = table.column(self.image_column).to_pylist()
        ids = (
            [str(v) for v in table.column(self.id_column).to_pylist()]
            if self.id_column
            else [f"{file}#{first + i}" for i in range(length)]
        )
        items: list[tuple[str, bytes | str]] = []
        for i, (name, value) in enumerate(zip(ids, values, strict=True)):
            try:
                items.append((name, row_bytes(value, self.image_column, first + i)))
            except ValueError as exc:
                if self.strict:
                    raise
                items.append((name, str(exc).replace(f"{CORRUPT_MARKER} ", "", 1)))
        return items

    def _decoded(self, items: list[tuple[str, bytes | str]]) -> tuple[np.ndarray, list, list]:
        images, errors, crcs = [], [], []
        for name, raw in items:
            error = raw if isinstance(raw, str) else ""
            if not error:
                try:
                    images.append(decode_image(raw, self.size, name))
                except ValueError as exc:
                    if self.strict:
                        raise
                    error = str(exc).replace(f"{CORRUPT_MARKER} ", "", 1)
            if error:
                images.append(np.zeros((self.size, self.size, 3), dtype=np.uint8))
            errors.append(error)
            crcs.append(0 if error else zlib.crc32(raw))
        return np.stack(images), errors, crcs

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from jobs.training.steps import to_input

        parquet = "row_group" in batch
        items = self._rows(batch) if parquet else self._files([str(p) for p in batch["path"]])
        images, errors, crcs = self._decoded(items)
        with torch.no_grad():
            pixels = torch.from_numpy(images).to(self.device)
            x = to_input(pixels, self.mean, self.std, False)
            logp = torch.log_softmax(self.net(x).float(), dim=1).cpu()
        top_logp, top_idx = logp.topk(self.k, dim=1)
        out = {} if parquet else {k: v for k, v in batch.items()}
        out["id" if parquet else "path"] = np.asarray([n for n, _ in items], dtype=object)
        out["crc"] = np.asarray(crcs, dtype=np.int64)
        out["error"] = np.asarray(errors, dtype=object)
        out["prediction"] = top_idx[:, 0].numpy().astype(np.int64)
        out["confidence"] = top_logp[:, 0].exp().numpy().astype(np.float64)
        out["topk_index"] = top_idx.numpy().astype(np.int64)
        out["topk_prob"] = top_logp.exp().numpy().astype(np.float64)
        if self.all_probs:
            out["probs"] = logp.exp().numpy().astype(np.float64)
        if parquet and "labels" in batch:  # a chunk's rows' labels, as file rows have theirs
            out["label"] = np.asarray(batch["labels"][0], dtype=np.int64)
        if "label" in out:  # passed through from a file batch, or the chunk's
            labels = torch.from_numpy(np.asarray(out["label"], dtype=np.int64))
            out["nll"] = (-logp.gather(1, labels[:, None])[:, 0]).numpy().astype(np.float64)
            out["topk_hit"] = (top_idx == labels[:, None]).any(dim=1).numpy()
        return out


@dataclass(frozen=True)
class ParquetInput:
    """Images as a Parquet column (bytes, or Ray's/Hugging Face's {bytes: …} struct)."""

    image_column: str
    id_column: str | None  # each row's id in the output; None: <file>#<row>
    rows: int


def is_parquet(loc: Location) -> bool:
    """A .parquet file, or a directory with .parquet files directly in it."""
    from jobs.data.plan import PARQUET_EXTENSIONS

    if loc.path.endswith(PARQUET_EXTENSIONS):
        return True
    return exists(loc) and any(n.endswith(PARQUET_EXTENSIONS) for n in list_dir(loc))


def pool_shape(resources: dict[str, float]) -> tuple[int, float]:
    """(scorer actors, GPUs per actor) for what Ray offers: one actor per GPU where there
    are GPUs, else one per CPU; never a request for GPUs that do not exist."""
    gpus = int(resources.get("GPU", 0))
    if gpus >= 1:
        return gpus, 1.0
    return max(1, int(resources.get("CPU", 1))), 0.0


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
    parquet: ParquetInput | None = None,  # rows of Parquet `files` instead of image files
) -> Iterator[dict[str, np.ndarray]]:
    """`files` of `source` (with their `labels`, if any) through a pool of Scorers of
    `ref`'s model: batches of per-image results, in no particular order."""
    import pyarrow as pa
    import ray
    import ray.data

    count, gpus = pool_shape(ray.cluster_resources())
    if parquet is not None:  # one chunk of <= SCORE_BATCH rows each, with its labels
        blocks = _parquet_chunks(source, files, labels)
    else:
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
                "image_column": parquet.image_column if parquet else None,
                "id_column": parquet.id_column if parquet else None,
            },
            compute=ray.data.ActorPoolStrategy(size=actors or count),
            num_cpus=1,
            num_gpus=gpus or None,
            batch_size=1 if parquet is not None else SCORE_BATCH,
            batch_format="numpy",
            # No restarts: a lost scorer fails the command, which is re-run as a whole (and
            # Ray's warning that a restart could not re-read the arguments stays away).
            max_restarts=0,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _parquet_chunks(source: Location, files: list[str], labels: list[int] | None) -> list:
    """Each file's rows as chunks of at most SCORE_BATCH rows inside one row group (from
    the footers alone), one single-row block per chunk, in file order; with `labels` (one
    per row of all files, in that order), each chunk carries its rows' labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = []
    done = 0  # rows of earlier chunks
    for file in files:
        with source.fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
        first = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            for offset in range(0, rows, SCORE_BATCH):
                length = min(SCORE_BATCH, rows - offset)
                chunk: dict[str, Any] = {
                    "file": [file],
                    "row_group": [group],
                    "offset": [offset],
                    "length": [length],
                    "first_row": [first + offset],
                }
                if labels is not None:
                    chunk["labels"] = pa.array(
                        [labels[done : done + length]], type=pa.list_(pa.int64())
                    )
                blocks.append(pa.table(chunk))
                done += length
            first += rows
    return blocks
