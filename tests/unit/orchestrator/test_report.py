"""`tlctl report`: plots, CSV and HTML of a search run, built from storage alone (no Ray).

The runs here are written by hand in the layout `jobs.search.tune` leaves in storage (a local
directory stands in for the bucket), with the table written by its own `write_trials_table`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from jobs.errors import TlctlError
from jobs.search.trials import write_trials_table
from jobs.storage.layout import RunLayout
from jobs.storage.location import resolve
from orchestrator.cli import app
from orchestrator.report import build_report

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN = "search-demo"
EPOCHS = 4
# (trial, freeze_depth, lr, status, val_acc per epoch run): best first, as jobs.search.trials ranks.
TRIALS = [
    ("4e507_00001", 2, 0.01, "completed", [0.40, 0.61, 0.72, 0.81]),
    ("4e507_00000", 0, 0.01, "completed", [0.35, 0.55, 0.66, 0.74]),
    ("4e507_00003", 2, 0.001, "stopped", [0.25, 0.31]),
    ("4e507_00002", 0, 0.001, "error", []),
]
ERROR_TEXT = "RuntimeError: worker <rank 0> failed & died"


def _spec(search: dict[str, Any] | None) -> dict[str, Any]:
    spec = {
        "name": RUN,
        "backbone": {"name": "resnet18", "freeze_depth": 0},
        "train": {"epochs": EPOCHS},
        # What a stored (resolved) spec always has; the report does not read them.
        "data": {"train": "/data/train"},
        "storage": {"uri": "/runs"},
    }
    if search is not None:
        spec["search"] = search
    return spec


def _epoch_line(trial: str, values: dict[str, Any], epoch: int, acc: float) -> dict[str, Any]:
    return {
        "kind": "epoch",
        "trial_id": trial,
        **values,
        "epoch": epoch,
        "epochs_done": epoch + 1,
        "val_acc": acc,
        "val_loss": 1.5 - acc,
        "train_acc": acc + 0.05,
        "train_loss": 1.4 - acc,
        "epoch_time_s": 5.8,
        "images_per_s": 29.0,
        "time": 1795900342.59 + 10 * epoch,
    }


def _event(name: str, trial: str, t: float) -> dict[str, Any]:
    return {"kind": "event", "event": name, "trial_id": trial, "time": t}


def _metrics(trials: list[tuple], dims: list[str]) -> list[dict[str, Any]]:
    lines = []
    for trial, depth, lr, status, accs in trials:
        values = {k: v for k, v in (("freeze_depth", depth), ("lr", lr)) if k in dims}
        lines.append(_event("trial_started", trial, 1795900300.0))
        lines += [_epoch_line(trial, values, e, a) for e, a in enumerate(accs)]
        lines.append(_event(f"trial_{status}", trial, 1795900400.0))
    return lines


def _row(trial: str, depth: int, lr: float, status: str, accs: list[float], dims: list[str]):
    best = max(range(len(accs)), key=lambda e: accs[e]) if accs else None
    ckpt = f"/runs/{RUN}/trials/{trial}/checkpoints/epoch-{best:04d}" if accs else None
    return {
        "trial_id": trial,
        **{k: v for k, v in (("freeze_depth", depth), ("lr", lr)) if k in dims},
        "status": status,
        "epochs_run": len(accs),
        "best_val_acc": accs[best] if accs else None,
        "best_epoch": best,
        "val_acc": accs[best] if accs else None,
        "train_time_s": 5.8 * len(accs),
        "checkpoint_uri": ckpt,
        "error": ERROR_TEXT if status == "error" else None,
    }


def write_search_run(root: Path, dims: list[str] = ["freeze_depth", "lr"]) -> Path:  # noqa: B006
    """A finished search run under `root` as jobs.search.tune leaves it, searching `dims`."""
    run = root / RUN
    (run / "model").mkdir(parents=True)
    grid = {"freeze_depth": [0, 2], "lr": [0.01, 0.001]}
    search = {**{d: grid[d] for d in dims}, "metric": "val_acc", "mode": "max"}
    (run / "spec.yaml").write_text(yaml.safe_dump(_spec(search)))
    lines = _metrics(TRIALS, dims)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    rows = [_row(*t, dims=dims) for t in TRIALS]
    write_trials_table(RunLayout(resolve(str(run))), rows)
    best = rows[0]
    model = {
        "backbone": "resnet18",
        "trial_id": best["trial_id"],
        "hyperparameters": {d: best[d] for d in dims},
        "metrics": {"val_acc": best["best_val_acc"], "epoch": best["best_epoch"]},
        "checkpoint": best["checkpoint_uri"],
    }
    (run / "model" / "model.json").write_text(json.dumps(model))
    return run


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_search_run(root)
    return root


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 2000, path  # a real plot, not an empty canvas


def assert_report(out: Path, files: list[str]) -> None:
    names = ["curves.png", "freeze_lr.png", "epochs.png", "trials.csv", "index.html"]
    assert sorted(Path(f).name for f in files) == sorted(names)
    assert all(Path(f).parent == out for f in files)
    for name in ("curves.png", "freeze_lr.png", "epochs.png"):
        assert_png(out / name)
    page = (out / "index.html").read_text()
    assert all(trial in page for trial, *_ in TRIALS)
    assert page.count('src="data:image/png;base64,') == 3
    assert "resnet18" in page
    with (out / "trials.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial_id"] for r in rows] == [t for t, *_ in TRIALS]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]


def test_build_report_writes_plots_csv_and_page(storage: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = build_report(str(storage), None, RUN, out)
    assert_report(out, result["files"])
    assert result["best_trial"] == "4e507_00001"
    assert result["trials"] == len(TRIALS)
    assert result["model_uri"] == str(storage / RUN / "model")
    page = (out / "index.html").read_text()
    assert str(storage / RUN / "model") in page
    assert "freeze_depth=2 lr=0.01" in page
    # Text from storage is escaped, never markup.
    assert "&lt;rank 0&gt; failed &amp; died" in page
    assert "<rank 0>" not in page
    # The page works on its own: nothing refers to the files next to it.
    assert 'src="curves.png"' not in page


def test_csv_keeps_every_column_and_empty_nulls(storage: Path, tmp_path: Path) -> None:
    build_report(str(storage), None, RUN, tmp_path / "out")
    with (tmp_path / "out" / "trials.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"freeze_depth", "lr", "status", "epochs_run", "best_val_acc", "checkpoint_uri"} <= set(
        rows[0]
    )
    failed = rows[-1]
    assert failed["status"] == "error" and failed["best_val_acc"] == ""
    assert failed["error"] == ERROR_TEXT
    assert rows[2]["status"] == "stopped" and rows[2]["epochs_run"] == "2"


@pytest.mark.parametrize("dims", [["lr"], ["freeze_depth"]])
def test_one_searched_dimension_still_plots(tmp_path: Path, dims: list[str]) -> None:
    root = tmp_path / "runs"
    write_search_run(root, dims)
    out = tmp_path / "out"
    result = build_report(str(root), None, RUN, out)
    assert_report(out, result["files"])


def test_cli_report_default_out_dir(
    storage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", RUN, "--storage", str(storage)])
    assert result.exit_code == 0, result.output
    out = Path("report") / RUN
    printed = result.stdout.split()
    assert printed == [str(out / n) for n in ("curves.png", "freeze_lr.png", "epochs.png")] + [
        str(out / "trials.csv"),
        str(out / "index.html"),
    ]
    assert_report(tmp_path / out, [str(tmp_path / p) for p in printed])


def test_cli_report_out_option(storage: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir"
    result = runner.invoke(app, ["report", RUN, "--storage", str(storage), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file()


def test_unknown_run_names_the_runs_there(storage: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["report", "nope", "--storage", str(storage), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "run 'nope' not found" in result.output
    assert f"(runs there: {RUN})" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_run_under_empty_root(tmp_path: Path) -> None:
    with pytest.raises(TlctlError) as info:
        build_report(str(tmp_path / "empty"), None, "nope", tmp_path / "o")
    assert info.value.exit_code == 2
    assert "(no runs there)" in info.value.message


PLAIN_T0 = 1795900000.0
# (epoch, val_acc, images_per_s, seconds after start); the restart re-runs epoch 2, whose
# first line the restarted rank 0 drops (MetricsLog.load) — kept here, the report drops it.
PLAIN_EPOCHS = [(0, 0.40, 120.0, 10), (1, 0.55, 160.0, 20), (2, 0.50, 161.0, 30)]
PLAIN_RERUN = [(2, 0.62, 158.0, 60), (3, 0.70, 170.0, 70)]
FAILURE_CAUSE = "ActorDiedError: worker <rank 1> died"


def _plain_line(epoch: int, acc: float, ips: float, at: float) -> dict[str, Any]:
    line = _epoch_line("x", {}, epoch, acc)
    del line["trial_id"]
    return {**line, "images_per_s": ips, "time": PLAIN_T0 + at}


def write_plain_run(root: Path, name: str = "plain", *, epochs: bool = True) -> Path:
    """A plain run that lost a worker after epoch 3 and resumed from epoch 2's checkpoint,
    skipping a broken newer one, as jobs.training.loop and the failure callback log it."""
    run = root / name
    run.mkdir(parents=True)
    (run / "spec.yaml").write_text(yaml.safe_dump({**_spec(None), "name": name}))
    placement = {"kind": "event", "event": "workers", "epoch": 0, "workers": []}
    lines = [{**placement, "time": PLAIN_T0}]
    if epochs:
        lines += [_plain_line(*e) for e in PLAIN_EPOCHS]
        lines += [
            {
                "kind": "event",
                "event": "worker_failure",
                "ranks": [1],
                "cause": FAILURE_CAUSE,
                "time": PLAIN_T0 + 35,
            },
            {
                "kind": "event",
                "event": "checkpoint_skipped",
                "epoch": 2,
                "checkpoint": "/runs/plain/checkpoints/epoch-0002",
                "reason": "model.pt has 10 bytes, the manifest says 20",
                "time": PLAIN_T0 + 50,
            },
            {
                "kind": "event",
                "event": "resumed",
                "epoch": 2,
                "from_checkpoint_epoch": 1,
                "time": PLAIN_T0 + 50,
            },
            {**placement, "epoch": 2, "time": PLAIN_T0 + 50},
        ]
        lines += [_plain_line(*e) for e in PLAIN_RERUN]
        model = {
            "backbone": "resnet18",
            "metrics": {"val_acc": 0.70, "epoch": 3},
            "checkpoint": "/runs/plain/checkpoints/epoch-0003",
        }
        (run / "model").mkdir()
        (run / "model" / "model.json").write_text(json.dumps(model))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def test_plain_run_report_tells_the_training_story(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_plain_run(root)
    out = tmp_path / "out"
    result = build_report(str(root), None, "plain", out)
    names = ["curves.png", "throughput.png", "timeline.png", "epochs.csv", "index.html"]
    assert [Path(f).name for f in result["files"]] == names
    for name in names[:3]:
        assert_png(out / name)
    assert result["kind"] == "train" and result["epochs"] == 4
    assert result["best_epoch"] == 3 and result["best_val_acc"] == 0.70
    assert result["model_uri"] == str(root / "plain" / "model")
    # One row per epoch, the re-run epoch with its last values, in epoch order.
    with (out / "epochs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(r["val_acc"]) for r in rows] == [0.40, 0.55, 0.62, 0.70]
    assert [float(r["images_per_s"]) for r in rows] == [120.0, 160.0, 158.0, 170.0]
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert 'src="curves.png"' not in page
    assert "tlctl run report: plain" in page
    assert "0.7 (epoch 4)" in page  # best val acc, 1-based
    # The restart story, escaped: failure with its cause, the skipped checkpoint, the resume.
    assert "ActorDiedError: worker &lt;rank 1&gt; died" in page and "<rank 1>" not in page
    assert "model.pt has 10 bytes, the manifest says 20" in page
    assert "from the checkpoint of epoch 2" in page
    assert "1 checkpoint skipped, 1 resumed, 1 worker failure" in page
    assert "workers</td>" not in page  # placements are not events worth a mark


def test_plain_run_timeline_marks_restarts_and_resumes(tmp_path: Path) -> None:
    from orchestrator.report.run import run_context

    root = tmp_path / "runs"
    run = write_plain_run(root)
    layout = RunLayout(resolve(str(run)))
    ctx = run_context(layout, layout.read_spec())
    assert [e["event"] for e in ctx["events"]] == [
        "worker_failure",
        "checkpoint_skipped",
        "resumed",
    ]
    assert ctx["start"] == PLAIN_T0
    assert [m["epoch"] for m in ctx["epochs"]] == [0, 1, 2, 3]


def test_plain_run_report_json(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_plain_run(root)
    result = runner.invoke(
        app, ["report", "plain", "--storage", str(root), "--out", str(tmp_path / "o"), "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["kind"] == "train" and out["epochs"] == 4 and len(out["files"]) == 5


def test_plain_run_without_epochs_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_plain_run(root, epochs=False)
    result = runner.invoke(
        app, ["report", "plain", "--storage", str(root), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "run 'plain' has no epochs recorded yet" in result.output
    assert "tlctl runs show plain" in result.output
    assert not (tmp_path / "o").exists()


def test_a_lost_best_checkpoint_is_shown(tmp_path: Path) -> None:
    """A trial whose best epoch lost its checkpoint to ASHA's stop: the table names the
    earlier checkpoint and its metric instead of implying the best epoch has one."""
    root = tmp_path / "runs"
    run = write_search_run(root)
    layout = RunLayout(resolve(str(run)))
    rows = layout.read_trials_table()
    for row in rows:  # as jobs.search.trials writes them: every row has every column
        row.update(checkpoint_epoch=row["best_epoch"], checkpoint_val_acc=row["best_val_acc"])
    stopped = rows[2]
    stopped.update(
        checkpoint_epoch=0,
        checkpoint_val_acc=0.25,
        checkpoint_uri=f"/runs/{RUN}/trials/{stopped['trial_id']}/checkpoints/epoch-0000",
    )
    write_trials_table(layout, rows)
    build_report(str(root), None, RUN, tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    assert f"{stopped['checkpoint_uri']} (epoch 1, val_acc 0.25)" in page
    shown = runner.invoke(
        app, ["runs", "show", RUN, "--storage", str(root)], env={"COLUMNS": "300"}
    )
    assert shown.exit_code == 0, shown.output
    assert "(epoch 1, val_acc 25.0%)" in shown.output


def test_unfinished_search_says_so(storage: Path, tmp_path: Path) -> None:
    (storage / RUN / "trials.parquet").unlink()
    with pytest.raises(TlctlError) as info:
        build_report(str(storage), None, RUN, tmp_path / "o")
    assert info.value.exit_code == 2
    assert "has no trials.parquet yet" in info.value.message


def test_out_dir_not_writable(storage: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    result = runner.invoke(
        app, ["report", RUN, "--storage", str(storage), "--out", str(blocker / "sub")]
    )
    assert result.exit_code == 2
    assert f"--out: cannot write to {blocker / 'sub'}" in result.output
