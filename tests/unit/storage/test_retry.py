"""Retries through storage outages: transient errors are waited out with capped, jittered
backoff until the window closes; permanent ones fail at once. What is transient is decided
by the error's type (jobs.storage.errors)."""

from __future__ import annotations

import pytest

from jobs.errors import TlctlError
from jobs.storage.errors import Unreachable, is_transient
from jobs.storage.retry import MAX_DELAY_S, backoff, retrying

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
            Unreachable("storage.endpoint: cannot reach http://127.0.0.1:9 (Connection refused)"),
            True,
        ),
        # tlctl's own words are not classified: a plain TlctlError is never retried.
        (TlctlError("storage.endpoint: cannot reach http://127.0.0.1:9"), False),
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
