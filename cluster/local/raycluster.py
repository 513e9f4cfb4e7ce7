"""A real multi-node Ray cluster on this machine: `tlctl cluster up --local --nodes N`.

One `ray start --head` plus N-1 `ray start --address` worker nodes, each with its own
ports, CPUs and a `tlctl-node-<i>` resource, token auth on (a fresh token in a 0600 file of
the cluster directory), and optionally the local SeaweedFS S3 server beside it. Each node
is a `ray start --block` process in its own session, recorded by pid in the state file, so
`down` ends exactly what `up` started (never other users' Ray: no `ray stop`).

Clients reach it with the variables `env` prints (RAY_ADDRESS, RAY_AUTH_MODE,
RAY_AUTH_TOKEN_PATH, and the S3 server's AWS_* when it runs one).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.local.s3server import (
    HOST,
    _pid_alive,
    _port_free,
    log_tail,
    read_state,
    start_s3_server,
    state_path,
    write_state,
)
from jobs.errors import TlctlError

DEFAULT_DIR = ".tlctl/cluster"
STATE_FILE = "raycluster.json"
TOKEN_FILE = "auth_token"
S3_SUBDIR = "s3"
S3_BUCKET = "tlctl"
DEFAULT_DASHBOARD_PORT = 8265
STOP_GRACE_S = 5.0  # a clean `ray start --block` exit takes ~10 s; a dev cluster needs none


@dataclass
class RayNode:
    """One `ray start --block` process (a head or a worker node) and its log file."""

    index: int
    pid: int
    log: str
    cpus: float
    head: bool = False


@dataclass
class LocalRayCluster:
    """A started (or recorded) local cluster; the token stays in its 0600 file."""

    directory: str
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_path: str
    nodes: list[RayNode] = field(default_factory=list)
    s3_dir: str | None = None
    started_at: float = 0.0

    def env(self) -> dict[str, str]:
        """What a client (tlctl, `ray job`, JobSubmissionClient) needs to reach the cluster."""
        out = {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }
        if self.s3_dir:
            server = read_state(state_path(Path(self.s3_dir)))
            out.update(server.env())
            out["AWS_ENDPOINT_URL"] = server.endpoint
        return out

    def alive_nodes(self) -> list[RayNode]:
        return [n for n in self.nodes if _pid_alive(n.pid)]

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM every node's process group (workers first), then SIGKILL what remains."""
        for node in sorted(self.nodes, key=lambda n: n.head):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.alive_nodes() or self._leftovers()):
            time.sleep(0.2)
        for node in self.nodes:
            _signal_group(node.pid, signal.SIGKILL)
        for pid in self._leftovers():  # processes that left the node's process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.s3_dir:
            path = state_path(Path(self.s3_dir))
            if path.exists():
                read_state(path).stop()
                path.unlink(missing_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        """Pids of Ray processes still using this cluster's temp dir."""
        return _pids_with(self.temp_dir)


# --- processes -----------------------------------------------------------------------------


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_with(text: str) -> list[int]:
    """Pids whose command line mentions `text` (Linux /proc; empty elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _free_port(exclude: set[int]) -> int:
    import random

    for _ in range(500):
        port = random.randrange(20000, 40000)
        if port not in exclude and _port_free(port):
            exclude.add(port)
            return port
    raise TlctlError(f"no free port found on {HOST}")


def _ray_binary() -> str:
    """The `ray` script of this Python (a venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise TlctlError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def write_token_file(path: Path, token: str) -> None:
    """A fresh token file only this user can read: a new file (O_EXCL), mode 0600, never
    written through a symlink or into a file someone else put there. A stale one of a
    stopped cluster is removed first (unlink removes a symlink itself, not its target)."""
    path.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise TlctlError(
            f"{path}: appeared while tlctl was creating the cluster's token file; refusing to "
            "write the token into a file it did not create (check who else writes there)"
        ) from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode())
    finally:
        os.close(fd)


def _node_env(
    token_path: Path, extra: dict[str, str] | None, *, clean_aws: bool = False
) -> dict[str, str]:
    """Token auth for the node; this Python's bin dir first on PATH (job entrypoints run
    `python`); no inherited Ray address or token values that would point elsewhere."""
    drop = ("RAY_", "AWS_") if clean_aws else ("RAY_",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra or {})
    return env


def _temp_dir(directory: Path) -> str:
    """A short temp dir per cluster (Ray's Unix socket paths must stay under ~100 chars)."""
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:8]
    return f"/tmp/tlctl-ray-{digest}"


# --- up / down / status --------------------------------------------------------------------


