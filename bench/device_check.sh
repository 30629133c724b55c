#!/usr/bin/env bash
# The one prepared script a session with a lent GPU runs (bench/README.md says how to call it):
# build with all cores, run the test suite (CUDA tests included), compute-sanitizer on a small
# CUDA case, the Python and C++ benchmarks; logs and JSON under $OUT; a short table last.
# Budget: about 9 minutes on an H100/H200 (use timeout_s=590). Steps run in order of priority,
# so a run cut short still leaves the build, test and sanitizer results in $OUT. Each step has
# its own timeout, a failed step does not stop the later ones, and the exit status is non-zero
# if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRY=${CARRY:-.carry}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export PEARLMOE_CUDA_ARCHS=${PEARLMOE_CUDA_ARCHS:-9.0a} PEARLMOE_WITH_CUDA=ON
SUMMARY="$OUT/summary.md"
failed=0
: >"$SUMMARY"

# step NAME TIMEOUT_S CMD...: run CMD with a timeout, log to $OUT/NAME.log, record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS status
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  status=$?
  tail -n 15 "$OUT/$name.log"
  if [ $status -eq 0 ]; then result=pass; else result="FAIL ($status)"; failed=1; fi
  printf '| %s | %s | %d s |\n' "$name" "$result" $((SECONDS - t0)) >>"$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
  git log -1 --format='commit %h %s' 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# CUTLASS headers from the carried wheel (the machine has no network).
if ls "$CARRY"/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  rm -rf /tmp/pm-cutlass && mkdir -p /tmp/pm-cutlass
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/pm-cutlass')" \
    "$(ls "$CARRY"/nvidia_cutlass-*.whl | head -1)"
  export PEARLMOE_CUTLASS_DIR=/tmp/pm-cutlass/cutlass_library/source
fi

step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
# The emulated kernel tests (-m emu) ran in CI; here the kernels themselves run.
step tests 240 "$PY" -m pytest -q -ra -m "not emu" tests
step sanitize-memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$PY" bench/sanitize_case.py
step sanitize-racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 1 \
  "$PY" bench/sanitize_case.py
step bench-routing 90 "$PY" bench/bench_routing.py --device cuda --out "$OUT" --tokens 1 64 4096
step bench-moe 150 "$PY" bench/bench_moe.py --device cuda --out "$OUT"
step bench-attention 120 "$PY" bench/bench_attention.py --device cuda --out "$OUT"
step bench-model 120 "$PY" bench/bench_model.py --device cuda --out "$OUT"
step bench-decode 90 "$PY" bench/bench_decode.py --device cuda --backend cudagraph --out "$OUT"
step bench-decode-eager 90 "$PY" bench/bench_decode.py --device cuda --backend eager --out "$OUT"
# AR eager (the baseline row) vs CUDA-graph AR / speculative / PEARL on the embedded pair.
# 8 prompts (the CLI's default is 16): the step's time limit was sized for 8.
step pearlmoe-bench 120 "$PY" -m pearlmoe.cli bench --device cuda --backend cudagraph \
  --dtypes bfloat16 --prompts 8 --out "$OUT"

BENCHMARK_DIR=$(ls -d "$CARRY"/benchmark/usr/lib/*/cmake/benchmark 2>/dev/null | head -1)
if [ -n "$BENCHMARK_DIR" ]; then
  export LD_LIBRARY_PATH="$(dirname "$(dirname "$BENCHMARK_DIR")"):${LD_LIBRARY_PATH:-}"
  step bench-cpp-build 240 bash -c "cmake -S bench/cpp -B build/bench-cpp -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -Dbenchmark_DIR=$PWD/$BENCHMARK_DIR -DBENCH_CUDA_ARCHS=90a \
    -DPython_EXECUTABLE=$(command -v "$PY") -DCUTLASS_DIR=${PEARLMOE_CUTLASS_DIR:-} \
    -DPEARLMOE_KERNELS_LIB=$(ls "$PWD"/build/*/libpearlmoe_kernels.a 2>/dev/null | head -1) \
    && cmake --build build/bench-cpp"
  step bench-cpp-routing 60 build/bench-cpp/bench_routing_cuda --benchmark_min_time=0.05 \
    --benchmark_out="$OUT/bench_routing_cuda.json" --benchmark_out_format=json
  step bench-cpp-moe-gemm 120 build/bench-cpp/bench_moe_gemm_cuda --benchmark_min_time=0.05 \
    --benchmark_out="$OUT/bench_moe_gemm_cuda.json" --benchmark_out_format=json
  step bench-cpp-attention 60 build/bench-cpp/bench_attention_cuda --benchmark_min_time=0.05 \
    --benchmark_out="$OUT/bench_attention_cuda.json" --benchmark_out_format=json
else
  echo "no Google Benchmark in $CARRY (run 'make carry' first): C++ benchmarks not run" |
    tee -a "$SUMMARY"
  failed=1
fi

echo
echo "| step | result | time |"
echo "|---|---|---|"
cat "$SUMMARY"
grep -A25 '^routing ops on' "$OUT/bench-routing.log" 2>/dev/null
grep -A10 '^moe_ffn on' "$OUT/bench-moe.log" 2>/dev/null
grep -A12 '^attention on' "$OUT/bench-attention.log" 2>/dev/null
grep -A5 '^model on' "$OUT/bench-model.log" 2>/dev/null
grep -A5 '^decoding on' "$OUT/bench-decode.log" 2>/dev/null
grep -B3 -A5 '^dtype ' "$OUT/pearlmoe-bench.log" 2>/dev/null
exit $failed
