"""Test-wide settings: CPU, and no silent rank promotion (a classic source of wrong broadcasts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the platform is pinned)

jax.config.update("jax_numpy_rank_promotion", "raise")
