#!/usr/bin/env bash
# Sets everything up, then runs the main job (README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
printf '\n==> kernel benchmarks (quick)\n'
$PY benchmarks/bench_attention.py --quick
$PY benchmarks/bench_gated_fusion.py --quick
