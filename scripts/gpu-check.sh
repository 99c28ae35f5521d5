#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and the usual CUDA Python stack (torch, triton,
# transformers, onnx, onnxruntime) already installed, no network needed: installs llmc over it,
# runs the GPU tests (the CUDA executor against onnxruntime and the interpreter, CUDA-graph replay,
# every zoo family), then `llmc bench --target cuda` on a 1.1B Llama-style model. Results go to
# ${OUT:-gpu-check-out}/ (test log, bench.json, bench.md). Meant to finish in under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# llmc itself, over what is installed (no downloads): the cuda target needs no TVM
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -3
set +e
timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider gpu_tests/test_cuda_executor.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 300 "$PY" -m llmc.cli -v bench llama-1b --target cuda --prompt-len 512 --new-tokens 128 --repeats 3 \
    --json "$OUT/bench.json" 2>"$OUT/bench.log" | tee "$OUT/bench.md"
bench=${PIPESTATUS[0]}
set -e
echo "gpu tests: exit $tests; bench: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
