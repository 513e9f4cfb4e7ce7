"""tlctl jobs on a Ray cluster, through the Ray Jobs API (`JobSubmissionClient`).

Every failure of the API a user can act on (cluster unreachable, token missing or wrong,
unknown job id) becomes one TlctlError line with exit code 2 instead of a traceback. Token
auth follows Ray 2.60: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`; as
`ray start` does, a token that is available turns token mode on when RAY_AUTH_MODE is unset.
The token itself is never printed. A connection is a `Cluster`: the client and the address
it was made for (for messages).

A head that has just started answers before it can take jobs: "No available agent to submit
job, please try again later" (HTTP 500), 502/503/504 from the dashboard or a proxy in front of
it, or a refused connection while the dashboard binds its port. `connect` and `submit` wait
those out (`transient_reason`) with backoff for `connect_timeout_s` (`tlctl submit
--connect-timeout`, default 60 s), saying once on stderr what they wait for. A cluster that
answered but never became ready is a failed submit (exit 1, with its last answer); one that
was never reached stays "cannot reach" (exit 2: most likely a wrong address).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from jobs.driver.settings import enable_token_auth, token_source
from jobs.errors import EXIT_FAILED, TlctlError

META_KEY = "tlctl"  # metadata marking a job as tlctl's (value: tlctl's version)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_PORT = 8265
T = TypeVar("T")
DEFAULT_CONNECT_TIMEOUT_S = 60.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 5.0
NO_AGENT = "No available agent to submit job"
TRANSIENT_STATUS = (502, 503, 504)


def cluster_address(address: str | None, field: str = "--address") -> str:
    """The dashboard URL from --address / RAY_ADDRESS: `host[:port]` → `http://host:port`.

    Checked by the rule every endpoint follows (jobs.storage.location.http_url): no
    credentials in it (they would be printed back), a port in 1..65535.
    """
    from jobs.redact import clip
    from jobs.storage.location import http_url

    if not address or not address.strip():
        raise TlctlError(
            "no Ray cluster given: pass --address http://HEAD:8265 (or set RAY_ADDRESS); "
            "`tlctl submit --local` runs on this machine instead"
        )
    text = address.strip().rstrip("/")
    if text.lower().startswith("ray://"):
        raise TlctlError(
            f"{field}: {clip(text)} is a Ray Client address; tlctl uses the Jobs API on the "
            "dashboard port (valid: http://HEAD:8265)"
        )
    if "://" not in text:
        text = "http://" + text
    if text.partition("://")[0].lower() not in ("http", "https"):
        raise TlctlError(
            f"{field}: {clip(text)} is not http(s)://host[:port] (e.g. http://HEAD:8265)"
        )
    parts = http_url(text, field, example="http://HEAD:8265", path_ok=True)
    scheme = parts.scheme.lower()
    if parts.port is None:
        text = f"{scheme}://{parts.netloc}:{DEFAULT_PORT}{parts.path}"
    return text


def plain_http_warning(address: str) -> str | None:
    """The warning for a cluster reached over plain HTTP off this machine, or None: the Ray
    auth token (and, with --pass-credentials, the AWS key pair) would travel unencrypted."""
    if urlsplit(address).scheme.lower() != "http" or is_loopback(address):
        return None
    return (
        f"warning: {address} is plain http://: the Ray auth token (and the AWS keys with "
        "--pass-credentials) travel unencrypted; use https:// (a TLS proxy) or an SSH tunnel"
    )


_WARNED: set[str] = set()


def warn_plain_http(address: str) -> None:
    """`plain_http_warning` on stderr, once per address and process."""
    warning = plain_http_warning(address)
    if warning and address not in _WARNED:
        _WARNED.add(address)
        print(warning, file=sys.stderr, flush=True)


def is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Cluster:
    """A connection to a cluster's Jobs API."""

    client: Any  # ray.job_submission.JobSubmissionClient
    address: str
    connect_timeout_s: float = 0.0  # how long `submit` waits out a head that is starting


@contextmanager
def api_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Jobs API failures → one actionable TlctlError (exit 2)."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except TlctlError:
        raise
    except AuthenticationError as exc:
        source = token_source()
        if "Authentication required" in str(exc) or source is None:
            raise TlctlError(
                f"the Ray cluster at {address} requires an auth token and tlctl sent none: set "
                "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token), to the "
                "cluster's token (`ray get-auth-token` on the head node)"
            ) from exc
        raise TlctlError(
            f"the Ray cluster at {address} rejected the auth token from {source}: it is not "
            "this cluster's token (`ray get-auth-token` on the head node prints the right one)"
        ) from exc
    except (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
    ) as exc:
        raise TlctlError(
            f"cannot reach the Ray cluster at {address} ({type(exc).__name__}): is it running "
            "(`tlctl cluster status` for a local one), and is that its dashboard address "
            "(http://HEAD:8265)?"
        ) from exc
    except RuntimeError as exc:
        text = str(exc)
        if job_id and ("does not exist" in text or "404" in text):
            raise TlctlError(
                f"unknown job id '{job_id}' on {address} (`tlctl jobs list` shows its jobs)"
            ) from exc
        raise TlctlError(f"Ray Jobs API at {address}: {text.strip()}") from exc


def transient_reason(exc: BaseException) -> str | None:
    """What a failed Jobs API call waits for when the head is still starting, or None when
    the failure is not one that time fixes."""
    import requests

    text = str(exc)
    if NO_AGENT in text:
        return 'its job agent to start ("No available agent to submit job")'
    status = None
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
    elif isinstance(exc, RuntimeError) and text.startswith("Request failed with status code"):
        digits = text[len("Request failed with status code") :].strip()[:3]
        status = int(digits) if digits.isdigit() else None
    if status in TRANSIENT_STATUS:
        return f"its dashboard to answer (HTTP {status})"
    if isinstance(exc, (ConnectionError, requests.exceptions.ConnectionError)) and _refused(exc):
        return "its dashboard to accept connections (connection refused)"
    return None


