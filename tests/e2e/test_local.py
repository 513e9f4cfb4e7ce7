"""End to end: `tlctl submit --local` on real local Ray (2 workers) against real SeaweedFS S3.

One module-scoped Ray and S3 bucket; the runs build on each other (pre-train on the
synthetic source, fine-tune on the target), as a user's would.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from typer.testing import CliRunner

from cluster.local.s3server import S3Server
from jobs.data.synth import synthesize
from jobs.storage.location import exists, list_dir, read_bytes, read_text, resolve, write_bytes
from jobs.storage.manifest import verify
from orchestrator.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
SIZE = 32


@pytest.fixture(scope="module")
def env(s3_env_module: S3Server, s3_bucket: str, ray_start_4_cpus, tmp_path_factory) -> dict:
    """Synthetic source/target datasets: source in S3, target on local disk."""
    endpoint = s3_env_module.endpoint
    src = resolve(f"s3://{s3_bucket}/data/source", endpoint)
    synthesize(src.fs, src.path, variant="source", classes=6, per_class=200, size=SIZE, seed=1)
    local = tmp_path_factory.mktemp("target")
    fs = resolve(str(local)).fs
    synthesize(
        fs, str(local / "train"), variant="target", classes=6, per_class=60, size=SIZE, seed=2
    )
    synthesize(fs, str(local / "val"), variant="target", classes=6, per_class=40, size=SIZE, seed=3)
    return {
        "bucket": s3_bucket,
        "endpoint": endpoint,
        "tmp": local,
        "server": s3_env_module,
        "storage": f"s3://{s3_bucket}/runs",
    }


def write_spec(env: dict, name: str, **over) -> Path:
    spec = {
        "name": name,
        "backbone": {"name": "resnet18", "weights": "none", "freeze_depth": 0},
        "data": {
            "train": str(env["tmp"] / "train"),
            "val": str(env["tmp"] / "val"),
            "image_size": SIZE,
        },
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.001},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "storage": {"uri": env["storage"], "endpoint": env["endpoint"]},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    path = env["tmp"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(spec: Path, *args: str):
    return runner.invoke(app, ["submit", str(spec), "--local", *args])


def run_loc(env: dict, name: str):
    return resolve(env["storage"], env["endpoint"]).join(name)


def metrics(env: dict, name: str) -> list[dict]:
    text = read_text(run_loc(env, name).join("metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def source_run(env: dict) -> str:
    """Pre-train on the source shapes (data in S3): the backbone later runs start from."""
    spec = write_spec(
        env,
        "source",
        data={
            "train": f"s3://{env['bucket']}/data/source",
            "image_size": SIZE,
            "val_fraction": 0.1,
        },
        train={"epochs": 12, "batch_size": 16, "lr": 0.001},
    )
    result = submit(spec)
    assert result.exit_code == 0, result.output
    return "source"


def test_run_writes_the_storage_layout(env: dict, source_run: str) -> None:
    run = run_loc(env, source_run)
    for part in (
        "spec.yaml",
        "classes.json",
        "metrics.jsonl",
        "model/model.pt",
        "model/model.json",
    ):
        assert exists(run.join(*part.split("/"))), part
    checkpoints = [c for c in list_dir(run.join("checkpoints")) if c.startswith("epoch-")]
    assert len(checkpoints) <= 2 + 1  # keep: 2 best, plus the latest
    assert "epoch-0011" in checkpoints  # the latest is always kept for resuming
    lines = [m for m in metrics(env, source_run) if m["kind"] == "epoch"]
    assert [m["epoch"] for m in lines] == list(range(12))
    for m in lines:
        assert 0 <= m["val_acc"] <= 1 and m["train_images"] > 0 and m["images_per_s"] > 0
    info = json.loads(read_text(run.join("model", "model.json")))
    assert info["backbone"] == "resnet18" and info["num_classes"] == 6
    assert info["classes"] == json.loads(read_text(run.join("classes.json")))
    assert info["metrics"]["val_acc"] == max(m["val_acc"] for m in lines)
    stored = read_text(run.join("spec.yaml"))
    assert env["server"].secret_key not in stored and "AWS_" not in stored


@pytest.fixture(scope="module")
def plain_run(env: dict) -> str:
    """A run from scratch with an explicit val folder: the tests that only read a model use it."""
    result = submit(write_spec(env, "plain-load"))
    assert result.exit_code == 0, result.output
    return "plain-load"


def test_model_loads_into_plain_torchvision_and_reproduces_val_acc(
    env: dict, plain_run: str
) -> None:
    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    model = torchvision.models.get_model("resnet18", num_classes=info["num_classes"])
    state = torch.load(io.BytesIO(read_bytes(run.join("model", "model.pt"))), weights_only=True)
    model.load_state_dict(state)  # strict: the default head is torchvision's own
    model.eval()
    mean = torch.tensor(info["mean"]).view(3, 1, 1)
    std = torch.tensor(info["std"]).view(3, 1, 1)
    correct = total = 0
    for label, cls in enumerate(info["classes"]):
        for f in sorted((env["tmp"] / "val" / cls).glob("*.png")):
            img = Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
            x = (torchvision.transforms.functional.to_tensor(img) - mean) / std
            with torch.no_grad():
                correct += int(model(x[None]).argmax(1).item() == label)
            total += 1
    assert total == info["metrics"]["val_images"]
    assert abs(correct / total - info["metrics"]["val_acc"]) <= 1 / total + 1e-9


def test_evaluate_reproduces_the_runs_val_metrics_and_writes_its_record(
    env: dict, plain_run: str, tmp_path: Path
) -> None:
    storage = ["--storage", env["storage"], "--endpoint", env["endpoint"]]
    val = str(env["tmp"] / "val")
    out = runner.invoke(app, ["evaluate", plain_run, "--data", val, "--json", *storage])
    assert out.exit_code == 0, out.output
    m = json.loads(out.stdout)
    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    # The same images, decode and weights as training's validation: the same numbers.
    assert m["n"] == info["metrics"]["val_images"] == 240
    assert m["top1"] == pytest.approx(info["metrics"]["val_acc"], abs=1e-12)
    assert m["nll"] == pytest.approx(info["metrics"]["val_loss"], rel=1e-4)
    assert sum(map(sum, m["confusion"])) == 240 and m["k"] == 5
    done = run.join("eval", "val")
    assert (
        json.loads(read_text(done.join("metrics.json")))["data_fingerprint"]
        == m["data_fingerprint"]
    )
    table = pq.read_table(io.BytesIO(read_bytes(done.join("predictions.parquet"))))
    assert table.num_rows == 240 and table.column("correct").to_pylist().count(True) == round(
        m["top1"] * 240
    )
    for name in ("confusion.png", "reliability.png"):
        assert read_bytes(done.join(name)).startswith(b"\x89PNG")
    assert "Most confident mistakes" in read_text(done.join("errors.html"))
    assert not exists(done.join("lease.json"))

    # Through the registry: MODEL@ALIAS evaluates the same model on the same data.
    promoted = runner.invoke(app, ["models", "promote", plain_run, "--model", "shapes", *storage])
    assert promoted.exit_code == 0, promoted.output
    alias = runner.invoke(
        app, ["evaluate", "shapes@champion", "--data", val, "--name", "via-alias", *storage]
    )
    assert alias.exit_code == 0, alias.output
    again = json.loads(read_text(run.join("eval", "via-alias", "metrics.json")))
    assert again["top1"] == m["top1"] and again["data_fingerprint"] == m["data_fingerprint"]
    assert f"top-1 {m['top1']:.1%}" in alias.stdout

    # A class the model does not know: exit 2 naming it, before Ray runs anything.
    odd = tmp_path / "odd"
    for cls in (info["classes"][0], "zebra"):
        (odd / cls).mkdir(parents=True)
        src = next((env["tmp"] / "val" / info["classes"][0]).glob("*.png"))
        (odd / cls / "x.png").write_bytes(src.read_bytes())
    bad = runner.invoke(app, ["evaluate", plain_run, "--data", str(odd), *storage])
    assert bad.exit_code == 2 and "zebra is unknown to the model" in bad.output
    assert not exists(run.join("eval", "odd"))


def _read_predictions(env: dict, uri: str):
    import pyarrow.dataset as pads

    loc = resolve(uri, env["endpoint"])
    names = [n for n in list_dir(loc) if n.endswith(".parquet")]
    return pads.dataset([loc.join(n).path for n in names], filesystem=loc.fs).to_table()


def test_predict_reproduces_val_acc_reports_bad_images_and_never_duplicates(
    env: dict, plain_run: str, tmp_path: Path
) -> None:
    storage = ["--storage", env["storage"], "--endpoint", env["endpoint"]]
    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    images = tmp_path / "incoming"
    for f in (env["tmp"] / "val").rglob("*.png"):
        (images / f.parent.name).mkdir(parents=True, exist_ok=True)
        (images / f.parent.name / f.name).write_bytes(f.read_bytes())
    (images / "broken.png").write_bytes(b"not an image")
    out = f"s3://{env['bucket']}/preds/one"
    args = ["predict", plain_run, "--input", str(images), "--output", out, *storage]
    done = runner.invoke(app, [*args, "--json", "--all-probs"])
    assert done.exit_code == 0, done.output
    meta = json.loads(done.stdout)
    assert (meta["images"], meta["rows"], meta["errors"]) == (241, 241, 1)
    assert meta["all_probs"] and 0 < meta["first_result_s"] <= meta["wall_s"]
    table = _read_predictions(env, out).to_pylist()
    bad = [r for r in table if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.png")
    assert bad[0]["prediction"] is None and "broken.png" in bad[0]["error"]
    good = [r for r in table if not r["error"]]
    correct = sum(r["prediction"] == r["path"].split("/")[-2] for r in good)
    assert correct / len(good) == pytest.approx(info["metrics"]["val_acc"], abs=1e-12)
    assert all(len(r["topk_labels"]) == 5 and r["topk_labels"][0] == r["prediction"] for r in good)
    assert all(abs(r["topk_probs"][0] - r["confidence"]) < 1e-12 for r in good)
    for r in good:  # every class's probability, in the model's class order
        assert len(r["probs"]) == 6 and abs(sum(r["probs"]) - 1) < 1e-6  # fp32 softmax
        assert r["probs"][info["classes"].index(r["prediction"])] == r["confidence"]
    assert bad[0]["probs"] is None

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists already" in again.output
    replaced = runner.invoke(app, [*args, "--overwrite", "--format", "csv", "--top-k", "2"])
    assert replaced.exit_code == 0, replaced.output
    names = list_dir(resolve(out, env["endpoint"]))
    assert not any(n.endswith(".parquet") for n in names)  # the old files are gone
    rows = [
        line
        for n in names
        if n.endswith(".csv")
        for line in read_text(resolve(out, env["endpoint"]).join(n)).splitlines()[1:]
    ]
    assert len(rows) == 241  # replaced, never appended
    for bad_args, words in (
        (["--top-k", "7"], "--top-k: 7 is out of range for a model of 6 classes"),
        (["--format", "xml"], "--format: 'xml'"),
    ):
        refused = runner.invoke(app, [*args, "--overwrite", *bad_args])
        assert refused.exit_code == 2 and words in refused.output, refused.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(
        app,
        ["predict", plain_run, "--input", str(empty), "--output", str(tmp_path / "o")] + storage,
    )
    assert nothing.exit_code == 2 and "no images under" in nothing.output
    assert not (tmp_path / "o").exists()


def test_same_name_resumes_from_last_epoch(env: dict) -> None:
    spec = write_spec(env, "resume-me")
    assert submit(spec).exit_code == 0
    result = submit(spec, "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    assert "resuming run resume-me" in result.output
    lines = metrics(env, "resume-me")
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == [0, 1, 2]  # no duplicates
    events = [m for m in lines if m["kind"] == "event" and m["event"] != "workers"]
    assert events == [{**events[0], "event": "resumed", "epoch": 2, "from_checkpoint_epoch": 1}]
    placements = [m for m in lines if m.get("event") == "workers"]
    assert [p["epoch"] for p in placements] == [0, 2]  # recorded at each start
    assert [w["rank"] for w in placements[-1]["workers"]] == [0, 1]
    again = submit(spec, "--set", "train.epochs=3")
    assert again.exit_code == 0 and "already complete" in again.output


def test_a_truncated_checkpoint_is_skipped_on_resume(env: dict) -> None:
    # keep 5: nothing is evicted (Ray keeps the best `keep` by val_acc, the broken one
    # included, so with keep 3 the re-run epoch 1 could go if it scored lowest).
    spec = write_spec(env, "truncated", checkpoint={"keep": 5})
    assert submit(spec).exit_code == 0
    run = run_loc(env, "truncated")
    assert verify(run.join("checkpoints", "epoch-0001")) is None
    assert verify(run.join("model")) is None
    newest = run.join("checkpoints", "epoch-0001", "model.pt")
    data = read_bytes(newest)
    write_bytes(newest, data[: len(data) // 2])  # as an upload cut short would leave it

    result = submit(spec, "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    lines = metrics(env, "truncated")
    skipped = [m for m in lines if m.get("event") == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0]["checkpoint"].endswith("epoch-0001")
    assert f"model.pt has {len(data) // 2} bytes" in skipped[0]["reason"]
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert resumed == [{**resumed[0], "epoch": 1, "from_checkpoint_epoch": 0}]
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == [0, 1, 2]
    # Epoch 1 ran again and was checkpointed under a new name: Ray Train evicts checkpoints
    # by path, so re-using the broken one's name could delete the good one with it.
    assert verify(run.join("checkpoints", "epoch-0001-r2")) is None
    assert verify(run.join("checkpoints", "epoch-0002")) is None
    assert verify(run.join("model")) is None


def test_resume_with_another_model_is_refused(env: dict) -> None:
    spec = write_spec(
        env,
        "resume-me",
        backbone={"name": "mobilenet_v3_small", "weights": "none", "freeze_depth": 0},
    )
    result = submit(spec)
    assert result.exit_code == 2
    assert "backbone.name: run 'resume-me' already exists" in result.output


def test_fine_tuning_a_source_model_beats_scratch(env: dict, source_run: str) -> None:
    budget = {"epochs": 6, "batch_size": 16, "lr": 0.001}
    pretrained = write_spec(
        env,
        "target-ft",
        train=budget,
        backbone={
            "name": "resnet18",
            "weights": run_loc(env, source_run).join("model").uri,
            "freeze_depth": 2,
        },
    )
    scratch = write_spec(env, "target-scratch", train=budget)
    for spec in (pretrained, scratch):
        result = submit(spec)
        assert result.exit_code == 0, result.output

    def best(name: str) -> float:
        return json.loads(read_text(run_loc(env, name).join("model", "model.json")))["metrics"][
            "val_acc"
        ]

    ft, sc = best("target-ft"), best("target-scratch")
    print(f"target val acc: fine-tuned {ft:.3f} vs scratch {sc:.3f}")
    assert ft >= sc + 0.05, (ft, sc)


def test_runs_list_and_show_read_storage(env: dict, source_run: str) -> None:
    listed = runner.invoke(
        app, ["runs", "list", "--storage", env["storage"], "--endpoint", env["endpoint"], "--json"]
    )
    assert listed.exit_code == 0, listed.output
    names = {r["name"]: r for r in json.loads(listed.output)}
    assert names["source"]["status"] == "complete" and names["source"]["epochs_done"] == 12
    shown = runner.invoke(
        app,
        [
            "runs",
            "show",
            "source",
            "--storage",
            env["storage"],
            "--endpoint",
            env["endpoint"],
            "--json",
        ],
    )
    record = json.loads(shown.output)
    assert record["model_uri"] == f"{env['storage']}/source/model"
    assert len(record["metrics"]) == 12 and record["classes"][0] == "circle"
    missing = runner.invoke(
        app, ["runs", "show", "nope", "--storage", env["storage"], "--endpoint", env["endpoint"]]
    )
    assert missing.exit_code == 2 and "run 'nope' not found" in missing.output


def test_missing_bucket_fails_before_training(env: dict) -> None:
    spec = write_spec(
        env,
        "no-bucket",
        storage={"uri": "s3://no-such-bucket-xyz/runs", "endpoint": env["endpoint"]},
    )
    result = submit(spec)
    assert result.exit_code == 2
    assert "bucket 'no-such-bucket-xyz' does not exist" in result.output
    assert "Traceback" not in result.output
    assert "starting run" not in result.output  # refused in pre-flight, before training


def test_wrong_secret_is_a_clear_error_and_not_printed(env: dict, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    result = submit(write_spec(env, "bad-creds"))
    assert result.exit_code == 2
    assert "access denied" in result.output and "wrong-secret-value" not in result.output


def test_corrupt_image_is_named_and_nothing_is_written(env: dict, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "train"
    shutil.copytree(env["tmp"] / "train", data)
    bad = data / "diamond" / "00003.png"
    bad.write_bytes(b"\x89PNG truncated")
    spec = write_spec(env, "corrupt", data={"train": str(data), "image_size": SIZE})
    result = submit(spec)
    assert result.exit_code == 2, result.output
    assert f"corrupt image {bad}" in result.output
    assert not exists(run_loc(env, "corrupt"))  # not even an empty prefix


def test_parquet_dataset_in_s3_trains(env: dict) -> None:
    """An image-bytes + label Parquet table in S3, split by val_fraction inside Ray Data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"image": [], "label": []}
    for cls_dir in sorted((env["tmp"] / "train").iterdir()):
        if cls_dir.is_dir():
            for f in sorted(cls_dir.glob("*.png"))[:20]:
                rows["image"].append(f.read_bytes())
                rows["label"].append(cls_dir.name)
    loc = resolve(f"s3://{env['bucket']}/data/target.parquet", env["endpoint"])
    with loc.fs.open_output_stream(loc.path) as out:
        pq.write_table(pa.table(rows), out)
    spec = write_spec(
        env,
        "parquet",
        data={"train": loc.uri, "val_fraction": 0.25, "image_size": SIZE},
        train={"epochs": 1, "batch_size": 16, "lr": 0.001},
    )
    result = submit(spec)
    assert result.exit_code == 0, result.output
    info = json.loads(read_text(run_loc(env, "parquet").join("model", "model.json")))
    assert info["classes"] == sorted(set(rows["label"]))
    assert info["metrics"]["val_images"] == 30  # a quarter of 120 rows
    assert info["metrics"]["train_images"] <= 90


