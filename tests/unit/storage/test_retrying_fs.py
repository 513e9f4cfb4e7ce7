"""The retrying filesystem Ray Train gets: each call survives a storage outage, streams are
replayed from their first byte, permanent errors fail at once, and it pickles.

The outage is a local filesystem that refuses connections for its first calls (pure logic,
no S3 here: tests/test_fault_tolerance.py stops a real SeaweedFS mid-run).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from jobs.errors import TlctlError
from jobs.storage import retry
from jobs.storage.location import resolve
from jobs.storage.retrying_fs import RetryingHandler, inner_fs, patient, retrying_fs

REFUSED = "AWS Error NETWORK_CONNECTION: curlCode: 7, Couldn't connect to server"


class _HalfRead:
    """A stream that breaks after its first few bytes, as a connection dropped mid-body."""

    def __init__(self, data: bytes) -> None:
        self.data, self.closed, self.done = data, False, False

    def read(self, n: int = -1) -> bytes:
        if self.done:
            raise OSError(f"{REFUSED} (mid-body)")
        self.done = True
        return self.data[:3]

    def close(self) -> None:
        self.closed = True


class FlakyHandler(pafs.FileSystemHandler):
    """A local filesystem whose next `down` calls fail as an unreachable server would."""

    def __init__(self, down: int = 0, *, break_reads: int = 0) -> None:
        self.local, self.down, self.break_reads, self.calls = pafs.LocalFileSystem(), down, 0, 0
        self.break_reads = break_reads

    def _call(self, fn):
        self.calls += 1
        if self.down > 0:
            self.down -= 1
            raise OSError(REFUSED)
        return fn()

    def get_type_name(self) -> str:
        return "flaky"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self._call(lambda: self.local.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._call(lambda: self.local.get_file_info(selector))

    def create_dir(self, path, recursive):
        return self._call(lambda: self.local.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        return self._call(lambda: self.local.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._call(lambda: self.local.delete_dir_contents(path, missing_dir_ok))

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        return self._call(lambda: self.local.delete_file(path))

    def move(self, src, dest):
        return self._call(lambda: self.local.move(src, dest))

    def copy_file(self, src, dest):
        return self._call(lambda: self.local.copy_file(src, dest))

    def open_input_stream(self, path):
        def open_():
            if self.break_reads > 0:
                self.break_reads -= 1
                return pa.PythonFile(_HalfRead(Path(path).read_bytes()), mode="r")
            return self.local.open_input_stream(path)

        return self._call(open_)

    def open_input_file(self, path):
        return self._call(lambda: self.local.open_input_file(path))

    def open_output_stream(self, path, metadata=None):
        return self._call(lambda: self.local.open_output_stream(path))

    def open_append_stream(self, path, metadata=None):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "backoff", lambda attempt: 0.0)


def wrapped(flaky: FlakyHandler, window_s: float = 60.0) -> pafs.FileSystem:
    return pafs.PyFileSystem(RetryingHandler(pafs.PyFileSystem(flaky), window_s))


def test_a_write_during_an_outage_lands_whole(tmp_path: Path) -> None:
    flaky = FlakyHandler(down=3)
    fs = wrapped(flaky)
    data = bytes(range(256)) * 1000
    with fs.open_output_stream(str(tmp_path / "obj")) as out:
        out.write(data[:100])
        out.write(data[100:])
    assert (tmp_path / "obj").read_bytes() == data
    assert flaky.calls == 5  # 3 refused, the write, the size check after it


def test_a_read_broken_mid_body_is_read_again_from_the_start(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"0123456789")
    flaky = FlakyHandler(down=1, break_reads=1)
    with wrapped(flaky).open_input_stream(str(tmp_path / "obj")) as stream:
        assert stream.read() == b"0123456789"
    assert flaky.calls == 3  # refused, broken after 3 bytes, whole


def test_a_checkpoint_download_and_listing_go_through(tmp_path: Path) -> None:
    """What a restarted worker group does: list the checkpoint, copy it to local disk."""
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 5000)
    (src / "b.bin").write_bytes(b"b" * 7)
    fs = wrapped(FlakyHandler(down=2, break_reads=1))
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(str(src))))
    assert names == ["a.bin", "b.bin"]
    (tmp_path / "local").mkdir()  # as Ray's download does
    pafs.copy_files(
        str(src),
        str(tmp_path / "local"),
        source_filesystem=fs,
        destination_filesystem=pafs.LocalFileSystem(),
        use_threads=False,
    )
    assert (tmp_path / "local" / "a.bin").read_bytes() == b"a" * 5000
    assert (tmp_path / "local" / "b.bin").read_bytes() == b"b" * 7


def test_a_missing_file_is_not_retried(tmp_path: Path) -> None:
    flaky = FlakyHandler()
    with pytest.raises(FileNotFoundError):
        wrapped(flaky).open_input_stream(str(tmp_path / "nope"))
    assert flaky.calls == 1


def test_an_outage_longer_than_the_window_fails_with_the_storage_error(tmp_path: Path) -> None:
    with pytest.raises(Exception) as err:
        wrapped(FlakyHandler(down=10**6), window_s=0.2).create_dir(str(tmp_path / "d"))
    assert isinstance(err.value, (TlctlError, OSError))
    assert "still failing after 0 s" in str(err.value) and "connect" in str(err.value)


def test_it_pickles_as_ray_ships_it_and_unwraps() -> None:
    s3 = resolve("s3://bucket/x", "http://127.0.0.1:9").fs
    fs = retrying_fs(s3, 42.0)
    again = pickle.loads(pickle.dumps(fs))
    assert again.handler == fs.handler and again.handler.window_s == 42.0
    assert inner_fs(fs) is s3 and inner_fs(s3) is s3
    assert fs.type_name == "py::retrying-s3"


def test_local_storage_is_left_alone(tmp_path: Path) -> None:
    loc = resolve(str(tmp_path))
    assert patient(loc).fs is loc.fs
