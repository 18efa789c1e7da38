"""Test-wide settings: CPU, and no silent rank promotion (a classic source of wrong broadcasts)."""

import gc
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


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
  """Drops every compiled XLA program when a test module ends.

  Each CPU executable keeps its own memory mappings until its cache entry dies, and one
  pytest-xdist worker runs half the suite: near the end it passed the kernel's
  `vm.max_map_count` (65,530 by default), and the next compile failed with "LLVM compilation
  error: Cannot allocate memory" / "Failed to materialize symbols" (CI, 2026-12-06;
  reproduced by lowering the limit to 6,000 under tests/test_train.py). The few programs a
  later module shares are compiled again, which costs seconds.
  """
  yield
  jax.clear_caches()
  gc.collect()
