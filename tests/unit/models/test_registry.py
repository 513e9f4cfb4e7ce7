"""The model registry (jobs.models.registry) and MODEL@ALIAS resolution (jobs.models.ref),
on a real SeaweedFS server and in a local directory, and `tlctl models …` through the CLI.

A run's model/ here is written the way `publish_model` writes it (weights, model.json, the
manifest last); training is not needed to test what points at it.
"""

from __future__ import annotations

import io
import json
import threading
import uuid

import pytest
import torch
from typer.testing import CliRunner

from cluster.local.s3server import S3Server
from jobs.errors import TlctlError
from jobs.models.ref import resolve_ref
from jobs.models.registry import Registry, RunModel
from jobs.storage.layout import MANIFEST, MODEL_INFO, WEIGHTS, RunLayout
from jobs.storage.location import Location, list_dir, read_bytes, resolve, write_bytes, write_text
from jobs.storage.manifest import describe
from orchestrator.cli import app

runner = CliRunner()
CLASSES = ["cat", "dog"]


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path) -> Location:
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        return resolve(f"s3://{bucket}/reg-{uuid.uuid4().hex[:8]}", server.endpoint)
    return resolve(str(tmp_path / "runs"))


def make_run(root: Location, name: str, classes=CLASSES, acc: float = 0.5) -> RunLayout:
    layout = RunLayout(root.join(name))
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.randn(len(classes), 4)}, buf)
    info = {"format": "tlctl-model/1", "run": name, "backbone": "resnet18", "classes": classes}
    info["metrics"] = {"val_acc": acc}
    files = {WEIGHTS: buf.getvalue(), MODEL_INFO: json.dumps(info).encode()}
    for file, data in files.items():
        write_bytes(layout.model.join(file), data)
    write_text(layout.model.join(MANIFEST), json.dumps(describe(files)))
    return layout


def test_promote_resolve_history_and_rollback(root: Location) -> None:
    reg = Registry(root)
    a, b = make_run(root, "run-a", acc=0.6), make_run(root, "run-b", acc=0.7)
    first = reg.promote("flowers", "champion", RunModel.read(a), reason="first")
    assert first["run"] == "run-a" and first["previous"] is None
    second = reg.promote("flowers", "champion", RunModel.read(b), reason="better")
    assert second["previous"]["run"] == "run-a"
    ref = resolve_ref("flowers@champion", root.uri, root.endpoint)
    assert ref.layout.uri == b.uri and ref.pointer["seq"] == 2

    back = reg.rollback("flowers", "champion", reason="regression")
    assert back["run"] == "run-a" and back["action"] == "rollback"
    assert resolve_ref("flowers@champion", root.uri, root.endpoint).layout.uri == a.uri
    moves = reg.history("flowers")
    assert [(m["seq"], m["run"], m["action"]) for m in moves] == [
        (1, "run-a", "promote"),
        (2, "run-b", "promote"),
        (3, "run-a", "rollback"),
    ]
    assert moves[1]["reason"] == "better" and moves[0]["by"]
    forward = reg.rollback("flowers", "champion", to_run="run-b")
    assert forward["run"] == "run-b"
    with pytest.raises(TlctlError, match="never pointed at run 'run-c'"):
        reg.rollback("flowers", "champion", to_run="run-c")


