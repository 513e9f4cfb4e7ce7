"""Hardening (issue 14): every bad endpoint/URI, spec file or override is exit 2 naming the
field, before Ray starts; the remote-safety rule, the --local CPU check, the grid size, the
plain-HTTP warning and the dev cluster's token file."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.errors import TlctlError
from jobs.spec.load import apply_overrides, check_fits_here, load_spec, parse_spec
from jobs.spec.search import SearchSpec
from jobs.storage.location import normalize_endpoint, parse_uri
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
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


def refused(raw) -> str:
    with pytest.raises(TlctlError) as info:
        parse_spec(raw)
    assert info.value.exit_code == 2
    return info.value.message


# --- B: one rule for every endpoint/URI field ---------------------------------------------


@pytest.mark.parametrize("field", ["storage.uri", "data.train", "data.val", "backbone.weights"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("s3:/bucket/x", "malformed"),
        ("s3:bucket/x", "malformed"),
        ("s3:///x", "has no bucket"),
        ("gs://bucket/x", "unsupported scheme 'gs://'"),
        ("http://host/x", "unsupported scheme 'http://'"),
        ("s3://KEY:SECRET@bucket/x", "must not contain credentials"),
        ("file://otherhost/x", "not a local file URI"),
    ],
)
def test_every_uri_field_follows_one_rule(field: str, value: str, fragment: str) -> None:
    section, key = field.split(".")
    message = refused(base(**{section: {key: value}}))
    assert f"{field}: " in message and fragment in message
    assert "SECRET" not in message


@pytest.mark.parametrize("field", ["storage.uri", "data.train"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_location_is_not_the_working_directory(field: str, value: str) -> None:
    section, key = field.split(".")
    assert f"{field}: empty" in refused(base(**{section: {key: value}}))


@pytest.mark.parametrize("field", ["storage.endpoint", "data.endpoint"])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("localhost:9000", "has no scheme"),
        ("http://h:9000/bucket", "must not have a path"),
        ("http://h:99999", "invalid port"),
        ("http://h:0", "invalid port"),
        ("http://h:abc", "invalid port"),
        ("http://h:", "invalid port"),
        ("ftp://h:21", "is not an http(s)"),
        ("KEY:SECRET@host:9000", "must not contain credentials"),
        ("http://KEY:SECRET@host:9000", "must not contain credentials"),
    ],
)
def test_every_endpoint_field_follows_one_rule(field: str, value: str, fragment: str) -> None:
    section, key = field.split(".")
    message = refused(base(**{section: {key: value}}))
    assert f"{field}: " in message and fragment in message
    assert "SECRET" not in message


@pytest.mark.parametrize("value", ["localhost:9000", "http://h:9000/x", "http://h:70000"])
def test_the_endpoint_variable_follows_the_same_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", value)
    assert refused(base()).startswith("AWS_ENDPOINT_URL")
    # The CLI's --endpoint takes it from the same variable, and names it.
    result = runner.invoke(app, ["runs", "list", "--storage", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: AWS_ENDPOINT_URL: ")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--storage", "s3:bucket/x"], "--storage"),
        (["--storage", ""], "--storage"),
        (["--storage", "gs://b/x"], "--storage"),
        (["--storage", "s3://tlctl/r", "--endpoint", "h:9000"], "--endpoint"),
        (["--storage", "s3://tlctl/r", "--endpoint", "http://h:9000/p"], "--endpoint"),
    ],
)
def test_cli_storage_and_endpoint_options_follow_the_rule(args: list[str], field: str) -> None:
    result = runner.invoke(app, ["runs", "list", *args], env={"AWS_ENDPOINT_URL": None})
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {field}: ")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("http://h:99999", "invalid port"),
        ("http://h:x", "invalid port"),
        ("ftp://h:8265", "is not http(s)"),
        ("ray://h:10001", "Ray Client address"),
    ],
)
def test_the_address_follows_the_rule(tmp_path: Path, address: str, fragment: str) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base()))
    result = runner.invoke(app, ["submit", str(spec), "--address", address])
    assert result.exit_code == 2, result.output
    assert "--address: " in result.output and fragment in result.output


def test_an_address_without_scheme_is_http() -> None:
    from orchestrator.targets.jobs_api import cluster_address

    assert cluster_address("head") == "http://head:8265"
    assert cluster_address("head:9999/") == "http://head:9999"
    assert cluster_address("https://[::1]") == "https://[::1]:8265"


def test_valid_locations_still_pass(tmp_path: Path) -> None:
    assert parse_uri("s3://tlctl/runs", "data.train") == ("s3", "tlctl/runs")
    assert parse_uri("file:///x/y", "data.train") == ("file", "/x/y")
    assert normalize_endpoint("https://s3.example.com:443/") == "https://s3.example.com:443"
    spec = parse_spec(base(data={"train": "./a:b"}, storage={"uri": "runs"}), base_dir=tmp_path)
    assert spec.data.train == str(tmp_path / "a:b")


def test_file_uris_and_paths_are_not_remote_safe() -> None:
    from orchestrator.targets.cluster import remote_path_errors

    spec = parse_spec(
        base(
            data={"train": "file:///data/train", "val": "s3://tlctl/val"},
            storage={"uri": "/runs"},
            backbone={"weights": "file:///w.pt"},
        )
    )
    errors = remote_path_errors(spec)
    assert [e.split(":")[0] for e in errors] == ["data.train", "storage.uri", "backbone.weights"]
    ok = parse_spec(base(data={"train": "s3://tlctl/t"}, backbone={"weights": "imagenet"}))
    assert remote_path_errors(ok) == []


# --- C: the spec file and --set -------------------------------------------------------------


def test_a_spec_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: d\xe9mo\n".encode("latin-1"))
    with pytest.raises(TlctlError, match="latin1.yaml: not UTF-8") as info:
        load_spec(path)
    assert info.value.exit_code == 2


def test_duplicate_keys_name_the_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: demo\ntrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n"
        "data: {train: x}\nstorage: {uri: s3://tlctl/r}\n"
    )
    with pytest.raises(TlctlError) as info:
        load_spec(path)
    assert "dup.yaml: line 5 " in info.value.message
    assert "duplicate key 'epochs' (first at line 3)" in info.value.message
    merged = tmp_path / "merge.yaml"  # a merge key's values may be overridden: not duplicates
    merged.write_text(
        "defaults: &d {epochs: 3, lr: 0.1}\n"
        "name: demo\ntrain: {<<: *d, epochs: 5}\ndata: {train: x}\nstorage: {uri: s3://tlctl/r}\n"
    )
    with pytest.raises(TlctlError, match="defaults: unknown field"):
        load_spec(merged)  # got past the loader: only the extra section is wrong


def test_an_alias_bomb_is_refused_quickly_and_briefly(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("name: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 500
    started = time.monotonic()
    result = runner.invoke(app, ["validate", str(path)])
    assert time.monotonic() - started < 5
    assert result.exit_code == 2
    assert "alias" in result.output and len(result.output) < 400


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("name: &a [*a]\n")
    with pytest.raises(TlctlError, match="alias"):
        load_spec(path)


def test_echoed_values_are_capped() -> None:
    message = refused(base(train={"optimizer": "x" * 10_000}, scaling={"num_workers": ["y"] * 999}))
    assert all(len(line) < 300 for line in message.splitlines())


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr=!!python/object/apply:os.system [echo hi]", "tags"),
        ("train.lr=!!float 1", "tags"),
        ("train.lr=&a 1", "anchors"),
        ("head.hidden=[1, 2", "not a valid YAML value"),
        ("train.epochs=010", "YAML 1.1 reads it as 8"),
        ("train.epochs=1_0", "ambiguous"),
        ("train.epochs=1:30", "ambiguous"),
        ("train..epochs=1", "expected key.path=value"),
    ],
)
def test_bad_overrides_are_exit_2(override: str, fragment: str) -> None:
    with pytest.raises(TlctlError) as info:
        apply_overrides(base(), [override])
    assert info.value.exit_code == 2
    assert info.value.message.startswith("--set ") and fragment in info.value.message


def test_plain_overrides_still_parse() -> None:
    raw = apply_overrides(base(), ["train.epochs=10", "train.lr=1e-3", "head.hidden=[8, 0x10]"])
    spec = parse_spec(raw)
    assert spec.train.epochs == 10 and spec.train.lr == 0.001 and spec.head.hidden == [8, 16]


def test_leading_zero_ints_in_the_file_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "octal.yaml"
    path.write_text(yaml.safe_dump(base()) + "train: {epochs: 010}\n")
    with pytest.raises(TlctlError, match="line .*'010' is ambiguous"):
        load_spec(path)


def test_a_run_name_with_a_trailing_newline_is_refused() -> None:
    assert "name: 'demo\\n' is not a valid run name" in refused(base(name="demo\n"))


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"train": {"weight_decay": "inf"}}, "train.weight_decay"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"failure": {"storage_retry_s": float("inf")}}, "failure.storage_retry_s"),
        ({"scaling": {"cpus_per_worker": "inf"}}, "scaling.cpus_per_worker"),
        ({"head": {"dropout": "nan"}}, "head.dropout"),
        (
            {"search": {"lr": [0.1], "reduction_factor": float("inf")}},
            "search.reduction_factor",
        ),
    ],
)
def test_inf_and_nan_are_refused(sections: dict, field: str) -> None:
    assert f"{field}: " in refused(base(**sections))


def test_a_run_name_with_markup_does_not_crash_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base(name="a[/]b")))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "'a[/]b' is not a valid run name" in result.output


# --- C: --local must fit this machine, a grid is counted not built --------------------------


def test_local_workers_must_fit_this_machines_cpus() -> None:
    spec = parse_spec(base(scaling={"num_workers": 4, "cpus_per_worker": 2}))
    with pytest.raises(TlctlError) as info:
        check_fits_here(spec, cpus=2)
    assert info.value.exit_code == 2
    assert info.value.message.startswith("scaling.num_workers: 4 workers × cpus_per_worker 2")
    check_fits_here(parse_spec(base(scaling={"num_workers": 2, "cpus_per_worker": 1})), cpus=2)


def test_cli_local_refuses_too_many_workers_before_ray(tmp_path: Path) -> None:
    cpus = os.cpu_count() or 1
    path = tmp_path / "s.yaml"
    raw = base(scaling={"num_workers": cpus + 1, "cpus_per_worker": 1})
    raw["storage"] = {"uri": str(tmp_path / "runs")}
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["submit", str(path), "--local"])
    assert result.exit_code == 2, result.output
    assert "scaling.num_workers: " in result.output
    assert not (tmp_path / "runs").exists()
    import ray

    assert not ray.is_initialized()


def test_a_huge_grid_is_counted_without_being_built() -> None:
    search = SearchSpec(freeze_depth={"range": [0, 10**12]}, batch_size=[8, 16], search_alg="grid")
    assert search.grid_size() == 2 * (10**12 + 1)
    message = refused(base(search={"freeze_depth": {"range": [0, 10**12]}, "search_alg": "grid"}))
    assert "search.freeze_depth: " in message


# --- E: plain HTTP and the dev cluster's token file -----------------------------------------


def test_plain_http_off_this_machine_warns() -> None:
    from orchestrator.targets.jobs_api import plain_http_warning

    warning = plain_http_warning("http://10.0.0.5:8265")
    assert warning is not None and "unencrypted" in warning and "\n" not in warning
    assert plain_http_warning("https://10.0.0.5:8265") is None
    assert plain_http_warning("http://127.0.0.1:8265") is None
    assert plain_http_warning("http://localhost:8265") is None


def test_the_token_file_is_new_private_and_never_a_symlink(tmp_path: Path) -> None:
    from cluster.local.raycluster import write_token_file

    path = tmp_path / "auth_token"
    path.write_text("stale")
    os.chmod(path, 0o644)
    write_token_file(path, "t0ken")
    assert path.read_text() == "t0ken"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path.unlink()
    path.symlink_to(victim)
    write_token_file(path, "t1ken")
    assert victim.read_text() == "keep"  # the link was replaced, its target never written
    assert not path.is_symlink() and path.read_text() == "t1ken"
