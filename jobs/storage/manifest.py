"""Checkpoint and model manifests: a checkpoint counts only when it is provably complete.

Every checkpoint directory (and `model/`) carries `manifest.json`, written after the files
it lists: each file's name, size and SHA-256. A directory whose manifest is missing, or
whose files are missing, shorter, longer or different from what it lists, is not a
checkpoint: an upload cut short by a lost node or a storage outage leaves exactly that.
Resume and export verify before they load; nothing here trusts a directory listing alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

from jobs.storage.layout import MANIFEST
from jobs.storage.location import Location, exists, read_bytes, read_text

FORMAT = "tlctl-manifest/1"
_CHUNK = 1 << 20


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest of in-memory files (name → bytes)."""
    return {
        "format": FORMAT,
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items())
        },
    }


def write_local_manifest(directory: str) -> dict[str, Any]:
    """Hash every file of a local checkpoint dir and write manifest.json last."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name != MANIFEST and os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": _sha256_file(path)}
    manifest = {"format": FORMAT, "files": files}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return manifest


def _check(manifest: Any, sizes: dict[str, int | None], digest) -> str | None:
    """Why `manifest` does not match (None when it does); `digest(name)` hashes a file."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is not a tlctl manifest"
    listed = manifest.get("files") or {}
    if not listed:
        return f"{MANIFEST} lists no files"
    for name, want in sorted(listed.items()):
        size = sizes.get(name)
        if size is None:
            return f"{name} is missing"
        if size != want.get("size"):
            return f"{name} has {size} bytes, the manifest says {want.get('size')}"
    for name, want in sorted(listed.items()):
        if digest(name) != want.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST}"
    return None


def verify_local(directory: str) -> str | None:
    """Why a local checkpoint dir is not a complete checkpoint, or None when it is."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return f"no {MANIFEST} (the checkpoint was not completely written)"
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    sizes = {
        name: os.path.getsize(os.path.join(directory, name))
        for name in os.listdir(directory)
        if os.path.isfile(os.path.join(directory, name))
    }
    return _check(manifest, sizes, lambda name: _sha256_file(os.path.join(directory, name)))


def verify(loc: Location) -> str | None:
    """Why a checkpoint dir in storage is not complete, or None when it is (reads it all)."""
    if not exists(loc.join(MANIFEST)):
        return f"no {MANIFEST} (the checkpoint was not completely written)"
    try:
        manifest = json.loads(read_text(loc.join(MANIFEST)))
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    names = list((manifest.get("files") or {}) if isinstance(manifest, dict) else {})
    infos = loc.fs.get_file_info([loc.join(n).path for n in names])
    sizes = {
        n: (i.size if i.type.name == "File" else None) for n, i in zip(names, infos, strict=True)
    }
    return _check(
        manifest, sizes, lambda name: hashlib.sha256(read_bytes(loc.join(name))).hexdigest()
    )


def read_verified(loc: Location) -> tuple[bytes, dict[str, bytes]]:
    """(manifest bytes, every listed file's bytes) of a directory whose files all match
    its manifest; otherwise a TlctlError (exit 2) saying what does not. One read per file:
    what is checked is what the caller then uses."""
    from jobs.errors import TlctlError

    where = loc.join(MANIFEST)
    try:
        raw = read_bytes(where)
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise TlctlError(f"{loc.uri}: no {MANIFEST} (not completely written)") from None
    except ValueError:
        raise TlctlError(f"{where.uri} is not valid JSON") from None
    listed = (manifest.get("files") or {}) if isinstance(manifest, dict) else {}
    files: dict[str, bytes] = {}
    for name in listed:
        with contextlib.suppress(FileNotFoundError):
            files[name] = read_bytes(loc.join(name))
    why = _check(
        manifest,
        {n: len(b) for n, b in files.items()},
        lambda n: hashlib.sha256(files[n]).hexdigest(),
    )
    if why is not None:
        raise TlctlError(f"{loc.uri}: {why}; it is not loaded (export the run again)")
    return raw, files
