"""A storage filesystem that waits out outages: every call retried through `storage.retry`.

tlctl's own writes (checkpoint files, metrics) retry explicitly, but Ray Train also talks to
storage itself while a run goes on: its controller rewrites the checkpoint manager's
snapshot after every checkpoint and deletes evicted checkpoints, and a restarted worker
group downloads the checkpoint it resumes from. Handing Ray Train this filesystem as
`RunConfig(storage_filesystem=...)` makes those calls survive an S3 server that is down or
slow for up to `failure.storage_retry_s` too, instead of failing the run.

A stream cannot be replayed halfway, so reads fetch the whole object (retried from the
start) into a spooled temporary file before handing it out, and writes are spooled and put
as a whole object on close (retried, and its size checked after). Ray Train's own writes are
Python `with` blocks, where an error raised at close propagates; pyarrow's C++ `copy_files`
into this filesystem drops it, so tlctl's uploader writes to the inner filesystem itself.
Client-side commands keep the plain filesystem: a wrong endpoint there must fail at once,
not after five minutes.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.storage.errors import IncompleteUpload
from jobs.storage.location import Location
from jobs.storage.retry import DEFAULT_WINDOW_S, retrying

SPOOL_MEMORY_BYTES = 64 << 20  # larger objects spill to a temporary file
_CHUNK = 8 << 20


class RetryingHandler(pafs.FileSystemHandler):
    """Delegates to `inner`, retrying transient errors for up to `window_s` per call.

    Plain-valued, so it pickles (Ray ships the filesystem to its controller and workers).
    """

    def __init__(self, inner: pafs.FileSystem, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.inner, self.window_s = inner, window_s

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RetryingHandler)
            and self.inner.equals(other.inner)
            and self.window_s == other.window_s
        )

    def __hash__(self) -> int:
        return hash((self.inner.type_name, self.window_s))

    def _retry(self, what: str, fn):
        return retrying(fn, what=what, window_s=self.window_s)

    def get_type_name(self) -> str:
        return f"retrying-{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry(
            f"stat {paths[0] if paths else ''}", lambda: self.inner.get_file_info(paths)
        )

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(f"list {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(f"mkdir {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(
            f"delete {path}/*",
            lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self) -> None:
        raise pa.ArrowNotImplementedError("refusing to delete the storage root")

    def delete_file(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry(f"move {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(f"copy {src}", lambda: self.inner.copy_file(src, dest))

    def _fetch(self, path: str) -> IO[bytes]:
        def fetch() -> IO[bytes]:
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
            try:
                with self.inner.open_input_stream(path) as stream:
                    while chunk := stream.read(_CHUNK):
                        spool.write(chunk)
            except BaseException:
                spool.close()
                raise
            spool.seek(0)
            return spool

        return self._retry(f"read {path}", fetch)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self._fetch(path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self._fetch(path), mode="r")

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_PutOnClose(self, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise pa.ArrowNotImplementedError("append is not supported on object storage")

    def put(self, path: str, spool: IO[bytes]) -> None:
        """Write a spooled object as a whole; each retry starts over from its first byte."""

        def put() -> None:
            size = spool.seek(0, 2)
            spool.seek(0)
            put_checked(self.inner, spool, size, path)

        self._retry(f"write {path}", put)


def put_checked(fs: pafs.FileSystem, src: IO[bytes], size: int, dest: str) -> None:
    """Write `size` bytes from `src` to `dest`, then check that the object landed whole.

    Not pyarrow's copy_files: when S3 failed a part of a multipart upload while shutting
    down, copy_files returned success and the object was never created (the error only
    went to the log: "Error ignored when destroying file"). Closing the stream here raises
    the error, and the size check catches anything that still slips through
    (IncompleteUpload, retried like an outage).
    """
    with fs.open_output_stream(dest) as out:
        shutil.copyfileobj(src, out, _CHUNK)
    landed = fs.get_file_info(dest)
    if landed.type != pafs.FileType.File or landed.size != size:
        raise IncompleteUpload(
            f"{dest} has {landed.size} bytes in storage after its upload, {size} were sent"
        )


class _PutOnClose:
    """A write-only file that collects the bytes and puts the object when closed."""

    def __init__(self, handler: RetryingHandler, path: str) -> None:
        self.handler, self.path = handler, path
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.spool.write(data)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.spool.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler.put(self.path, self.spool)
        finally:
            self.spool.close()


def retrying_fs(fs: pafs.FileSystem, window_s: float = DEFAULT_WINDOW_S) -> pafs.FileSystem:
    """`fs`, patient through storage outages (local filesystems are returned as they are)."""
    if isinstance(fs, pafs.LocalFileSystem) or isinstance(fs, pafs.PyFileSystem):
        return fs
    return pafs.PyFileSystem(RetryingHandler(fs, window_s))


def inner_fs(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem a retrying one wraps (itself otherwise)."""
    handler = getattr(fs, "handler", None)
    return handler.inner if isinstance(handler, RetryingHandler) else fs


def patient(loc: Location, window_s: float = DEFAULT_WINDOW_S) -> Location:
    """The same location through a retrying filesystem."""
    return dataclasses.replace(loc, fs=retrying_fs(loc.fs, window_s))
