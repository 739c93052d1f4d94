#!/usr/bin/env bash
# The GPU suite, for one GPU (about 8 minutes on an H100/H200): the GPU-gated tests (fp16 with loss
# scaling and bf16 on every engine at world size 1 over NCCL, compile on CUDA), then the benchmarks
# of tools/gpu_suite.py (one table; JSON to ${OUT:-.}/gpu_suite.json). No network, random weights.
#   bash tools/gpu_suite.sh            # on the GPU machine, from the repository root
#   python tools/gpu_suite.py --dry-run  # the same code on a CPU at tiny sizes (a test runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# The benchmarks run even when a test fails or runs past TESTS_LIMIT_S; the exit status is the first
# failure's. The benchmarks print each row as it ends and rewrite the JSON after it.
status=0
timeout "${TESTS_LIMIT_S:-900}" $PY -m pytest -q -rs -m gpu tests/distributed/test_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests.log" || status=$?
$PY tools/gpu_suite.py --json "$OUT/gpu_suite.json" 2>&1 | tee "$OUT/gpu_suite.log" || { rc=$?; [ "$status" != 0 ] || status=$rc; }
exit "$status"
