"""Every object name under a run's prefix, and the readers for them.

`<storage.uri>/<name>/` holds one run. This module is the only place that spells the names
of what lies there; everything else asks a `RunLayout` for a location. `LAYOUT` describes
each entry for people: docs/spec.md's storage section is generated from it (and a test
fails when it is stale).
"""

from __future__ import annotations

import io
import json
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.errors import TlctlError
from jobs.storage.location import Location, exists, list_dir, read_bytes, read_text, resolve

if TYPE_CHECKING:
    from jobs.spec.model import JobSpec

# Objects of a run prefix.
SPEC = "spec.yaml"
CLASSES = "classes.json"
METRICS = "metrics.jsonl"
EVENTS = "events"
CHECKPOINTS = "checkpoints"
MODEL = "model"
TUNE = "tune"
TUNER_STATE = "tuner.pkl"  # Ray Tune's own name for it
# Not .json/.pkl: Tune downloads those into its staging dir and uploads them back.
TUNE_MANIFEST = "tlctl.manifest"
TRIALS = "trials"
TRIALS_TABLE = "trials.parquet"
LEASE = "lease.json"
EVAL = "eval"
EVAL_METRICS = "metrics.json"
EVAL_PREDICTIONS = "predictions.parquet"
EVAL_FILES = ("confusion.png", "reliability.png", "errors.html")
EXPORT = "export"
EXPORT_INFO = "export.json"
EXPORT_FILES = {"pt2": "model.pt2", "onnx": "model.onnx"}  # by `tlctl export --format`
# The model registry, at the storage root beside the runs (a run name never starts with _).
REGISTRY = "_models"
ALIASES = "aliases"
HISTORY = "history"
# Files of a checkpoint directory and of model/.
WEIGHTS = "model.pt"
STATE = "state.pt"
META = "meta.json"
MANIFEST = "manifest.json"
MODEL_INFO = "model.json"
CHECKPOINT_FILES = (WEIGHTS, STATE, META, MANIFEST)

LAYOUT: tuple[tuple[str, str], ...] = (
    (SPEC, "the resolved spec (never credentials: those come from the AWS chain)"),
    (CLASSES, "the class → index map (index = position)"),
    (METRICS, "one line per epoch, plus event lines (resumed, worker_failure, …)"),
    (
        f"{EVENTS}/",
        "events written by a process other than the log's writer (a worker failure seen by "
        f"Ray Train's controller), one object each; folded into {METRICS} by its next writer",
    ),
    (
        f"{CHECKPOINTS}/epoch-NNNN/",
        f"a Ray Train checkpoint: {WEIGHTS} (a plain state_dict), {STATE} (optimizer, "
        f"schedule), {META}, {MANIFEST} (sizes + SHA-256 of the others, written last); "
        "epoch-NNNN-rK when epoch NNNN was trained again after a restart",
    ),
    (f"{MODEL}/{WEIGHTS}", "the best checkpoint's weights: a plain state_dict"),
    (
        f"{MODEL}/{MODEL_INFO}",
        "backbone, num_classes, classes, image_size, mean, std, head, metrics",
    ),
    (f"{MODEL}/{MANIFEST}", f"sizes + SHA-256 of {WEIGHTS} and {MODEL_INFO}"),
    (f"{TUNE}/", "a search: Ray Tune's experiment state (what a resubmit restores)"),
    (
        f"{TUNE}/{TUNE_MANIFEST}",
        "a search: the SHA-256 of each Tune state file tlctl saw Tune save (its last 32 "
        "versions); a restore refuses state files it does not list",
    ),
    (
        f"{TRIALS}/<trial-id>/",
        f"a search: each trial laid out like a run ({CHECKPOINTS}/, {METRICS})",
    ),
    (TRIALS_TABLE, "a search: one row per trial (values, best metric, epochs, status, checkpoint)"),
    (
        f"{EVAL}/<name>/",
        f"`tlctl evaluate`: {EVAL_METRICS} (top-1/top-k, NLL, ECE, per-class precision/recall/"
        f"F1, confusion matrix, the data's fingerprint), {EVAL_PREDICTIONS} (one row per "
        f"image), {', '.join(EVAL_FILES)}",
    ),
    (
        f"{EXPORT}/<format>/",
        f"`tlctl export`: {' or '.join(EXPORT_FILES.values())} (uint8 NHWC in, logits out, "
        f"normalization inside), {EXPORT_INFO} (input/output contract, versions, the "
        f"verification against eager), {MANIFEST} (sizes + SHA-256, written last)",
    ),
    (
        LEASE,
        "while a job trains the run: its holder (host, pid, job) and heartbeat; another "
        "submit is refused until the heartbeat is older than its TTL (60 s, or "
        "TLCTL_LEASE_TTL_S), then takes it over; removed when the job ends",
    ),
)

