"""jobs.storage.location: URI parsing (no server) and real reads/writes/errors against SeaweedFS."""

from __future__ import annotations

import json
import os
import pickle
import stat
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.local.s3server import S3Server, free_port_pair, read_state, write_state
from jobs.errors import TlctlError
from jobs.storage import location as storage

# --- parse_uri / resolve (no server) -------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://tlctl/runs", ("s3", "tlctl/runs")),
        ("s3://tlctl/runs/", ("s3", "tlctl/runs")),
        ("s3://tlctl", ("s3", "tlctl")),
        ("s3://tlctl//a///b/", ("s3", "tlctl/a/b")),
        ("S3://my.bucket-1/x", ("s3", "my.bucket-1/x")),
        ("file:///data/runs/", ("file", "/data/runs")),
        ("file://localhost/data", ("file", "/data")),
        ("/data/runs/", ("file", "/data/runs")),
    ],
)
def test_parse_uri(uri: str, expected: tuple[str, str]) -> None:
    assert storage.parse_uri(uri) == expected


def test_parse_uri_local_relative_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.parse_uri("runs") == ("file", str(tmp_path / "runs"))
    assert storage.parse_uri("~/runs") == ("file", str(tmp_path / "home" / "runs"))


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("gs://bucket/x", "unsupported scheme 'gs://'"),
        ("http://host/x", "unsupported scheme 'http://'"),
        ("s3://", "has no bucket"),
        ("s3:/tlctl/runs", "malformed"),
        ("s3://ab/x", "invalid bucket name 'ab'"),
        ("s3://Bad_Bucket/x", "invalid bucket name 'Bad_Bucket'"),
        ("s3://-tlctl/x", "invalid bucket name"),
        ("s3://192.168.0.1/x", "invalid bucket name"),
        ("s3://tlctl/a/../b", "'..'"),
        ("file://otherhost/x", "not a local file URI"),
        ("", "empty"),
    ],
)
def test_parse_uri_rejects(uri: str, fragment: str) -> None:
    with pytest.raises(TlctlError) as info:
        storage.parse_uri(uri)
    assert fragment in info.value.message
    assert "s3://bucket/prefix" in info.value.message or "storage.uri" in info.value.message


def test_resolve_s3_with_endpoint() -> None:
    loc = storage.resolve("s3://tlctl/runs/", "http://127.0.0.1:9000/")
    assert (loc.path, loc.uri, loc.endpoint) == (
        "tlctl/runs",
        "s3://tlctl/runs",
        "http://127.0.0.1:9000",
    )
    assert loc.is_s3 and loc.bucket == "tlctl"
    assert isinstance(loc.fs, pafs.S3FileSystem)
    options = loc.fs.__reduce__()[1][0]
    assert options["endpoint_override"] == "127.0.0.1:9000"
    assert options["scheme"] == "http"
    assert options["force_virtual_addressing"] is False
    assert options["connect_timeout"] <= 10 and options["request_timeout"] <= 30
    # Credentials come from the AWS chain on each host, never baked into the filesystem
    # (it is pickled to Ray workers).
    assert options["access_key"] is None and options["secret_key"] is None


def test_resolve_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert storage.resolve("s3://tlctl/x", "https://s3.example:443").fs.region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    loc = storage.resolve("s3://tlctl/x", "https://s3.example:443")
    assert loc.fs.region == "eu-west-1"
    assert loc.fs.__reduce__()[1][0]["scheme"] == "https"


def test_resolve_caches_filesystem_per_endpoint() -> None:
    a = storage.resolve("s3://tlctl/a", "http://127.0.0.1:9000")
    b = storage.resolve("s3://other/b", "http://127.0.0.1:9000/")
    c = storage.resolve("s3://tlctl/a", "http://127.0.0.1:9001")
    assert a.fs is b.fs
    assert a.fs is not c.fs


@pytest.mark.parametrize(
    ("endpoint", "fragment"),
    [
        ("127.0.0.1:9000", "must be http(s)://host:port"),
        ("ftp://127.0.0.1:9000", "must be http(s)://host:port"),
        ("http://127.0.0.1:9000/bucket", "must not have a path"),
    ],
)
def test_resolve_rejects_bad_endpoint(endpoint: str, fragment: str) -> None:
    with pytest.raises(TlctlError, match="storage.endpoint") as info:
        storage.resolve("s3://tlctl/x", endpoint)
    assert fragment in info.value.message


