#!/usr/bin/env bash
# Sets everything up, then runs the main job (README's first command): builds the
# default AV-MNIST-with-questions data (cached), trains the quick text + image +
# audio fusion model on CPU and prints its evaluation report.
# Extra arguments are config overrides, e.g. train.epochs=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
printf '\n==> train configs/quick.yaml and report\n'
$PY -m mmkernels.train --config configs/quick.yaml "$@"