_CHECKPOINT_DIR = re.compile(r"^epoch-(\d{4,})(?:-r(\d+))?$")


def _plain_scalar(f: Any) -> bool:
    """Whether a pyarrow field has a type a tlctl trials.parquet holds: a plain scalar, not
    an extension type (registered in this process, or only named in the field metadata)."""
    import pyarrow as pa
    import pyarrow.types as types

    if isinstance(f.type, pa.BaseExtensionType) or b"ARROW:extension:name" in (f.metadata or {}):
        return False
    checks = (types.is_string, types.is_large_string, types.is_integer, types.is_floating)
    return any(c(f.type) for c in (*checks, types.is_boolean, types.is_null))


def _field_type(f: Any) -> str:
    """A pyarrow field's type, with the extension name an unregistered type only keeps in
    its metadata."""
    name = (f.metadata or {}).get(b"ARROW:extension:name")
    return f"extension<{name.decode(errors='replace')}> ({f.type})" if name else str(f.type)


def layout_tree(width: int = 92) -> str:
    """The layout as the indented block the docs show (descriptions wrapped at `width`)."""
    column = max(len(path) for path, _ in LAYOUT) + 4
    lines = ["<storage.uri>/<name>/"]
    for path, text in LAYOUT:
        wrapped = textwrap.wrap(text, width - column) or [""]
        lines.append(f"  {path:<{column - 2}}{wrapped[0]}")
        lines += [" " * column + more for more in wrapped[1:]]
    return "\n".join(lines)


