"""Parameters with logical axis names, the one way every attnlab parameter is created.

Each parameter carries one logical name per axis ("embed", "heads", "mlp", ...;
"layers" for the stacked blocks of `BackboneConfig.scan_layers`) as Flax
sharding metadata; a mesh mapping can later turn them into shardings without
touching model code (see `attnlab.models.logical_axes`). The names, and the
mesh axes each is split over by default, are stated in `attnlab.axes`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.axes import Axes
from attnlab.models.config import BackboneConfig

Array = jax.Array


def with_logical_axes(init: Callable[..., Array], axes: Axes) -> Callable[..., Array]:
  """`init` with logical axis names attached as sharding metadata.

  Pass the result as a Flax initializer (e.g. `nnx.Embed(embedding_init=...)`).
  eager_sharding=False: the names are logical ("embed", "heads"), not mesh axes,
  so nothing may be sharded at creation; a trainer maps them onto its mesh
  (e.g. under `flax.linen.logical_axis_rules` with `nnx.get_partition_spec`).
  """
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def named_param(init: Callable[..., Array], shape: tuple[int, ...], axes: Axes,
                cfg: BackboneConfig, rngs: nnx.Rngs) -> nnx.Param:
  """A free-standing parameter (position embedding, CLS token, LayerScale) with axis names."""
  if len(shape) != len(axes):
    raise ValueError(f"axes {axes} must name every axis of {shape}.")
  return nnx.Param(with_logical_axes(init, axes)(rngs.params(), shape,
                                                 jnp.dtype(cfg.param_dtype)))


def constant_param(value: float, shape: tuple[int, ...], axes: Axes,
                   cfg: BackboneConfig) -> nnx.Param:
  """A parameter that starts at `value` everywhere (e.g. a learned sigmoid bias).

  It draws no key from the "params" stream, so adding one to a model leaves the
  initial values of every other parameter unchanged.
  """
  if len(shape) != len(axes):
    raise ValueError(f"axes {axes} must name every axis of {shape}.")
  unused_key = jax.random.key(0)  # a constant initializer ignores its key
  init = with_logical_axes(jax.nn.initializers.constant(value), axes)
  return nnx.Param(init(unused_key, shape, jnp.dtype(cfg.param_dtype)))
