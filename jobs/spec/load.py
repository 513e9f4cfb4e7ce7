"""A job spec from YAML: `--set` overrides, validation, and the defaults that depend on
other fields or on where the job runs.

Every problem is reported as one line `field: what is wrong (valid: …)`, all of them at
once, before Ray starts. Relative local paths are made absolute (against the working
directory) so the stored spec and a cluster job mean the same files. A *resolved* spec has
every default filled in: it is what `tlctl validate --resolved` prints, what is stored with
a run and what a cluster job runs.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jobs.errors import TlctlError
from jobs.redact import clip, clip_text, redact
from jobs.spec.model import JobSpec, semantic_errors
from jobs.spec.search import resolve_search
from jobs.storage.location import normalize_endpoint

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# A spec is a few hundred values; an alias bomb (`&a [*a, *a, …]` nested) is billions.
MAX_SPEC_NODES = 20_000
MAX_SPEC_BYTES = 1_000_000
MERGE_TAG = "tag:yaml.org,2002:merge"
# The ints YAML 1.1 and 1.2 read alike; `010` (octal 8 in 1.1), `1_000` and `1:30` (90) not.
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)|0x[0-9a-fA-F]+")


class SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what would silently change a spec: a duplicate key (the
    last one would win), an int YAML 1.1 reads unlike 1.2 (`010` = 8) and aliases that
    expand past MAX_SPEC_NODES values (a 400-byte file must not become gigabytes)."""

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], Node] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == MERGE_TAG:
                continue
            ident = (key.tag, key.value)
            if ident in seen:
                first = seen[ident].start_mark.line + 1
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {clip(key.value)} (first at line {first})",
                    key.start_mark,
                )
            seen[ident] = key
        return node

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node) > MAX_SPEC_NODES:
            raise ComposerError(
                None,
                None,
                f"more than {MAX_SPEC_NODES} values once its aliases are expanded (an alias bomb?)",
                node.start_mark,
            )
        return node

    def construct_yaml_int(self, node: ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        if not _PLAIN_INT.fullmatch(text):
            as_11 = super().construct_yaml_int(node)
            raise ConstructorError(
                None,
                None,
                f"{clip(text)} is ambiguous: YAML 1.1 reads it as {as_11} (write the number "
                "without leading zeros, '_' or ':', or quote it)",
                node.start_mark,
            )
        return super().construct_yaml_int(node)


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)


def _expanded_size(root: Node) -> float:
    """Values in the document with every alias expanded, counted on the node graph (which
    shares aliased nodes, so this stays cheap); a cycle counts as infinite."""
    sizes: dict[int, float] = {}
    active: set[int] = set()

    def size(node: Node) -> float:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            return math.inf
        active.add(key)
        total = 1.0
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


def load_yaml(text: str) -> Any:
    """YAML text through SpecLoader (safe: no Python objects, no tags beyond YAML's own)."""
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader


def _valid_fields(loc: tuple[Any, ...]) -> list[str]:
    model: Any = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = models[0] if models else ann  # `SearchSpec | None` → SearchSpec
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_errors(exc: ValidationError) -> list[str]:
    """One `field.path: message (valid: …)` line per pydantic error."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "spec"
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            valid = _valid_fields(loc)
            msg = "unknown field" + (f" (valid: {', '.join(valid)})" if valid else "")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            msg = f"{clip(err['input'])} is not allowed (valid: {expected.replace(' or ', ', ')})"
            msg = msg.replace("'", "") if isinstance(err["input"], str) else msg
        elif kind == "missing":
            msg = "required field is missing"
        elif kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        else:
            msg = f"{msg} (got {clip(err.get('input'))})" if "input" in err else msg
        lines.append(f"{clip_text(where, 120)}: {msg}")
    return lines


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.lr=0.01` → raw["train"]["lr"] = 0.01 (values parsed as YAML, as in the file)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        shown = clip_text(item)
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise TlctlError(f"--set {shown}: expected key.path=value (e.g. train.epochs=5)")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TlctlError(f"--set {shown}: {clip(part)} is not a section")
            node = child
        node[parts[-1]] = override_value(value, shown) if value != "" else ""
    return raw


def override_value(value: str, shown: str) -> Any:
    """One `--set` value as YAML: plain values only (no tags such as !!python/…, anchors or
    aliases), and ints read as YAML 1.2 does (`010` is refused, never octal 8)."""
    try:
        tokens = list(yaml.scan(value))
        if any(isinstance(t, (yaml.TagToken, yaml.AnchorToken, yaml.AliasToken)) for t in tokens):
            raise TlctlError(
                f"--set {shown}: tags, anchors and aliases are not allowed (valid: a plain "
                "YAML value: 5, 0.01, true, text, [a, b], {k: v})"
            )
        return load_yaml(value)
    except (yaml.YAMLError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise TlctlError(f"--set {shown}: not a valid YAML value ({clip_text(problem)})") from exc


def _absolute(path: str, base: Path) -> str:
    """Relative local paths become absolute; URIs and special values stay as they are."""
    if "://" in path or path in ("imagenet", "none"):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _validated(raw: Any) -> JobSpec:
    if not isinstance(raw, dict):
        raise TlctlError("spec: expected a YAML mapping of sections (name, backbone, data, …)")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise TlctlError("invalid job spec:\n" + "\n".join(format_errors(exc))) from exc


def parse_spec(
    raw: Any,
    *,
    base_dir: Path | None = None,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Validate a raw mapping and resolve it; raises TlctlError (exit 2) with every problem.

    `local` picks the defaults of a job on this machine (failure.max_failures 0) or on a
    cluster (2). `allow_large_grid` (the CLI's `--yes`) lets a grid of more than
    MAX_GRID_TRIALS run.
    """
    spec = _validated(raw)
    errors = semantic_errors(spec, allow_large_grid=allow_large_grid)
    if errors:
        raise TlctlError("invalid job spec:\n" + "\n".join(errors))
    base = base_dir or Path.cwd()
    spec.data.train = _absolute(spec.data.train, base)
    if spec.data.val:
        spec.data.val = _absolute(spec.data.val, base)
    spec.storage.uri = _absolute(spec.storage.uri, base)
    spec.backbone.weights = _absolute(spec.backbone.weights, base)
    resolve_defaults(spec, local=local)
    return spec


