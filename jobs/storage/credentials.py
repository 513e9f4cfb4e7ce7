"""S3 credentials shipped with one cluster job (`tlctl submit --pass-credentials`).

For dev clusters whose nodes have no S3 credentials of their own, the client writes its key
pair into an AWS shared-credentials file inside the job's working_dir package and sets
`AWS_SHARED_CREDENTIALS_FILE` to that file's *name* in the job's runtime_env. Every process
of the job starts in the working dir (Ray's rule), so the AWS SDKs (pyarrow's and boto3's)
find the file with no code on the path; the values never appear in the job's entrypoint,
metadata, runtime_env or logs. A process that changed directory (Tune trials may) gets the
absolute path from `adopt_shipped_credentials`, which looks in the working dir Ray put first
on PYTHONPATH.
"""

from __future__ import annotations

import os

CREDENTIALS_FILE = "tlctl-aws-credentials"
ENV_VAR = "AWS_SHARED_CREDENTIALS_FILE"


def credentials_text(access_key: str, secret_key: str, session_token: str | None) -> str:
    """An AWS shared-credentials file with one `default` profile."""
    lines = [
        "[default]",
        f"aws_access_key_id = {access_key}",
        f"aws_secret_access_key = {secret_key}",
    ]
    if session_token:
        lines.append(f"aws_session_token = {session_token}")
    return "\n".join(lines) + "\n"


def adopt_shipped_credentials() -> str | None:
    """Make a shipped (relative) credentials path absolute in this process; returns it."""
    path = os.environ.get(ENV_VAR)
    if not path or os.path.isabs(path) or os.path.basename(path) != CREDENTIALS_FILE:
        return None
    search = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    try:
        search.insert(0, os.getcwd())
    except FileNotFoundError:  # the working dir was re-extracted under this process
        pass
    for directory in search:
        candidate = os.path.join(directory, path) if directory else ""
        if candidate and os.path.isfile(candidate):
            os.environ[ENV_VAR] = os.path.abspath(candidate)
            return os.environ[ENV_VAR]
    return None


def load_into_environment() -> bool:
    """The job's driver: hold the shipped keys in its own environment (process memory).

    The driver reads them once at start, so a working dir that Ray re-extracts or cleans up
    while the job runs cannot take its credentials away. Returns True if keys were loaded.
    """
    import configparser

    path = adopt_shipped_credentials()
    if path is None:
        return False
    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_section("default"):
        return False
    section = parser["default"]
    os.environ["AWS_ACCESS_KEY_ID"] = section.get("aws_access_key_id", "")
    os.environ["AWS_SECRET_ACCESS_KEY"] = section.get("aws_secret_access_key", "")
    if section.get("aws_session_token"):
        os.environ["AWS_SESSION_TOKEN"] = section["aws_session_token"]
    return True
