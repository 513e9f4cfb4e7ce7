"""Retries through storage outages: transient errors are waited out with capped, jittered
backoff until the window closes; permanent ones fail at once. Upload order: manifest last."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import TlctlError
from jobs.retry import MAX_DELAY_S, backoff, is_transient, retrying
from jobs.upload import upload_order

REFUSED = OSError("AWS Error NETWORK_CONNECTION during PutObject: curlCode: 7, Connection refused")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def flaky(failures: list[BaseException], result: str = "ok"):
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


def test_an_outage_is_waited_out_and_the_write_lands() -> None:
    clock = Clock()
    fn, calls = flaky([REFUSED] * 5)
    seen = []
    out = retrying(
        fn,
        what="metrics.jsonl",
        window_s=300,
        sleep=clock.sleep,
        clock=clock,
        on_retry=lambda attempt, exc: seen.append(attempt),
    )
    assert out == "ok" and calls["n"] == 6 and seen == [0, 1, 2, 3, 4]
    assert all(0 <= s <= MAX_DELAY_S for s in clock.sleeps)


def test_past_the_window_the_job_fails_with_the_storage_error() -> None:
    clock = Clock()
    fn, calls = flaky([REFUSED] * 10_000)
    with pytest.raises(TlctlError) as err:
        retrying(fn, what="checkpoint epoch-0003", window_s=60, sleep=clock.sleep, clock=clock)
    assert err.value.exit_code == 1
    assert "checkpoint epoch-0003 still failing after 60 s" in err.value.message
    assert "Connection refused" in err.value.message
    assert 60 <= clock.now <= 60 + 1e-6 and calls["n"] > 3


def test_permanent_errors_are_not_retried() -> None:
    clock = Clock()
    denied = OSError("AWS Error ACCESS_DENIED during PutObject")
    fn, calls = flaky([denied])
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        retrying(fn, what="x", sleep=clock.sleep, clock=clock)
    assert calls["n"] == 1 and clock.sleeps == []


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (REFUSED, True),
        (OSError("When uploading part: AWS Error SLOW_DOWN ... SlowDown"), True),
        (OSError("HTTP response code: 503 Service Unavailable"), True),
        (
            TlctlError("storage.endpoint: cannot reach http://127.0.0.1:9 (Connection refused)"),
            True,
        ),
        # What SeaweedFS answers while it shuts down (seen in the outage test).
        (
            OSError(
                "When getting information for bucket 'b': AWS Error UNKNOWN "
                "(HTTP status 500) during HeadBucket operation: No response body."
            ),
            True,
        ),
        (OSError("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation"), False),
        (OSError("AWS Error NO_SUCH_BUCKET"), False),
        (ValueError("Connection refused"), False),  # not a storage error type
    ],
)
def test_what_counts_as_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_backoff_is_full_jitter_with_a_cap() -> None:
    assert backoff(0, rng=lambda: 1.0) == 1.0
    assert backoff(3, rng=lambda: 1.0) == 8.0
    assert backoff(20, rng=lambda: 1.0) == MAX_DELAY_S
    assert backoff(5, rng=lambda: 0.0) == 0.0


def test_the_manifest_is_uploaded_last() -> None:
    names = ["manifest.json", "state.pt", "meta.json", "model.pt"]
    assert upload_order(names) == ["meta.json", "model.pt", "state.pt", "manifest.json"]


def test_metrics_are_written_in_the_background_and_flushed_on_close(tmp_path) -> None:
    from jobs.metrics import MetricsLog, read_metrics
    from jobs.storage import resolve

    loc = resolve(str(tmp_path)).join("metrics.jsonl")
    log = MetricsLog(loc, trial_id="t1")
    for epoch in range(5):
        log.epoch({"epoch": epoch, "val_acc": epoch / 10})
    log.event("resumed", epoch=3)
    log.close()
    lines = read_metrics(loc)
    assert [m.get("epoch") for m in lines] == [0, 1, 2, 3, 4, 3]
    assert all(m["trial_id"] == "t1" for m in lines)


def test_a_metrics_write_that_cannot_succeed_surfaces_in_the_training_thread(tmp_path) -> None:
    from jobs.metrics import MetricsLog
    from jobs.storage import resolve

    (tmp_path / "file").write_text("x")  # a file where the log's directory should be
    log = MetricsLog(resolve(str(tmp_path / "file")).join("metrics.jsonl"))
    log.epoch({"epoch": 0})
    with pytest.raises(Exception):  # noqa: B017 - the storage error, whatever its type
        log.close()
    with pytest.raises(Exception):  # noqa: B017
        log.epoch({"epoch": 1})


def test_stale_local_checkpoints_of_the_run_are_removed_and_no_others(tmp_path, monkeypatch):
    import tempfile

    from jobs.upload import local_checkpoint_prefix, remove_stale_local_checkpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = tempfile.mkdtemp(prefix=local_checkpoint_prefix("s3://b/runs/a"))
    (Path(mine) / "model.pt").write_bytes(b"x")
    other = tempfile.mkdtemp(prefix=local_checkpoint_prefix("s3://b/runs/ab"))
    assert remove_stale_local_checkpoints("s3://b/runs/a") == 1
    assert not Path(mine).exists() and Path(other).exists()


def test_training_waits_only_when_max_pending_uploads_are_pending() -> None:
    import threading
    import time

    from jobs.upload import Uploader

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

    from jobs.upload import lower_thread_priority

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
