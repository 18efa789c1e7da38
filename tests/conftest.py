"""Test-wide settings: CPU, and no silent rank promotion (a classic source of wrong broadcasts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the platform is pinned)

jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_xla_compile():
  """Skips XLA's optimisation passes for a module that checks values, not speed.

  Halves compile time of the model tests. Opt in per module with
  `pytestmark = pytest.mark.usefixtures("fast_xla_compile")`; restored afterwards
  so memory-analysis tests elsewhere in the same worker see the optimised programs.
  """
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
