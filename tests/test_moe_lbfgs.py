"""attnlab.moe.lbfgs on problems with known minima, alone and vmapped with frozen fits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.moe import lbfgs


def _rosenbrock(p):
  x, y = p["x"], p["y"]
  return (1 - x) ** 2 + 100 * (y - x * x) ** 2


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def test_finds_the_rosenbrock_minimum_and_says_it_converged():
  start = {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}
  res = jax.jit(lambda p: lbfgs.minimize(jax.value_and_grad(_rosenbrock), p, max_evaluations=2000,
                                         tolerance=1e-12))(start)
  assert bool(res.converged)
  np.testing.assert_allclose([res.params["x"], res.params["y"]], [1.0, 1.0], atol=1e-5)
  assert float(res.value) < 1e-10 and 20 < int(res.evaluations) < 2000


def test_a_capped_fit_is_not_called_converged():
  start = {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}
  res = lbfgs.minimize(jax.value_and_grad(_rosenbrock), start, max_evaluations=10, tolerance=1e-12)
  assert not bool(res.converged) and int(res.evaluations) == 10


def test_vmapped_fits_each_solve_their_own_least_squares_problem():
  rng = np.random.default_rng(0)
  M = jnp.asarray(rng.normal(size=(4, 20, 3)))
  y = jnp.asarray(rng.normal(size=(4, 20)))
  want = np.stack([np.linalg.lstsq(np.asarray(M[i]), np.asarray(y[i]), rcond=None)[0] for i in range(4)])

  def solve(m, t):
    loss = lambda p: jnp.mean((m @ p["w"] - t) ** 2)  # noqa: E731
    return lbfgs.minimize(jax.value_and_grad(loss), {"w": jnp.zeros(3)}, max_evaluations=500,
                          tolerance=1e-14)

  res = jax.jit(jax.vmap(solve))(M, y)
  assert bool(jnp.all(res.converged))
  np.testing.assert_allclose(res.params["w"], want, atol=1e-6)
