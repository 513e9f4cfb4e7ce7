"""Shared pytest fixtures, one section per real component (never mocks: see DESIGN.md)."""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.local.s3server import S3Server, read_state, start_s3_server, state_path

# --- S3: one real SeaweedFS server per test session --------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback (~3 s to start), shared by the whole session.

    With TLCTL_TEST_S3_DIR set (CI starts one with `python -m cluster.local.s3server up`),
    that running server is used and left running.
    """
    external = os.environ.get("TLCTL_TEST_S3_DIR")
    if external:
        yield read_state(state_path(Path(external)))
        return
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        # Its data is thrown away, so a short grace is enough (a clean exit takes ~17 s).
        server.stop(grace=2.0)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS credential chain at `s3_server` for one test."""
    _point_aws_at(s3_server, monkeypatch)
    return s3_server


def _point_aws_at(server: S3Server, mp: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    for name, value in server.env().items():
        mp.setenv(name, value)


@pytest.fixture(scope="module")
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket for this test module, named after it plus a random suffix, dropped
    afterwards: the suite writes tens of GB of checkpoints, and only a dropped bucket gives
    SeaweedFS its disk back (a CI run once filled the disk and every write failed)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.lower()).strip("-")[:40]
    name = f"t-{stem}-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    yield name
    try:
        s3_server.delete_bucket(name)
    except Exception as exc:  # cleanup: the module's own tests have passed or failed already
        warnings.warn(f"could not drop test bucket {name}: {exc}", stacklevel=1)


@pytest.fixture(scope="module")
def s3_env_module(s3_server: S3Server) -> Iterator[S3Server]:
    """`s3_env` for a whole module: set before Ray starts, so its workers inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        _point_aws_at(s3_server, mp)
        yield s3_server


# --- Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_start_4_cpus(s3_env_module: S3Server) -> Iterator[None]:
    """Local Ray with 2 training workers' CPUs plus 2 for Ray Data ingest (real workers).

    Started after the S3 environment so that workers see the credentials; `tlctl submit
    --local` reuses a Ray this process already runs.
    """
    import ray

    from jobs.driver.drive import quiet_ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    quiet_ray(verbose=False)
    try:
        yield
    finally:
        ray.shutdown()
