"""Storage failures as types, decided once where pyarrow's errors come in.

pyarrow reports every S3 failure as an OSError whose only information is its text, so
`classify` reads that text here and nowhere else; everything above it tests the type:
retries wait out the transient kinds, the CLI prints the message. Texts are those seen from
pyarrow 26 against SeaweedFS 4.48 (tests/unit/storage/test_location.py), plus AWS's
CamelCase codes for the same conditions.
"""

from __future__ import annotations

import re
from typing import ClassVar

from jobs.errors import TlctlError
from jobs.redact import redact


class StorageError(TlctlError):
    """A storage failure; `transient` kinds are worth waiting out (retry.retrying)."""

    transient: ClassVar[bool] = False


class Unreachable(StorageError):
    """Connection refused, DNS, timeouts: the server is down, restarting or too slow."""

    transient = True


class ServerError(StorageError):
    """The server answered but failed (5xx, SlowDown, a reset connection)."""

    transient = True


class IncompleteUpload(StorageError):
    """An upload that reported success but is not in storage whole (checked after each
    one: pyarrow can lose a failed multipart part, see retrying_fs.put_checked)."""

    transient = True


class AccessDenied(StorageError):
    """Credentials missing, wrong or not allowed."""


class NoSuchBucket(StorageError):
    """The bucket does not exist at that endpoint."""


class WrongRegion(StorageError):
    """The bucket lives in another region than the one configured."""


class NotFound(StorageError, FileNotFoundError):
    """No object or directory there (also a FileNotFoundError, as pyarrow raises it)."""


_KINDS: tuple[tuple[type[StorageError], re.Pattern[str]], ...] = (
    (NoSuchBucket, re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|specified bucket does not exist")),
    (
        AccessDenied,
        re.compile(
            r"ACCESS_DENIED|AccessDenied|Access Denied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId"
            r"|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|HTTP status 403|EXPIRED_TOKEN"
            r"|ExpiredToken|InvalidToken|No AWS credentials"
        ),
    ),
    (WrongRegion, re.compile(r"configured region is|HTTP status 301|PermanentRedirect")),
    (
        Unreachable,
        re.compile(
            r"NETWORK_CONNECTION|curlCode|Connection refused|Could not connect|Couldn't connect"
            r"|Timeout was reached|timed out|Could not resolve|Couldn't resolve",
            re.IGNORECASE,
        ),
    ),
    (
        ServerError,
        re.compile(
            r"Connection reset|Broken pipe|SlowDown|SLOW_DOWN|ServiceUnavailable|InternalError"
            r"|INTERNAL_FAILURE|Service Unavailable|HTTP (?:response code|status):? 5\d\d"
            r"|status code 5\d\d|RequestTimeout",
            re.IGNORECASE,
        ),
    ),
)


def classify(exc: BaseException) -> type[StorageError] | None:
    """The kind of a storage failure; None for anything that is not one (a bug, a missing
    object, which callers handle as FileNotFoundError)."""
    if isinstance(exc, StorageError):
        return type(exc)
    if not isinstance(exc, OSError) or isinstance(exc, FileNotFoundError):
        return None
    text = str(exc)
    for kind, pattern in _KINDS:
        if pattern.search(text):
            return kind
    return None


def is_transient(exc: BaseException) -> bool:
    """A storage failure worth waiting out (the server is unreachable, slow or failing)."""
    kind = classify(exc)
    return kind is not None and kind.transient


def as_storage_error(exc: BaseException) -> StorageError | None:
    """`exc` as its typed storage error (its text scrubbed), or None when it is none."""
    if isinstance(exc, StorageError):
        return exc
    kind = classify(exc)
    return None if kind is None else kind(scrub(str(exc)))


def scrub(text: str) -> str:
    """Remove secrets from a backend's message in case it ever echoes them."""
    return redact(text)
