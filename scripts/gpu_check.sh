#!/usr/bin/env bash
# The one GPU check (issue 13): on a CUDA machine, in about 8 minutes, build with the CUDA sources, run every
# GPU test, measure the GPU targets side by side, and write benchmarks/results/gpu_<device>.md. Each stage
# prints one line as it finishes, so a run cut short still says what passed; every stage's full output is
# in $OUT (default gpu-results/). Usage: bash scripts/gpu_check.sh   (OUT=dir to choose where results go)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu-results}
mkdir -p "$OUT_DIR"
export FASTRANK_CUDA=ON TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, its output to $OUT_DIR/NAME.txt
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout -s INT "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1
  rc=$?
  printf '[%s] %s in %ss: %s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" \
    "$(($(date +%s) - start))" "$(tail -n 1 "$OUT_DIR/$name.txt")"
  return $rc
}

stage env 60 bash -c "nvidia-smi -L; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
# The machine may have no network: build in place with what is installed, falling back to CMake directly.
stage build 300 bash -c "$PY -m pip install --no-build-isolation --no-deps --no-index -e . || \
  { cmake -S . -B build/gpu -DFASTRANK_CUDA=ON -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) \
    && cmake --build build/gpu -j && cp build/gpu/_C*.so fastrank/ && echo built with cmake; }"
stage extension 60 env PYTHONPATH="$PWD" $PY -c "import fastrank._C as C; print('fastrank._C has_cuda =', C.has_cuda)"
stage tests 240 env PYTHONPATH="$PWD" $PY -m pytest -q -ra -p no:cacheprovider --durations=15 \
  --junitxml="$OUT_DIR/junit.xml" tests/test_maxsim.py tests/test_maxsim_packed.py tests/test_maxsim_packed_triton.py \
  tests/test_lite.py tests/test_losses.py tests/test_hostile_maxsim.py tests/test_hostile_lite.py tests/test_hostile_losses.py \
  tests/test_dispatch.py tests/test_cuda_offsets.py
stage measure 240 env PYTHONPATH="$PWD" $PY -m fastrank.bench.gpu --out "$OUT_DIR/measure"
if [ -f "$OUT_DIR/measure/report.md" ]; then
  device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo gpu)
  cp "$OUT_DIR/measure/report.md" "benchmarks/results/gpu_${device}.md"
  cp "$OUT_DIR/measure/report.md" "$OUT_DIR/gpu_${device}.md"
  echo "[results] benchmarks/results/gpu_${device}.md"
fi
