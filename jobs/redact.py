"""Secrets out of any text tlctl prints, logs, stores or puts in job metadata: one function.

A secret reaches a message in two ways: a user writes credentials into a URL
(`s3://KEY:SECRET@bucket`, `user:pass@host:9000`), or a library echoes a value it was given
(an AWS key, the Ray auth token). `redact` removes both kinds from any text; `redact_data`
does the same to every string in a JSON-like value (a spec dict, job metadata). `clip`
bounds what an error message echoes of a user's value, so a small input cannot print a
huge one.
"""

from __future__ import annotations

import os
import re
import reprlib
from pathlib import Path
from typing import Any

MASK = "***"
# Environment variables whose values are secrets (an access key id too: it names the account).
SECRET_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "RAY_AUTH_TOKEN",
)
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"  # Ray reads its token from this file (else the default)
MIN_SECRET_LEN = 8  # shorter values are too likely to occur in ordinary text
CLIP_CHARS = 80

_REPR = reprlib.Repr()  # bounded: a value that is huge (an alias bomb) is never walked whole
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = CLIP_CHARS, 40, 40
# `scheme://userinfo@` (up to the netloc's last '@', as urlsplit reads it).
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#]*@")
# `user:pass@host` without a scheme: a token with a ':' right before an '@' and a host.
_BARE_USERINFO = re.compile(r"(?<![\w.:@%+-])[^\s/:'\"()<>]+:[^\s/'\"()<>]*@(?=[\w\[])")


def secret_values() -> list[str]:
    """The secret values this process knows of, longest first (so none is left half-masked)."""
    values = {os.environ.get(name, "") for name in SECRET_VARS}
    values.add(_token_file_value())
    return sorted((v for v in values if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def _token_file_value() -> str:
    """The Ray auth token in its file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), if any."""
    path = os.environ.get(TOKEN_PATH_VAR) or str(Path.home() / ".ray" / "auth_token")
    try:
        with open(path, "rb") as handle:
            return handle.read(4096).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def redact(text: str) -> str:
    """`text` with URL credentials (`scheme://***@host`, `***@host`) and known secret
    values replaced by ***."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _BARE_USERINFO.sub(f"{MASK}@", text)
    for secret in secret_values():
        text = text.replace(secret, MASK)
    return text


def redact_data(value: Any) -> Any:
    """`value` (dicts, lists, strings, numbers) with `redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value


def clip(value: Any, limit: int = CLIP_CHARS) -> str:
    """A user's value for an error message: its repr, redacted, at most `limit` chars."""
    text = redact(_REPR.repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_text(text: str, limit: int = CLIP_CHARS) -> str:
    """A user's string for an error message as is (no quotes), redacted and bounded."""
    text = redact(str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"
