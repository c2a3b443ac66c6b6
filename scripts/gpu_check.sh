#!/usr/bin/env bash
# make gpu-check: run on a machine with a CUDA GPU, its own python3 and torch (no venv,
# no network). Builds bpext, runs the test suite (CUDA cases included), compute-sanitizer
# memcheck and racecheck on a short run of every CUDA kernel, and the GPU benchmark.
# Logs and results go to $OUT (default out/gpu-check); a summary is printed last. The step
# limits add up to under 9 minutes: one run and a rerun fit a session's 15 minutes of device time
# only if the machine is released between them (FP32=1 adds the float32 benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - start)) "$(tail -n 1 "$OUT/$name.log")")")
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

# Only the SIMD levels this CPU runs: the build fits its limit.
if ! step build 180 env MAX_JOBS="$(nproc)" BPEXT_SIMD_LEVELS=native \
    $PY -m pip install --no-build-isolation --no-deps -e .; then
  tail -n 40 "$OUT/build.log"; printf '%s\n' "${summary[@]}"; exit 1
fi
step errors 30 $PY -X faulthandler -m pytest -q -p no:cacheprovider tests/test_errors.py
# That machine has no network: pytest-xdist, transformers and timm are used only where present.
PYTEST_ARGS=()
$PY -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 8)
$PY -c "import transformers, timm" 2>/dev/null || PYTEST_ARGS+=(--ignore=tests/test_convert.py)
step tests 150 $PY -m pytest -q -m "not slow" -p no:cacheprovider "${PYTEST_ARGS[@]}"
step memcheck 75 compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/cuda_smoke.py
[ "${SKIP_RACECHECK:-0}" = 1 ] || \
  step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 1 $PY scripts/cuda_smoke.py
step bench_bf16 90 $PY -m bpext bench --device cuda --dtype bfloat16 --no-compile --out "$OUT/bench_bf16"
[ "${FP32:-0}" = 1 ] && step bench_fp32 100 $PY -m bpext bench --device cuda --dtype float32 --no-compile \
  --suite activation --suite dense --out "$OUT/bench_fp32"

grep -E "passed|failed" "$OUT/tests.log" | tail -n 3
sed -n '/^bpext vs native/,$p' "$OUT/bench_bf16.log"
[ -f "$OUT/bench_fp32.log" ] && sed -n '/^bpext vs native/,$p' "$OUT/bench_fp32.log"
printf '%s\n' "${summary[@]}"
