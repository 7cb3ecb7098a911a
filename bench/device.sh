#!/usr/bin/env bash
# Everything a session lent a GPU runs, in ONE device call from the repository root:
#
#   run(command="LMMRT_GIT_COMMIT=<sha> bash bench/device.sh", timeout_s=480)
#
# Stages run in order, each under its own `timeout`, each isolated (a stage that fails or times
# out is recorded and the next one still runs), all of them within TOTAL_S seconds (default 420,
# 7 minutes); a stage that would get under 20 s is skipped, and 25 s stay for the final merge. Everything lands under
# $OUT (else bench/results/device-<utc time>/):
#   stages.tsv              stage, exit status, seconds, limit        summary.md   the digest
#   logs/<stage>.log        full output of each stage                  logs/pytest.xml
#   bench-*.json            one per benchmark (written after every case, so a timeout keeps data)
#   results.json/.md, *.png merged results, table and plots            cuda_checks/  bench/cuda_checks.sh's own logs
# STAGES="build bench_xattn merge" runs a subset (names as in stages.tsv); PY=... picks Python.
# Order: the correctness and benchmark stages this project needs most come first; cuda_checks.sh
# (compute-sanitizer; its kernel tests already ran in `tests`) and the video benchmark use what
# time is left.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench/results/device-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export OUT
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export PY
export PATH="$(dirname "$PY"):$PATH:/usr/local/cuda/bin"   # cmake, ninja from the venv; nvcc
TOTAL_S=${TOTAL_S:-420}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # real Triton kernels on the GPU
export LMMRT_GIT_COMMIT=${LMMRT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
printf "stage\trc\tseconds\tlimit\n" > "$OUT/stages.tsv"

want() { [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME CAP_SECONDS CMD... : runs CMD under timeout min(CAP, time left - reserve); STAGE_LIMIT
# is exported so a command can size its own internal budget.
stage() {
  local name=$1 cap=$2; shift 2
  want "$name" || return 0
  local reserve=25 least=20   # every stage leaves >= 25 s for the final merge
  [ "$name" = merge ] && reserve=0 least=5
  local left=$(( TOTAL_S - ($(date +%s) - T0) - reserve ))
  local lim=$(( cap < left ? cap : left ))
  if [ "$lim" -lt "$least" ]; then
    printf "%s\tskipped\t0\t0\n" "$name" >> "$OUT/stages.tsv"
    echo "== $name: skipped (total time budget spent)"
    return 0
  fi
  echo "== $name (limit ${lim}s)"
  local s=$(date +%s)
  STAGE_LIMIT=$lim timeout -k 10 "$lim" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local d=$(( $(date +%s) - s ))
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "(timed out after ${lim}s)" >> "$OUT/logs/$name.log"
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$d" "$lim" >> "$OUT/stages.tsv"
  tail -n 6 "$OUT/logs/$name.log" | sed 's/^/   /'
  echo "== $name: rc=$rc in ${d}s"
}

env_report() {
  date -u; nvidia-smi || true
  nvidia-smi --query-gpu=name,compute_cap,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used,memory.total \
    --format=csv || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton, transformers; print('triton', triton.__version__, 'transformers', transformers.__version__)" || true
  command -v nvcc && nvcc --version | tail -n 2
  command -v cmake && cmake --version | head -n 1
  command -v compute-sanitizer || echo "no compute-sanitizer on PATH"
}

# The extension for this machine's Python: a direct CMake build installed into the source tree
# (lmmrt/_C*.so, git-ignored), which works however lmmrt is imported from the repo root; else an
# editable pip install without build isolation (nothing can be downloaded here).
build_ext() {
  local cc arch pb
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  arch=${LMMRT_CUDA_ARCHS:-${cc:-90}}
  rm -f lmmrt/_C*.so
  if pb=$("$PY" -m pybind11 --cmakedir) \
     && cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMMRT_CUDA=ON \
          -DLMMRT_CUDA_ARCHS="$arch" -Dpybind11_DIR="$pb" -DPython_EXECUTABLE="$PY" -DCMAKE_INSTALL_PREFIX="$REPO" \
     && cmake --build build/device -j "$(nproc)" && cmake --install build/device \
     && "$PY" -c "import lmmrt._C as C; print('lmmrt._C', C.__file__, C.build_info())"; then
    return 0
  fi
  echo "direct CMake build failed; trying pip install --no-build-isolation --no-deps -e ."
  rm -f lmmrt/_C*.so
  LMMRT_CUDA=ON LMMRT_CUDA_ARCHS="$arch" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && "$PY" -c "import lmmrt._C as C; print('lmmrt._C', C.__file__, C.build_info())"
}

bench_stage() {  # bench_stage NAME MARGIN_S: python -m bench.run --only NAME, budget = limit - margin
  "$PY" -m bench.run --only "$1" --out "$OUT" --budget-s $(( STAGE_LIMIT > $2 + 10 ? STAGE_LIMIT - $2 : 10 ))
}

summary() {
  {
    echo "# device run $(date -u +%FT%TZ), commit $LMMRT_GIT_COMMIT, $(( $(date +%s) - T0 ))s of ${TOTAL_S}s"
    echo; echo '```'; column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"; echo '```'
    for f in "$OUT"/logs/tests.log; do [ -f "$f" ] && { echo; echo "tests: $(tail -n 1 "$f")"; }; done
    [ -f "$OUT/cuda_checks/summary.txt" ] && { echo; echo "cuda_checks:"; cat "$OUT/cuda_checks/summary.txt"; }
  } > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

export -f build_ext env_report bench_stage
export REPO

stage env          20 bash -c env_report
stage build       150 bash -c build_ext
stage info         30 "$PY" -m lmmrt info
# The tests that need a GPU (kernels in bf16/fp16 against the reference, the whole model on the
# triton backend, CUDA-graph decode); the CPU suite is what CI runs.
stage tests       150 "$PY" -m pytest -q -rs tests/kernels tests/models/test_backend_parity.py \
  tests/runtime/test_static_decode.py -m "not slow" -p no:cacheprovider --junitxml "$OUT/logs/pytest.xml"
stage bench_perceiver 60 bash -c "bench_stage perceiver 15"
stage bench_xattn  90 bash -c "bench_stage xattn 20"
stage bench_generate 150 bash -c "bench_stage generate 45"
if [ -f bench/cuda_checks.sh ]; then  # it runs bench_cuda_decode.py itself
  stage cuda_checks 150 env PYTHON="$PY" OUT="$OUT/cuda_checks" bash bench/cuda_checks.sh
elif [ -f bench/bench_cuda_decode.py ]; then
  stage bench_cuda_decode 60 "$PY" bench/bench_cuda_decode.py --json "$OUT/bench_cuda_decode.json"
fi
[ -f bench/bench_video_overlap.py ] && stage bench_video_overlap 75 "$PY" bench/bench_video_overlap.py
stage merge 30 "$PY" -m bench.run --merge-only --out "$OUT"
summary
exit 0
