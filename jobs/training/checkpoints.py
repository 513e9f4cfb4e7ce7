"""Checkpoints on the worker's side: what one holds, where it is saved first, which one a
restarted worker group resumes from, and which one of an epoch is complete.

A checkpoint directory holds model.pt (a plain state_dict that loads into torchvision),
state.pt (optimizer, schedule, epoch) and meta.json; the uploader adds manifest.json last.
Nothing is loaded from storage without `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from jobs.storage.layout import META, STATE, WEIGHTS, RunLayout
from jobs.storage.location import Location
from jobs.storage.manifest import verify


def save_checkpoint(directory: str, model, optimizer, scheduler, meta: dict[str, Any]) -> None:
    """model.pt is a plain state_dict (loads into torchvision); state.pt resumes training."""
    net = model.module if hasattr(model, "module") else model
    torch.save(net.state_dict(), os.path.join(directory, WEIGHTS))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": meta["epoch"],
        },
        os.path.join(directory, STATE),
    )
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    # manifest.json (sizes, SHA-256) is written by the uploader, off the training loop.


def load_checkpoint(checkpoint, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer and schedule in place; returns the checkpoint's meta."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(
            torch.load(os.path.join(d, WEIGHTS), map_location="cpu", weights_only=True)
        )
        state = torch.load(os.path.join(d, STATE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        with open(os.path.join(d, META)) as f:
            return json.load(f)


def usable_checkpoint(latest, candidates: list[Location]) -> tuple[Any, list[tuple[str, str]]]:
    """The checkpoint to resume from: the newest of `candidates` (the run's checkpoint dirs,
    newest first) whose manifest verifies (None: start over), and (uri, reason) of each
    newer one skipped.

    Usually that is Ray's latest. It can be newer: a checkpoint whose upload finished (its
    manifest landed) just before its worker or node died, so Ray never registered it; it is
    complete, and resuming from it loses less. It is older when Ray's latest is broken.
    Verified where it lies (not through as_directory: a second download of the same
    checkpoint by load_checkpoint would contend for Ray's per-node download lock).
    """
    import ray.train

    latest_path = latest.path.rstrip("/") if latest is not None else None
    skipped = []
    for loc in candidates:
        reason = verify(loc)
        if reason is None:
            if loc.path.rstrip("/") == latest_path:
                return latest, skipped
            return ray.train.Checkpoint(loc.path, filesystem=loc.fs), skipped
        skipped.append((loc.uri, reason))
    return None, skipped


def complete_checkpoint(run: RunLayout, epoch: int) -> tuple[Location | None, str | None]:
    """The newest dir of `epoch` that verifies (None, with the newest one's reason, if none)."""
    reason = None
    for number, loc in run.checkpoint_dirs():
        if number == epoch:
            why = verify(loc)
            if why is None:
                return loc, None
            reason = reason or f"{loc.uri}: {why}"
    return None, reason or f"no checkpoint of epoch {epoch} under {run.checkpoints.uri}"


def local_checkpoint_prefix(run_uri: str) -> str:
    """Prefix of a run's local checkpoint dirs in the temp dir (one per epoch, each deleted
    once uploaded)."""
    return f"tlctl-ckpt-{hashlib.sha1(run_uri.encode()).hexdigest()[:10]}-"


def remove_stale_local_checkpoints(run_uri: str) -> int:
    """Delete this run's local checkpoint dirs left on this node by a worker group that was
    killed before its uploads finished. Called where no upload of this run can still be
    running here: by a new group's rank 0, and by the driver once the run's (or a search
    trial's) last group is gone. Returns how many were removed."""
    prefix = local_checkpoint_prefix(run_uri)
    tmp = tempfile.gettempdir()
    stale = [name for name in os.listdir(tmp) if name.startswith(prefix)]
    for name in stale:
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    return len(stale)
