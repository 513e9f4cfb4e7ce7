"""The cluster configs users deploy tlctl with (cluster/): they parse, agree with each other,
with pyproject.toml and with the installed Ray, describe a job tlctl can run, and hold no
secret. Fast: no cluster, no Docker, no network."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
RAYCLUSTER_YAML = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = CLUSTER / "kuberay" / "rayjob.yaml"
AWS_YAML = CLUSTER / "aws" / "cluster.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
CONFIG_FILES = (RAYCLUSTER_YAML, RAYJOB_YAML, AWS_YAML)

RAY_VERSION = ray.__version__
TOKEN_SECRET = "tlctl-ray-token"  # Secret with key auth_token (KubeRay authOptions)
S3_SECRET = "tlctl-s3"  # optional Secret with the MinIO/SeaweedFS keys
SERVICE_ACCOUNT = "tlctl-ray"  # the pods' ServiceAccount (IRSA on EKS)
GPU_INSTANCES = {"g5.xlarge": 1, "p4d.24xlarge": 8}  # NVIDIA GPUs per instance type
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY", re.IGNORECASE)
NOT_A_SECRET = re.compile(r"(_PATH|_FILE|_MODE)$|^(secretName|secretKeyRef|secretRef)$")
IDENTIFIER = re.compile(r"[A-Za-z_][\w.-]*")
ENV_REFERENCE = re.compile(r"^\$(\{\w+\}|\(\w+\)|\w+)$")  # ${X}, $(X), $X


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(pyproject: dict[str, Any], name: str) -> Requirement:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def cap(pyproject: dict[str, Any], name: str) -> str:
    """The `<=X` cap of a dependency: the version the image installs."""
    caps = [s.version for s in requirement(pyproject, name).specifier if s.operator == "<="]
    assert len(caps) == 1, f"pyproject: {name} has no single <= cap"
    return caps[0]


def tlctl_image(pyproject: dict[str, Any]) -> str:
    return f"tlctl:{pyproject['project']['version']}"


# --- every file parses -----------------------------------------------------------------------


def test_the_cluster_configs_exist_and_every_yaml_parses() -> None:
    found = sorted(CLUSTER.rglob("*.yaml"))
    for path in CONFIG_FILES:
        assert path in found, f"{path.relative_to(ROOT)} is missing"
    for path in found:
        parsed = docs(path)
        assert parsed, f"{path.relative_to(ROOT)}: no YAML document"
        for doc in parsed:
            assert isinstance(doc, dict), f"{path.relative_to(ROOT)}: a document is not a mapping"
    assert DOCKERFILE.is_file()


def test_installed_ray_is_the_pinned_one(pyproject: dict[str, Any]) -> None:
    assert RAY_VERSION in requirement(pyproject, "ray").specifier


# --- KubeRay ---------------------------------------------------------------------------------


def ray_containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """What both manifests' RayClusterSpecs must hold for tlctl."""
    assert spec.get("rayVersion") == RAY_VERSION, f"{where}: rayVersion"
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{where}: Ray token auth is not on"
    assert auth.get("secretName") == TOKEN_SECRET, f"{where}: token Secret"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params.get("dashboard-host") == "0.0.0.0", f"{where}: dashboard not on 0.0.0.0"
    assert str(params.get("num-cpus", "")).replace(".", "", 1).isdigit(), f"{where}: num-cpus"
    head_pod = head["template"]
    assert head_pod["spec"].get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}: head SA"
    for c in ray_containers(head_pod):
        assert "nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {}), (
            f"{where}: the head must not take a GPU"
        )
    head_ports = {p["containerPort"] for c in ray_containers(head_pod) for p in c.get("ports", [])}
    assert 8265 in head_ports, f"{where}: no dashboard port 8265 on the head"

    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    gpu_groups = 0
    for g in groups:
        name = f"{where} worker group {g.get('groupName')}"
        assert isinstance(g.get("rayStartParams"), dict), f"{name}: rayStartParams"
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], f"{name}: min/max replicas"
        assert g["maxReplicas"] >= 1, f"{name}: can never start"
        assert g["template"]["spec"].get("serviceAccountName") == SERVICE_ACCOUNT, name
        for c in ray_containers(g["template"]):
            res = c.get("resources", {})
            gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
            if gpus is not None:
                assert int(gpus) >= 1, f"{name}: GPU limit {gpus}"
                requested = (res.get("requests") or {}).get("nvidia.com/gpu", gpus)
                assert int(requested) == int(gpus), f"{name}: GPU requests != limits"
                gpu_groups += 1
    assert gpu_groups, f"{where}: no worker group with an nvidia.com/gpu limit"

    for pod in [head_pod, *(g["template"] for g in groups)]:
        for c in ray_containers(pod):
            env = {e["name"]: e for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") == S3_SECRET, f"{where} {c['name']}: {key} not from Secret"
                assert ref.get("optional") is True, (
                    f"{where} {c['name']}: {key} must be optional (AWS setups use IRSA instead)"
                )


def test_raycluster_manifest() -> None:
    rc = one(RAYCLUSTER_YAML, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"] == "tlctl"
    check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    sa = one(RAYCLUSTER_YAML, "ServiceAccount")
    assert sa["metadata"]["name"] == SERVICE_ACCOUNT


def test_rayjob_manifest() -> None:
    job = one(RAYJOB_YAML, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    # InteractiveMode would wait forever for someone to submit the job by hand.
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int)
    assert spec["ttlSecondsAfterFinished"] >= 0


def test_rayjob_cluster_matches_the_raycluster() -> None:
    """The job's cluster is raycluster.yaml's, plus the spec volume on the head."""
    rc = one(RAYCLUSTER_YAML, "RayCluster")["spec"]
    jc = one(RAYJOB_YAML, "RayJob")["spec"]["rayClusterSpec"]
    for key in (
        "rayVersion",
        "authOptions",
        "enableInTreeAutoscaling",
        "autoscalerOptions",
        "workerGroupSpecs",
    ):
        assert jc.get(key) == rc.get(key), f"rayjob.yaml rayClusterSpec.{key} differs"
    assert jc["headGroupSpec"]["rayStartParams"] == rc["headGroupSpec"]["rayStartParams"]
    job_head = copy.deepcopy(jc["headGroupSpec"]["template"])
    job_head["spec"].pop("volumes", None)
    for c in job_head["spec"]["containers"]:
        c.pop("volumeMounts", None)
    assert job_head == rc["headGroupSpec"]["template"], "rayjob.yaml head pod differs"


def all_images(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [i for v in node.values() for i in all_images(v)]
    if isinstance(node, list):
        return [i for v in node for i in all_images(v)]
    return []


def check_image(ref: str, pyproject: dict[str, Any]) -> None:
    repo, _, tag = ref.rpartition(":")
    if repo == "rayproject/ray" or repo.endswith("/rayproject/ray"):
        assert tag.split("-")[0] == RAY_VERSION, f"{ref}: not Ray {RAY_VERSION}"
    else:
        assert repo.rsplit("/", 1)[-1] == "tlctl", f"{ref}: not the tlctl image"
        assert tag == pyproject["project"]["version"], f"{ref}: not tlctl {tag}"


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML], ids=lambda p: p.name)
def test_kuberay_images_are_this_tlctl_and_ray(path: Path, pyproject: dict[str, Any]) -> None:
    images = all_images(docs(path))
    assert images
    assert tlctl_image(pyproject) in images
    for ref in images:
        check_image(ref, pyproject)


def test_rayjob_entrypoint_reads_the_mounted_configmap_spec() -> None:
    job = one(RAYJOB_YAML, "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "jobs.entrypoint", "--spec"] and len(argv) == 5, argv
    spec_path = PurePosixPath(argv[4])
    assert spec_path.is_absolute()
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {
        m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])
    }
    volume = next(
        (v for v in head.get("volumes", []) if mounts.get(v["name"]) == str(spec_path.parent)),
        None,
    )
    assert volume is not None, f"nothing is mounted at {spec_path.parent} on the head"
    cm = one(RAYJOB_YAML, "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert spec_path.name in cm["data"], f"the ConfigMap has no {spec_path.name}"


def test_entrypoint_module_is_in_the_package(pyproject: dict[str, Any]) -> None:
    assert "jobs" in pyproject["tool"]["setuptools"]["packages"]
    module = ROOT / "jobs" / "entrypoint.py"
    if not module.is_file():
        pytest.skip("jobs/entrypoint.py is not written yet (RayJob entrypoint module)")
    assert importlib.util.find_spec("jobs.entrypoint") is not None
    assert "--spec" in module.read_text(), "jobs.entrypoint takes no --spec option"


def test_every_package_is_installed(pyproject: dict[str, Any]) -> None:
    """A sub-package missing from the list works in the checkout and breaks when installed
    (a cluster node's image, a wheel)."""
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("jobs", "orchestrator", "cluster")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed


def spec_text() -> str:
    return one(RAYJOB_YAML, "ConfigMap")["data"]["spec.yaml"]


def unresolved(raw: Any, full: Any, where: str = "") -> list[str]:
    """Fields of the resolved `full` spec that `raw` leaves out or states differently."""
    if isinstance(full, dict) and isinstance(raw, dict):
        return [
            p
            for k, v in full.items()
            if not (v is None and k not in raw)
            for p in unresolved(raw.get(k, ...), v, f"{where}.{k}".lstrip("."))
        ]
    return [] if raw == full else [where]


def test_configmap_spec_is_a_valid_resolved_cluster_spec(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from jobs.spec.load import parse_spec

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    raw = yaml.safe_load(spec_text())
    spec = parse_spec(copy.deepcopy(raw), local=False)
    assert spec.scaling.use_gpu is True
    assert isinstance(spec.scaling.num_workers, int), "autoscaling from 0 GPUs needs a number"
    for uri in (spec.data.train, spec.data.val, spec.storage.uri):
        assert uri and uri.startswith("s3://"), f"{uri}: a cluster job cannot read local paths"
    missing = unresolved(raw, spec.model_dump(mode="json"))
    assert not missing, (
        f"the ConfigMap spec is not resolved (regenerate it with `tlctl validate SPEC "
        f"--resolved`): {', '.join(missing)}"
    )
    if importlib.util.find_spec("jobs.entrypoint") is not None:
        from jobs.spec.load import load_resolved_spec

        (tmp_path / "spec.yaml").write_text(spec_text())
        assert load_resolved_spec(str(tmp_path / "spec.yaml")).name == spec.name


# --- no secret in any config -----------------------------------------------------------------


def secret_literals(node: Any, where: str = "") -> list[str]:
    """Places where a secret-looking name is given a literal value instead of a reference."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            found.append(f"{where}: a Secret with its values")
        name = node.get("name")
        if isinstance(name, str) and "value" in node and SECRET_NAME.search(name):
            if not NOT_A_SECRET.search(name) and not ENV_REFERENCE.match(str(node["value"])):
                found.append(f"{where}: env {name} has a literal value")
        for key, value in node.items():
            here = f"{where}.{key}"
            named = isinstance(key, str) and IDENTIFIER.fullmatch(key)  # not a path
            if named and isinstance(value, (str, int, float)) and SECRET_NAME.search(key):
                if not NOT_A_SECRET.search(str(key)) and not ENV_REFERENCE.match(str(value)):
                    found.append(f"{here}: literal value")
            found += secret_literals(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += secret_literals(value, f"{where}[{i}]")
    elif isinstance(node, str):
        for line in node.splitlines():
            for m in re.finditer(r"\b([A-Za-z0-9_]+)\s*[=:]\s*(\S+)", line):
                name, value = m.groups()
                if SECRET_NAME.search(name) and not NOT_A_SECRET.search(name):
                    if not ENV_REFERENCE.match(value.strip("'\"")):
                        found.append(f"{where}: {name}= literal in {line.strip()[:60]!r}")
    return found


def test_the_secret_check_catches_literals() -> None:
    bad = [
        {"env": [{"name": "RAY_AUTH_TOKEN", "value": "abc123"}]},
        {"data": {"AWS_SECRET_ACCESS_KEY": "wJalr"}},
        {"kind": "Secret", "stringData": {"auth_token": "abc"}},
        {"cmd": "RAY_AUTH_TOKEN=abc123 ray start --head"},
        {"spec.yaml": "storage:\n  aws_secret_access_key: wJalr\n"},
    ]
    for doc in bad:
        assert secret_literals(doc), f"not caught: {doc}"
    good = [
        {"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "t"}}}]},
        {"env": [{"name": "RAY_AUTH_TOKEN_PATH", "value": "/etc/ray/token"}]},
        {"authOptions": {"mode": "token", "secretName": "tlctl-ray-token"}},
        {"cmd": "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN ray start"},
        {"file_mounts": {"~/.ray/auth_token": "~/.ray/tlctl-aws.token"}},
    ]
    for doc in good:
        assert not secret_literals(doc), f"false alarm: {doc}"


@pytest.mark.parametrize("path", [*CONFIG_FILES, DOCKERFILE], ids=lambda p: p.name)
def test_no_config_holds_a_secret(path: Path) -> None:
    content: Any = path.read_text() if path == DOCKERFILE else docs(path)
    if path == DOCKERFILE:  # only instructions: comments may explain
        content = "\n".join(ln for ln in content.splitlines() if not ln.lstrip().startswith("#"))
    assert not secret_literals(content), secret_literals(content)


# --- AWS cluster launcher --------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    (config,) = docs(AWS_YAML)
    return config


def commands(config: dict[str, Any], *keys: str) -> list[str]:
    return [c for k in keys for c in (config.get(k) or [])]


def test_aws_config_passes_rays_own_validation(aws: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_node_types(aws: dict[str, Any]) -> None:
    assert aws["provider"]["type"] == "aws" and aws["provider"].get("region")
    types = aws["available_node_types"]
    head = aws["head_node_type"]
    assert head in types
    head_res = types[head]["resources"]
    assert "CPU" in head_res, "set the head's CPUs explicitly"
    assert not head_res.get("GPU"), "the head takes no GPU"
    workers = {k: v for k, v in types.items() if k != head}
    assert workers
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert instance in GPU_INSTANCES, f"{name}: {instance} is not a known GPU instance"
        assert t["resources"].get("GPU") == GPU_INSTANCES[instance], f"{name}: GPU count"
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min/max workers"
    assert {t["node_config"]["InstanceType"] for t in workers.values()} == set(GPU_INSTANCES)
    assert sum(t["min_workers"] for t in workers.values()) <= aws["max_workers"]
    for name, t in types.items():
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no instance profile (S3)"


def test_aws_nodes_start_with_token_auth(aws: dict[str, Any]) -> None:
    for key, flag in (
        ("head_start_ray_commands", "--head"),
        ("worker_start_ray_commands", "--address"),
    ):
        starts = [c for c in commands(aws, key) if "ray start" in c]
        assert starts, f"{key}: no ray start"
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, f"{key}: ray start without token auth"
            assert flag in cmd
    head_start = " ".join(commands(aws, "head_start_ray_commands"))
    assert "--dashboard-host=0.0.0.0" in head_start
    token_files = [r for r in aws.get("file_mounts", {}) if r == "~/.ray/auth_token"]
    assert token_files or "RAY_AUTH_TOKEN_PATH=" in head_start, "the nodes get no token"


def test_aws_image_is_the_dockerfiles(aws: dict[str, Any], pyproject: dict[str, Any]) -> None:
    check_image(aws["docker"]["image"], pyproject)
    assert aws["docker"]["image"].endswith("/" + tlctl_image(pyproject))
    setup = commands(aws, "setup_commands", "head_setup_commands", "worker_setup_commands")
    installs = [c for c in setup if re.search(r"\b(pip|conda|uv)\b.*\binstall\b", c)]
    assert not installs, f"setup commands install packages beside the image: {installs}"


# --- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_base_is_the_pinned_ray(pyproject: dict[str, Any]) -> None:
    froms = [rest for op, rest in dockerfile_instructions() if op == "FROM"]
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", froms[0])
    assert m, f"FROM {froms[0]}: expected rayproject/ray:X.Y.Z-py311-gpu"
    version, minor = m.group(1), m.group(2)
    assert version == RAY_VERSION
    assert version in requirement(pyproject, "ray").specifier
    assert minor == "11", "images run Python 3.11"
    assert f"3.{minor}" in SpecifierSet(pyproject["project"]["requires-python"])


def test_dockerfile_installs_the_torch_caps_and_tlctl(pyproject: dict[str, Any]) -> None:
    runs = " ".join(rest for op, rest in dockerfile_instructions() if op == "RUN")
    for name in ("torch", "torchvision"):
        pinned = re.findall(rf"(?<![\w-]){name}==([\w.+]+)", runs)
        assert pinned == [cap(pyproject, name)], f"{name}: image has {pinned}"
    assert re.search(r"pip install [^&;]*(?<![\w/])\.(\s|$)", runs), "tlctl not pip-installed"
    copied = {
        src.rstrip("/")
        for op, rest in dockerfile_instructions()
        if op == "COPY"
        for src in [w for w in rest.split() if not w.startswith("--")][:-1]
    }
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    needed = {"pyproject.toml", pyproject["project"]["readme"], *top_level}
    assert needed <= copied, f"the image misses {sorted(needed - copied)}"
    ignore = ROOT / ".dockerignore"
    if ignore.is_file():
        patterns = {ln.strip().strip("/") for ln in ignore.read_text().splitlines()}
        assert {".venv", ".git"} <= patterns
        assert not (needed & patterns), ".dockerignore drops what the image copies"
