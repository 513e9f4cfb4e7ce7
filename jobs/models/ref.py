"""What a command that takes RUN accepts: a run name under the storage root, a run prefix
URI, or `MODEL@ALIAS` from the registry; each resolves to a run's verified model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.errors import TlctlError
from jobs.models.registry import NAME_RE, Registry, RunModel
from jobs.storage.layout import RunLayout
from jobs.storage.location import resolve


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: the run's verified model, and the pointer it came through."""

    text: str
    model: RunModel
    pointer: dict[str, Any] | None = None

    @property
    def layout(self) -> RunLayout:
        return self.model.layout


def resolve_ref(ref: str, storage: str | None, endpoint: str | None) -> ModelRef:
    """RUN, URI or MODEL@ALIAS → the run's model, verified against its manifest (exit 2 when
    it is missing, fails its manifest, or changed since the alias was moved to it)."""
    if "@" in ref and "://" not in ref:
        model, _, alias = ref.partition("@")
        if storage is None:
            raise TlctlError(
                f"--storage: needed to find {ref} in the registry (or set TLCTL_STORAGE)"
            )
        registry = Registry(resolve(storage, endpoint))
        pointer = registry.resolve(model, alias)
        run = RunModel.read(RunLayout.at(pointer["run_uri"], endpoint))
        if run.manifest_sha256 != pointer["manifest_sha256"]:
            raise TlctlError(
                f"{ref}: run {pointer['run']!r}'s model has changed since it was made {ref} "
                "(its manifest's SHA-256 differs); promote it again if that is intended"
            )
        return ModelRef(ref, run, pointer)
    if not NAME_RE.fullmatch(ref):  # not a run name: a URI (checked by the one URI rule)
        layout = RunLayout(resolve(ref, endpoint, field="RUN", endpoint_field="--endpoint"))
    else:
        if storage is None:
            raise TlctlError(f"--storage: needed to find run {ref!r} (or give its URI)")
        layout = RunLayout(resolve(storage, endpoint).join(ref))
    return ModelRef(ref, RunModel.read(layout))
