#!/usr/bin/env bash
# C++ unit tests of csrc/common with CMake + ctest; the CPU kernels are also
# built against libtorch when torch is importable (as an IDE / C++ user would).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
prefix=$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build/cmake "${gen[@]}" -DCMAKE_BUILD_TYPE=Release ${prefix:+-DCMAKE_PREFIX_PATH="$prefix"}
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure
