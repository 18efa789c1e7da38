# Sourced by the one-shot GPU scripts (gpu_check.sh, hopper_check.sh) after they set OUT's
# default: installs attnlab without dependencies or network, pins the platform (cuda, or
# cpu for the ATTNLAB_GPU_CHECK_QUICK=1 dry run) and writes $OUT/env.txt.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
QUICK="${ATTNLAB_GPU_CHECK_QUICK:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the install below fails

# No network there: no build isolation (it would fetch setuptools).
"$PYTHON" -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -n 3

if [ "$QUICK" = "1" ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=cuda  # tests/conftest.py pins cpu unless this is set
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PYTHON" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
