#!/usr/bin/env bash
# The sample-efficiency study on a GPU: the main job end to end, then the batching sweep.
#
#   bash benchmarks/gpu_study.sh                       # on the lent GPU machine; results go to $OUT
#   ATTNLAB_GPU_CHECK_QUICK=1 bash benchmarks/gpu_study.sh   # CPU dry run: quick config, tiny sweep
#
# The GPU machine has jax, flax, optax, orbax, chex, scipy and scikit-learn but
# not ml_collections, grain or tensorflow-datasets (nor their own needs): carry
# them as wheels in .whl/ (see ../.library/device/README.md) and this script
# installs them into /tmp/site. Writes $OUT/study.txt and $OUT/sweep.txt.
# STUDY_SECONDS and SWEEP_SECONDS bound the two steps (defaults fit a 10-minute call
# after benchmarks/gpu_check.sh).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/attnlab_gpu_study}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
QUICK="${ATTNLAB_GPU_CHECK_QUICK:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -n 3
  export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the image's own packages: only what is missing
fi

if [ "$QUICK" = "1" ]; then
  export JAX_PLATFORMS=cpu
  CONFIG=configs/sample_efficiency/digits.py:quick
  SWEEP_ARGS=(--min_steps 10 --epochs 1 --repeats 1)
else
  CONFIG=configs/sample_efficiency/digits.py
  SWEEP_ARGS=(--repeats 1)
fi

echo "== the main job: $CONFIG =="
WORKDIR="$(mktemp -d)/study"
{
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
  start=$SECONDS
  timeout "${STUDY_SECONDS:-170}" "$PYTHON" train.py --config "$CONFIG" --workdir "$WORKDIR"
  echo "train.py exit code: $?, wall $((SECONDS - start)) s (start-up and compile included)"
  cat "$WORKDIR/report.md" 2>/dev/null | head -n 60
} 2>&1 | tee "$OUT/study.txt" | tail -n 40

echo "== the batching sweep: batched vs vmapped vs sequential =="
timeout "${SWEEP_SECONDS:-150}" "$PYTHON" benchmarks/sweep.py "${SWEEP_ARGS[@]}" 2>&1 \
  | tee "$OUT/sweep.txt" | tail -n 20
echo "sweep exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/sweep.txt"
