"""Checkpoint uploads off the loop: manifest last, training waits only when too many are
pending, the upload thread at low priority, stale local copies of a killed group removed."""

from __future__ import annotations

from pathlib import Path

from jobs.training.upload import upload_order


def test_the_manifest_is_uploaded_last() -> None:
    names = ["manifest.json", "state.pt", "meta.json", "model.pt"]
    assert upload_order(names) == ["meta.json", "model.pt", "state.pt", "manifest.json"]


def test_stale_local_checkpoints_of_the_run_are_removed_and_no_others(tmp_path, monkeypatch):
    import tempfile

    from jobs.training.checkpoints import local_checkpoint_prefix, remove_stale_local_checkpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tempfile.mkdtemp(prefix=local_checkpoint_prefix("s3://b/runs/a"))
    (Path(mine) / "model.pt").write_bytes(b"x")
    other = tempfile.mkdtemp(prefix=local_checkpoint_prefix("s3://b/runs/ab"))
    assert remove_stale_local_checkpoints("s3://b/runs/a") == 1
    assert not Path(mine).exists() and Path(other).exists()


def test_training_waits_only_when_max_pending_uploads_are_pending() -> None:
    import threading
    import time

    from jobs.training.upload import Uploader

    uploader = Uploader()
    release = threading.Event()
    uploader._upload = lambda checkpoint, name: release.wait(5)  # an upload storage holds up
    for _ in range(2):
        uploader.submitted()
        threading.Thread(target=uploader, args=(None, "epoch")).start()
    assert uploader.wait_below(3) < 0.1  # 2 pending, 3 allowed: no wait
    waiter = threading.Thread(target=uploader.wait_below, args=(2,))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # 2 pending, 2 allowed: training waits for storage
    release.set()
    waiter.join(5)
    assert not waiter.is_alive() and uploader.wait_below(1) < 0.1


def test_the_upload_thread_is_lowered_once_and_alone() -> None:
    import os
    import threading

    from jobs.training.upload import lower_thread_priority

    seen = {}

    def upload_thread() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority()
        lower_thread_priority()  # Ray reuses its upload thread: not lowered twice
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        seen["before"] = before

    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=upload_thread)
    t.start()
    t.join()
    assert seen["delta"] == min(10, 19 - seen["before"])
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me