def resolve_defaults(spec: JobSpec, *, local: bool) -> None:
    """Fill the defaults that depend on other fields or on where the job runs (in place)."""
    if spec.checkpoint.mode is None:
        spec.checkpoint.mode = "min" if spec.checkpoint.metric.endswith("loss") else "max"
    resolve_search(spec.search)
    if spec.checkpoint.max_pending is None:
        spec.checkpoint.max_pending = 1 if spec.search else 4
    if spec.failure.max_failures is None:
        spec.failure.max_failures = 0 if local else 2
    # Validated whenever set: the AWS SDKs would use them for any s3:// data or weights too.
    endpoints = {
        name: normalize_endpoint(os.environ[name], f"{name} (the storage endpoint)")
        for name in ENDPOINT_VARS
        if os.environ.get(name)
    }
    if spec.storage.endpoint is None and "://" in spec.storage.uri and endpoints:
        spec.storage.endpoint = next(iter(endpoints.values()))


def check_fits_here(spec: JobSpec, *, cpus: int) -> None:
    """`--local`: one run's (or trial's) workers must fit this machine's `cpus`, refused
    before Ray starts (Ray would accept the logical CPUs and oversubscribe the real ones).
    `scaling.num_workers` must be resolved (a number)."""
    scaling = spec.scaling
    need = scaling.workers * scaling.cpus_per_worker
    if need > cpus:
        raise TlctlError(
            f"scaling.num_workers: {scaling.workers} workers × cpus_per_worker "
            f"{scaling.cpus_per_worker:g} = {need:g} CPUs, this machine has {cpus} (valid for "
            f"--local: num_workers × cpus_per_worker <= {cpus}; or submit to a cluster)"
        )


def unresolved_fields(spec: JobSpec) -> list[str]:
    """The fields that resolution fills and `spec` leaves unset."""
    fields = {
        "checkpoint.mode": spec.checkpoint.mode,
        "checkpoint.max_pending": spec.checkpoint.max_pending,
        "failure.max_failures": spec.failure.max_failures,
    }
    if spec.search is not None:
        fields["search.mode"] = spec.search.mode
        fields["search.num_samples"] = spec.search.num_samples
    return [name for name, value in fields.items() if value is None]


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing, unreadable, non-UTF-8, oversized or malformed file
    (duplicate keys and alias bombs included) is one clear line naming the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError as exc:
        raise TlctlError(f"cannot read {path}: no such spec file") from exc
    except OSError as exc:
        raise TlctlError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_SPEC_BYTES:
        raise TlctlError(f"{path}: larger than {MAX_SPEC_BYTES} bytes; not a job spec")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TlctlError(
            f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "save the spec as UTF-8"
        ) from exc
    try:
        return load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise TlctlError(f"{path}: {_yaml_problem(exc)}") from exc
    except RecursionError as exc:
        raise TlctlError(f"{path}: not valid YAML (nested too deeply for a job spec)") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line N not valid YAML (why)` for a YAMLError, its values clipped."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1} " if mark else ""
    return f"{where}not valid YAML ({clip_text(getattr(exc, 'problem', None) or exc, 160)})"


def load_spec(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    local: bool = True,
    allow_large_grid: bool = False,
) -> JobSpec:
    """Read a YAML spec file, apply `--set` overrides, validate and resolve."""
    raw = read_yaml(Path(path))
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    return parse_spec(raw, local=local, allow_large_grid=allow_large_grid)


def load_resolved_spec(path: str | Path) -> JobSpec:
    """A resolved spec file (what a cluster job runs); anything else is refused with the fix."""
    fix = "make one with `tlctl validate SPEC --resolved > resolved.yaml`"
    raw = read_yaml(Path(path))
    try:
        spec = _validated(raw)
    except TlctlError as exc:
        problems = exc.message.replace("\n", "; ")
        raise TlctlError(f"{path}: not a resolved tlctl spec ({problems}); {fix}") from exc
    missing = unresolved_fields(spec)
    if missing:
        raise TlctlError(f"{path}: not a resolved tlctl spec (unset: {', '.join(missing)}); {fix}")
    return spec


def stored_spec(text: str, where: str) -> JobSpec:
    """The spec stored with a run (resolved when it was written)."""
    try:
        return _validated(load_yaml(text))
    except yaml.YAMLError as exc:
        raise TlctlError(f"{where}: {_yaml_problem(exc)}") from exc
    except TlctlError as exc:
        raise TlctlError(f"{where}: not a tlctl job spec ({exc.message})") from exc


def spec_yaml(spec: JobSpec) -> str:
    """The resolved spec as YAML: what is stored with a run and shipped to a cluster
    (redacted: validation refuses credentials, and nothing that slips past reaches storage)."""
    return redact(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
