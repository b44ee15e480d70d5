#!/usr/bin/env bash
# Everything a session with a lent GPU should run, as ONE device call (200 s of GPU work on an H100, 2026-11-26,
# before jpeg_fit and gpu_decode were added; those add about a minute):
#   1. the GPU tests (no host sync in CUDA training steps, channels_last, fused AdamW), when pytest is importable;
#   2. benchmarks/gpu_throughput.py (transfer_lit vs hand-written loops; 159 s on the H100 with its 240 s budget);
#   3. benchmarks/jpeg_fit.py for ResNet-50 (does the loader keep the GPU fed from a JPEG folder?), again with
#      --resized-cache (data.cache_dir), and gpu_decode.py.
# The exit status is 1 when any step failed.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
# (arguments go to gpu_throughput.py: `bash benchmarks/gpu_check.sh --tiny` is a CPU smoke run)
# JPEG_ROOT=DIR gives jpeg_fit/gpu_decode a folder of JPEGs (default: ../shared's hymenoptera, else generated ones).
# Results: $OUT/gpu_tests.txt, $OUT/gpu_throughput.json, $OUT/jpeg_fit.txt, $OUT/jpeg_fit_resized_cache.txt,
# $OUT/gpu_decode.txt (OUT defaults to
# ./gpu_check_out). PYTHON picks the interpreter.
set -u -o pipefail
status=0
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
  | tee "$OUT/device.txt"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sync_free.py tests/test_speed.py \
    2>&1 | tee "$OUT/gpu_tests_full.txt" | tail -15 | tee "$OUT/gpu_tests.txt" || status=1
else
  echo "pytest is not installed here: GPU tests skipped" | tee "$OUT/gpu_tests.txt"
fi
timeout 420 "$PY" benchmarks/gpu_throughput.py --json-out "$OUT/gpu_throughput.json" "$@" 2>&1 | tail -40 || status=1
# jpeg_fit and gpu_decode take only --tiny from the arguments (their own defaults otherwise).
jpeg=(--models resnet50)
decode=()
case " $* " in *" --tiny "*) jpeg=(--tiny); decode=(--generate 6 --passes 1) ;; esac
if [ -n "${JPEG_ROOT:-}" ]; then jpeg+=(--root "$JPEG_ROOT"); decode+=(--root "$JPEG_ROOT"); fi
timeout 150 "$PY" benchmarks/jpeg_fit.py "${jpeg[@]}" 2>&1 | tee "$OUT/jpeg_fit.txt" | tail -3 || status=1
# The same from data.cache_dir (images resized once): what a many-epoch run on full-size photos gets.
timeout 150 "$PY" benchmarks/jpeg_fit.py "${jpeg[@]}" --resized-cache 2>&1 | tee "$OUT/jpeg_fit_resized_cache.txt" \
  | tail -3 || status=1
timeout 60 "$PY" benchmarks/gpu_decode.py ${decode[@]+"${decode[@]}"} 2>&1 | tee "$OUT/gpu_decode.txt" | tail -1 || status=1
exit $status
