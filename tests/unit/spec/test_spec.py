"""Job spec validation: every error path gives `field: message`, exit 2, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.errors import TlctlError
from jobs.spec.load import apply_overrides, load_spec, parse_spec
from orchestrator.cli import app

runner = CliRunner()


def base(**sections) -> dict:
    raw = {
        "name": "demo",
        "data": {"train": "data/x"},
        "storage": {"uri": "s3://tlctl/runs"},
        "backbone": {"name": "resnet18", "weights": "none"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def errors_of(raw) -> str:
    with pytest.raises(TlctlError) as info:
        parse_spec(raw)
    assert info.value.exit_code == 2
    return info.value.message


def test_defaults_and_resolution(tmp_path: Path) -> None:
    spec = parse_spec(base(storage={"uri": "runs"}), base_dir=tmp_path)
    assert spec.train.epochs == 10 and spec.train.optimizer == "adamw"
    assert spec.data.train == str(tmp_path / "data" / "x")
    assert spec.storage.uri == str(tmp_path / "runs")
    assert spec.checkpoint.mode == "max"
    assert spec.failure.max_failures == 0


def test_loss_metric_defaults_to_min_mode() -> None:
    assert parse_spec(base(checkpoint={"metric": "val_loss"})).checkpoint.mode == "min"


def test_cluster_jobs_default_to_two_failures() -> None:
    assert parse_spec(base(), local=False).failure.max_failures == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (base(name="Bad Name"), "name: 'Bad Name' is not a valid run name"),
        (base(name="../escape"), "name: '../escape' is not a valid run name"),
        (
            base(backbone={"name": "resnet19"}),
            "backbone.name: unknown backbone 'resnet19' (valid: ",
        ),
        (
            base(backbone={"freeze_depth": 9}),
            "backbone.freeze_depth: 9 is out of range for resnet18 (valid: 0..5",
        ),
        (base(backbone={"freeze_depth": -1}), "backbone.freeze_depth: "),
        (
            base(train={"optimizer": "lion"}),
            "train.optimizer: lion is not allowed (valid: adamw, sgd, adam)",
        ),
        (base(train={"epochs": 0}), "train.epochs: "),
        (base(train={"lr": -1}), "train.lr: "),
        (base(train={"precision": "fp16"}), "train.precision: fp16 needs scaling.use_gpu"),
        (base(data={"val_fractoin": 0.2}), "data.val_fractoin: unknown field (valid: train, val, "),
        (base(data={"val_fraction": 1.5}), "data.val_fraction: "),
        (base(data={"image_size": 4}), "data.image_size: "),
        (base(head={"hidden": [0]}), "head.hidden.0: "),
        (base(head={"dropout": 1.0}), "head.dropout: "),
        (base(scaling={"num_workers": 0}), "scaling.num_workers: "),
        (
            base(scaling={"placement": "random"}),
            "scaling.placement: random is not allowed (valid: pack, spread)",
        ),
        (
            base(storage={"uri": "s3://b/r", "endpoint": "ftp://host"}),
            "storage.endpoint: 'ftp://host' is not an http(s)://host[:port] URL",
        ),
        (
            base(storage={"uri": "s3://b/r", "endpoint": "http://key:secret@host:9000"}),
            "storage.endpoint: must not contain credentials",
        ),
        (base(checkpoint={"metric": "f1"}), "checkpoint.metric: f1 is not allowed (valid: val_acc"),
        (base(checkpoint={"keep": 0}), "checkpoint.keep: "),
        (
            base(checkpoint={"upload": "fast"}),
            "checkpoint.upload: fast is not allowed (valid: async, sync)",
        ),
        (
            base(data={"train": "s3://b/t", "endpoint": "ftp://host"}),
            "data.endpoint: 'ftp://host' is not an http(s)://host[:port] URL",
        ),
        (base(bogus=1), "bogus: unknown field (valid: name, backbone, head, data"),
        (base(search={"lr": []}), "search.lr: no choices"),
        ({"name": "x", "storage": {"uri": "s3://b"}}, "data: required field is missing"),
    ],
)
def test_invalid_fields(raw, expected) -> None:
    assert expected in errors_of(raw)


def test_every_error_reported_at_once() -> None:
    message = errors_of(base(train={"epochs": 0, "optimizer": "lion"}, bogus=1))
    assert message.count("\n") == 3  # header + three lines


def test_secret_in_endpoint_not_echoed() -> None:
    message = errors_of(base(storage={"uri": "s3://b/r", "endpoint": "http://k:hunter2@h:9000"}))
    assert "hunter2" not in message


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides(
        base(),
        ["train.epochs=3", "head.hidden=[64, 32]", "scaling.use_gpu=false", "data.val=s3://b/val"],
    )
    spec = parse_spec(raw)
    assert spec.train.epochs == 3 and spec.head.hidden == [64, 32]
    assert spec.scaling.use_gpu is False and spec.data.val == "s3://b/val"


@pytest.mark.parametrize("bad", ["noequals", "=3", "name.sub=1"])
def test_bad_overrides(bad) -> None:
    with pytest.raises(TlctlError) as info:
        apply_overrides(base(), [bad])
    assert "--set" in info.value.message


def test_load_spec_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TlctlError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TlctlError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(TlctlError, match="expected a YAML mapping"):
        load_spec(listy)


def test_cli_invalid_spec_exits_2_without_starting_ray(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(base(backbone={"name": "resnet19"})))
    result = runner.invoke(app, ["submit", str(spec), "--local"])
    assert result.exit_code == 2
    assert "backbone.name: unknown backbone 'resnet19'" in result.output
    assert "Traceback" not in result.output
    import ray

    assert not ray.is_initialized()


def test_cli_set_override_validated(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(base()))
    result = runner.invoke(app, ["validate", str(spec), "--set", "train.epochs=zero"])
    assert result.exit_code == 2
    assert "train.epochs:" in result.output
    ok = runner.invoke(app, ["validate", str(spec), "--set", "train.epochs=2"])
    assert ok.exit_code == 0, ok.output


def test_cli_submit_needs_a_target(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(base()))
    result = runner.invoke(app, ["submit", str(spec)], env={"RAY_ADDRESS": ""})
    assert result.exit_code == 2
    assert "--local" in result.output


def test_cli_runs_large_grids_only_with_yes(tmp_path: Path) -> None:
    raw = base(
        search={
            "lr": [round(0.001 * (i + 1), 6) for i in range(40)],
            "freeze_depth": list(range(6)),
            "batch_size": [8, 16, 32, 64, 128],
            "search_alg": "grid",
        }
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    big = runner.invoke(app, ["validate", str(spec)])
    assert big.exit_code == 2 and "grid has 1200 trials (> 1000); pass --yes" in big.output
    assert runner.invoke(app, ["validate", str(spec), "--yes"]).exit_code == 0
    refused = runner.invoke(app, ["submit", str(spec), "--local"])
    assert refused.exit_code == 2 and "pass --yes" in refused.output
    # With --yes the spec is accepted and pre-flight runs (and finds no S3 server here).
    result = runner.invoke(app, ["submit", str(spec), "--local", "--yes"])
    assert result.exit_code == 2
    assert "grid has" not in result.output and "error: storage" in result.output


def test_cli_prints_brackets_in_messages_literally(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(base(search={"lr": {"loguniform": [0.1, 0.01]}})))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert "search.lr: loguniform lo must be < hi (got [0.1, 0.01])" in result.output
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump(base(search={"lr": []})))
    result = runner.invoke(app, ["validate", str(empty)])
    assert result.exit_code == 2, result.output
    assert "{loguniform: [lo, hi]}" in result.output


def test_uploads_are_asynchronous_unless_the_spec_says_sync() -> None:
    assert parse_spec(base()).checkpoint.upload == "async"
    assert parse_spec(base(checkpoint={"upload": "sync"})).checkpoint.upload == "sync"


def test_a_bad_endpoint_in_the_environment_names_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(TlctlError) as err:
        parse_spec(base(storage={"uri": "s3://b/r"}))
    assert err.value.message.startswith("AWS_ENDPOINT_URL (the storage endpoint): ")


def test_the_spec_loads_without_torch_or_ray() -> None:
    """The CLI validates a spec (and reads runs back) without paying for torch or Ray."""
    import subprocess
    import sys

    code = (
        "import sys, jobs.spec.load, jobs.storage.layout; "
        "print(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
