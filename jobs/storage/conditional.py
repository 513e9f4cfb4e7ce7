"""Conditional writes on one storage key: create if absent, replace or delete only if
unchanged since it was read (compare-and-swap).

On S3 through boto3 (pyarrow has no conditional writes): `If-None-Match: *` to create,
`If-Match: <etag>` to replace or delete. In a local directory: `O_EXCL` to create, and
replace/delete under an exclusive `flock` of the key's directory, the body's SHA-256 as the
version token. The run lease (jobs.storage.lease) and the model registry's aliases
(jobs.models.registry) are built on it.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.storage import errors
from jobs.storage.credentials import adopt_shipped_credentials
from jobs.storage.location import DEFAULT_REGION, Location


@dataclass(frozen=True)
class Seen:
    """An object as read: its raw body, its version token and its age (on the server's
    clock for S3: the response's `Date` minus the object's `Last-Modified`)."""

    data: bytes
    token: str
    age_s: float


class Backend(Protocol):
    """Conditional operations on one key. `create`/`replace` return the new version token,
    or None when their condition did not hold."""

    where: str

    def read(self) -> Seen | None: ...
    def create(self, data: bytes) -> str | None: ...
    def replace(self, data: bytes, token: str) -> str | None: ...
    def delete(self, token: str) -> bool: ...
    def honours_conditions(self, data: bytes, token: str) -> bool: ...
    def prune_parent(self) -> None: ...


# --- S3 -----------------------------------------------------------------------------------


class S3Backend:
    """A key in a bucket, through boto3 (pyarrow has no conditional writes), with the
    endpoint, region and credential chain the run's pyarrow filesystem uses."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.where = loc.uri
        self.bucket, self.key = loc.path.split("/", 1)
        self.client = s3_client(loc.endpoint)

    def _call(self, fn: Callable[[], Any], precondition_ok: bool = True) -> Any:
        """`fn()`; a failed precondition (412, 409 conflict, 404) is None; other failures
        are the typed storage errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if precondition_ok and (
                status in (404, 409, 412)
                or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")
            ):
                return None
            raise storage_error(self.loc, f"{code or status}: {exc}", status) from exc
        except BotoCoreError as exc:
            raise errors.Unreachable(f"storage: cannot reach {where(self.loc)} ({exc})") from exc

    def read(self) -> Seen | None:
        response = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self.key))
        if response is None:
            return None
        data = response["Body"].read()
        modified = response["LastModified"].timestamp()
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return Seen(data, response["ETag"], max(0.0, now - modified))

    def _put(self, data: bytes, **condition: str) -> str | None:
        response = self._call(
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                ContentType="application/json",
                **condition,
            )
        )
        return None if response is None else response["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> bool:
        try:
            done = self._call(
                lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            )
            return done is not None
        except errors.StorageError as exc:
            if "NotImplemented" not in str(exc) and "501" not in str(exc):
                raise
        seen = self.read()  # no conditional delete here: compare, then delete
        if seen is None or seen.token != token:
            return False
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key))
        return True

    def prune_parent(self) -> None:
        """Remove the key's directory if it is empty now: a non-recursive delete of
        `parent/` (SeaweedFS drops an empty implicit directory and keeps a non-empty one;
        AWS only ever removes a `parent/` marker object)."""
        parent = self.key.rsplit("/", 1)[0] if "/" in self.key else ""
        if parent:
            self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=parent + "/"))

    def honours_conditions(self, data: bytes, token: str) -> bool:
        """Sent right after our create of `data`: a second `If-None-Match: *` must be
        refused (when it is not, the same bytes were written again: same etag, no change)."""
        return self._put(data, IfNoneMatch="*") is None


def s3_client(endpoint: str | None) -> Any:
    """A boto3 client that reaches what `location.resolve` reaches: the same endpoint
    (path-style), region rule, timeouts and AWS credential chain."""
    import boto3
    from botocore.config import Config

    from jobs.storage.location import CONNECT_TIMEOUT_S, MAX_ATTEMPTS, REQUEST_TIMEOUT_S

    adopt_shipped_credentials()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    region = region or (DEFAULT_REGION if endpoint else None)
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=REQUEST_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


def storage_error(loc: Location, text: str, status: int) -> errors.StorageError:
    text = errors.scrub(text)
    if status == 403 or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return errors.AccessDenied(f"storage: access denied for {loc.uri} at {where(loc)}")
    if "NoSuchBucket" in text:
        return errors.NoSuchBucket(f"storage.uri: bucket '{loc.bucket}' does not exist")
    if status >= 500 or "SlowDown" in text:
        return errors.ServerError(f"storage: {loc.uri}: {text}")
    return errors.StorageError(f"storage: {loc.uri}: {text}")


def where(loc: Location) -> str:
    return loc.endpoint or "AWS S3"


# --- a local directory --------------------------------------------------------------------


class LocalBackend:
    """A file: created with O_EXCL; replaced and deleted compare-and-swap under an
    exclusive flock of its directory. The version token is the body's SHA-256."""

    def __init__(self, loc: Location) -> None:
        self.path = loc.path
        self.where = loc.path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> Seen | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                modified = os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Seen(data, _digest(data), max(0.0, time.time() - modified))

    def read(self) -> Seen | None:
        return self._read()

    def create(self, data: bytes) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return _digest(data)

    def replace(self, data: bytes, token: str) -> str | None:
        with self._locked():
            seen = self._read()
            if seen is None or seen.token != token:
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        return _digest(data)

    def delete(self, token: str) -> bool:
        with self._locked():
            seen = self._read()
            if seen is None or seen.token != token:
                return False
            os.unlink(self.path)
        return True

    def prune_parent(self) -> None:
        with contextlib.suppress(OSError):  # not empty (or gone): left as it is
            os.rmdir(os.path.dirname(self.path))

    def honours_conditions(self, data: bytes, token: str) -> bool:
        return True  # O_EXCL and flock are the kernel's


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backend_for(loc: Location) -> Backend:
    return S3Backend(loc) if loc.is_s3 else LocalBackend(loc)