def test_resolve_endpoint_with_credentials_is_not_echoed() -> None:
    with pytest.raises(TlctlError) as info:
        storage.resolve("s3://tlctl/x", "http://key:topsecret@127.0.0.1:9000")
    assert "topsecret" not in info.value.message


def test_resolve_local_ignores_endpoint(tmp_path: Path) -> None:
    loc = storage.resolve(str(tmp_path / "runs"), "http://127.0.0.1:9000")
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert (loc.path, loc.uri, loc.endpoint) == (
        str(tmp_path / "runs"),
        str(tmp_path / "runs"),
        None,
    )
    assert not loc.is_s3 and loc.bucket is None


def test_location_join() -> None:
    loc = storage.resolve("s3://tlctl/runs", "http://127.0.0.1:9000")
    child = loc.join("flowers", "model/model.pt")
    assert (child.path, child.uri) == (
        "tlctl/runs/flowers/model/model.pt",
        "s3://tlctl/runs/flowers/model/model.pt",
    )
    assert child.fs is loc.fs and child.endpoint == loc.endpoint
    assert loc.join() == loc
    assert storage.resolve("/").join("a", "b").uri == "/a/b"
    with pytest.raises(TlctlError):
        loc.join("../escape")


def test_location_pickles() -> None:
    loc = storage.resolve("s3://tlctl/runs", "http://127.0.0.1:9000")
    copy = pickle.loads(pickle.dumps(loc))
    assert copy.uri == loc.uri and copy.fs.equals(loc.fs)


# --- round trips: real SeaweedFS and local disk --------------------------------------------