def test_failure_during_training_exits_1_with_the_reason(env: dict, tmp_path: Path) -> None:
    """Streaming (uncached) data decodes during training: a corrupt file fails the job."""
    import shutil

    data = tmp_path / "train"
    shutil.copytree(env["tmp"] / "train", data)
    bad = data / "heart" / "00007.png"
    bad.write_bytes(b"garbage")
    spec = write_spec(
        env,
        "fails-late",
        data={
            "train": str(data),
            "val": str(env["tmp"] / "val"),
            "image_size": SIZE,
            "cache": "false",
        },
    )
    result = submit(spec)
    assert result.exit_code == 1, result.output
    assert "training failed" in result.output and f"corrupt image {bad}" in result.output
    assert "Traceback" not in result.output


def test_predict_reads_parquet_rows_and_names_them_by_id(
    env: dict, plain_run: str, tmp_path: Path
) -> None:
    """Parquet input (Hugging Face's {bytes, path} image struct, 3 row groups, an id
    column): one row per input row, by id; a null image is that row's error."""
    import pyarrow as pa

    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    files = sorted((env["tmp"] / "val").rglob("*.png"))
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files] + [None]
    ids = [f"{f.parent.name}/{f.name}" for f in files] + ["missing"]
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"img": images, "key": ids}), source, row_group_size=100)
    out = tmp_path / "preds"
    args = ["predict", plain_run, "--input", str(source), "--output", str(out)]
    flags = ["--image-column", "img", "--id-column", "key", "--json"]
    storage = ["--storage", env["storage"], "--endpoint", env["endpoint"]]
    done = runner.invoke(app, [*args, *flags, *storage])
    assert done.exit_code == 0, done.output
    meta = json.loads(done.stdout)
    assert (meta["images"], meta["rows"], meta["errors"]) == (241, 241, 1)
    rows = pq.read_table(str(out)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    bad = next(r for r in rows if r["id"] == "missing")
    assert bad["prediction"] is None and "null image" in bad["error"]
    good = [r for r in rows if r["id"] != "missing"]
    correct = sum(r["prediction"] == r["id"].split("/")[0] for r in good)
    assert correct / len(good) == pytest.approx(info["metrics"]["val_acc"], abs=1e-12)


def test_evaluate_reads_parquet_rows_with_the_same_numbers_as_the_folder(
    env: dict, plain_run: str, tmp_path: Path
) -> None:
    """The run's validation images as Parquet rows (Hugging Face's image struct, class
    names in a label column, 3 row groups): the run's val_acc and val_loss again."""
    import pyarrow as pa

    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    files = sorted((env["tmp"] / "val").rglob("*.png"))
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    table = pa.table({"img": images, "cls": [f.parent.name for f in files]})
    source = tmp_path / "val.parquet"
    pq.write_table(table, source, row_group_size=100)
    args = ["evaluate", plain_run, "--data", str(source), "--name", "val-rows", "--json"]
    flags = ["--image-column", "img", "--label-column", "cls"]
    storage = ["--storage", env["storage"], "--endpoint", env["endpoint"]]
    done = runner.invoke(app, [*args, *flags, *storage])
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("{"), done.stdout[:2000]
    m = json.loads(done.stdout)
    assert m["n"] == len(files) == info["metrics"]["val_images"]
    assert m["top1"] == pytest.approx(info["metrics"]["val_acc"], abs=1e-12)
    assert m["nll"] == pytest.approx(info["metrics"]["val_loss"], rel=1e-4)
    out = run.join("eval", "val-rows")
    rows = pq.read_table(io.BytesIO(read_bytes(out.join("predictions.parquet")))).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(f"{source}#{i}" for i in range(len(files)))
    assert all(
        r["label"] == table.column("cls")[int(r["path"].rsplit("#")[1])].as_py() for r in rows
    )
    assert "Most confident mistakes" in read_text(out.join("errors.html"))


def _val_batch(env: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every val image as uint8 NHWC, resized as training decodes them, with its label."""
    classes = sorted(p.name for p in (env["tmp"] / "val").iterdir() if p.is_dir())
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((env["tmp"] / "val" / cls).glob("*.png")):
            img = Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels), classes


def test_export_pt2_and_onnx_are_verified_stored_and_reproduce_val_acc(
    env: dict, plain_run: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    storage = ["--storage", env["storage"], "--endpoint", env["endpoint"]]
    run = run_loc(env, plain_run)
    info = json.loads(read_text(run.join("model", "model.json")))
    images, labels, classes = _val_batch(env)
    assert classes == info["classes"]

    done = runner.invoke(app, ["export", plain_run, "--json", *storage])
    assert done.exit_code == 0, done.output
    record = json.loads(done.stdout)
    where = run.join("export", "pt2")
    assert record["uri"] == where.join("model.pt2").uri
    assert verify(where) is None and not exists(where.join("lease.json"))
    stored = json.loads(read_text(where.join("export.json")))
    assert stored["verification"] == record["verification"] and stored["verification"]["passed"]
    assert [c["n"] for c in stored["verification"]["batches"]] == [1, 2, 7, 64]
    assert stored["verification"]["images_from"] == str(env["tmp"] / "val")
    # The stored program alone (uint8 in, normalization inside) gives the run's val_acc.
    local = tmp_path / "model.pt2"
    local.write_bytes(read_bytes(where.join("model.pt2")))
    program = torch.export.load(str(local)).module()  # a file this test's tlctl wrote
    with torch.no_grad():
        top1 = program(torch.from_numpy(images)).argmax(1).numpy()
    assert abs((top1 == labels).mean() - info["metrics"]["val_acc"]) <= 1 / len(labels) + 1e-9

    out = f"s3://{env['bucket']}/exports/onnx"
    args = ["export", plain_run, "--format", "onnx", "--out", out, *storage]
    onnx_done = runner.invoke(app, [*args, "--json"])
    assert onnx_done.exit_code == 0, onnx_done.output
    dest = resolve(out, env["endpoint"])
    assert verify(dest) is None and sorted(list_dir(dest)) == [
        "export.json",
        "manifest.json",
        "model.onnx",
    ]
    (tmp_path / "model.onnx").write_bytes(read_bytes(dest.join("model.onnx")))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    logits = session.run(["logits"], {"images": images})[0]  # one batch of 240: dynamic
    assert (
        abs((logits.argmax(1) == labels).mean() - info["metrics"]["val_acc"])
        <= 1 / len(labels) + 1e-9
    )

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--out: " in again.output and "exists already" in again.output
    # A program that disagrees with eager is refused and nothing is written.
    import jobs.models.export as export_module

    real = export_module.load_program

    def off_by_half(fmt: str, path: str):
        run = real(fmt, path)
        return lambda x: run(x) + 0.5

    monkeypatch.setattr(export_module, "load_program", off_by_half)
    wrong = runner.invoke(app, [*args[:5], f"{out}-wrong", *storage])
    assert wrong.exit_code == 1 and "disagrees with the eager model" in wrong.output
    assert not exists(resolve(f"{out}-wrong", env["endpoint"]))


def test_ctrl_c_then_resubmit_resumes(env: dict) -> None:
    """A real interrupt: SIGINT to `tlctl submit --local` once a checkpoint has landed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(env, "interrupted", train={"epochs": 6, "batch_size": 16, "lr": 0.001})
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    run = run_loc(env, "interrupted")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        # Interrupted in epoch 1 or later, once epoch 0's checkpoint is complete (uploads
        # run in the background: the next epoch starts before its manifest lands).
        if exists(run.join("checkpoints", "epoch-0000", "manifest.json")) and any(
            m.get("epoch") == 1 for m in metrics(env, "interrupted")
        ):
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: submit the same spec again (or `tlctl resume interrupted`)" in err
    done = [m["epoch"] for m in metrics(env, "interrupted") if m["kind"] == "epoch"]
    assert 2 <= len(done) < 6

    # From the stored spec alone (the spec file is gone, as after a lost driver).
    spec.unlink()
    result = runner.invoke(
        app,
        [
            "resume",
            "interrupted",
            "--storage",
            env["storage"],
            "--endpoint",
            env["endpoint"],
            "--local",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "resuming run interrupted" in result.output
    lines = metrics(env, "interrupted")
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == list(range(6))
    resumed = [m for m in lines if m.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= 1
