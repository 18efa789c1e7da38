"""Functions that read something off a whole built model: axis names, size, attention maps."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from attnlab.axes import Axes, variable_axes

Array = jax.Array


def logical_axes(model: nnx.Module) -> dict[tuple[Any, ...], Axes | None]:
  """The logical axis names of every parameter, keyed by its path in `nnx.state(model)`.

  Works on abstract models from `nnx.eval_shape` too. A parameter without names
  maps to None (every attnlab parameter has names; the tests check it). With
  `scan_layers=True` the blocks' parameters have no block index in their path
  and "layers" first among their names.

  Example:
    >>> logical_axes(model)[("encoder", "blocks", 0, "attn", "query", "kernel")]
    ('embed', 'heads', 'head_dim')
  """
  return {path: variable_axes(var)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on `nnx.eval_shape` models: nothing is allocated)."""
  return sum(math.prod(var.shape) for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def attention_maps(model: nnx.Module, *args: Any, **kwargs: Any) -> list[Array]:
  """Each layer's attention weights [B, H, Lq, Lk] (float32), from one deterministic pass.

  `model` is a `ViT` or `Transformer`; `args`/`kwargs` are what its `__call__`
  takes (images, or tokens and `padding_mask_BL`). Only for kinds that define
  weights (every kind with pairwise scores; not `linear`). Jit it like any pure
  function of the model: ``nnx.jit(attention_maps)(model, x)``.
  """
  _, maps = model(*args, deterministic=True, return_attention_weights=True, **kwargs)
  return list(maps)