def _round_trip(root: storage.Location) -> None:
    storage.write_text(root.join("spec.yaml"), "name: x\n")
    storage.write_bytes(root.join("model", "model.pt"), b"\x00\x01weights")
    storage.write_text(root.join("spec.yaml"), "name: y\n")  # overwrite

    assert storage.read_text(root.join("spec.yaml")) == "name: y\n"
    assert storage.read_bytes(root.join("model/model.pt")) == b"\x00\x01weights"
    assert storage.exists(root) and storage.exists(root.join("model"))
    assert not storage.exists(root.join("nothing-here"))
    assert storage.list_dir(root) == ["model", "spec.yaml"]
    assert storage.list_dir(root.join("model")) == ["model.pt"]
    assert storage.list_dir(root.join("nothing-here")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(root.join("nothing-here"))

    storage.delete_tree(root.join("model/model.pt"))
    assert not storage.exists(root.join("model/model.pt"))
    storage.delete_tree(root)
    assert not storage.exists(root.join("spec.yaml"))
    assert storage.list_dir(root) == []
    storage.delete_tree(root)  # missing is fine


def test_round_trip_s3(s3_env: S3Server, s3_bucket: str) -> None:
    _round_trip(storage.resolve(f"s3://{s3_bucket}/roundtrip", s3_env.endpoint))


def test_round_trip_local(tmp_path: Path) -> None:
    _round_trip(storage.resolve(str(tmp_path / "runs")))


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    loc = storage.resolve(str(tmp_path / "a" / "metrics.json"))
    storage.write_text(loc, json.dumps({"epoch": 1}))
    storage.write_text(loc, json.dumps({"epoch": 2}))
    assert os.listdir(tmp_path / "a") == ["metrics.json"]
    assert json.loads(storage.read_text(loc)) == {"epoch": 2}


def test_delete_tree_at_bucket_root_keeps_bucket(s3_env: S3Server, s3_server: S3Server) -> None:
    bucket = f"t-root-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    root = storage.resolve(f"s3://{bucket}", s3_env.endpoint)
    storage.write_text(root.join("a/b.txt"), "x")
    storage.delete_tree(root)
    assert storage.list_dir(root) == []
    storage.check_writable(root)  # bucket still there


# --- check_writable: the errors users hit, with the texts pyarrow really produces ---------


def test_check_writable_good_bucket(s3_env: S3Server, s3_bucket: str) -> None:
    loc = storage.resolve(f"s3://{s3_bucket}/runs", s3_env.endpoint)
    storage.check_writable(loc)
    storage.check_writable(loc)
    assert not any(name.startswith(".tlctl-write-probe") for name in storage.list_dir(loc))


def test_check_writable_missing_bucket(s3_env: S3Server) -> None:
    loc = storage.resolve("s3://no-such-bucket-here/runs", s3_env.endpoint)
    with pytest.raises(TlctlError) as info:
        storage.check_writable(loc)
    assert info.value.message.startswith(
        f"storage.uri: bucket 'no-such-bucket-here' does not exist at {s3_env.endpoint}"
    )
    assert "s3 mb s3://no-such-bucket-here" in info.value.message


def test_write_to_missing_bucket_is_a_clear_error(s3_env: S3Server) -> None:
    loc = storage.resolve("s3://no-such-bucket-here/runs/x.txt", s3_env.endpoint)
    with pytest.raises(TlctlError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.write_text(loc, "x")
    # Reading a missing bucket is just "nothing there" (pyarrow's view); check_writable
    # is what reports it.
    assert storage.list_dir(loc) == []
    assert not storage.exists(loc)


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_check_writable_wrong_credentials(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    bad_secret = "wrong-secret-Zq9xV7"
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    loc = storage.resolve(f"s3://{s3_bucket}/runs", s3_env.endpoint)
    with pytest.raises(TlctlError) as info:
        storage.check_writable(loc)
    message = info.value.message
    assert message.startswith(f"storage: access denied for s3://{s3_bucket}/runs")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE" in message
    for secret in (bad_secret, s3_env.secret_key):
        assert secret not in message
        assert secret not in str(info.value.__cause__)


def test_reads_with_wrong_secret_say_access_denied(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loc = storage.resolve(f"s3://{s3_bucket}/denied/x.txt", s3_env.endpoint)
    storage.write_text(loc, "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-Zq9xV7")
    with pytest.raises(TlctlError, match="access denied"):
        storage.read_text(loc)


def test_check_writable_unreachable_endpoint_fails_fast(s3_env: S3Server) -> None:
    port = free_port_pair()  # nothing listens there
    loc = storage.resolve("s3://tlctl/runs", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(TlctlError) as info:
        storage.check_writable(loc)
    assert time.monotonic() - started < 15
    assert info.value.message == (
        f"storage.endpoint: cannot reach http://127.0.0.1:{port} (Could not connect to server)"
    )


def test_check_writable_stopped_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that was up and went away reads like any unreachable endpoint."""
    from cluster.local.s3server import start_s3_server

    server = start_s3_server(tmp_path / "s3")
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket("tlctl")
        loc = storage.resolve("s3://tlctl/runs", server.endpoint)
        storage.check_writable(loc)
    finally:
        server.stop(grace=2.0)
    assert not server.is_running()
    with pytest.raises(TlctlError, match=r"storage.endpoint: cannot reach http://127\.0\.0\.1:\d+"):
        storage.check_writable(loc)


def test_check_writable_creates_local_dir(tmp_path: Path) -> None:
    loc = storage.resolve(str(tmp_path / "new" / "runs"))
    storage.check_writable(loc)
    assert (tmp_path / "new" / "runs").is_dir()
    assert os.listdir(tmp_path / "new" / "runs") == []


def test_check_writable_local_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    loc = storage.resolve(str(tmp_path / "file" / "runs"))
    with pytest.raises(TlctlError, match=r"storage.uri: cannot write to .*file/runs \(.*directory"):
        storage.check_writable(loc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_check_writable_local_read_only_dir(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(TlctlError, match="storage.uri: cannot write to .*Permission denied"):
            storage.check_writable(storage.resolve(str(locked)))
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")
def test_check_writable_local_uncreatable_dir() -> None:
    """Nobody, not even root, can create a directory in /proc."""
    with pytest.raises(TlctlError, match="storage.uri: cannot write to /proc/tlctl-runs"):
        storage.check_writable(storage.resolve("/proc/tlctl-runs"))


# --- the server's state file (used by `python -m cluster.local.s3server up/down/env`) ----


def test_state_round_trip_keeps_secret_out(s3_server: S3Server, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state(path, s3_server)
    assert s3_server.secret_key not in path.read_text()
    secret_file = Path(json.loads(path.read_text())["secret_file"])
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    again = read_state(path)
    assert (again.endpoint, again.pid, again.secret_key) == (
        s3_server.endpoint,
        s3_server.pid,
        s3_server.secret_key,
    )
    assert again.is_running()
    assert s3_server.secret_key not in repr(again)
