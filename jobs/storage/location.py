"""One storage location (``s3://bucket/prefix`` or a local directory) as a pyarrow filesystem.

Ray Train, Ray Data and tlctl's own files (spec, metrics, model) must reach the same bucket
with the same settings, so they all go through `resolve`. Every storage failure leaves this
module as a typed `jobs.storage.errors` error with a message a user can act on
(`describe_error`), and `check_writable` finds them before any compute is spent.
Credentials only ever come from the standard AWS chain (environment, profile); this module
never reads, passes or prints secret values, except to scrub them out of error texts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import pyarrow.fs as pafs

from jobs.errors import TlctlError
from jobs.redact import clip, clip_text
from jobs.storage import errors
from jobs.storage.credentials import adopt_shipped_credentials

# Bounded so an unreachable or stalled server fails in seconds, not minutes. The request
# timeout is curl's low-speed window (no bytes for that long), not a cap on a whole upload.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3
DEFAULT_REGION = "us-east-1"

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_VALID_FORMS = "s3://bucket/prefix, a local path, or file:///absolute/path"

_FS_CACHE: dict[tuple[str, str | None, str | None], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Location:
    """A resolved place in storage: the filesystem to use and the path inside it."""

    fs: pafs.FileSystem
    path: str  # "bucket/prefix" for S3 (no scheme), absolute local path otherwise
    uri: str  # "s3://bucket/prefix" or the absolute local path
    endpoint: str | None

    def join(self, *parts: str) -> Location:
        """A location below this one; parts may contain '/' and are normalized."""
        segments = _segments("/".join(parts), self.uri)
        if not segments:
            return self
        path = "/".join([self.path.rstrip("/"), *segments])
        uri = f"s3://{path}" if self.is_s3 else path
        return dataclasses.replace(self, path=path, uri=uri)

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> str | None:
        return self.path.split("/", 1)[0] if self.is_s3 else None

    def __str__(self) -> str:
        return self.uri


# --- parsing and resolving ---------------------------------------------------------------


def parse_uri(
    uri: str, field: str = "storage.uri", *, bucket_names: bool = True
) -> tuple[str, str]:
    """Split a storage URI into ("s3", "bucket/key") or ("file", "/abs/path").

    The one rule for every URI field (storage.uri, data.train, data.val, a weights URI,
    --storage); `field` names the one in messages. Anything that looks like `scheme:` is read
    as a scheme, so `s3:bucket/x` is an error, not a local directory named `s3:`.
    `bucket_names` False leaves S3's bucket naming rules to the resolve before use.
    """
    text = (uri or "").strip()
    if not text:
        raise TlctlError(f"{field}: empty (valid: {_VALID_FORMS})")
    match = _SCHEME_RE.match(text)
    if match is None:
        return "file", os.path.abspath(os.path.expanduser(text))
    scheme = match.group(1).lower()
    if scheme == "s3":
        return "s3", _s3_path(text, field, bucket_names)
    if scheme == "file":
        return "file", _file_path(text, field)
    hint = "" if "://" in text else f"; for a local path write ./{clip_text(text, 40)}"
    raise TlctlError(
        f"{field}: unsupported scheme '{clip_text(scheme, 20)}://' in {clip(text)} "
        f"(valid: {_VALID_FORMS}{hint})"
    )


def is_remote_safe(uri: str) -> bool:
    """True for a URI every node of a remote cluster reads the same (s3://); False for a
    local path or file:// URI, which names a file on one machine only."""
    try:
        return parse_uri(uri)[0] == "s3"
    except TlctlError:
        return False


def _s3_path(uri: str, field: str, bucket_names: bool = True) -> str:
    """'bucket/key' from 's3://bucket/key', with the bucket name checked up front."""
    if not uri[3:].startswith("//"):
        raise TlctlError(f"{field}: malformed {clip(uri)} (valid: s3://bucket/prefix)")
    rest = uri[5:]
    if "@" in rest.split("/", 1)[0]:
        # Never echo it: the user put credentials into the URI.
        raise TlctlError(
            f"{field}: must not contain credentials (user:password@); they come from the AWS "
            "credential chain (valid: s3://bucket/prefix)"
        )
    if rest.startswith("/") or not rest.strip("/"):
        raise TlctlError(
            f"{field}: {clip(uri)} has no bucket (valid: s3://bucket/prefix, e.g. s3://tlctl/runs)"
        )
    segments = _segments(rest, uri, field)
    if bucket_names:
        _check_bucket_name(segments[0], uri, field)
    return "/".join(segments)


def _file_path(uri: str, field: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise TlctlError(
            f"{field}: {clip(uri)} is not a local file URI (valid: file:///absolute/path)"
        )
    return os.path.normpath(parts.path)


def _segments(path: str, uri: str, field: str = "storage.uri") -> list[str]:
    """Non-empty path segments; '.' and '..' are refused because S3 keys take them literally."""
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise TlctlError(f"{field}: '.' and '..' are not allowed in {clip(uri)}")
    return segments


def _check_bucket_name(bucket: str, uri: str, field: str) -> None:
    if _BUCKET_RE.fullmatch(bucket) and not _IPV4_RE.fullmatch(bucket) and ".." not in bucket:
        return
    raise TlctlError(
        f"{field}: invalid bucket name {clip(bucket)} in {clip(uri)}: S3 bucket names are 3-63 "
        "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    )


def resolve(
    uri: str,
    endpoint: str | None = None,
    *,
    field: str = "storage.uri",
    endpoint_field: str = "storage.endpoint",
) -> Location:
    """The filesystem and path for `uri`; `endpoint` (S3 only) selects a non-AWS server."""
    scheme, path = parse_uri(uri, field)
    if scheme == "file":
        return Location(fs=pafs.LocalFileSystem(), path=path, uri=path, endpoint=None)
    canonical = normalize_endpoint(endpoint, endpoint_field) if endpoint else None
    return Location(fs=_s3_filesystem(canonical), path=path, uri=f"s3://{path}", endpoint=canonical)


def http_url(text: str, field: str, *, example: str, path_ok: bool = False) -> SplitResult:
    """`text` split as an http(s)://host[:port] URL, or a TlctlError naming `field`.

    The one rule for every endpoint and address (storage.endpoint, data.endpoint,
    AWS_ENDPOINT_URL(_S3), --endpoint, --address): a scheme, a host, a numeric port in
    1..65535, no credentials and (unless `path_ok`) no path. Credentials are never echoed.
    """
    value = (text or "").strip()
    if not value:
        raise TlctlError(f"{field}: empty (it must be http(s)://host:port, e.g. {example})")
    # Before any parsing: `KEY:SECRET@host` has no scheme, so urlsplit finds no netloc in it.
    if "@" in re.split(r"[/?#]", value.partition("://")[2] or value, maxsplit=1)[0]:
        raise TlctlError(
            f"{field}: must not contain credentials (user:password@); they come from the "
            f"AWS credential chain or the Ray token (valid: http(s)://host:port, e.g. {example})"
        )
    shown, valid = clip(value), f"it must be http(s)://host:port, e.g. {example}"
    if "://" not in value:
        raise TlctlError(f"{field}: {shown} has no scheme ({valid})")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TlctlError(f"{field}: {shown} is not an http(s)://host[:port] URL ({valid})")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535 or parts.netloc.endswith(":"):
        raise TlctlError(f"{field}: {shown} has an invalid port (valid: 1..65535; {valid})")
    if parts.query or parts.fragment or (not path_ok and parts.path not in ("", "/")):
        raise TlctlError(f"{field}: {shown} must not have a path ({valid})")
    return parts


def normalize_endpoint(endpoint: str, field: str = "storage.endpoint") -> str:
    """'http(s)://host:port' without a trailing slash; anything else is a clear error.

    The one rule for endpoint shape: the spec's endpoint fields validate with it too.
    """
    parts = http_url(endpoint, field, example="http://127.0.0.1:9000")
    return f"{parts.scheme.lower()}://{parts.netloc}"


def _region(endpoint: str | None) -> str | None:
    """AWS_REGION / AWS_DEFAULT_REGION; else us-east-1 for custom servers (signing needs one).

    For AWS itself pyarrow's own default (the profile's region) is kept.
    """
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return region or (DEFAULT_REGION if endpoint else None)


def _s3_filesystem(endpoint: str | None, *, background_writes: bool = True) -> pafs.FileSystem:
    """One S3FileSystem per (endpoint, region): they are costly to build and safe to share.

    Credentials are looked up by the AWS SDK on each request, so a cached filesystem follows
    changes of AWS_* variables.
    """
    adopt_shipped_credentials()  # a cluster job's --pass-credentials file, if any
    region = _region(endpoint)
    key = ("s3" if background_writes else "s3-foreground", endpoint, region)
    with _FS_LOCK:
        if key not in _FS_CACHE:
            _FS_CACHE[key] = _new_s3_filesystem(endpoint, region, background_writes)
        return _FS_CACHE[key]


def foreground_fs(loc: Location) -> pafs.FileSystem:
    """`loc`'s filesystem with every write done in the calling thread (S3: no background part
    uploads in pyarrow's I/O pool), so that a low-priority uploader thread stays low."""
    return _s3_filesystem(loc.endpoint, background_writes=False) if loc.is_s3 else loc.fs


def _new_s3_filesystem(
    endpoint: str | None, region: str | None, background_writes: bool = True
) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
        "background_writes": background_writes,
    }
    if region:
        kwargs["region"] = region
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(
            endpoint_override=parts.netloc, scheme=parts.scheme, force_virtual_addressing=False
        )
    return pafs.S3FileSystem(**kwargs)


# --- reading and writing -----------------------------------------------------------------


@contextmanager
def _mapped_errors(loc: Location) -> Iterator[None]:
    """Every storage failure at `loc` as its typed error, with a message a user can act on.

    A missing object stays a FileNotFoundError (typed NotFound for S3) so callers can handle
    it; local OSErrors other than that name their path already and pass through.
    """
    try:
        yield
    except TlctlError:
        raise
    except OSError as exc:
        if not loc.is_s3 or errors.classify(exc) is None:
            raise
        raise describe_error(exc, loc) from exc


def read_bytes(loc: Location) -> bytes:
    """A whole object/file; a missing one is errors.NotFound (a FileNotFoundError)."""
    try:
        with _mapped_errors(loc), loc.fs.open_input_stream(loc.path) as stream:
            return stream.read()
    except errors.NotFound:
        raise
    except FileNotFoundError as exc:
        raise errors.NotFound(f"{loc.uri}: no such file or object") from exc


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object/file; readers never see a partial one."""
    with _mapped_errors(loc):
        if loc.is_s3:
            # An S3 PUT (or completed multipart upload) is atomic already.
            with loc.fs.open_output_stream(loc.path) as stream:
                stream.write(data)
        else:
            _write_local_atomic(loc.path, data)


def _write_local_atomic(path: str, data: bytes) -> None:
    """Temp file in the same directory, then os.replace: a crash leaves old or new, never half."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def read_text(loc: Location, encoding: str = "utf-8") -> str:
    return read_bytes(loc).decode(encoding)


def write_text(loc: Location, text: str, encoding: str = "utf-8") -> None:
    write_bytes(loc, text.encode(encoding))


def exists(loc: Location) -> bool:
    """True for an existing file/object or a directory/prefix with something in it."""
    with _mapped_errors(loc):
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_dir(loc: Location) -> list[str]:
    """Immediate child names, sorted; [] when nothing is there (a missing bucket too)."""
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    with _mapped_errors(loc):
        infos = loc.fs.get_file_info(selector)
    return sorted(info.base_name for info in infos)


def delete_tree(loc: Location) -> None:
    """Remove a file or a whole directory/prefix; missing is fine. Never deletes a bucket."""
    with _mapped_errors(loc):
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            return
        if info.type != pafs.FileType.Directory:
            loc.fs.delete_file(loc.path)
        elif loc.is_s3 and loc.path == loc.bucket:
            loc.fs.delete_dir_contents(loc.path, missing_dir_ok=True)
        else:
            loc.fs.delete_dir(loc.path)


# --- checking before compute -------------------------------------------------------------


def check_writable(loc: Location) -> None:
    """Fail now, with a clear message, if a run could not write its results to `loc`.

    The probe leaves nothing behind on S3, so a job refused later in pre-flight leaves no
    trace: pyarrow's delete_file would put an empty "prefix/" marker object in place of a
    parent it empties, so the probe is deleted with a plain S3 DeleteObject, and the
    prefixes that held nothing before are removed as well (servers with real directories,
    like SeaweedFS, keep them otherwise). A local directory is created, as a run needs it.
    """
    if loc.is_s3:
        _check_s3_writable(loc)
    else:
        _check_local_writable(loc)


def _check_s3_writable(loc: Location) -> None:
    if _bucket_exists(loc) is False:
        raise _missing_bucket(loc)
    probe = loc.join(f".tlctl-write-probe-{uuid.uuid4().hex}")
    try:
        new_prefixes = _empty_prefixes(loc)
        with loc.fs.open_output_stream(probe.path) as stream:
            stream.write(b"tlctl write probe\n")
    except OSError as exc:
        raise describe_error(exc, loc) from exc
    try:
        _delete_keys(probe, [probe.path.partition("/")[2], *new_prefixes])
    except Exception:  # botocore's own errors: fall back to pyarrow (which leaves a marker)
        try:
            loc.fs.delete_file(probe.path)
        except OSError as exc:
            raise describe_error(exc, loc) from exc


def _empty_prefixes(loc: Location) -> list[str]:
    """The "prefix/" keys of `loc` and its parents that hold nothing yet, deepest first."""
    bucket, _, key = loc.path.partition("/")
    parts = key.split("/") if key else []
    empty = []
    while parts and loc.fs.get_file_info("/".join([bucket, *parts])).type == pafs.FileType.NotFound:
        empty.append("/".join(parts) + "/")
        parts.pop()
    return empty


def _delete_keys(loc: Location, keys: list[str]) -> None:
    """S3 DeleteObject of `keys` in `loc`'s bucket, in order, through boto3 with the same
    endpoint, region, credential chain and bounded timeouts as pyarrow's filesystem. It
    never creates "directory" markers, and a "prefix/" key that still has objects under it
    keeps them (S3 deletes exactly one key)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=REQUEST_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"} if loc.endpoint else None,
    )
    client = boto3.session.Session().client(
        "s3", endpoint_url=loc.endpoint, region_name=_region(loc.endpoint), config=config
    )
    for key in keys:
        client.delete_object(Bucket=loc.bucket, Key=key)


def _bucket_exists(loc: Location) -> bool | None:
    """HeadBucket; None when it is refused (some policies allow writes but not HeadBucket)."""
    try:
        info = loc.fs.get_file_info(loc.bucket)
    except OSError as exc:
        if errors.classify(exc) is errors.AccessDenied:
            return None
        raise describe_error(exc, loc) from exc
    return info.type != pafs.FileType.NotFound


def _check_local_writable(loc: Location) -> None:
    try:
        os.makedirs(loc.path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=loc.path, prefix=".tlctl-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise describe_error(exc, loc) from exc


# --- error messages ----------------------------------------------------------------------


def describe_error(exc: Exception, loc: Location) -> TlctlError:
    """The typed error, with the message a user can act on, for a failure at `loc` (never
    with secrets)."""
    if isinstance(exc, TlctlError):
        return exc
    if not loc.is_s3:
        return _local_error(exc, loc)
    text = errors.scrub(str(exc))
    kind = errors.classify(exc)
    if kind is errors.NoSuchBucket:
        return _missing_bucket(loc)
    if kind is errors.AccessDenied:
        return errors.AccessDenied(
            f"storage: access denied for {loc.uri} at {_where(loc)}{_aws_code(text)} — check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if kind is errors.WrongRegion:
        return errors.WrongRegion(
            f"storage: bucket '{loc.bucket}' is in another region than the one configured — "
            "set AWS_REGION to the bucket's region"
        )
    if kind is errors.Unreachable:
        return _unreachable(loc, text)
    return (kind or errors.StorageError)(f"storage: {loc.uri}: {text}")


def _missing_bucket(loc: Location) -> errors.NoSuchBucket:
    flag = f" --endpoint-url {loc.endpoint}" if loc.endpoint else ""
    return errors.NoSuchBucket(
        f"storage.uri: bucket '{loc.bucket}' does not exist at {_where(loc)} "
        f"(create it first, e.g. `aws{flag} s3 mb s3://{loc.bucket}`)"
    )


def _unreachable(loc: Location, text: str) -> errors.Unreachable:
    detail = re.search(r"curlCode: \d+, ([^;]+)", text)
    reason = detail.group(1).strip() if detail else text
    if loc.endpoint:
        return errors.Unreachable(f"storage.endpoint: cannot reach {loc.endpoint} ({reason})")
    return errors.Unreachable(f"storage: cannot reach AWS S3 for {loc.uri} ({reason})")


def _where(loc: Location) -> str:
    return loc.endpoint or "AWS S3"


def _aws_code(text: str) -> str:
    match = re.search(r"AWS Error ([A-Z_]+)", text)
    return f" ({match.group(1)})" if match else ""


def _local_error(exc: Exception, loc: Location) -> TlctlError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        reason = "a file is in the way; it must be a directory"
    return errors.StorageError(f"storage.uri: cannot write to {loc.path} ({reason})")