@dataclass(frozen=True)
class RunLayout:
    """The objects of one run (or of one search trial, which is laid out the same way)."""

    root: Location

    @classmethod
    def at(cls, uri: str, endpoint: str | None = None) -> RunLayout:
        return cls(resolve(uri, endpoint))

    @property
    def uri(self) -> str:
        return self.root.uri

    @property
    def name(self) -> str:
        return self.root.path.rstrip("/").rsplit("/", 1)[-1]

    # --- locations --------------------------------------------------------------------

    @property
    def spec(self) -> Location:
        return self.root.join(SPEC)

    @property
    def classes(self) -> Location:
        return self.root.join(CLASSES)

    @property
    def metrics(self) -> Location:
        return self.root.join(METRICS)

    @property
    def events(self) -> Location:
        return self.root.join(EVENTS)

    def event(self, name: str) -> Location:
        return self.events.join(name)

    @property
    def checkpoints(self) -> Location:
        return self.root.join(CHECKPOINTS)

    def checkpoint(self, dir_name: str) -> Location:
        return self.checkpoints.join(dir_name)

    @property
    def model(self) -> Location:
        return self.root.join(MODEL)

    def evaluation(self, name: str) -> Location:
        return self.root.join(EVAL, name)

    def export(self, fmt: str) -> Location:
        return self.root.join(EXPORT, fmt)

    @property
    def model_info(self) -> Location:
        return self.model.join(MODEL_INFO)

    @property
    def lease(self) -> Location:
        return self.root.join(LEASE)

    @property
    def tune(self) -> Location:
        return self.root.join(TUNE)

    @property
    def trials_table(self) -> Location:
        return self.root.join(TRIALS_TABLE)

    def trial(self, trial_id: str) -> RunLayout:
        return RunLayout(self.root.join(TRIALS, trial_id))

    def with_root(self, root: Location) -> RunLayout:
        """The same run through another filesystem (e.g. a retrying one)."""
        return RunLayout(root)

    # --- readers ----------------------------------------------------------------------

    def has_spec(self) -> bool:
        return exists(self.spec)

    def read_spec(self) -> JobSpec:
        """The stored spec, typed (an object that is not a tlctl spec is an error naming it)."""
        # pydantic only here: the names above serve torch-only images (the GPU benchmark).
        from jobs.spec.load import stored_spec

        return stored_spec(read_text(self.spec), self.spec.uri)

    def read_classes(self) -> list[str] | None:
        return json.loads(read_text(self.classes)) if exists(self.classes) else None

    def read_model_info(self) -> dict[str, Any] | None:
        """model/model.json, or None before the model is exported."""
        return json.loads(read_text(self.model_info)) if exists(self.model_info) else None

    def read_log(self) -> list[dict[str, Any]]:
        """metrics.jsonl, plus the events not folded into it yet, in time order."""
        return self.with_pending_events(read_jsonl(self.metrics))

    def with_pending_events(self, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`lines` plus the event objects they do not hold yet, in time order."""
        folded = {m.get("id") for m in lines if m.get("id")}
        pending = [e for e in self.read_events() if e.get("id") not in folded]
        return merge_by_time(lines, pending)

    def read_events(self) -> list[dict[str, Any]]:
        """The event objects under events/, oldest first."""
        names = list_dir(self.events)
        return [json.loads(read_text(self.event(name))) for name in names]

    def read_trials_table(self) -> list[dict[str, Any]]:
        """trials.parquet as rows ([] before the search has finished).

        tlctl writes only plain scalar columns; any other type (an extension type such as
        Ray's pickled objects, whose values unpickle when read, lists, structs) is refused
        from the schema, before one value is read.
        """
        import pyarrow.parquet as pq

        if not exists(self.trials_table):
            return []
        data = read_bytes(self.trials_table)
        where = self.trials_table.uri
        try:
            schema = pq.read_schema(io.BytesIO(data))
        except Exception as exc:  # any parquet failure: not a table tlctl wrote
            raise TlctlError(f"{where}: {TRIALS_TABLE} is not one tlctl wrote ({exc})") from exc
        for f in schema:
            if not _plain_scalar(f):
                raise TlctlError(
                    f"{where}: {TRIALS_TABLE} is not one tlctl wrote: column '{f.name}' has "
                    f"type {_field_type(f)} (tlctl writes only string, integer, float, bool "
                    "and null columns)"
                )
        return pq.read_table(io.BytesIO(data)).to_pylist()

    def checkpoint_dirs(self) -> list[tuple[int, Location]]:
        """(epoch, location) of every checkpoint dir, newest first (of one epoch's dirs, the
        latest rewrite first)."""
        if not exists(self.checkpoints):
            return []
        found = []
        for name in list_dir(self.checkpoints):
            parsed = parse_checkpoint_name(name)
            if parsed is not None:
                found.append((parsed, self.checkpoint(name)))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(epoch, loc) for (epoch, _), loc in found]


def read_jsonl(loc: Location) -> list[dict[str, Any]]:
    """JSON lines, skipping blanks (a torn final line is ignored, not fatal); [] if absent."""
    return parse_jsonl(read_text(loc)) if exists(loc) else []


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def merge_by_time(
    lines: list[dict[str, Any]], events: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`lines` with `events` inserted where their times fall (stable for equal times)."""
    out = list(lines)
    for event in sorted(events, key=lambda e: e.get("time", 0)):
        at = len(out)
        while at > 0 and out[at - 1].get("time", 0) > event.get("time", 0):
            at -= 1
        out.insert(at, event)
    return out


def epoch_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in lines if m.get("kind", "epoch") == "epoch"]


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(epoch, rewrite) of `epoch-NNNN` (rewrite 1) or `epoch-NNNN-rK` (K); else None."""
    match = _CHECKPOINT_DIR.match(name)
    return (int(match[1]), int(match[2] or 1)) if match else None


def checkpoint_name(epoch: int, taken: Iterable[str]) -> str:
    """The directory name for `epoch`'s checkpoint: `epoch-NNNN`, or `epoch-NNNN-rK` when
    an earlier attempt left that name behind (a checkpoint skipped as broken, or an upload
    cut short). Never reusing a name matters: Ray Train deletes an evicted checkpoint by its
    path, which would take a re-written checkpoint of the same name with it."""
    base = f"epoch-{epoch:04d}"
    taken = set(taken)
    if base not in taken:
        return base
    rewrite = 2
    while f"{base}-r{rewrite}" in taken:
        rewrite += 1
    return f"{base}-r{rewrite}"
