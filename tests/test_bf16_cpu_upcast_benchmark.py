"""benchmarks/bf16_cpu_upcast.py: its upcast rules change the products' inputs' types only."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_cpu_upcast  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_upcast_rules_give_the_same_gradients(kind):
  # The upcast of a bf16 value is exact, so the rules differ only in summation order.
  keys = jax.random.split(jax.random.key(0), 4)
  args = tuple(jax.random.normal(key, (4, 64, 2, 64), jnp.bfloat16) for key in keys)
  default, _ = bf16_cpu_upcast.compile_fwd_bwd(kind, bf16_cpu_upcast.RULES["dk/dv upcast (default)"],
                                               args)
  every, _ = bf16_cpu_upcast.compile_fwd_bwd(kind, bf16_cpu_upcast.RULES["every product upcast"],
                                             args)
  for name, a, b in zip("qkv", default(*args), every(*args)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), name
    # One bf16 rounding step (2^-8 relative) of the gradient's magnitude.
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-8 * np.abs(b).max(), err_msg=name)


def test_measure_rules_reports_every_rule():
  keys = jax.random.split(jax.random.key(1), 4)
  args = tuple(jax.random.normal(key, (1, 32, 2, 16), jnp.bfloat16) for key in keys)
  rows = bf16_cpu_upcast.measure_rules("sigmoid", args, repeats=2)
  assert set(rows) == set(bf16_cpu_upcast.RULES)
  default = rows["dk/dv upcast (default)"]
  assert default["ms"] > 0 and default["mib"] >= 0  # the default rule always runs
