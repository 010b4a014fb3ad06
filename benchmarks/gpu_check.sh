#!/usr/bin/env bash
# One-call GPU check on a fresh machine (H200: Python 3.12, torch, triton, pytest,
# hypothesis, ninja preinstalled; no internet). Builds the extension for sm_90,
# runs the test suite (CUDA + Triton backends), then benchmarks/bench_gpu.py.
# Logs, CSV and markdown go under $OUT when set (else benchmarks/results/gpu).
# The whole run is held under ~8 minutes (TOTAL_S, default 450 s): the tests and
# the benchmarks get what the build leaves. The benchmark table is printed last.
#
#   bash benchmarks/gpu_check.sh      # env: OUT, TOTAL_S, TEST_MAX_S, PYTEST_ARGS, MAX_JOBS, PYTHON, BENCH_ARGS
#   BENCH_ARGS=--dry-run bash benchmarks/gpu_check.sh   # the whole flow on a CPU machine (tiny shapes)
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-450}
LOG_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$LOG_DIR"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }

export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
# The H200 image's python3 is the one with torch; a plain `python` may not exist there.
PY=${PYTHON:-python3}

{ nvidia-smi || true; $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"; } \
  > "$LOG_DIR/env.txt" 2>&1
say "environment: $(tail -n 1 "$LOG_DIR/env.txt")"
# At most 8 files come back from the device machine: env.txt (with mmkernels.info appended),
# build.log, pytest_triton.log, pytest.log, bench.log, bench/bench_gpu.{csv,md,png}.

# 1. build (CUDA extension for sm_90)
say "building: $PY -m pip install --no-build-isolation --no-deps -e . (log: $LOG_DIR/build.log)"
BUILD_MAX_S=${BUILD_MAX_S:-240}
timeout -k 10 "$BUILD_MAX_S" $PY -m pip install --no-build-isolation --no-deps -e . > "$LOG_DIR/build.log" 2>&1
BUILD_RC=$?
if [ $BUILD_RC -ne 0 ] && [ $BUILD_RC -ne 124 ] && ! grep -q "error:" "$LOG_DIR/build.log"; then
  # pip's editable machinery (not the compiler) can be what fails on a foreign image:
  # build in place instead; a compile error or a timeout would only repeat.
  say "pip failed (rc=$BUILD_RC); trying setup.py build_ext --inplace"
  timeout -k 10 "$BUILD_MAX_S" $PY setup.py build_ext --inplace >> "$LOG_DIR/build.log" 2>&1
  BUILD_RC=$?
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
say "build rc=$BUILD_RC"
[ $BUILD_RC -ne 0 ] && tail -n 30 "$LOG_DIR/build.log"
INFO=$($PY -m mmkernels.info 2>&1)
printf '\n== python -m mmkernels.info ==\n%s\n' "$INFO" >> "$LOG_DIR/env.txt"
say "$(echo "$INFO" | sed -n 3,4p | tr '\n' ' ')"

# 2. tests: the Triton tests first, then the op tests (CUDA backend, contract edges, model,
#    transformers backend), each to the end (no -x: one failure must not hide the rest).
#    No autotuning in tests: one compilation per kernel variant. MMKERNELS_REQUIRE_EXT=1: on
#    this machine a missing CUDA kernel or an unusable Triton fails its tests, never skips them.
export MMKERNELS_REQUIRE_EXT=1
LEFT=$(( TOTAL_S - $(elapsed) ))
TEST_MAX_S=${TEST_MAX_S:-260}
TEST_S=$(( LEFT - 170 ))
[ $TEST_S -gt $TEST_MAX_S ] && TEST_S=$TEST_MAX_S
[ $TEST_S -lt 80 ] && TEST_S=80
T1=$(( TEST_S / 2 ))
# Compiling the kernel variants is most of the tests' time: spread it over worker processes.
XDIST_TRITON=""
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then XDIST_TRITON="-n 8"; XDIST="-n 4"; fi
say "tests 1/2: pytest python_tests/test_triton.py $XDIST_TRITON -q (limit ${T1}s, log: $LOG_DIR/pytest_triton.log)"
MMKERNELS_TRITON_AUTOTUNE=0 timeout -k 10 "$T1" $PY -m pytest python_tests/test_triton.py $XDIST_TRITON -q -p no:cacheprovider -rfEs --durations=15 \
  > "$LOG_DIR/pytest_triton.log" 2>&1
TRITON_TEST_RC=$?
[ $TRITON_TEST_RC -eq 124 ] && echo "(pytest stopped by the ${T1}s limit)" >> "$LOG_DIR/pytest_triton.log"
say "triton tests rc=$TRITON_TEST_RC: $(tail -n 1 "$LOG_DIR/pytest_triton.log")"
T2=$(( TEST_S - T1 ))
# The data, training and benchmark-script tests need no GPU and run in CI: only the op tests here.
GPU_TESTS="python_tests/test_cross_modal_attention.py python_tests/test_gated_fusion.py python_tests/test_dispatch.py
  python_tests/test_contract_edges.py python_tests/test_property.py python_tests/test_errors.py
  python_tests/test_model_fusion.py python_tests/test_integration_transformers.py python_tests/test_key_masks.py
  python_tests/test_nn_multihead_attention.py python_tests/test_integration_families.py
  python_tests/test_integration_patches.py"
say "tests 2/2: pytest $XDIST ${PYTEST_ARGS:--q} (op tests; limit ${T2}s, log: $LOG_DIR/pytest.log)"
MMKERNELS_TRITON_AUTOTUNE=0 timeout -k 10 "$T2" $PY -m pytest $GPU_TESTS $XDIST ${PYTEST_ARGS:--q} -p no:cacheprovider \
  -rfEs --durations=15 > "$LOG_DIR/pytest.log" 2>&1
TEST_RC=$?
[ $TEST_RC -eq 124 ] && echo "(pytest stopped by the ${T2}s limit)" >> "$LOG_DIR/pytest.log"
say "other tests rc=$TEST_RC: $(tail -n 1 "$LOG_DIR/pytest.log")"

# 3. benchmarks with what is left
LEFT=$(( TOTAL_S - $(elapsed) ))
BENCH_S=$(( LEFT - 20 ))
[ $BENCH_S -gt 300 ] && BENCH_S=300
[ $BENCH_S -lt 90 ] && BENCH_S=90
say "benchmarks: benchmarks/bench_gpu.py (budget ${BENCH_S}s, log: $LOG_DIR/bench.log)"
timeout -k 10 $(( BENCH_S + 60 )) $PY benchmarks/bench_gpu.py --budget-s "$BENCH_S" --out "$LOG_DIR/bench" ${BENCH_ARGS:-} \
  > "$LOG_DIR/bench.log" 2>&1
BENCH_RC=$?
say "benchmarks rc=$BENCH_RC"

# summary, then the table last
echo
echo "==== gpu_check summary ($(elapsed)s) ===="
echo "build rc=$BUILD_RC   triton tests rc=$TRITON_TEST_RC   other tests rc=$TEST_RC   bench rc=$BENCH_RC   logs: $LOG_DIR"
for f in pytest_triton.log pytest.log; do
  echo "-- $f: $(tail -n 1 "$LOG_DIR/$f")"
  n=$(grep -cE "^(FAILED|ERROR)" "$LOG_DIR/$f")
  [ "$n" -gt 0 ] && echo "   $n failed:"
  grep -E "^(FAILED|ERROR)" "$LOG_DIR/$f" | cut -c1-200 | head -n 60
  [ "$n" -gt 60 ] && echo "   ... and $(( n - 60 )) more in $f"
done
echo "-- bench.log: $(grep -c Traceback "$LOG_DIR/bench.log") tracebacks (failed entries say FAILED in the table)"
if grep -q "=== mmkernels GPU benchmarks" "$LOG_DIR/bench.log"; then
  sed -n '/=== mmkernels GPU benchmarks/,$p' "$LOG_DIR/bench.log"
else
  echo "(no benchmark table: last lines of bench.log)"
  tail -n 25 "$LOG_DIR/bench.log"
fi
# non-zero when the build or a test failed (the benchmark's own failures are in its table)
[ $BUILD_RC -eq 0 ] && [ $TRITON_TEST_RC -eq 0 ] && [ $TEST_RC -eq 0 ]
