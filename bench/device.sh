#!/usr/bin/env bash
# Everything a session lent a GPU runs, in ONE device call from the repository root:
#
#   run(command="LMMRT_GIT_COMMIT=<sha> bash bench/device.sh", timeout_s=500)
#
# Stages run in ORDER, each under its own cap (bench/stages.sh: SIGINT at cap - min(15 s, cap / 4), 20 s for pytest,
# so pytest and the benchmarks still write their reports, SIGKILL at the cap), each isolated (a
# stage that fails or is stopped is recorded and the next one runs). The caps sum to at most
# TOTAL_S (default 460 s, 8 minutes less 20 s), checked before anything runs, so the script ends within
# TOTAL_S (plus a few seconds of bookkeeping) by construction. Without a GPU it stops at once (exit 3)
# after writing a summary that says so. Settings are environment variables: `bash bench/device.sh --help`.
# Most important first: the build, whole-model backend parity and CUDA-graph decode, kernel
# numerics, compute-sanitizer, then the benchmarks. GPU tests run in parallel (pytest-xdist) with
# a per-test timeout (pytest-timeout).
usage() {
  cat <<'EOF'
usage: [VAR=value ...] bash bench/device.sh [-h|--help]

Runs the GPU stages in order (build, GPU tests, compute-sanitizer, benchmarks, merged report), each under
its own cap, and writes everything under OUT. Settings (environment variables):
  STAGES="build tests_model"  run only these stages (default: all but the opt-in ones); names as DRY_RUN=1
                              lists them; opt-in, run only when named: bench_tp
  CAP_<stage>=SECONDS         one stage's cap (SIGINT before it, so reports are written; SIGKILL at it)
  TOTAL_S=460                 the caps of the stages that run must sum to at most this (checked first)
  GRACE_S=15                  seconds between a stage's SIGINT and its cap (at most cap / 4; the pytest
                              stages get 20)
  DRY_RUN=1                   print the stages and their caps, run nothing
  OUT=DIR                     where results go (default bench/results/device-<utc time>/): stages.tsv,
                              summary.md, logs/<stage>.log and .xml (junit), bench-*.json, results.json/.md
  PY=PYTHON                   the Python to run (default /opt/torch/.venv/bin/python, else python3)
  LMMRT_GIT_COMMIT=SHA        the commit the results are recorded under (default: git rev-parse HEAD)
  LMMRT_CUDA_ARCHS=90         the arch to build for (default: the GPU's own, from nvidia-smi)
  ALLOW_NO_GPU=1              run the stages even when nvidia-smi lists no GPU (testing the script on a CPU)
Exit status: 0 when the stages ran (each stage's own status is in stages.tsv and summary.md), 2 for bad
settings, 3 when there is no GPU.
EOF
}
case ${1:-} in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "device.sh: unknown argument '$1': settings are environment variables (bash bench/device.sh --help)" >&2
     exit 2 ;;
esac
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench/results/device-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export OUT REPO
PY=${PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export PY
export PATH="$(dirname "$PY"):$PATH:/usr/local/cuda/bin"   # cmake, ninja from the venv; nvcc
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # real Triton kernels on the GPU
export LMMRT_GIT_COMMIT=${LMMRT_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# Build for this GPU's own arch only (faster), and tell the build tests what to expect.
CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
export LMMRT_CUDA_ARCHS=${LMMRT_CUDA_ARCHS:-${CC:-90}}
. bench/stages.sh

TOTAL_S=${TOTAL_S:-460}
ORDER="env build tests_model tests_kernels cuda_checks bench_xattn bench_perceiver bench_decode_attention
  bench_generate bench_splice_generate bench_mllama bench_serve bench_tp merge"
# tensor parallelism (bench/bench_tp.py) is opt-in, STAGES="... bench_tp": the default caps already fill TOTAL_S
OPT_IN="bench_tp"
# caps in seconds (CAP_<stage>=... in the environment overrides one)
: "${CAP_env:=15}" "${CAP_build:=60}" "${CAP_tests_model:=75}" "${CAP_tests_kernels:=60}" "${CAP_cuda_checks:=60}"
: "${CAP_bench_xattn:=15}" "${CAP_bench_perceiver:=15}" "${CAP_bench_decode_attention:=20}"
: "${CAP_bench_generate:=30}" "${CAP_bench_splice_generate:=30}" "${CAP_bench_mllama:=40}" "${CAP_merge:=10}"
: "${CAP_bench_serve:=30}" "${CAP_bench_tp:=60}"
for name in ${STAGES:-}; do
  if [[ " $(echo $ORDER) " != *" $name "* ]]; then
    echo "device.sh: STAGES names '$name', which is no stage; the stages: $(echo $ORDER)" >&2
    exit 2
  fi
done
sum=0
for name in $ORDER; do cap_var=CAP_$name; want "$name" && sum=$(( sum + ${!cap_var} )); done
if [ "$sum" -gt "$TOTAL_S" ]; then
  echo "device.sh: the stage caps sum to ${sum}s, over TOTAL_S=${TOTAL_S}s; lower a cap" >&2
  exit 2
fi
if [ -n "${DRY_RUN:-}" ]; then  # the plan only
  for name in $ORDER; do cap_var=CAP_$name; want "$name" && echo "$name ${!cap_var}"; done
  echo "total ${sum} of ${TOTAL_S}"
  exit 0
fi
T0=$(date +%s)
printf "stage\trc\tseconds\tcap\n" > "$OUT/stages.tsv"
# A GPU is what this script is for: without one every stage would only fail (or run to its cap).
if ! command -v nvidia-smi > /dev/null; then
  GPU_LINE="NO GPU: nvidia-smi is not on PATH"
else
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1)
  smi_rc=$?
  if [ "$smi_rc" -eq 0 ] && [ -n "$GPUS" ]; then
    GPU_LINE="GPU: $(echo "$GPUS" | paste -sd ';' -)"
  else
    GPU_LINE="NO GPU: nvidia-smi lists none (exit status $smi_rc: $(echo "${GPUS:-no output}" | head -n 2 | paste -sd ' ' -))"
  fi
fi
run_stage() { local cap_var=CAP_$1; stage "$1" "${!cap_var}" "${@:2}"; }

env_report() {
  date -u; nvidia-smi || true
  nvidia-smi --query-gpu=name,compute_cap,clocks.sm,clocks.max.sm,power.draw,power.limit,memory.used,memory.total \
    --format=csv || true
  echo "LMMRT_CUDA_ARCHS=$LMMRT_CUDA_ARCHS"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton, transformers; print('triton', triton.__version__, 'transformers', transformers.__version__)" || true
  "$PY" -c "import xdist, pytest_timeout; print('pytest-xdist and pytest-timeout present')" || true
  command -v nvcc && nvcc --version | tail -n 2
  command -v cmake && cmake --version | head -n 1
  command -v compute-sanitizer || echo "no compute-sanitizer on PATH"
}

# The extension for this machine's Python and GPU: a direct CMake build installed into the source
# tree (lmmrt/_C*.so, git-ignored), which works however lmmrt is imported from the repo root; else
# an editable pip install without build isolation (nothing can be downloaded here).
build_ext() {
  local pb
  rm -f lmmrt/_C*.so
  if pb=$("$PY" -m pybind11 --cmakedir) \
     && cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMMRT_CUDA=ON \
          -DLMMRT_CUDA_ARCHS="$LMMRT_CUDA_ARCHS" -Dpybind11_DIR="$pb" -DPython_EXECUTABLE="$PY" \
          -DCMAKE_INSTALL_PREFIX="$REPO" \
     && cmake --build build/device -j "$(nproc)" && cmake --install build/device \
     && "$PY" -c "import lmmrt._C as C; print('lmmrt._C', C.__file__, C.build_info())"; then
    return 0
  fi
  echo "direct CMake build failed; trying pip install --no-build-isolation --no-deps -e ."
  rm -f lmmrt/_C*.so
  LMMRT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && "$PY" -c "import lmmrt._C as C; print('lmmrt._C', C.__file__, C.build_info())"
}

bench_stage() {  # bench_stage NAME MARGIN_S: python -m bench.run --only NAME, budget = limit - margin
  "$PY" -m bench.run --only "$1" --out "$OUT" --budget-s $(( STAGE_LIMIT > $2 + 10 ? STAGE_LIMIT - $2 : 10 ))
}

# gpu_tests NAME WORKERS PYTEST_ARGS...: parallel, per-test timeout, junit XML. The timeout's thread
# method ends a stuck worker even inside a CUDA call (where SIGALRM would wait); xdist reports the
# test as crashed and starts a new worker.
gpu_tests() {
  local name=$1 workers=$2; shift 2
  "$PY" -m pytest -q -rs -n "$workers" --timeout 60 --timeout-method thread -p no:cacheprovider \
    --junitxml "$OUT/logs/$name.xml" "$@"
}

junit_counts() {  # junit_counts XML: "N tests, F failures, E errors, S skipped (junit)", else why there is none
  local head
  head=$(grep -o -m 1 '<testsuite [^>]*>' "$1" 2>/dev/null) || { echo "no junit XML."; return; }
  for attr in tests failures errors skipped; do
    printf '%s %s, ' "$(sed -n "s/.* $attr=\"\([0-9]*\)\".*/\1/p" <<< "$head")" "$attr"
  done | sed 's/, $/ (junit)./'
}

last_line() { grep -v -e '^(killed at its cap' -e '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1; }

summary() {
  {
    echo "# device run $(date -u +%FT%TZ), commit $LMMRT_GIT_COMMIT, $(( $(date +%s) - T0 ))s of ${TOTAL_S}s," \
      "LMMRT_CUDA_ARCHS=$LMMRT_CUDA_ARCHS"
    echo; echo "$GPU_LINE"
    echo; echo '```'; column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"; echo '```'
    tail -n +2 "$OUT/stages.tsv" | while IFS=$'\t' read -r name rc _ cap; do
      case $rc in
        124) echo; echo "$name: stopped by SIGINT at its cap (${cap}s): what it wrote until then is kept" ;;
        137) echo; echo "$name: KILLED at its cap (${cap}s), it did not stop on SIGINT: no report of its own" \
               "(no junit XML, no counts, no JSON); its log's last line: $(last_line "$OUT/logs/$name.log")" ;;
      esac
    done
    for name in tests_model tests_kernels; do
      grep -q "^$name"$'\t' "$OUT/stages.tsv" || continue
      echo; echo "$name: $(junit_counts "$OUT/logs/$name.xml") $(grep -E '(passed|failed|error)' "$OUT/logs/$name.log" | tail -n 1)"
    done
    [ -f "$OUT/cuda_checks/summary.txt" ] && { echo; echo "cuda_checks:"; cat "$OUT/cuda_checks/summary.txt"; }
  } > "$OUT/summary.md"
  cat "$OUT/summary.md"
}

