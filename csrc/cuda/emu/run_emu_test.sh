#!/usr/bin/env bash
# CPU-only correctness test of the CUDA kernels (see emu.h). Usage: csrc/cuda/emu/run_emu_test.sh [quick]
# Needs g++ >= 11 (C++20 <barrier>) and the CUDA toolkit headers (cuda_fp16.h etc.); no GPU, no torch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
out="${TMPDIR:-/tmp}/mmk_emu_test"
"${CXX:-g++}" -std=c++20 -O1 -pthread -I"$cuda_home/include" -I"$here" "$here/emu_test.cpp" -o "$out"
"$out" "$@"
