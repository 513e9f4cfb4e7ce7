"""Secrets never leave tlctl: `jobs.redact`, the CLI's error edge and what is stored or shipped.

Every case runs the real CLI (typer's CliRunner) or the real function; the secret must be in
no output, no stored object and nothing a cluster job would carry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from jobs.errors import TlctlError
from jobs.redact import clip, redact, redact_data
from jobs.spec.load import parse_spec, spec_yaml
from orchestrator.cli import app
from orchestrator.cli.common import guarded

runner = CliRunner()
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


# --- redact -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://KEY:SECRET@bucket/x", "s3://***@bucket/x"),
        ("http://user:pass@host:8265/api", "http://***@host:8265/api"),
        ("https://u:p@ss@host:9000", "https://***@host:9000"),
        ("KEY:SECRET@host:9000", "***@host:9000"),
        ("endpoint 'KEY:SECRET@host:9000' is bad", "endpoint '***@host:9000' is bad"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("mail joe@example.com", "mail joe@example.com"),
        ("at joe@example.com:8080", "at joe@example.com:8080"),
    ],
)
def test_redact_removes_url_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_removes_known_secret_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("ray-token-0123456789abcdef\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-env-token-abcdefgh")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    text = (
        f"a {SECRET} b session-token-value-123 c AKIAEXAMPLEKEYID d ray-env-token-abcdefgh "
        "e ray-token-0123456789abcdef"
    )
    assert redact(text) == "a *** b *** c *** d *** e ***"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "tlctl")  # too short to mask without harm
    assert redact("s3://tlctl/runs") == "s3://tlctl/runs"


def test_redact_data_and_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    data = {"a": [f"x{SECRET}", {"u": "s3://k:s@b/x"}], "n": 3}
    assert redact_data(data) == {"a": ["x***", {"u": "s3://***@b/x"}], "n": 3}
    bomb: list = [1] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10**9 leaves, shared: clip never walks it whole
    assert len(clip(bomb)) <= 80
    assert len(clip("x" * 10_000)) <= 80


# --- the CLI's error edge -----------------------------------------------------------------


def _app_raising(exc: BaseException) -> typer.Typer:
    demo = typer.Typer()

    @demo.command()
    @guarded
    def boom() -> None:
        raise exc

    return demo


def test_an_unexpected_exception_is_one_redacted_line_exit_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    result = runner.invoke(
        _app_raising(ValueError(f"bad http://u:pw@host:1 key={SECRET}\nsecond line")), []
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert SECRET not in result.output and "u:pw" not in result.output
    assert result.output.strip().splitlines() == [
        "error: unexpected ValueError: bad http://***@host:1 key=*** second line"
    ]


def test_a_tlctl_error_is_redacted_escaped_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    result = runner.invoke(_app_raising(TlctlError(f"x: [/] a[/]b {SECRET} " + "y" * 5000)), [])
    assert result.exit_code == 2
    assert SECRET not in result.output and "[/] a[/]b ***" in result.output
    assert len(result.output) < 1200


def test_typer_exits_pass_through_guarded() -> None:
    assert runner.invoke(_app_raising(typer.Exit(3)), []).exit_code == 3


# --- each secret case: exit 2, the secret nowhere ------------------------------------------


def _spec(tmp_path: Path, **sections: dict) -> Path:
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True, exist_ok=True)
    raw = {
        "name": "leaky",
        "backbone": {"name": "resnet18", "weights": "none"},
        "data": {"train": str(data)},
        "storage": {"uri": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_refused(result, secret: str, field: str, tmp_path: Path) -> None:
    assert result.exit_code == 2, result.output
    assert secret not in result.output
    assert "Traceback" not in result.output
    assert field in result.output
    assert not (tmp_path / "runs").exists()  # nothing written to storage


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"storage": {"uri": f"s3://KEY:{SECRET}@bucket/x"}}, "storage.uri"),
        ({"storage": {"endpoint": f"KEY:{SECRET}@host:9000"}}, "storage.endpoint"),
        ({"storage": {"endpoint": f"http://KEY:{SECRET}@host:9000"}}, "storage.endpoint"),
        ({"data": {"endpoint": f"http://KEY:{SECRET}@host:9000"}}, "data.endpoint"),
        ({"data": {"train": f"s3://KEY:{SECRET}@bucket/train"}}, "data.train"),
        ({"data": {"val": f"s3://KEY:{SECRET}@bucket/val"}}, "data.val"),
        ({"backbone": {"weights": f"s3://KEY:{SECRET}@bucket/w.pt"}}, "backbone.weights"),
    ],
)
@pytest.mark.parametrize("preflight", [False, True])
def test_credentials_in_a_spec_are_refused_unechoed(
    tmp_path: Path, sections: dict, field: str, preflight: bool
) -> None:
    args = ["validate", str(_spec(tmp_path, **sections))] + (["--preflight"] if preflight else [])
    _assert_refused(runner.invoke(app, args), SECRET, field, tmp_path)


@pytest.mark.parametrize("name", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_credentials_in_the_endpoint_variable_are_refused(tmp_path: Path, name: str) -> None:
    spec = _spec(tmp_path, storage={"uri": "s3://tlctl/runs"})
    result = runner.invoke(
        app, ["validate", str(spec)], env={name: f"http://user:{SECRET}@host:9000"}
    )
    _assert_refused(result, SECRET, name, tmp_path)
    listed = runner.invoke(
        app, ["runs", "list", "--storage", "s3://tlctl/runs"], env={name: f"user:{SECRET}@h:9"}
    )
    _assert_refused(listed, SECRET, name, tmp_path)


@pytest.mark.parametrize("via_env", [False, True])
def test_credentials_in_the_address_are_refused_unechoed(tmp_path: Path, via_env: bool) -> None:
    address = f"http://user:{SECRET}@host:8265"
    spec = str(_spec(tmp_path))
    if via_env:
        result = runner.invoke(app, ["submit", spec], env={"RAY_ADDRESS": address})
    else:
        result = runner.invoke(app, ["submit", spec, "--address", address])
    _assert_refused(result, SECRET, "RAY_ADDRESS" if via_env else "--address", tmp_path)


def test_what_is_stored_or_shipped_is_redacted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A secret value that slips past validation (here: inside a path) is masked in the
    stored spec, the checkpoint meta's spec dict and the cluster job's spec file."""
    from orchestrator.targets.cluster import SPEC_FILE, runtime_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    spec = parse_spec(
        {
            "name": "leaky",
            "backbone": {"name": "resnet18", "weights": "none"},
            "data": {"train": f"s3://tlctl/{SECRET}/train"},
            "storage": {"uri": "s3://tlctl/runs"},
        }
    )
    assert SECRET not in spec_yaml(spec) and "s3://tlctl/***/train" in spec_yaml(spec)
    assert SECRET not in str(redact_data(spec.model_dump(mode="json")))
    env = runtime_env(spec, tmp_path, pass_credentials=False, pip=[])
    assert SECRET not in (tmp_path / SPEC_FILE).read_text()
    assert SECRET not in str(env)