export -f build_ext env_report bench_stage gpu_tests

if [[ $GPU_LINE == "NO GPU"* ]] && [ -z "${ALLOW_NO_GPU:-}" ]; then
  GPU_LINE="$GPU_LINE: no stage ran (ALLOW_NO_GPU=1 runs them anyway, to test this script on a CPU)"
  summary > /dev/null
  echo "device.sh: $GPU_LINE; summary in $OUT/summary.md" >&2
  exit 3
fi
run_stage env bash -c env_report
run_stage build bash -c build_ext
# whole-model backend parity and CUDA-graph decode (with the CUDA decode kernel in the graph)
STAGE_GRACE=$XDIST_GRACE_S run_stage tests_model bash -c 'gpu_tests tests_model 4 tests/models/test_backend_parity.py \
  tests/runtime/test_static_decode.py tests/kernels/test_cuda_graph_decode.py \
  tests/test_mllama_generate.py::test_cuda_graph_decode_on_gpu \
  tests/runtime/test_decode_compaction.py::test_compaction_captures_and_replays_the_smaller_batch_graph_on_gpu'
# kernel numerics (bf16/fp16 against the references) and the build tests (archs from LMMRT_CUDA_ARCHS)
STAGE_GRACE=$XDIST_GRACE_S run_stage tests_kernels bash -c 'gpu_tests tests_kernels 8 tests/kernels tests/test_build.py -m "not slow" \
  --ignore tests/kernels/test_cuda_graph_decode.py'
