"""Unit tests of cluster submission's pure logic: addresses, submission ids, what the job
carries (and that it carries no secret in the open), shipped credentials, the cluster-side
entrypoint's spec check and log lines, and `num_workers: auto`. No cluster needed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobDetails, JobStatus

from jobs.driver.progress import progress_line
from jobs.driver.scaling import resolve_num_workers
from jobs.errors import TlctlError
from jobs.spec.load import load_resolved_spec, parse_spec
from jobs.spec.model import JobSpec
from jobs.storage import credentials
from orchestrator.targets.cluster import (
    next_attempt,
    remote_path_errors,
    runtime_env,
    submission_id,
)
from orchestrator.targets.jobs_api import cluster_address, is_loopback

SECRET = "s3cr3t-value-never-printed"


def spec(**over) -> JobSpec:
    raw = {
        "name": "demo",
        "backbone": {"name": "resnet18", "weights": "none"},
        "data": {"train": "s3://data/train", "image_size": 32},
        "storage": {"uri": "s3://tlctl/runs", "endpoint": "http://127.0.0.1:9000"},
    }
    for key, value in over.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return parse_spec(raw, local=False)


def job(sid: str, status: str, run: str = "demo") -> JobDetails:
    return JobDetails(
        type="SUBMISSION",
        submission_id=sid,
        entrypoint="python -m jobs.entrypoint --spec spec.yaml",
        status=JobStatus(status),
        metadata={"tlctl": "0.1.0", "run": run},
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://head:8265", "http://head:8265"),
        ("head:8265", "http://head:8265"),
        ("head", "http://head:8265"),
        ("https://ray.example.com/", "https://ray.example.com:8265"),
        ("http://10.0.0.5:9999", "http://10.0.0.5:9999"),
    ],
)
def test_cluster_address_is_the_dashboard_url(given: str, expected: str) -> None:
    assert cluster_address(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (None, "no Ray cluster given"),
        ("", "no Ray cluster given"),
        ("ray://head:10001", "Ray Client address"),
        ("ftp://head", "is not http(s)://host[:port]"),
    ],
)
def test_bad_cluster_addresses(given, message: str) -> None:
    with pytest.raises(TlctlError) as err:
        cluster_address(given)
    assert message in err.value.message and err.value.exit_code == 2


def test_loopback_detection() -> None:
    assert is_loopback("http://127.0.0.1:8265") and is_loopback("http://localhost:8265")
    assert not is_loopback("http://10.0.0.5:8265")


def test_first_submission_is_attempt_one_and_later_ones_count_up() -> None:
    assert next_attempt([], "demo") == 1
    done = [job("tlctl-demo-1", "FAILED"), job("tlctl-demo-2", "STOPPED")]
    assert next_attempt(done, "demo") == 3
    assert submission_id("demo", 3) == "tlctl-demo-3"
    # A run named like another run's attempt ("demo-7" vs run "demo") is not counted.
    assert next_attempt([job("tlctl-demo-7-1", "SUCCEEDED", run="demo-7")], "demo") == 1


@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_a_run_that_is_still_active_is_not_submitted_twice(status: str) -> None:
    with pytest.raises(TlctlError) as err:
        next_attempt([job("tlctl-demo-1", "SUCCEEDED"), job("tlctl-demo-2", status)], "demo")
    assert f"already {status} on this cluster as job tlctl-demo-2" in err.value.message
    assert err.value.exit_code == 2


def test_local_paths_are_refused_for_a_remote_cluster() -> None:
    assert remote_path_errors(spec()) == []
    errors = remote_path_errors(spec(data__train="/home/me/data", backbone__weights="w.pt"))
    assert [e.split(":")[0] for e in errors] == ["data.train", "backbone.weights"]
    assert "valid: an s3:// URI" in errors[0]


def test_runtime_env_carries_code_and_spec_but_no_secret(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    the_spec = spec()
    env = runtime_env(the_spec, tmp_path, pass_credentials=True, pip=[])
    assert env["working_dir"] == str(tmp_path)
    assert env["py_modules"] == [str(Path(__file__).resolve().parents[3] / "jobs")]
    assert yaml.safe_load((tmp_path / "job.yaml").read_text()) == the_spec.model_dump(mode="json")
    assert env["env_vars"][credentials.ENV_VAR] == credentials.CREDENTIALS_FILE
    assert "pip" not in env
    # The secret is only in the 0600 file that travels in the working_dir package.
    assert SECRET not in json.dumps(env) and SECRET not in (tmp_path / "job.yaml").read_text()
    shipped = tmp_path / credentials.CREDENTIALS_FILE
    assert SECRET in shipped.read_text()
    assert stat.S_IMODE(shipped.stat().st_mode) == 0o600


def test_runtime_env_without_pass_credentials_ships_none(tmp_path: Path) -> None:
    env = runtime_env(spec(), tmp_path, pass_credentials=False, pip=["pandas>=2"])
    assert credentials.ENV_VAR not in env["env_vars"]
    assert not (tmp_path / credentials.CREDENTIALS_FILE).exists()
    assert env["pip"] == ["pandas>=2"]


def test_an_optuna_search_asks_for_optuna(tmp_path: Path) -> None:
    raw = {
        "name": "s",
        "backbone": {"name": "resnet18", "weights": "none"},
        "data": {"train": "s3://data/train"},
        "storage": {"uri": "s3://tlctl/runs"},
        "search": {"lr": {"loguniform": [1e-4, 1e-2]}, "search_alg": "random"},
    }
    the_spec = parse_spec(raw, local=False)
    assert "pip" not in runtime_env(the_spec, tmp_path, pass_credentials=False, pip=[])
    the_spec.search.search_alg = "optuna"
    assert runtime_env(the_spec, tmp_path, pass_credentials=False, pip=[])["pip"] == ["optuna>=3"]


def test_shipped_credentials_are_found_after_a_chdir(tmp_path: Path, monkeypatch) -> None:
    workdir, elsewhere = tmp_path / "job", tmp_path / "trial"
    workdir.mkdir()
    elsewhere.mkdir()
    (workdir / credentials.CREDENTIALS_FILE).write_text(
        credentials.credentials_text("AKID", SECRET, "tok")
    )
    monkeypatch.setenv(credentials.ENV_VAR, credentials.CREDENTIALS_FILE)
    monkeypatch.setenv("PYTHONPATH", f"{workdir}{os.pathsep}/somewhere/else")
    monkeypatch.chdir(elsewhere)  # as a Tune trial may
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "")  # recorded, so what the loader sets is undone after
        monkeypatch.delenv(name)
    assert credentials.load_into_environment()
    assert os.environ[credentials.ENV_VAR] == str(workdir / credentials.CREDENTIALS_FILE)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKID"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert os.environ["AWS_SESSION_TOKEN"] == "tok"


def test_without_shipped_credentials_nothing_changes(monkeypatch) -> None:
    monkeypatch.delenv(credentials.ENV_VAR, raising=False)
    assert credentials.adopt_shipped_credentials() is None
    monkeypatch.setenv(credentials.ENV_VAR, "/abs/own/credentials")  # the user's own file
    assert credentials.adopt_shipped_credentials() is None
    assert os.environ[credentials.ENV_VAR] == "/abs/own/credentials"


def test_entrypoint_refuses_an_unresolved_spec(tmp_path: Path) -> None:
    raw = tmp_path / "raw.yaml"
    raw.write_text(yaml.safe_dump({"name": "x", "data": {"train": "s3://d/t"}}))
    with pytest.raises(TlctlError, match="not a resolved tlctl spec") as err:
        load_resolved_spec(str(raw))
    assert "tlctl validate SPEC --resolved" in err.value.message
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(spec().model_dump()))
    assert load_resolved_spec(str(resolved)).name == "demo"
    with pytest.raises(TlctlError, match="cannot read"):
        load_resolved_spec(str(tmp_path / "missing.yaml"))


def test_entrypoint_log_lines() -> None:
    line = progress_line(
        {"epoch_done": 0, "epoch": 0, "train_loss": 1.5, "train_acc": 0.4, "val_acc": 0.5}, 3
    )
    assert line is not None and line.startswith("epoch 1/3  train loss 1.5000 acc 40.0%")
    assert "acc 50.0%" in line
    assert progress_line({"epoch": 0, "step": 3, "steps": 9}, 3) is None  # a step, not a line
    trial = {"search": True, "trial_id": "t_1", "epoch": 1, "val_acc": 0.25}
    assert progress_line(trial, 4).startswith("trial t_1 epoch 2/4")
    assert progress_line({"search": True, "trial_id": "t_1", "status": "stopped"}, 4) == (
        "trial t_1 stopped"
    )


def test_auto_workers_is_one_per_gpu_or_two_on_cpu() -> None:
    cpu = spec(scaling__num_workers="auto")
    assert cpu.scaling.num_workers == "auto"  # resolved where the job runs
    assert resolve_num_workers(cpu, gpus=0, where="x").scaling.num_workers == 2
    gpu = spec(scaling__num_workers="auto", scaling__use_gpu=True)
    assert resolve_num_workers(gpu, gpus=8, where="x").scaling.num_workers == 8
    assert gpu.scaling.num_workers == "auto"  # a copy, not changed in place
    with pytest.raises(TlctlError, match="the cluster has no GPU"):
        resolve_num_workers(gpu, gpus=0, where="the cluster")
    fixed = spec(scaling__num_workers=3, scaling__use_gpu=True)
    assert resolve_num_workers(fixed, gpus=0, where="x").scaling.num_workers == 3


@pytest.mark.parametrize("bad", [0, -1, 5000, "many", 2.5, True])
def test_num_workers_must_be_auto_or_a_count(bad) -> None:
    with pytest.raises(TlctlError) as err:
        spec(scaling__num_workers=bad)
    assert "scaling.num_workers:" in err.value.message and "valid: auto" in err.value.message
