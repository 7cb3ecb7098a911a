#!/usr/bin/env bash
# GPU checks of lmmrt's CUDA extension, for the device script (one call on a GPU machine).
#
#   bash bench/cuda_checks.sh            # from the repository root; PYTHON=... to pick the interpreter
#
# Steps (all run; the exit status is non-zero if any failed), logs under "$OUT" when set, else
# bench/results/cuda_checks/:
#   1. build lmmrt._C for this machine's Python when it does not import (pip, no build isolation)
#   2. nvidia-smi, build_info
#   3. pytest tests/kernels/test_cuda_extension.py tests/kernels/test_cuda_kernels.py  (junit XML too)
#   4. compute-sanitizer --tool memcheck on the small *sanitize* tests (decode: head_dim 96, 257 keys,
#      1 and 3 splits; norms: D 97 and 1000), with the caching allocator off so every tensor is its
#      own allocation and an out-of-bounds access cannot land inside a neighbour:
#        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
#          python -m pytest tests/kernels/test_cuda_kernels.py -k sanitize -x -q
#   5. python bench/bench_cuda_decode.py --json "$OUT/bench_cuda_decode.json"
# About 2-4 minutes on an H100/H200 including the build.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${OUT:-bench/results/cuda_checks}
mkdir -p "$LOG"
status=0
step() {  # step NAME CMD...: run, tee to $LOG/NAME.log, remember failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > >(tee "$LOG/$name.log") 2>&1
  local rc=$?
  echo "=== $name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$LOG/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

if ! "$PY" -c "import lmmrt._C" 2>/dev/null; then
  step build env LMMRT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -q -e . || exit 1
fi
step info bash -c "nvidia-smi; \"$PY\" -c 'import lmmrt._C as C, torch; print(C.build_info(), C.device_count(), torch.__version__, torch.cuda.get_device_name())'"
step pytest "$PY" -m pytest -q -rs tests/kernels/test_cuda_extension.py tests/kernels/test_cuda_kernels.py \
  --junitxml "$LOG/pytest.xml"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest tests/kernels/test_cuda_kernels.py -k sanitize -x -q -p no:cacheprovider
else
  echo "=== memcheck: compute-sanitizer not found, skipped" | tee -a "$LOG/summary.txt"
fi
step bench "$PY" bench/bench_cuda_decode.py --json "$LOG/bench_cuda_decode.json"
echo "=== cuda_checks: $([ $status -eq 0 ] && echo PASS || echo FAIL) (logs in $LOG)" | tee -a "$LOG/summary.txt"
exit $status
