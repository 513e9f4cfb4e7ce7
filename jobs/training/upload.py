"""Checkpoint uploads off the training loop, retried through storage outages, manifest last.

Rank 0 saves a checkpoint's files into a fresh local directory and hands it to
`ray.train.report(checkpoint_upload_mode=ASYNC, checkpoint_upload_fn=uploader)`: Ray Train
runs the upload in its single background upload thread (so at most one upload is in flight
per run, and the next epoch trains meanwhile), deletes the local copy afterwards, and waits
for the last upload before the worker finishes. tlctl's uploader hashes the files into
manifest.json, copies them one by one, each retried with backoff through an outage
(jobs.storage.retry), and the manifest last: a checkpoint directory without a verifying manifest is
never resumed from or exported.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pyarrow.fs as pafs

from jobs.storage.layout import MANIFEST
from jobs.storage.manifest import write_local_manifest
from jobs.storage.retry import DEFAULT_WINDOW_S, retrying
from jobs.storage.retrying_fs import inner_fs, put_checked

NICE_STEP = 10


_LOWERED = threading.local()


def lower_thread_priority(step: int = NICE_STEP) -> None:
    """Make the calling thread yield the CPU to training: its nice value +`step`, once
    (Linux schedules threads on their own, so only this thread is affected; Ray already
    runs its workers at nice 15, so this one ends at 19). Best effort elsewhere."""
    if getattr(_LOWERED, "done", False):
        return
    _LOWERED.done = True
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):
        pass


def put_file(fs: pafs.FileSystem, local: str, dest: str) -> None:
    """Upload one local file, checked after it lands (see retrying_fs.put_checked)."""
    with open(local, "rb") as src:
        put_checked(fs, src, os.path.getsize(local), dest)


def upload_order(names: list[str]) -> list[str]:
    """Every file, the manifest last."""
    return sorted(names, key=lambda name: (name == MANIFEST, name))


class Uploader:
    """A `checkpoint_upload_fn` for ray.train.report that also counts its pending uploads.

    Ray Train's background thread uploads one checkpoint at a time but queues any number.
    Before saving the next checkpoint, rank 0 calls `wait_below(checkpoint.max_pending)`:
    training rides out slow uploads and storage outages for that many checkpoints, then
    waits for storage instead of filling the local disk. The metrics Ray reports with a
    checkpoint (what ASHA decides on) arrive when its upload is done, so a search keeps
    that lag to one upload (max_pending 1).
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        fs: pafs.FileSystem | None = None,
        background: bool = False,
    ) -> None:
        self.window_s = window_s
        self.fs = fs  # default: the storage's own (inner) filesystem
        self.background = background  # runs in Ray's upload thread: lower its priority
        self.before_manifest: Callable[[], None] | None = None  # e.g. flush the metrics
        self._cond = threading.Condition()
        self._pending = 0

    def submitted(self) -> None:
        """Call right before handing a checkpoint to ray.train.report."""
        with self._cond:
            self._pending += 1

    def wait_below(self, limit: int) -> float:
        """Block while `limit` or more uploads are pending; returns the seconds waited."""
        start = time.perf_counter()
        with self._cond:
            while self._pending >= max(1, limit):
                self._cond.wait()
        return time.perf_counter() - start

    def __call__(self, checkpoint, checkpoint_dir_name: str):
        if self.background:
            lower_thread_priority()
        try:
            return self._upload(checkpoint, checkpoint_dir_name)
        finally:
            with self._cond:
                self._pending = max(0, self._pending - 1)
                self._cond.notify_all()

    def _upload(self, checkpoint, checkpoint_dir_name: str):
        import ray.train

        window_s = self.window_s
        storage = ray.train.get_context().get_storage()
        # Retried per file, here, on the plain filesystem (not twice over).
        fs = self.fs or inner_fs(storage.storage_filesystem)
        dest = f"{storage.experiment_fs_path.rstrip('/')}/{checkpoint_dir_name}"
        local = checkpoint.path
        write_local_manifest(local)  # hashing ~130 MB takes a while: here, not in the loop
        what = f"checkpoint {checkpoint_dir_name}"
        retrying(lambda: fs.create_dir(dest, recursive=True), what=what, window_s=window_s)
        for name in upload_order(os.listdir(local)):
            if name == MANIFEST and self.before_manifest is not None:
                self.before_manifest()
            retrying(
                lambda name=name: put_file(fs, os.path.join(local, name), f"{dest}/{name}"),
                what=f"{what}/{name}",
                window_s=window_s,
            )
        return ray.train.Checkpoint(dest, filesystem=storage.storage_filesystem)
