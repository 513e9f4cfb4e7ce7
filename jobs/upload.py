"""Checkpoint uploads off the training loop, retried through storage outages, manifest last.

Rank 0 saves a checkpoint into a fresh local directory and hands it to
`ray.train.report(checkpoint_upload_mode=ASYNC, checkpoint_upload_fn=uploader)`: Ray Train
runs the upload in its single background upload thread (so at most one upload is in flight
per run, and the next epoch trains meanwhile), deletes the local copy afterwards, and waits
for the last upload before the worker finishes. tlctl's uploader copies the files one by
one, each retried with backoff through an outage (jobs.retry), and the manifest last: a
checkpoint directory without a verifying manifest is never resumed from or exported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from jobs.manifest import MANIFEST
from jobs.retry import DEFAULT_WINDOW_S, retrying


def upload_order(names: list[str]) -> list[str]:
    """Every file, the manifest last."""
    return sorted(names, key=lambda name: (name == MANIFEST, name))


def make_uploader(window_s: float = DEFAULT_WINDOW_S) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for ray.train.report."""

    def upload(checkpoint, checkpoint_dir_name: str):
        import pyarrow.fs as pafs
        import ray.train

        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        dest = f"{storage.experiment_fs_path.rstrip('/')}/{checkpoint_dir_name}"
        local = checkpoint.path
        what = f"checkpoint {checkpoint_dir_name}"
        retrying(lambda: fs.create_dir(dest, recursive=True), what=what, window_s=window_s)
        for name in upload_order(os.listdir(local)):
            retrying(
                lambda name=name: pafs.copy_files(
                    os.path.join(local, name),
                    f"{dest}/{name}",
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs,
                ),
                what=f"{what}/{name}",
                window_s=window_s,
            )
        return ray.train.Checkpoint(dest, filesystem=fs)

    return upload
