"""The model registry: named models whose aliases (`champion`, …) point at runs' models.

It lives in storage beside the runs, under `<storage>/_models/<model>/` (no run name starts
with `_`):

- `aliases/<alias>.json`: the pointer: the run, its URI, the SHA-256 of its `model/`
  manifest (so a model that changed after promotion is caught), its classes, who moved the
  alias, when, why, and the history record of that move.
- `history/<alias>/<seq>.json`: one write-once record per move (promote or rollback),
  numbered per alias; `history` reads them, `rollback` walks them back.

An alias moves by compare-and-swap (jobs.storage.conditional): created with
`If-None-Match: *`, replaced with `If-Match` on the pointer that was read, so of two
concurrent promotions exactly one wins and the other is refused, naming the winner.
The history record is written after the move (write-once, `If-None-Match`): a crash in
between leaves the alias moved and its pointer still naming its run and its predecessor.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import TlctlError
from jobs.spec.model import NAME_RE  # a model name follows the run-name rule
from jobs.storage.conditional import backend_for
from jobs.storage.layout import ALIASES, HISTORY, MANIFEST, MODEL_INFO, REGISTRY, RunLayout
from jobs.storage.location import Location, exists, list_dir
from jobs.storage.manifest import read_verified

ALIAS_RE = re.compile(r"[a-z][a-z0-9\-_]{0,31}")
DEFAULT_ALIAS = "champion"
FORMAT = "tlctl-alias/1"
HISTORY_FORMAT = "tlctl-alias-move/1"
SEQ_DIGITS = 8


def check_model_name(model: str) -> None:
    if not NAME_RE.fullmatch(model) or ".." in model:
        raise TlctlError(
            f"model: {model!r} is not a model name ([a-z0-9][a-z0-9-_.]{{0,62}}, like a run)"
        )


def check_alias(alias: str) -> None:
    if not ALIAS_RE.fullmatch(alias):
        raise TlctlError(f"alias: {alias!r} is not an alias name ([a-z][a-z0-9-_]{{0,31}})")


def mover() -> str:
    """Who moves an alias: TLCTL_USER, else user@host."""
    if os.environ.get("TLCTL_USER"):
        return os.environ["TLCTL_USER"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class RunModel:
    """A run's verified `model/`: what a pointer records about it."""

    layout: RunLayout
    manifest_sha256: str
    info: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def read(cls, layout: RunLayout) -> RunModel:
        if not exists(layout.model.join(MANIFEST)):
            raise TlctlError(
                f"run {layout.uri} has no model/ (it has not finished training, or is not a "
                "tlctl run)"
            )
        raw, files = read_verified(layout.model)
        try:
            info = json.loads(files[MODEL_INFO])
        except (KeyError, ValueError):
            raise TlctlError(f"{layout.model.uri}: {MODEL_INFO} is missing or not JSON") from None
        return cls(layout, hashlib.sha256(raw).hexdigest(), info, files)

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or [])


