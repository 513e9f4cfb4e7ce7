#!/usr/bin/env bash
# Create .venv and install tlctl with its test extras (and onnx, which the tests use for real). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch/torchvision first, pinned to releases that work together (CPU or CUDA wheels).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test,onnx]"
echo "tlctl installed in $(pwd)/.venv (activate: . .venv/bin/activate)"
