"""The GPU benchmark cannot run here; its --smoke mode proves the script itself works, as
`python -m benchmarks.gpu_throughput` and with neither Ray nor pydantic importable (the
GPU machine's image has torch, not tlctl's other dependencies)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WITHOUT_RAY_AND_PYDANTIC = (
    "import runpy, sys; sys.modules['ray'] = sys.modules['pydantic'] = None; "
    "sys.argv = ['gpu_throughput', '--smoke']; "
    "runpy.run_module('benchmarks.gpu_throughput', run_name='__main__')"
)


def test_gpu_throughput_smoke_runs_the_training_step() -> None:
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_AND_PYDANTIC],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    ).stdout
    result = json.loads(out)
    assert result["smoke"] is True
    assert [r["backbone"] for r in result["results"]] == ["mobilenet_v3_large", "resnet50"]
    assert all(r["images_per_s"] > 0 for r in result["results"])
