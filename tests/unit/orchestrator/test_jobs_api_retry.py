"""A Ray head that has just started: its Jobs API refuses connections, answers 5xx or "No
available agent to submit job" for a while. `connect` and `submit` wait that out for
--connect-timeout with one line on stderr, then fail with the cause (exit 1).

Against a real HTTP server on loopback (http.server in a thread) answering as Ray's
dashboard does, through Ray's own JobSubmissionClient: no mock of the client library.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from jobs.errors import TlctlError
from orchestrator.targets.jobs_api import connect, submit, transient_reason

NO_AGENT = "No available agent to submit job, please try again later."


class FakeHead:
    """Answers like Ray's dashboard: /api/version, GET and POST /api/jobs/. The first
    `jobs_failures` GETs and `submit_failures` POSTs get the given error answers."""

    def __init__(self, *, jobs_failures=(), submit_failures=()) -> None:
        self.jobs_failures = list(jobs_failures)
        self.submit_failures = list(submit_failures)
        self.submits = 0
        head = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, body: object) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/api/version"):
                    return self._answer(
                        200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}
                    )
                if self.path.startswith("/api/jobs/"):
                    if head.jobs_failures:
                        return self._answer(*head.jobs_failures.pop(0))
                    return self._answer(200, [])
                self._answer(404, "not found")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/api/jobs/"):
                    head.submits += 1
                    if head.submit_failures:
                        return self._answer(*head.submit_failures.pop(0))
                    return self._answer(200, {"submission_id": "tlctl-r-1", "job_id": None})
                self._answer(404, "not found")

        self.handler = Handler

    def serve(self, port: int = 0) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture
def no_ray_env(monkeypatch) -> None:
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/tlctl-test-token")


@pytest.fixture
def head_factory(no_ray_env) -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def make(head: FakeHead, port: int = 0) -> str:
        server = head.serve(port)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_transient_answers_are_told_from_real_errors(head_factory) -> None:
    head = FakeHead(jobs_failures=[(502, "bad gateway"), (400, "bad request")])
    url = head_factory(head)
    bad_gateway = requests.get(f"{url}/api/jobs/")
    with pytest.raises(requests.HTTPError) as http_502:
        bad_gateway.raise_for_status()
    assert "HTTP 502" in transient_reason(http_502.value)
    with pytest.raises(requests.HTTPError) as http_400:
        requests.get(f"{url}/api/jobs/").raise_for_status()
    assert transient_reason(http_400.value) is None

    no_agent = RuntimeError(f"Request failed with status code 500: {NO_AGENT}.")
    assert "No available agent" in transient_reason(no_agent)
    assert transient_reason(RuntimeError("Request failed with status code 500: boom.")) is None
    assert "HTTP 503" in transient_reason(RuntimeError("Request failed with status code 503: x"))
    with pytest.raises(requests.ConnectionError) as refused:
        requests.get(f"http://127.0.0.1:{free_port()}/api/version", timeout=2)
    assert "connection refused" in transient_reason(refused.value)
    assert transient_reason(ValueError("Connection refused")) is None


def test_submit_waits_out_no_available_agent_with_one_line(head_factory, capsys) -> None:
    head = FakeHead(
        jobs_failures=[(503, "starting")],
        submit_failures=[(500, NO_AGENT), (500, NO_AGENT)],
    )
    cluster = connect(head_factory(head), connect_timeout_s=30)
    job_id = submit(cluster, entrypoint="echo hi", submission_id="tlctl-r-1")
    assert job_id == "tlctl-r-1" and head.submits == 3
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    waits = [ln for ln in lines if ln.startswith("tlctl: waiting for the Ray cluster")]
    assert len(waits) == 2, lines  # one for connect (503), one for submit (no agent)
    assert "No available agent" in waits[1] and "--connect-timeout" in waits[1]


def test_a_head_that_never_gets_ready_fails_with_the_cause(head_factory) -> None:
    head = FakeHead(submit_failures=[(500, NO_AGENT)] * 100)
    cluster = connect(head_factory(head), connect_timeout_s=1.5)
    start = time.monotonic()
    with pytest.raises(TlctlError) as failed:
        submit(cluster, entrypoint="echo hi", submission_id="tlctl-r-1")
    assert 1.4 < time.monotonic() - start < 10
    assert failed.value.exit_code == 1
    assert "not ready to take a job after 2 s" in str(failed.value)
    assert NO_AGENT in str(failed.value)
    assert head.submits >= 2


def test_a_dashboard_that_starts_listening_late_is_waited_for(head_factory) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timer = threading.Timer(1.5, lambda: head_factory(FakeHead(), port))
    timer.start()
    try:
        cluster = connect(url, connect_timeout_s=20)
    finally:
        timer.join()
    assert cluster.address == url


def test_nothing_listening_is_still_cannot_reach(no_ray_env) -> None:
    with pytest.raises(TlctlError) as unreachable:
        connect(f"http://127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    assert unreachable.value.exit_code == 2
    assert "cannot reach the Ray cluster" in str(unreachable.value)
    # No retry without a timeout (`tlctl jobs` commands): at once.
    start = time.monotonic()
    with pytest.raises(TlctlError):
        connect(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5
