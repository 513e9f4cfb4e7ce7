#!/usr/bin/env bash
# Set up and run the whole test suite (unit + integration against real Ray and SeaweedFS S3).
# Tests start their own SeaweedFS unless TLCTL_TEST_S3_DIR names one started by
# `python -m cluster.local.s3server up` (as .ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/ruff check .
.venv/bin/python -m pytest -ra --durations=15 "$@"
