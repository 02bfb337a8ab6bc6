#!/usr/bin/env bash
# The one-call GPU check (issue 12).  On an H100/H200 device machine (no network):
#
#   bash bench/device_check.sh [OUTDIR]          # OUTDIR defaults to $OUT, else bench/results
#
# 1. records the card, driver and toolkit;
# 2. builds and installs kronlin with the machine's own packages
#    (pip --no-build-isolation --no-deps; CUDA module for this card only);
#    wheels under .whl/ (e.g. array-api-strict) are installed first if present;
# 3. runs the whole test suite, CuPy and torch-CUDA legs included;
# 4. runs compute-sanitizer (memcheck) over the CUDA kernel tests;
# 5. times the GPU paths (bench/device_check.py) and writes gpu-<date>.json/.md,
#    printing the markdown table last.
#
# Without a GPU every GPU step is skipped with one line saying so (CI runs it
# that way: tests/test_device_check.py).  Environment switches:
#   KRONLIN_CHECK_INSTALL=0   use the kronlin already installed (CI)
#   KRONLIN_CHECK_SUITE=0     skip step 3
#   KRONLIN_CHECK_QUICK=1     smaller timing sizes
#   KRONLIN_CHECK_SUITE_ARGS  pytest arguments for step 3; default -k "cupy or cuda or jax" (the GPU legs: CI
#                             runs the rest); set it empty for the whole suite
#   KRONLIN_CHECK_TIMINGS_ARGS extra arguments for bench/device_check.py (e.g. --only gram)
#   KRONLIN_CHECK_*_LIMIT     time limits in seconds of the steps INSTALL, SUITE, SANITIZER, TIMINGS
# The default step limits add up to 9 minutes (540 s); on an H200 on 2026-11-27 the steps took 19 + 100 + 7
# + about 110 s.
# Exit status: the number of failed steps (0 = all passed or skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/device-check.log"
: >"$LOG"
PY=${PYTHON:-python3}
# JAX would take 75% of the GPU's memory in each of the suite's worker processes
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
failed=0
declare -A status
say() { echo "device_check: $*" | tee -a "$LOG"; }
step() {  # step NAME LIMIT_S CMD... : run with a time limit, log, record pass/fail
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  say "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status[$name]="passed ($((SECONDS - t0)) s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status[$name]="TIMED OUT after ${limit} s"; failed=$((failed + 1))
  else status[$name]="FAILED, exit $rc ($((SECONDS - t0)) s; see device-check.log)"; failed=$((failed + 1)); fi
  say "$name: ${status[$name]}"
}

gpu=$("$PY" - <<'PYEOF' 2>/dev/null
try:
    import cupy
    print(cupy.cuda.runtime.getDeviceCount())
except Exception:
    print(0)
PYEOF
)
gpu=${gpu:-0}

# 1. the machine
say "host $(hostname), $(nproc) cores, $("$PY" --version 2>&1)"
if command -v nvidia-smi >/dev/null && [ "$gpu" -gt 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
  (command -v nvcc >/dev/null && nvcc --version | tail -1) | tee -a "$LOG"
else
  say "no CUDA device: skipping the GPU steps (tests' GPU legs, compute-sanitizer, GPU timings); CPU steps still run"
fi

# 2. build and install with the machine's own packages
if [ "${KRONLIN_CHECK_INSTALL:-1}" != "0" ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 120 "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
  fi
  arch=()
  if [ "$gpu" -gt 0 ]; then
    cc=$("$PY" -c "import cupy; d=cupy.cuda.Device(0).compute_capability; print(d)" 2>/dev/null)
    [ -n "$cc" ] && arch=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$cc")
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) step install "${KRONLIN_CHECK_INSTALL_LIMIT:-90}" "$PY" -m pip install -q --no-build-isolation --no-deps \
    -Cbuild-dir=build/device-check "${arch[@]}" .
else
  say "install: skipped (KRONLIN_CHECK_INSTALL=0), using $("$PY" -c 'import kronlin, os; print(os.path.dirname(kronlin.__file__))')"
fi

# 3. the whole suite, GPU legs included
if [ "${KRONLIN_CHECK_SUITE:-1}" != "0" ]; then
  extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  eval "suite_args=(${KRONLIN_CHECK_SUITE_ARGS-'-k' 'cupy or cuda or jax'})"  # shell words, quotes honoured
  # -v: every result is in the log as it happens, so a time-out still shows what failed
  step suite "${KRONLIN_CHECK_SUITE_LIMIT:-210}" "$PY" -m pytest -v -p no:cacheprovider "${extra[@]}" -rfE \
    --tb=short --durations=10 "${suite_args[@]}"
  grep -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$LOG" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -60
  grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1 | tee -a "$LOG"
  [ "$gpu" -gt 0 ] || say "suite: ran without a GPU, so its CuPy and torch-CUDA legs were skipped"
else
  say "suite: skipped (KRONLIN_CHECK_SUITE=0)"
fi

# 4. compute-sanitizer over the CUDA kernel tests
if [ "$gpu" -gt 0 ] && command -v compute-sanitizer >/dev/null; then
  step sanitizer "${KRONLIN_CHECK_SANITIZER_LIMIT:-60}" compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_woodbury.py::test_gram_cuda_kernel_matches_cpu \
    -k "eig_scale or gram or binding or mixed"
  grep -E "ERROR SUMMARY" "$LOG" | tail -1 | tee -a "$LOG"
else
  say "sanitizer: skipped ($([ "$gpu" -gt 0 ] && echo 'compute-sanitizer not found' || echo 'no CUDA device'))"
fi

# 5. GPU timings (prints one 'skipped' line without a GPU)
checks="$OUTDIR/.device-check-steps.json"
"$PY" - "$checks" <<PYEOF
import json, sys
json.dump({$(for k in "${!status[@]}"; do printf '"%s": "%s", ' "$k" "${status[$k]}"; done)}, open(sys.argv[1], "w"))
PYEOF
quick=(); [ "${KRONLIN_CHECK_QUICK:-0}" != "0" ] && quick=(--quick)
eval "timing_args=(${KRONLIN_CHECK_TIMINGS_ARGS:-})"
step timings "${KRONLIN_CHECK_TIMINGS_LIMIT:-180}" "$PY" bench/device_check.py --out "$OUTDIR" --checks "$checks" \
  "${quick[@]}" "${timing_args[@]}"
if [ "$gpu" -eq 0 ]; then status[timings]="skipped (no CUDA device)"; grep "device_check timings: skipped" "$LOG" | tail -1; fi
rm -f "$checks"
md=$(ls -t "$OUTDIR"/gpu-*.md 2>/dev/null | head -1)
say "steps: $(for k in "${!status[@]}"; do printf '%s=%s; ' "$k" "${status[$k]}"; done)"
[ -n "$md" ] && [ "$gpu" -gt 0 ] && cat "$md"
exit $failed
