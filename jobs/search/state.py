"""Ray Tune's experiment state under `<run>/tune/`, checked against a manifest tlctl writes.

Resuming a search unpickles Tune's state (`tuner.pkl`, and the cloudpickled objects inside
`experiment_state-*.json` and the searcher's state), so whoever can write a run's prefix can
run code on the next resume of a search, as with Ray Tune itself (docs/security.md). What
tlctl can catch is state it did not save: cut short, mixed with another run's, or replaced.

Each time Tune saves its state (into a local staging directory, which a background thread
then uploads), the search algorithm (jobs.search.algorithms) calls `StateRecorder.record`,
which writes the SHA-256 of every state file to `tune/<TUNE_MANIFEST>` in storage at once,
before the upload starts. Storage may hold an older generation of a file than the manifest
(an upload still running, or skipped while the previous one ran), so the manifest keeps the
last `HISTORY` hashes of each file; any of them is accepted. Before a restore, `verify`
refuses any state file whose hash is not listed, and a manifest written for another run.
The manifest is a record, not a signature: someone who can write the prefix can rewrite it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from jobs.errors import TlctlError
from jobs.storage.errors import NotFound
from jobs.storage.layout import TUNE_MANIFEST, TUNER_STATE, RunLayout
from jobs.storage.location import Location, list_dir, read_bytes, write_text
from jobs.storage.retry import retrying

FORMAT = "tlctl-tune-state/1"
HISTORY = 32
# What Tune reads back from the top of its experiment directory on a restore.
STATE_SUFFIXES = (".json", ".pkl")

log = logging.getLogger(__name__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_names(names: list[str]) -> list[str]:
    """The names Tune restores from (its top-level .json and .pkl files)."""
    return sorted(n for n in names if n.endswith(STATE_SUFFIXES))


def _write(tune: Location, run: str, files: dict[str, list[str]]) -> None:
    body = json.dumps({"format": FORMAT, "run": run, "files": files}, indent=1, sort_keys=True)
    manifest = tune.join(TUNE_MANIFEST)
    retrying(lambda: write_text(manifest, body), what=f"write {manifest.uri}")


def _read(tune: Location) -> dict[str, Any] | None:
    """The manifest, or None when there is none; an unreadable one is an error."""
    manifest = tune.join(TUNE_MANIFEST)
    try:
        raw = retrying(lambda: read_bytes(manifest), what=f"read {manifest.uri}")
    except NotFound:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not (
        isinstance(body, dict)
        and body.get("format") == FORMAT
        and isinstance(body.get("files"), dict)
        and all(
            isinstance(v, list) and all(isinstance(h, str) for h in v)
            for v in body["files"].values()
        )
    ):
        raise TlctlError(f"{manifest.uri}: not a tlctl Tune state manifest ({FORMAT})")
    return body


def start(tune: Location, run: str) -> None:
    """A new search: the manifest starts with the `tuner.pkl` the Tuner just wrote (any
    manifest left from an earlier search under this name is replaced)."""
    data = retrying(lambda: read_bytes(tune.join(TUNER_STATE)), what="read Tune's tuner.pkl")
    _write(tune, run, {TUNER_STATE: [_sha256(data)]})


def verify(tune: Location, run: str) -> None:
    """Refuse (exit 2) to restore Tune state that does not match what tlctl recorded."""
    fresh = "delete it to start the search afresh, or choose a new run name"
    manifest = _read(tune)
    if manifest is None:
        raise TlctlError(
            f"{tune.uri}: Ray Tune state without tlctl's manifest ({TUNE_MANIFEST}): not "
            f"saved by tlctl, so it is not restored (restoring unpickles it); {fresh}"
        )
    if manifest.get("run") != run:
        raise TlctlError(
            f"{tune.uri}: this Ray Tune state was saved for run {manifest.get('run')!r}, not "
            f"{run!r}; it is not restored; {fresh}"
        )
    files = manifest["files"]
    names = state_names(retrying(lambda: list_dir(tune), what=f"list {tune.uri}"))
    if TUNER_STATE not in names:
        raise TlctlError(f"{tune.uri}: {TUNER_STATE} is missing; {fresh}")
    for name in names:
        data = retrying(lambda n=name: read_bytes(tune.join(n)), what=f"read {tune.uri}/{name}")
        if _sha256(data) not in files.get(name, []):
            why = "is not one tlctl saved" if name in files else "was not written by tlctl"
            raise TlctlError(
                f"{tune.uri}/{name}: this Ray Tune state file {why} (changed, cut short or "
                f"foreign); it is not restored (restoring unpickles it); {fresh}"
            )


class StateRecorder:
    """Keeps one run's manifest up to date as Tune saves; lives in the search algorithm,
    so Tune pickles it into its own state: only plain values survive pickling."""

    def __init__(self, run_uri: str, endpoint: str | None, run: str) -> None:
        self.run_uri, self.endpoint, self.run = run_uri, endpoint, run
        self._files: dict[str, list[str]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The history is read again from storage by whichever process records next.
        return {"run_uri": self.run_uri, "endpoint": self.endpoint, "run": self.run}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._files = None

    def record(self, staging_dir: str) -> None:
        """Hash Tune's just-saved state files in `staging_dir` into the stored manifest.

        Runs inside Tune's save, before the upload: a failure to write is logged (the next
        save writes it again), never raised into Tune.
        """
        try:
            tune = RunLayout.at(self.run_uri, self.endpoint).tune
            if self._files is None:
                self._files = dict((_read(tune) or {}).get("files", {}))
            for name in state_names(os.listdir(staging_dir)):
                with open(os.path.join(staging_dir, name), "rb") as f:
                    digest = _sha256(f.read())
                seen = self._files.get(name, [])
                if not seen or seen[0] != digest:
                    self._files[name] = [digest, *[h for h in seen if h != digest]][:HISTORY]
            _write(tune, self.run, self._files)
        except Exception as exc:  # noqa: BLE001 - Tune's save must go on
            log.warning("tlctl: could not record Tune's state manifest: %s", exc)
