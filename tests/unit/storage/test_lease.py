"""The one-job-per-run lease against real SeaweedFS (its conditional writes: If-None-Match,
If-Match) and against a local directory (O_EXCL, flock): acquire, a second acquire refused
naming the holder, renew, expiry and takeover, release, a lost lease detected."""

from __future__ import annotations

import json
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from cluster.local.s3server import S3Server
from jobs.storage import lease as lease_mod
from jobs.storage.conditional import S3Backend
from jobs.storage.layout import RunLayout
from jobs.storage.lease import LeaseHeld, LeaseLost, acquire, check_free, ttl_from_env
from jobs.storage.location import Location, exists, read_text, resolve, write_text

TTL = 2.0


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path) -> Location:
    """The lease's key, on S3 (real SeaweedFS) and in a local directory."""
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        return resolve(f"s3://{bucket}/leases/{uuid.uuid4().hex[:8]}", server.endpoint).join(
            "lease.json"
        )
    return resolve(str(tmp_path / "run")).join("lease.json")


def test_seaweedfs_honours_if_none_match_and_if_match(s3_env: S3Server, s3_bucket: str) -> None:
    """What the lease relies on, checked on the server tests (and the quickstart) use."""
    probe = resolve(f"s3://{s3_bucket}/probe-{uuid.uuid4().hex[:6]}", s3_env.endpoint)
    backend = S3Backend(probe)
    first = backend.create(b"one")
    assert first is not None
    assert backend.create(b"two") is None  # If-None-Match: * refused: it exists
    second = backend.replace(b"three", first)
    assert second is not None and second != first
    assert backend.replace(b"four", first) is None  # If-Match on a stale etag refused
    assert backend.honours_conditions(b"three", second)
    assert backend.delete(first) is False  # not ours any more: left alone
    assert backend.delete(second) is True and backend.read() is None


def test_acquire_refuses_a_second_holder_naming_the_first(where: Location) -> None:
    first = acquire(where, job="job A", what="run 'r'", ttl_s=30)
    try:
        holder = json.loads(read_text(where))
        assert holder["job"] == "job A" and holder["pid"] > 0 and holder["host"]
        with pytest.raises(LeaseHeld) as refused:
            acquire(where, job="job B", what="run 'r'", ttl_s=30)
        message = str(refused.value)
        assert refused.value.exit_code == 2
        assert "run 'r' is being trained by job A" in message
        assert f"pid {holder['pid']}" in message and "last heartbeat" in message
        with pytest.raises(LeaseHeld):
            check_free(where, what="run 'r'")
    finally:
        first.release()
    assert not exists(where)
    check_free(where)  # released: free again
    acquire(where, job="job B", ttl_s=30).release()


def test_renewal_keeps_the_lease_fresh_and_changes_its_version(where: Location) -> None:
    lease = acquire(where, job="job A", ttl_s=TTL, renew_s=0.3).start()
    try:
        token = lease.token
        time.sleep(TTL + 1.0)  # past the TTL: only the heartbeat keeps it alive
        assert lease.token != token and lease.holder.beat >= 2
        assert lease.lost is None
        with pytest.raises(LeaseHeld):
            acquire(where, job="job B", ttl_s=TTL)
    finally:
        lease.release()


def test_an_expired_lease_is_taken_over_once(where: Location) -> None:
    dead = acquire(where, job="job A (killed)", ttl_s=TTL)  # never renewed: its holder died
    time.sleep(TTL + 1.5)
    takers: list[object] = []
    refused: list[BaseException] = []

    def take() -> None:
        try:
            takers.append(acquire(where, job="job B", ttl_s=30))
        except LeaseHeld as exc:
            refused.append(exc)

    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(takers) == 1 and len(refused) == 2  # If-Match on the old etag: one wins
    new = takers[0]
    assert new.took_over is not None and new.took_over.job == "job A (killed)"
    assert new.took_over_age_s is not None and new.took_over_age_s > TTL
    # The dead holder's lease is gone: renewing it (a paused process waking up) is refused.
    with pytest.raises(LeaseLost) as lost:
        dead.renew()
    assert "held by job B" in str(lost.value) and lost.value.exit_code == 1
    dead.release()  # must not delete the new holder's lease
    assert json.loads(read_text(where))["job"] == "job B"
    new.release()
    assert not exists(where)


def test_a_lost_lease_is_detected_by_the_heartbeat(where: Location) -> None:
    seen: list[LeaseLost] = []
    lease = acquire(where, job="job A", ttl_s=TTL, renew_s=0.2, on_lost=seen.append).start()
    # Someone else replaced it (as a takeover after a long stall of ours would).
    write_text(where, json.dumps({"host": "elsewhere", "pid": 7, "job": "job C", "ttl_s": 60}))
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen and "job C" in str(seen[0])
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert json.loads(read_text(where))["job"] == "job C"  # not ours to delete


def test_takeover_is_recorded_in_the_run_log(s3_env: S3Server, s3_bucket: str) -> None:
    """What the driver does with a takeover (jobs.driver.drive.take_lease), for real."""
    from jobs.driver.drive import take_lease
    from jobs.spec.load import parse_spec

    root = f"s3://{s3_bucket}/runs-{uuid.uuid4().hex[:6]}"
    spec = parse_spec(
        {
            "name": "leased",
            "backbone": {"name": "resnet18", "weights": "none"},
            "data": {"train": "/nonexistent/train"},
            "storage": {"uri": root, "endpoint": s3_env.endpoint},
        },
        local=True,
    )
    layout = RunLayout(resolve(root, s3_env.endpoint).join("leased"))
    prepared = SimpleNamespace(spec=spec, layout=layout)  # the two fields take_lease reads
    acquire(layout.lease, job="old job", ttl_s=1.0)
    time.sleep(2.5)
    lease = take_lease(prepared, "new job")
    try:
        events = [m for m in layout.read_log() if m.get("event") == "lease_takeover"]
        assert len(events) == 1
        assert events[0]["previous"]["job"] == "old job" and events[0]["heartbeat_age_s"] > 1
        assert events[0]["holder"]["job"] == "new job"
    finally:
        lease.release()
    assert not exists(layout.lease)


def test_ttl_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(lease_mod.TTL_ENV, raising=False)
    assert ttl_from_env() == lease_mod.DEFAULT_TTL_S
    monkeypatch.setenv(lease_mod.TTL_ENV, "5")
    assert ttl_from_env() == 5.0
    monkeypatch.setenv(lease_mod.TTL_ENV, "soon")
    with pytest.raises(Exception, match="TLCTL_LEASE_TTL_S"):
        ttl_from_env()


def test_release_can_leave_no_trace_of_an_otherwise_empty_run(where: Location) -> None:
    parent = resolve(where.uri.rsplit("/", 1)[0], where.endpoint)
    acquire(where, job="job A", ttl_s=30, prune_empty_parent=True).release()
    assert not exists(parent)  # nothing but the lease was there: no empty prefix left
    lease = acquire(where, job="job A", ttl_s=30, prune_empty_parent=True)
    write_text(parent.join("spec.yaml"), "name: r\n")
    lease.release()
    assert exists(parent.join("spec.yaml")) and not exists(where)  # others' objects stay
