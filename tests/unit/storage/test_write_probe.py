"""The storage write probe leaves nothing behind (a real SeaweedFS, no mocks)."""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pytest

from cluster.local.s3server import S3Server
from jobs.storage import location as storage


def _keys(server: S3Server, bucket: str) -> list[str]:
    """Every object key in the bucket, directory markers included (plain S3 listing)."""
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1"
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.mark.parametrize("prefix", ["runs", "deep/er/runs"])
def test_probe_of_a_new_prefix_leaves_no_marker(
    s3_env: S3Server, s3_bucket: str, prefix: str
) -> None:
    root = storage.resolve(f"s3://{s3_bucket}/{uuid.uuid4().hex[:6]}-{prefix}", s3_env.endpoint)
    before = _keys(s3_env, s3_bucket)
    storage.check_writable(root)
    assert _keys(s3_env, s3_bucket) == before
    assert root.fs.get_file_info(root.path).type == pafs.FileType.NotFound


def test_probe_keeps_what_is_there(s3_env: S3Server, s3_bucket: str) -> None:
    root = storage.resolve(f"s3://{s3_bucket}/kept-{uuid.uuid4().hex[:6]}", s3_env.endpoint)
    storage.write_text(root.join("other", "spec.yaml"), "x")
    before = _keys(s3_env, s3_bucket)
    storage.check_writable(root)
    assert _keys(s3_env, s3_bucket) == before
