"""Shared pytest fixtures, one section per real component (never mocks: see DESIGN.md)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from cluster.local.s3server import S3Server, start_s3_server

# --- S3: one real SeaweedFS server per test session --------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on loopback (~3 s to start), shared by the whole session."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        # Its data is thrown away, so a short grace is enough (a clean exit takes ~17 s).
        server.stop(grace=2.0)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS credential chain at `s3_server` for one test."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="module")
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for this test module, named after it plus a random suffix."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.lower()).strip("-")[:40]
    name = f"t-{stem}-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    return name


# --- Ray -----------------------------------------------------------------------------------
# (Ray fixtures go here: module-scoped, named by resources, e.g. `ray_start_2_cpus`.)
