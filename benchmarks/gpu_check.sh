#!/usr/bin/env bash
# One prepared GPU check for the fused attention kernels (target: < 6 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh            # on the lent GPU machine; results go to $OUT
#   ATTNLAB_GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # CPU dry run: interpret mode,
#                                                             # tiny shapes (proves the script)
#
# Steps: install attnlab (no deps, no network), run the kernel tests with the NATIVE
# Triton kernels (the gpu-marked tests plus the tests that use the default backend),
# then the kernel benchmark at L = 1k, 4k, 16k; D = 64, 128; causal and full; bf16; then the
# decode kernel's tests (native) and the decode benchmark (tokens/s at 4k and 32k cached
# tokens, batch 1 and 16, bf16: jnp unsplit and split vs the Pallas decode kernel).
# Writes $OUT/env.txt, $OUT/tests.txt, $OUT/attention_kernels.md, $OUT/decode_tests.txt
# and $OUT/decode.md.
set -uo pipefail

OUT="${OUT:-/tmp/attnlab_gpu_check}"
source "$(dirname "$0")/gpu_env.sh"  # install, platform, $OUT/env.txt

echo "== kernel tests (native kernels on GPU) =="
# native_gpu: the gpu-marked tests (per-head and [B, H, 1, 1] sigmoid biases with their
# gradient among them); the others call the kernels with the default (native) backend.
SELECT='native_gpu or default_blocks or dispatch or any_real_type or traced_bias or bad_'
timeout 170 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
  -k "$SELECT" -rs 2>&1 | tee "$OUT/tests.txt" | tail -n 25
echo "tests exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"

echo "== kernel benchmark =="
if [ "$QUICK" = "1" ]; then
  BENCH_ARGS=(--quick)
else
  BENCH_ARGS=(--lengths 1024,4096,16384 --head-dims 64,128 --masks causal,full
              --xla-max-len 4096 --repeats 5)
fi
timeout 200 "$PYTHON" benchmarks/attention_kernels.py "${BENCH_ARGS[@]}" \
  --out "$OUT/attention_kernels.md" 2>&1 | tail -n 60
echo "benchmark exit code: ${PIPESTATUS[0]}"

echo "== decode kernel tests (native kernel on GPU) =="
# native_gpu: the gpu-marked decode tests; defaults / pallas_model / bad_ use the default
# (native) backend; the lowering tests need no device.
timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py \
  -k 'native_gpu or defaults or pallas_model or auto_picks or bad_ or lowers' -rs 2>&1 \
  | tee "$OUT/decode_tests.txt" | tail -n 15
echo "decode tests exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/decode_tests.txt"

echo "== decode benchmark =="
if [ "$QUICK" = "1" ]; then
  DECODE_ARGS=(--lengths 256 --batches 1 --repeats 2)
else
  DECODE_ARGS=(--lengths 4096,32768 --batches 1,16 --dtype bfloat16 --repeats 5)
fi
# Rows are written as they are measured: a timeout still leaves the rows done.
timeout 90 "$PYTHON" benchmarks/decode.py "${DECODE_ARGS[@]}" --out "$OUT/decode.md" 2>&1 \
  | tail -n 20
echo "decode benchmark exit code: ${PIPESTATUS[0]}"