# compute-sanitizer memcheck/racecheck/synccheck/initcheck, then the CUDA decode benchmark
run_stage cuda_checks env PYTHON="$PY" OUT="$OUT/cuda_checks" STEPS="sanitize bench" bash bench/cuda_checks.sh
run_stage bench_xattn bash -c "bench_stage xattn 8"
run_stage bench_perceiver bash -c "bench_stage perceiver 8"
run_stage bench_decode_attention bash -c "bench_stage decode_attention 8"
run_stage bench_generate bash -c "bench_stage generate 12"
# LLaVA-1.5-7B and BLIP-2-OPT-2.7B shapes vs transformers; batch 1 of both first, JSON after every case
run_stage bench_splice_generate bash -c "bench_stage splice_generate 6"
# Llama-3.2-11B-Vision shapes vs transformers: TTFT with one 4-tile image, decode at batch 1 and 16
run_stage bench_mllama bash -c "bench_stage mllama 6"
# lmmrt serve's engine on an IDEFICS-9B-shaped model: 1 / 8 / 64 concurrent clients first, JSON after each
run_stage bench_serve "$PY" -m bench.bench_serve --device cuda --pairs 1 --out "$OUT"
# tensor parallelism (bench/bench_tp.py): tokens/s at tp=1 (tp=2 too with two GPUs) on an IDEFICS-9B shape and the
# NCCL all-reduce cost; opt-in (OPT_IN)
run_stage bench_tp "$PY" -m bench.bench_tp --device cuda --out "$OUT"
run_stage merge "$PY" -m bench.run --merge-only --out "$OUT"
summary
exit 0
