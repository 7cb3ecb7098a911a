#!/usr/bin/env bash
# GPU checks of lmmrt's CUDA extension, for the device script (one call on a GPU machine).
#
#   bash bench/cuda_checks.sh            # from the repository root; PYTHON=... to pick the interpreter
#   STEPS="sanitize bench" bash bench/cuda_checks.sh    # a subset (bench/device.sh runs this one)
#
# Steps (all of STEPS run; the exit status is non-zero if any failed), logs under "$OUT" when set,
# else bench/results/cuda_checks/:
#   build     build lmmrt._C for this machine's Python when it does not import (pip, no build isolation)
#   pytest    tests/kernels/test_cuda_extension.py and test_cuda_kernels.py (junit XML too)
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck and initcheck, the four in parallel,
#             each on the small *sanitize* tests (decode: head_dim 96, 257 keys, 1 and 3 splits;
#             norms: D 97 and 1000), with the caching allocator off so every tensor is its own
#             allocation (an out-of-bounds access cannot land inside a neighbour) and so initcheck
#             sees fresh allocations:
#               PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
#                 python -m pytest tests/kernels/test_cuda_kernels.py -k sanitize -x -q
#   bench     python bench/bench_cuda_decode.py --json "$OUT/bench_cuda_decode.json"
# Stopped with SIGINT (bench/device.sh's cap), it still writes summary.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${OUT:-bench/results/cuda_checks}
STEPS=${STEPS:-build pytest sanitize bench}
mkdir -p "$LOG"
status=0
wants() { [[ " $STEPS " == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$LOG/summary.txt"; }
trap 'note "=== cuda_checks: interrupted (SIGINT), steps after this point did not run"; exit 130' INT

step() {  # step NAME CMD...: run, output to $LOG/NAME.log, remember failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$LOG/$name.log"
  note "=== $name: rc=$rc ($((SECONDS - t0)) s)"
  [ $rc -eq 0 ] || status=1
  return $rc
}

if wants build && ! "$PY" -c "import lmmrt._C" 2>/dev/null; then
  step build env LMMRT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -q -e . || exit 1
fi
step info bash -c "nvidia-smi -L; \"$PY\" -c 'import lmmrt._C as C, torch; print(C.build_info(), C.device_count(), torch.__version__, torch.cuda.get_device_name())'"
if wants pytest; then
  step pytest "$PY" -m pytest -q -rs tests/kernels/test_cuda_extension.py tests/kernels/test_cuda_kernels.py \
    --junitxml "$LOG/pytest.xml"
fi
if wants sanitize; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    tools="memcheck racecheck synccheck initcheck"
    for tool in $tools; do
      step "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" -m pytest tests/kernels/test_cuda_kernels.py -k sanitize -x -q -p no:cacheprovider &
    done
    for tool in $tools; do wait -n || status=1; done
  else
    note "=== sanitize: compute-sanitizer not found, skipped"
  fi
fi
if wants bench; then
  step bench "$PY" bench/bench_cuda_decode.py --json "$LOG/bench_cuda_decode.json"
fi
note "=== cuda_checks: $([ $status -eq 0 ] && echo PASS || echo FAIL) (logs in $LOG)"
exit $status
