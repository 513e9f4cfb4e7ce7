#!/usr/bin/env bash
# The quickstart, end to end and offline: install, start a local S3 server (SeaweedFS),
# make synthetic source/target datasets, pre-train a small backbone on the source, then
# fine-tune it on the target with a frozen prefix (real transfer learning), and compare
# with the same budget from scratch. A few minutes on 2 CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0

S3DIR=.tlctl/s3
python -m cluster.local.s3server up --dir "$S3DIR" --port 9000 --bucket tlctl
eval "$(python -m cluster.local.s3server env --dir "$S3DIR")"

tlctl data synth data/source --variant source --classes 6 --per-class 200 --size 32 --seed 1
tlctl data synth data/target/train --variant target --classes 6 --per-class 60 --size 32 --seed 2
tlctl data synth data/target/val --variant target --classes 6 --per-class 40 --size 32 --seed 3
tlctl data synth data/target/test --variant target --classes 6 --per-class 30 --size 32 --seed 4
tlctl data synth data/incoming --variant target --classes 6 --per-class 20 --size 32 --seed 5

tlctl submit examples/source.yaml --local        # 1. pre-train on the source shapes
tlctl submit examples/quickstart.yaml --local    # 2. fine-tune on the target, frozen prefix
tlctl submit examples/scratch.yaml --local       # 3. control: same budget from scratch

S=(--storage s3://tlctl/runs --endpoint http://127.0.0.1:9000)
tlctl runs list "${S[@]}"
tlctl runs show quickstart "${S[@]}"
tlctl evaluate quickstart --data data/target/test "${S[@]}"   # 4. held-out metrics + plots
tlctl models promote quickstart --model shapes --reason "quickstart" "${S[@]}"   # 5. champion
tlctl predict shapes@champion --input data/incoming --output s3://tlctl/predictions/incoming \
  --overwrite "${S[@]}"                                        # 6. batch inference via the alias
tlctl export shapes@champion --format onnx "${S[@]}"           # 7. ONNX, verified in onnxruntime

cat <<MSG

The S3 server is still running, so you can explore the runs:
  . .venv/bin/activate && eval "\$(python -m cluster.local.s3server env --dir $S3DIR)"
  tlctl runs show quickstart --storage s3://tlctl/runs --endpoint http://127.0.0.1:9000
  tlctl models history shapes --storage s3://tlctl/runs --endpoint http://127.0.0.1:9000
The evaluation (metrics.json, confusion.png, reliability.png, errors.html) is under
s3://tlctl/runs/quickstart/eval/test/, the predictions under s3://tlctl/predictions/incoming/,
the ONNX model (uint8 NHWC images in, logits out) under s3://tlctl/runs/quickstart/export/onnx/.
Next, a Ray Tune search over freeze depth and learning rate on the same data (a few more
minutes), its ranked trials and a visual report:
  tlctl submit examples/search.yaml --local
  tlctl runs show search-demo --storage s3://tlctl/runs --endpoint http://127.0.0.1:9000
  tlctl report search-demo --storage s3://tlctl/runs --endpoint http://127.0.0.1:9000 --out report/
Stop it with:  python -m cluster.local.s3server down --dir $S3DIR
MSG