def _refused(exc: BaseException) -> bool:
    """A refused connection, seen through the SDK's re-raise (DNS failures and timeouts are
    not: waiting does not fix a wrong host)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or re.search(
            r"Connection refused|Errno 111|ECONNREFUSED", str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def with_retries(
    call: Callable[[], T],
    *,
    address: str,
    timeout_s: float,
    what: str,
    say: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call()`, retried with backoff while its failure is `transient_reason` and
    `timeout_s` has not passed; one line through `say` (stderr) when the waiting starts.

    After the timeout: exit 1 with the last answer, or (never reached at all) the call's
    own error, which `api_errors` turns into "cannot reach" (exit 2).
    """
    deadline = clock() + timeout_s
    attempt = 0
    answered = False  # the head answered at least once: it exists, it is not ready
    while True:
        try:
            return call()
        except Exception as exc:
            reason = transient_reason(exc)
            if reason is None:
                raise
            answered = answered or "connection refused" not in reason
            left = deadline - clock()
            if left <= 0:
                if not answered:
                    raise
                raise TlctlError(
                    f"the Ray cluster at {address} was not ready to {what} after "
                    f"{timeout_s:.0f} s (--connect-timeout): still waiting for {reason}; "
                    f"last answer: {_one_line(exc)}",
                    exit_code=EXIT_FAILED,
                ) from exc
            if attempt == 0:
                (say or _stderr)(
                    f"tlctl: waiting for the Ray cluster at {address}: {reason} "
                    f"(up to {timeout_s:.0f} s, --connect-timeout)"
                )
            sleep(
                min(left, random.uniform(0.5, 1.0) * min(MAX_DELAY_S, FIRST_DELAY_S * 2**attempt))
            )
            attempt += 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def connect(address: str | None, *, connect_timeout_s: float = 0.0) -> Cluster:
    """A connection to the cluster's Jobs API, checked to answer; a head still starting is
    waited for up to `connect_timeout_s` (0: not at all)."""
    url = cluster_address(address)
    warn_plain_http(url)
    enable_token_auth()
    # Ray prefers these variables over the address it is given; --address must win.
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ["RAY_ADDRESS"] = url
    from ray.job_submission import JobSubmissionClient

    def attempt() -> Any:
        client = JobSubmissionClient(url)
        client.list_jobs()  # the version check is unauthenticated: this one is not
        return client

    with api_errors(url):
        client = with_retries(
            attempt, address=url, timeout_s=connect_timeout_s, what="list its jobs"
        )
    return Cluster(client, url, connect_timeout_s)


def submit(cluster: Cluster, **job: Any) -> str:
    """`JobSubmissionClient.submit_job(**job)`, waiting out a head whose job agent is not up
    yet (for the cluster's `connect_timeout_s`). Call inside `api_errors`."""
    return with_retries(
        lambda: cluster.client.submit_job(**job),
        address=cluster.address,
        timeout_s=cluster.connect_timeout_s,
        what="take a job",
    )


def is_tlctl(job) -> bool:
    return bool((job.metadata or {}).get(META_KEY))


def tlctl_jobs(cluster: Cluster, run: str | None = None) -> list:
    """tlctl's jobs on the cluster (of one run), oldest first."""
    with api_errors(cluster.address):
        jobs = [j for j in cluster.client.list_jobs() if j.submission_id and is_tlctl(j)]
    if run is not None:
        jobs = [j for j in jobs if (j.metadata or {}).get("run") == run]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def get_job(cluster: Cluster, job_id: str):
    with api_errors(cluster.address, job_id):
        return cluster.client.get_job_info(job_id)


def job_row(job) -> dict[str, Any]:
    """What `jobs list/status` show for a job (times in seconds since the epoch)."""
    meta = job.metadata or {}
    start = job.start_time / 1000 if job.start_time else None
    end = job.end_time / 1000 if job.end_time else None
    duration = ((end or time.time()) - start) if start else None
    return {
        "id": job.submission_id,
        "run": meta.get("run"),
        "kind": meta.get("kind"),
        "status": str(job.status.value if hasattr(job.status, "value") else job.status),
        "start": start,
        "end": end,
        "duration_s": duration,
        "message": job.message,
        "exit_code": getattr(job, "driver_exit_code", None),
        "run_uri": meta.get("run_uri"),
        "storage_endpoint": meta.get("storage_endpoint") or None,
        "tlctl": meta.get(META_KEY),
    }


def job_logs(cluster: Cluster, job_id: str) -> str:
    with api_errors(cluster.address, job_id):
        return cluster.client.get_job_logs(job_id)


def follow_logs(cluster: Cluster, job_id: str, out: TextIO) -> None:
    """Print the job's logs as they come until the job ends."""
    get_job(cluster, job_id)  # unknown id → clear error before streaming

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with api_errors(cluster.address, job_id):
        asyncio.run(tail())


def stop_job(cluster: Cluster, job_id: str, *, wait_s: float = 60.0) -> str:
    """Ask the job to stop and wait until it has; returns its final status."""
    status = job_row(get_job(cluster, job_id))["status"]
    if status in TERMINAL:
        return status
    with api_errors(cluster.address, job_id):
        cluster.client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = str(cluster.client.get_job_status(job_id).value)
            if status in TERMINAL:
                return status
            time.sleep(0.5)
    return status