def test_two_concurrent_promotions_one_wins(root: Location) -> None:
    reg = Registry(root)
    runs = [RunModel.read(make_run(root, f"run-{i}")) for i in range(2)]
    reg.promote("m", "champion", runs[0])
    barrier = threading.Barrier(4)
    results: list[object] = []

    def move(run: RunModel) -> None:
        barrier.wait()
        try:
            results.append(reg.promote("m", "champion", run))
        except TlctlError as exc:
            results.append(exc)

    threads = [threading.Thread(target=move, args=(runs[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, TlctlError)]
    assert len(won) + len(lost) == 4 and won
    # Every winner replaced the pointer it read: the history chain has no gaps or forks.
    moves = reg.history("m")
    assert len(moves) == 1 + len(won)
    assert len({m["seq"] for m in moves}) == len(moves)
    replaced = [w["previous"]["seq"] for w in won]  # type: ignore[index]
    assert len(set(replaced)) == len(replaced), "two promotions replaced the same pointer"
    for loser in lost:
        assert "moved by someone else at the same moment" in loser.message


def test_refusals_name_what_exists(root: Location) -> None:
    reg = Registry(root)
    run = RunModel.read(make_run(root, "run-a"))
    reg.promote("flowers", "champion", run)
    with pytest.raises(TlctlError, match=r"no alias 'prod' \(aliases: champion\)"):
        resolve_ref("flowers@prod", root.uri, root.endpoint)
    with pytest.raises(TlctlError, match=r"no model 'roses'.*models: flowers"):
        resolve_ref("roses@champion", root.uri, root.endpoint)
    other = RunModel.read(make_run(root, "run-x", classes=["cat", "dog", "fox"]))
    with pytest.raises(TlctlError, match="--allow-class-change"):
        reg.promote("flowers", "champion", other)
    assert reg.promote("flowers", "champion", other, allow_class_change=True)["run"] == "run-x"
    reg.promote("solo", "champion", run)
    with pytest.raises(TlctlError, match="only at run 'run-a': there is nothing to roll back"):
        reg.rollback("solo", "champion")


def test_a_model_that_fails_its_manifest_is_never_promoted_or_used(root: Location) -> None:
    reg = Registry(root)
    layout = make_run(root, "run-a")
    reg.promote("flowers", "champion", RunModel.read(layout))
    weights = layout.model.join(WEIGHTS)
    write_bytes(weights, read_bytes(weights) + b"x")
    with pytest.raises(TlctlError, match="model.pt has .* bytes, the manifest says"):
        RunModel.read(layout)
    with pytest.raises(TlctlError, match="model.pt has"):
        resolve_ref("flowers@champion", root.uri, root.endpoint)
    # Re-exported (a valid manifest again, other bytes): the alias still names the old model.
    make_run(root, "run-a")
    with pytest.raises(TlctlError, match="has changed since it was made flowers@champion"):
        resolve_ref("flowers@champion", root.uri, root.endpoint)
    with pytest.raises(TlctlError, match="has no model/"):
        RunModel.read(RunLayout(root.join("never-trained")))


def test_models_cli_promote_list_show_history_rollback(tmp_path) -> None:
    root = resolve(str(tmp_path / "runs"))
    make_run(root, "run-a", acc=0.61)
    make_run(root, "run-b", acc=0.72)
    storage = ["--storage", root.uri]

    def tlctl(*args: str):
        return runner.invoke(app, [*args, *storage])

    out = tlctl("models", "promote", "run-a", "--model", "flowers", "--reason", "first")
    assert out.exit_code == 0, out.output
    assert "flowers@champion → run run-a" in out.stdout
    assert tlctl("models", "promote", "run-b", "--model", "flowers").exit_code == 0
    listed = tlctl("models", "list").stdout.splitlines()
    assert any(line.split()[:3] == ["flowers", "champion", "run-b"] for line in listed), listed
    assert "72.0%" in "\n".join(listed)
    shown = json.loads(tlctl("models", "show", "flowers", "--json").stdout)
    assert shown["champion"]["run"] == "run-b"
    history = tlctl("models", "history", "flowers").stdout.splitlines()
    assert len(history) == 3 and history[2].split()[0] == "2"
    rolled = tlctl("models", "rollback", "flowers", "--json")
    assert rolled.exit_code == 0 and json.loads(rolled.stdout)["run"] == "run-a"
    # `runs list` does not take the registry for a run (these runs have no spec: not listed).
    runs = tlctl("runs", "list")
    assert runs.exit_code == 0 and "_models" not in runs.stdout

    for args, words in (
        (("models", "promote", "run-z", "--model", "flowers"), "has no model/"),
        (("models", "promote", "run-a", "--model", "Bad Name"), "model: 'Bad Name'"),
        (("models", "promote", "run-a", "--model", "f", "--alias", "9x"), "alias: '9x'"),
        (("models", "show", "roses"), "no model 'roses'"),
        (("models", "rollback", "flowers", "--to", "run-q"), "never pointed at run 'run-q'"),
    ):
        bad = tlctl(*args)
        assert bad.exit_code == 2, (args, bad.output)
        assert words in bad.output and "Traceback" not in bad.output
    assert list_dir(root.join("_models", "flowers", "aliases")) == ["champion.json"]


def test_evaluate_and_predict_refuse_bad_input_before_ray(tmp_path, monkeypatch) -> None:
    """One line, exit 2, nothing written, Ray never started (ray.init would raise here)."""
    import ray

    def no_ray(*_a, **_k):
        raise AssertionError("ray.init reached")

    monkeypatch.setattr(ray, "init", no_ray)
    root = resolve(str(tmp_path / "runs"))
    make_run(root, "run-a")
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    storage = ["--storage", root.uri]
    cases = (
        (["evaluate", "run-a", "--data", "gs://b/test"], "--data: unsupported scheme 'gs://'"),
        (["evaluate", "run-a", "--data", str(images), "--name", "Bad/Name"], "--name: 'Bad/Name'"),
        (["evaluate", "s3:/b/runs/x", "--data", str(images)], "RUN: malformed 's3:/b/runs/x'"),
        (["evaluate", "nope@champion", "--data", str(images)], "no model 'nope'"),
        (["predict", "run-a", "--input", str(images), "--output", "s3:b/o"], "--output: malformed"),
        (
            ["predict", "run-a", "--input", str(images), "--output", str(tmp_path / "o")],
            "no images",
        ),
        (
            ["predict", "run-a", "--input", str(tmp_path), "--output", str(tmp_path / "x" / "o")],
            "is inside --input",
        ),
        # A remote cluster cannot read this machine's files: refused before connecting to it.
        (
            ["evaluate", "run-a", "--data", str(images), "--address", "http://10.255.0.9:8265"],
            f"--data: {images} is a path on this machine",
        ),
        (
            ["predict", "s3://b/runs/a", "--input", str(images), "--output", "s3://b/o"]
            + ["--address", "http://10.255.0.9:8265"],
            f"--input: {images} is a path on this machine",
        ),
        (
            ["predict", "run-a", "--input", str(images), "--output", str(tmp_path / "o")]
            + ["--local", "--address", "http://127.0.0.1:8265"],
            "--local and --address: choose one",
        ),
    )
    for args, words in cases:
        out = runner.invoke(app, [*args, *storage])
        assert out.exit_code == 2, (args, out.output)
        assert words in out.output and "Traceback" not in out.output, (args, out.output)
        assert len(out.output.strip().splitlines()) == 1, out.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()
    assert not (tmp_path / "runs" / "run-a" / "eval").exists()


def test_two_predicts_into_one_output_cannot_both_write(tmp_path) -> None:
    """Both pass pre-flight (the output is new to each); the output's lease lets one write:
    the other is refused, exit 2, before any compute and without touching the output."""
    import numpy as np
    from PIL import Image

    from jobs.models.predict import PREDICT_LEASE, plan_prediction, predict
    from jobs.storage.lease import acquire

    root = resolve(str(tmp_path / "runs"))
    make_run(root, "run-a")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    args = dict(classes=CLASSES, top_k=1, fmt="parquet", overwrite=False)
    plan = plan_prediction(str(images), str(tmp_path / "out"), None, **args)
    other = acquire(plan.output.join(PREDICT_LEASE), job="another tlctl predict")
    with pytest.raises(TlctlError) as refused:
        predict(resolve_ref("run-a", root.uri, None), plan)
    assert refused.value.exit_code == 2 and "another tlctl predict" in refused.value.message
    assert list_dir(plan.output) == [PREDICT_LEASE]
    other.release()
