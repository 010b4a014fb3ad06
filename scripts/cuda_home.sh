#!/usr/bin/env bash
# Prints the CUDA toolkit root (empty if none). nvcc may be a wrapper script that
# execs the real one: follow it, else torch guesses one level too high.
if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; exit 0; fi
command -v nvcc >/dev/null 2>&1 || exit 0
real=$(grep -ao '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1)
[ -n "$real" ] || real=$(readlink -f "$(command -v nvcc)")
dirname "$(dirname "$real")"
