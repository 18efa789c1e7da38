#!/usr/bin/env bash
# The Hopper kernel check (issue 23), one prepared script for a lent H100/H200, < 8 minutes:
#
#   bash benchmarks/hopper_check.sh           # on the GPU machine; everything goes to $OUT
#   ATTNLAB_GPU_CHECK_QUICK=1 bash benchmarks/hopper_check.sh   # CPU dry run (interpret mode,
#                                                                # tiny shapes; proves the script)
#
# Steps (each under its own timeout, so one stuck step cannot eat the others' time):
#   1. install attnlab (no deps, no network); $OUT/env.txt
#   2. the Mosaic GPU kernels' tests, natively (gpu-marked: values and gradients against the
#      float64 reference) plus the Triton kernels' native tests -> $OUT/tests.txt  (~90 s)
#   3. the tuning sweep, Mosaic GPU tiles against Triton -> $OUT/tune_mgpu.md and
#      $OUT/tuned_gpu.json (copy it to attnlab/kernels/tuned_gpu.json to make the
#      winners the default)                                                       (~150 s)
#   4. the kernel table: ours (Triton and Mosaic GPU), jax's attention_mgpu, cuDNN ->
#      $OUT/attention_kernels.md                                                  (~200 s)
# Afterwards, commit the tables under benchmarks/results/<device>_<date>_jax<version>/.
set -uo pipefail

OUT="${OUT:-/tmp/attnlab_hopper_check}"
source "$(dirname "$0")/gpu_env.sh"  # install, platform, $OUT/env.txt

if [ "$QUICK" = "1" ]; then
  TESTS=(tests/test_kernels_mgpu.py -k "lower or bad_ or blocks")
  TUNE_ARGS=(--quick)
  BENCH_ARGS=(--quick)
else
  TESTS=(tests/test_kernels_mgpu.py tests/test_kernels.py -k "native or default_backend or table")
  TUNE_ARGS=(--lengths 8192 --head-dims 64,128 --masks causal,full --configs 128x2,128x3,64x2
             --repeats 5)
  BENCH_ARGS=(--lengths 4096,16384 --head-dims 64,128 --masks causal,full --xla-max-len 4096
              --repeats 5)
fi

echo "== kernel tests (native) =="
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -rs 2>&1 \
  | tee "$OUT/tests.txt" | tail -n 25
echo "tests exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

echo "== Mosaic GPU tuning sweep =="
timeout 170 "$PYTHON" benchmarks/tune_mgpu.py "${TUNE_ARGS[@]}" --out "$OUT/tune_mgpu.md" \
  --out-table "$OUT/tuned_gpu.json" 2>&1 | tail -n 40
echo "tuning exit code: ${PIPESTATUS[0]}"

echo "== kernel benchmark =="
# Rows are written as they are measured: a timeout still leaves the rows done.
timeout 200 "$PYTHON" benchmarks/attention_kernels.py "${BENCH_ARGS[@]}" \
  --out "$OUT/attention_kernels.md" 2>&1 | tail -n 70
echo "benchmark exit code: ${PIPESTATUS[0]}"
