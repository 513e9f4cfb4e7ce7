"""Output for people and for pipes: piped, every table row and every epoch is one line,
never wrapped or cut at 80 columns; text from storage is printed, never read as markup.

CliRunner's stdout is not a terminal, as in `tlctl runs list | grep NAME`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator import display
from orchestrator.cli import app

runner = CliRunner()
LONG = "digits-cluster-finetune-resnet50-freeze2-lr3e-4-long-name-0001"  # 62 characters


def write_run(root: Path, name: str, classes: list[str], epochs: int = 2) -> None:
    run = root / name
    run.mkdir(parents=True)
    spec = {
        "name": name,
        "backbone": {"name": "resnet18", "freeze_depth": 2},
        "train": {"epochs": epochs},
        "data": {"train": "/data/train"},
        "storage": {"uri": str(root)},
    }
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    (run / "classes.json").write_text(json.dumps(classes))
    lines = [
        {
            "kind": "epoch",
            "epoch": e,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 1.1,
            "val_acc": 0.4 + e / 10,
            "images_per_s": 123.4,
            "epoch_time_s": 4.5,
            "time": 1795900000.0 + e,
        }
        for e in range(epochs)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, LONG, ["cat", "dog"])
    write_run(root, "marked", ["cat[/]", "[bold]dog"])
    return root


def test_runs_list_piped_is_one_full_row_per_run(storage: Path) -> None:
    out = runner.invoke(app, ["runs", "list", "--storage", str(storage)], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    rows = out.stdout.splitlines()
    assert rows[0].split()[:3] == ["name", "status", "backbone"]
    mine = [r for r in rows if LONG in r]  # `| grep NAME` finds the whole name on one line
    assert len(mine) == 1 and mine[0].split()[0] == LONG
    assert len(mine[0]) > 80  # not wrapped or cut to the 80 columns a pipe gets
    assert not any("…" in r or "│" in r for r in rows)  # no ellipsis, no box drawing


def test_runs_show_prints_storage_text_literally(storage: Path) -> None:
    out = runner.invoke(app, ["runs", "show", "marked", "--storage", str(storage)])
    assert out.exit_code == 0, out.output
    assert "cat[/], [bold]dog" in out.stdout
    epochs = [r for r in out.stdout.splitlines() if r.split()[:1] in (["1"], ["2"])]
    assert len(epochs) == 2 and all("4.5 s" in r for r in epochs)


def test_an_epoch_line_is_one_line_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    progress = display.TrainingProgress(epochs=100)
    with progress:
        progress.update(
            {
                "epoch_done": 9,
                "epoch": 9,
                "train_loss": 1.23456,
                "train_acc": 0.5,
                "val_loss": 2.34567,
                "val_acc": 0.25,
                "images_per_s": 12345.6,
                "epoch_time_s": 1234.5,
            }
        )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("epoch 10/100") and lines[0].endswith("img/s  1234.5 s")
    assert len(lines[0]) > 80


def test_a_piped_search_prints_a_line_per_trial_epoch_and_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = display.SearchProgress(epochs=4)
    with progress:
        for item in (
            {"search": True, "trial_id": "ab[/]_00000", "status": "running"},
            {"search": True, "trial_id": "ab[/]_00000", "epoch": 0, "val_acc": 0.5},
            {"search": True, "trial_id": "ab[/]_00000", "epoch": 1, "val_acc": 0.6},
            {"search": True, "trial_id": "ab[/]_00000", "status": "stopped"},
        ):
            progress.update({"status": "running", **item})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "trial ab[/]_00000 running",
        "trial ab[/]_00000 epoch 1/4  train acc -  val loss - acc 50.0%",
        "trial ab[/]_00000 epoch 2/4  train acc -  val loss - acc 60.0%",
        "trial ab[/]_00000 stopped",
    ]


def test_a_run_that_does_not_read_is_listed_as_unreadable(storage: Path) -> None:
    (storage / "broken").mkdir()
    (storage / "broken" / "spec.yaml").write_text("name: Not A Valid Name\n")
    out = runner.invoke(app, ["runs", "list", "--storage", str(storage)])
    assert out.exit_code == 0, out.output
    broken = [r for r in out.stdout.splitlines() if r.startswith("broken ")]
    assert len(broken) == 1 and "unreadable (" in broken[0] and "not a tlctl job spec" in broken[0]
    assert any(r.startswith(LONG) for r in out.stdout.splitlines())
