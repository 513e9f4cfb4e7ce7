"""tlctl jobs on a Ray cluster, through the Ray Jobs API (`JobSubmissionClient`).

Every failure of the API a user can act on (cluster unreachable, token missing or wrong,
unknown job id) becomes one TlctlError line with exit code 2 instead of a traceback. Token
auth follows Ray 2.60: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`; as
`ray start` does, a token that is available turns token mode on when RAY_AUTH_MODE is unset.
The token itself is never printed. A connection is a `Cluster`: the client and the address
it was made for (for messages).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

from jobs.driver.settings import enable_token_auth, token_source
from jobs.errors import TlctlError

META_KEY = "tlctl"  # metadata marking a job as tlctl's (value: tlctl's version)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_PORT = 8265


def cluster_address(address: str | None) -> str:
    """The dashboard URL from --address / RAY_ADDRESS: `host[:port]` → `http://host:port`."""
    if not address or not address.strip():
        raise TlctlError(
            "no Ray cluster given: pass --address http://HEAD:8265 (or set RAY_ADDRESS); "
            "`tlctl submit --local` runs on this machine instead"
        )
    text = address.strip().rstrip("/")
    if text.startswith("ray://"):
        raise TlctlError(
            f"--address: '{text}' is a Ray Client address; tlctl uses the Jobs API on the "
            "dashboard port (valid: http://HEAD:8265)"
        )
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TlctlError(
            f"--address: '{address}' is not http(s)://host[:port] (e.g. http://HEAD:8265)"
        )
    if parts.port is None:
        text = f"{parts.scheme}://{parts.hostname}:{DEFAULT_PORT}{parts.path}"
    return text


def is_loopback(address: str) -> bool:
    host = urlsplit(address).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Cluster:
    """A connection to a cluster's Jobs API."""

    client: Any  # ray.job_submission.JobSubmissionClient
    address: str


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


def connect(address: str | None) -> Cluster:
    """A connection to the cluster's Jobs API, checked to answer."""
    url = cluster_address(address)
    enable_token_auth()
    # Ray prefers these variables over the address it is given; --address must win.
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ["RAY_ADDRESS"] = url
    from ray.job_submission import JobSubmissionClient

    with api_errors(url):
        client = JobSubmissionClient(url)
        client.list_jobs()  # the version check is unauthenticated: this one is not
    return Cluster(client, url)


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
