"""The GPU benchmark cannot run here; its --smoke mode proves the script itself works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_throughput_smoke_runs_the_training_step() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    result = json.loads(out)
    assert result["smoke"] is True
    assert [r["backbone"] for r in result["results"]] == ["mobilenet_v3_large", "resnet50"]
    assert all(r["images_per_s"] > 0 for r in result["results"])
