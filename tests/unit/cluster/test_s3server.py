"""`python -m cluster.local.s3server`: a directory remembers its server. `up` after `down`
comes back on the same port with the same keys and data; a new directory gets the default
port when it is free; `status` says which. A real SeaweedFS, started and stopped for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.local import s3server
from cluster.local.s3server import free_port_pair, main, read_state, state_path

pytestmark = pytest.mark.slow


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out.strip()


def test_up_down_up_keeps_port_keys_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = free_port_pair()
    monkeypatch.setattr(s3server, "DEFAULT_PORT", default)
    data = str(tmp_path / "s3")
    assert run(capsys, "status", "--dir", data) == (1, f"no SeaweedFS server recorded in {data}")
    code, endpoint = run(capsys, "up", "--dir", data, "--bucket", "kept")
    assert code == 0 and endpoint == f"http://127.0.0.1:{default}"
    first = read_state(state_path(Path(data)))
    try:
        first.client().put_object(Bucket="kept", Key="x", Body=b"still here")
        code, line = run(capsys, "status", "--dir", data)
        assert code == 0 and line.startswith(f"running: {endpoint} (pid {first.pid})")
        assert run(capsys, "down", "--dir", data)[0] == 0
        code, line = run(capsys, "status", "--dir", data)
        assert code == 1 and line.startswith(f"stopped: {endpoint}")

        assert run(capsys, "up", "--dir", data) == (0, endpoint)  # same port as before
        again = read_state(state_path(Path(data)))
        assert (again.access_key, again.secret_key) == (first.access_key, first.secret_key)
        assert again.pid != first.pid and again.is_running()
        body = again.client().get_object(Bucket="kept", Key="x")["Body"].read()
        assert body == b"still here"
        assert run(capsys, "up", "--dir", data) == (0, endpoint)  # already running: a no-op
    finally:
        read_state(state_path(Path(data))).stop(grace=2.0)


def test_a_taken_default_port_falls_back_to_a_free_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(s3server, "_port_free", lambda port, host="127.0.0.1": port != 9000)
    assert s3server._default_s3_port() is None  # 9000 taken: `up` picks a free pair
    monkeypatch.undo()
    monkeypatch.setattr(s3server, "_port_free", lambda port, host="127.0.0.1": True)
    assert s3server._default_s3_port() == s3server.DEFAULT_PORT == 9000