class Registry:
    """The registry at a storage root."""

    def __init__(self, root: Location) -> None:
        self.root = root
        self.base = root.join(REGISTRY)

    def _alias_loc(self, model: str, alias: str) -> Location:
        return self.base.join(model, ALIASES, f"{alias}.json")

    def _history_loc(self, model: str) -> Location:
        return self.base.join(model, HISTORY)

    # --- reading ----------------------------------------------------------------------

    def models(self) -> list[str]:
        return [m for m in list_dir(self.base) if NAME_RE.fullmatch(m)]

    def aliases(self, model: str) -> dict[str, dict[str, Any]]:
        out = {}
        for name in list_dir(self.base.join(model, ALIASES)):
            alias = name.removesuffix(".json")
            pointer = self.pointer(model, alias)
            if pointer is not None:
                out[alias] = pointer
        return out

    def pointer(self, model: str, alias: str) -> dict[str, Any] | None:
        seen = backend_for(self._alias_loc(model, alias)).read()
        return None if seen is None else _parse(seen.data, self._alias_loc(model, alias))

    def history(self, model: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded move of the model's aliases (or of one), oldest first."""
        base = self._history_loc(model)
        aliases = [alias] if alias is not None else list_dir(base)
        moves = []
        for name in aliases:
            loc = base.join(name)
            for n in sorted(n for n in list_dir(loc) if re.fullmatch(r"\d+\.json", n)):
                seen = backend_for(loc.join(n)).read()
                if seen is not None:
                    moves.append(_parse(seen.data, loc.join(n)))
        return sorted(moves, key=lambda m: (m.get("at", 0), m["alias"], m["seq"]))

    def resolve(self, model: str, alias: str) -> dict[str, Any]:
        """The pointer of `model@alias`; an unknown one names what exists."""
        check_model_name(model)
        check_alias(alias)
        pointer = self.pointer(model, alias)
        if pointer is not None:
            return pointer
        if model not in self.models():
            known = ", ".join(self.models()) or "none yet"
            raise TlctlError(
                f"model: no model {model!r} in the registry at {self.base.uri} "
                f"(models: {known}; `tlctl models promote RUN --model {model}` makes one)"
            )
        known = ", ".join(sorted(self.aliases(model))) or "none"
        raise TlctlError(f"alias: model {model!r} has no alias {alias!r} (aliases: {known})")

    # --- moving -----------------------------------------------------------------------

    def promote(
        self,
        model: str,
        alias: str,
        run: RunModel,
        *,
        reason: str = "",
        allow_class_change: bool = False,
        action: str = "promote",
    ) -> dict[str, Any]:
        """Point `model@alias` at `run`'s model (compare-and-swap), then record the move."""
        check_model_name(model)
        check_alias(alias)
        loc = self._alias_loc(model, alias)
        backend = backend_for(loc)
        seen = backend.read()
        current = None if seen is None else _parse(seen.data, loc)
        if current is not None and current["classes"] != run.classes and not allow_class_change:
            raise TlctlError(
                f"classes: run {run.layout.name!r} has classes {run.classes}, but {model}@{alias} "
                f"(run {current['run']!r}) has {current['classes']}; predictions would change "
                "meaning (pass --allow-class-change if that is intended)"
            )
        # The alias's own move number: its pointer is compare-and-swapped, so each number
        # is taken by exactly one move.
        seq = 1 if current is None else int(current.get("seq", 0)) + 1
        pointer = {
            "format": FORMAT,
            "model": model,
            "alias": alias,
            "run": run.layout.name,
            "run_uri": run.layout.uri,
            "manifest_sha256": run.manifest_sha256,
            "classes": run.classes,
            "backbone": run.info.get("backbone"),
            "metrics": run.info.get("metrics") or {},
            "action": action,
            "by": mover(),
            "at": time.time(),
            "reason": reason,
            "seq": seq,
            "previous": None
            if current is None
            else {k: current.get(k) for k in ("run", "run_uri", "manifest_sha256", "seq")},
        }
        body = json.dumps(pointer, indent=1, sort_keys=True).encode()
        token = backend.create(body) if seen is None else backend.replace(body, seen.token)
        if token is None:
            now = self.pointer(model, alias)
            who = f"run {now['run']!r}, moved by {now['by']}" if now else "removed"
            raise TlctlError(
                f"alias: {model}@{alias} was moved by someone else at the same moment (now: "
                f"{who}); nothing was changed: look at it, then run the command again"
            )
        self._record(model, alias, {**pointer, "format": HISTORY_FORMAT})
        return pointer

    def rollback(
        self, model: str, alias: str, *, to_run: str | None = None, reason: str = ""
    ) -> dict[str, Any]:
        """Move `model@alias` back to the run it pointed at before (or to `to_run`, one it
        pointed at some time), recorded as a rollback."""
        current = self.resolve(model, alias)
        moves = self.history(model, alias)
        earlier = [h for h in moves if h["run"] != current["run"]]
        if to_run is not None:
            earlier = [h for h in earlier if h["run"] == to_run]
            if not earlier:
                been = sorted({h["run"] for h in moves}) or ["none"]
                raise TlctlError(
                    f"--to: {model}@{alias} never pointed at run {to_run!r} (it has pointed at: "
                    f"{', '.join(been)}; to point it at a new run, use `tlctl models promote`)"
                )
        elif current.get("previous"):
            prev = current["previous"]["run"]
            earlier = [h for h in earlier if h["run"] == prev] or earlier
        if not earlier:
            raise TlctlError(
                f"rollback: {model}@{alias} has pointed only at run {current['run']!r}: there "
                "is nothing to roll back to"
            )
        target = earlier[-1]
        run = RunModel.read(RunLayout.at(target["run_uri"], self.root.endpoint))
        if run.manifest_sha256 != target["manifest_sha256"]:
            raise TlctlError(
                f"rollback: run {target['run']!r}'s model has changed since it was "
                f"{model}@{alias} (its manifest's SHA-256 differs); not rolled back"
            )
        return self.promote(
            model, alias, run, reason=reason, allow_class_change=True, action="rollback"
        )

    def _record(self, model: str, alias: str, record: dict[str, Any]) -> None:
        """Write-once (`If-None-Match`): the move's number is its own (see `promote`)."""
        loc = self._history_loc(model).join(alias, f"{record['seq']:0{SEQ_DIGITS}d}.json")
        body = json.dumps(record, indent=1, sort_keys=True).encode()
        if backend_for(loc).create(body) is None:
            raise TlctlError(f"history: {loc.uri} exists already; the move is not recorded")


def _parse(data: bytes, loc: Location) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not {"run", "run_uri", "manifest_sha256"} <= set(body):
        raise TlctlError(f"{loc.uri}: not a tlctl registry record")
    return body
