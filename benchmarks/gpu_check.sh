#!/usr/bin/env bash
# Everything a session with a lent GPU should run, as ONE device call (about 6 minutes on an H100/H200):
#   1. the GPU tests (no host sync in CUDA training steps, channels_last), when pytest is importable there;
#   2. benchmarks/gpu_throughput.py (transfer_lit vs hand-written loops, ~4.5 min with its 240 s budget).
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
# (arguments go to gpu_throughput.py: `bash benchmarks/gpu_check.sh --tiny` is a CPU smoke run)
# Results: $OUT/gpu_tests.txt and $OUT/gpu_throughput.json (OUT defaults to ./gpu_check_out). PYTHON picks the interpreter.
set -u
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
  | tee "$OUT/device.txt"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sync_free.py tests/test_performance.py \
    2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -15 | tee "$OUT/gpu_tests.txt"
else
  echo "pytest is not installed here: GPU tests skipped" | tee "$OUT/gpu_tests.txt"
fi
timeout 420 "$PY" benchmarks/gpu_throughput.py --json-out "$OUT/gpu_throughput.json" "$@" 2>&1 | tail -40