def start_cluster(
    directory: str | Path = DEFAULT_DIR,
    *,
    nodes: int = 2,
    cpus_per_node: float = 2,
    object_store_mb: int = 1024,
    dashboard_port: int | None = None,
    with_s3: bool = True,
    node_env: dict[str, str] | None = None,
    clean_aws: bool = False,
    timeout: float = 120.0,
) -> LocalRayCluster:
    """Start the head, then the worker nodes; return once all N nodes are alive.

    Nodes inherit this process's environment, as with `ray start`. `with_s3` also starts
    the local S3 server and gives the nodes its credentials (as a cloud node's IAM role
    would); `clean_aws` drops inherited AWS_* variables, so that jobs must bring their own
    (`--pass-credentials`).
    """
    if nodes < 1:
        raise TlctlError(f"--nodes: {nodes} (valid: 1 or more)")
    directory = Path(directory).resolve()
    recorded = read_cluster(directory)
    if recorded is not None and recorded.alive_nodes():
        raise TlctlError(
            f"a local cluster is already running from {directory} at {recorded.dashboard_url}"
            " (`tlctl cluster down` first)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    token_path = directory / TOKEN_FILE
    write_token_file(token_path, secrets.token_hex(32))
    temp_dir = _temp_dir(directory)
    shutil.rmtree(temp_dir, ignore_errors=True)
    taken: set[int] = set()
    gcs_port = _free_port(taken)
    if dashboard_port is None:
        dashboard_port = (
            DEFAULT_DASHBOARD_PORT if _port_free(DEFAULT_DASHBOARD_PORT) else _free_port(taken)
        )
    elif not _port_free(dashboard_port):
        raise TlctlError(f"--dashboard-port: {dashboard_port} is already in use on {HOST}")
    cluster = LocalRayCluster(
        directory=str(directory),
        gcs_address=f"{HOST}:{gcs_port}",
        dashboard_url=f"http://{HOST}:{dashboard_port}",
        temp_dir=temp_dir,
        token_path=str(token_path),
        started_at=time.time(),
    )
    extra = dict(node_env or {})
    try:
        if with_s3:
            s3_dir = directory / S3_SUBDIR
            server = start_s3_server(s3_dir)
            write_state(state_path(s3_dir), server)
            server.create_bucket(S3_BUCKET)
            cluster.s3_dir = str(s3_dir)
            extra.update(server.env())
            extra["AWS_ENDPOINT_URL"] = server.endpoint
        env = _node_env(token_path, extra, clean_aws=clean_aws)
        common = [
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={HOST}",
            f"--num-cpus={cpus_per_node:g}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
        ]
        for index in range(nodes):
            head = index == 0
            args = [_ray_binary(), "start", *common]
            args.append(f"--resources={json.dumps({f'tlctl-node-{index}': 1})}")
            args.append(f"--dashboard-agent-listen-port={_free_port(taken)}")
            args.append(f"--ray-client-server-port={_free_port(taken)}" if head else "")
            if head:
                args += [
                    "--head",
                    f"--port={gcs_port}",
                    f"--temp-dir={temp_dir}",
                    "--include-dashboard=true",
                    f"--dashboard-host={HOST}",
                    f"--dashboard-port={dashboard_port}",
                ]
            else:
                args.append(f"--address={cluster.gcs_address}")
            log = directory / f"node-{index}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [a for a in args if a],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=directory,
                    start_new_session=True,
                )
            cluster.nodes.append(RayNode(index, proc.pid, str(log), cpus_per_node, head))
            write_cluster(cluster)
            _wait_nodes(cluster, index + 1, timeout)
    except BaseException:
        cluster.stop(grace=5.0)
        raise
    return cluster


def _wait_nodes(cluster: LocalRayCluster, count: int, timeout: float) -> None:
    """Poll the dashboard until `count` nodes are alive; fail with the node's log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if not _pid_alive(node.pid):
                raise TlctlError(
                    f"ray node {node.index} exited while starting; its log {node.log}:\n"
                    + log_tail(Path(node.log), 15)
                )
        if alive_node_count(cluster) >= count:
            return
        time.sleep(0.5)
    raise TlctlError(
        f"the local Ray cluster did not reach {count} node(s) in {timeout:.0f} s; logs in "
        f"{cluster.directory}"
    )


def alive_node_count(cluster: LocalRayCluster) -> int:
    """Alive nodes as the dashboard sees them (0 while it does not answer yet)."""
    token = Path(cluster.token_path).read_text().strip()
    request = urllib.request.Request(
        cluster.dashboard_url + "/nodes?view=summary",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return 0
    summary = ((body.get("data") or {}).get("summary")) or []
    return sum(1 for n in summary if (n.get("raylet") or {}).get("state") == "ALIVE")


def write_cluster(cluster: LocalRayCluster) -> None:
    path = Path(cluster.directory) / STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(cluster), indent=2) + "\n")
    os.replace(tmp, path)


def read_cluster(directory: str | Path = DEFAULT_DIR) -> LocalRayCluster | None:
    """The cluster recorded in `directory`, or None."""
    path = Path(directory).resolve() / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TlctlError(f"cannot read the local cluster state {path}: {exc}") from None
    nodes = [RayNode(**n) for n in state.pop("nodes", [])]
    return LocalRayCluster(**state, nodes=nodes)


def stop_cluster(directory: str | Path = DEFAULT_DIR) -> LocalRayCluster | None:
    """Stop the recorded cluster (and its S3 server); returns what was stopped."""
    cluster = read_cluster(directory)
    if cluster is None:
        return None
    cluster.stop()
    (Path(cluster.directory) / STATE_FILE).unlink(missing_ok=True)
    Path(cluster.token_path).unlink(missing_ok=True)
    return cluster


def cluster_status(directory: str | Path = DEFAULT_DIR) -> dict[str, Any]:
    """What runs: nodes (pid alive, as the dashboard sees them), addresses, S3 endpoint."""
    cluster = read_cluster(directory)
    if cluster is None:
        return {"running": False, "directory": str(Path(directory).resolve())}
    s3 = None
    if cluster.s3_dir and state_path(Path(cluster.s3_dir)).exists():
        server = read_state(state_path(Path(cluster.s3_dir)))
        s3 = {"endpoint": server.endpoint, "running": server.is_running(), "bucket": S3_BUCKET}
    alive = cluster.alive_nodes()
    return {
        "running": bool(alive),
        "directory": cluster.directory,
        "dashboard": cluster.dashboard_url,
        "gcs_address": cluster.gcs_address,
        "nodes": [
            {**asdict(n), "alive": _pid_alive(n.pid)} for n in sorted(cluster.nodes, key=_idx)
        ],
        "nodes_alive_in_ray": alive_node_count(cluster) if alive else 0,
        "s3": s3,
        "started_at": cluster.started_at,
        "token_path": cluster.token_path,
    }


def _idx(node: RayNode) -> int:
    return node.index
