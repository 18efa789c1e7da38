"""Input checks shared by every attention entry point.

Each check raises a ValueError that names the argument, the shape it saw and the
shape it expected, so a researcher never has to decode a broadcasting error from
deep inside an einsum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from attnlab import checks


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static sizes of one attention call (q [B, Lq, H, D], k [B, Lk, Hkv, D], v [B, Lk, Hkv, Dv])."""
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_dim: int

  @property
  def group(self) -> int:
    """Query heads per key/value head (1 for multi-head, H for multi-query)."""
    return self.num_heads // self.num_kv_heads


def _rank4(name: str, x: Any, layout: str) -> tuple[int, ...]:
  shape = getattr(x, "shape", None)
  if shape is None:
    raise ValueError(f"{name} must be an array of shape {layout}; got {type(x).__name__}.")
  if len(shape) != 4:
    raise ValueError(f"{name} must have rank 4 with layout {layout}; got shape {tuple(shape)}.")
  return tuple(shape)


def check_qk(q: Any, k: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Checks q [B, Lq, H, D] against k [B, Lk, Hkv, D] and returns their shapes."""
  q_shape = _rank4("q", q, "[batch, q_length, num_heads, head_dim]")
  k_shape = _rank4("k", k, "[batch, kv_length, num_kv_heads, head_dim]")
  if q_shape[0] != k_shape[0]:
    raise ValueError(f"q and k must share the batch dimension; got q {q_shape} and k {k_shape}.")
  if q_shape[3] != k_shape[3]:
    raise ValueError(
        f"q and k must share head_dim (last axis); got q {q_shape} and k {k_shape}.")
  if q_shape[2] % k_shape[2]:
    raise ValueError(
        f"num_heads of q ({q_shape[2]}) must be a multiple of num_kv_heads of k ({k_shape[2]}) "
        f"for grouped-query attention; got q {q_shape} and k {k_shape}.")
  for name, x in (("q", q), ("k", k)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
  return q_shape, k_shape


def check_qkv(q: Any, k: Any, v: Any) -> Dims:
  """Checks the three attention inputs and returns their sizes."""
  q_shape, k_shape = check_qk(q, k)
  v_shape = _rank4("v", v, "[batch, kv_length, num_kv_heads, value_dim]")
  if v_shape[:3] != k_shape[:3]:
    raise ValueError(
        f"v must match k in batch, kv_length and num_kv_heads; got k {k_shape} and v {v_shape}.")
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise ValueError(f"v must be a floating-point array; got dtype {v.dtype}.")
  return Dims(batch=q_shape[0], q_len=q_shape[1], kv_len=k_shape[1], num_heads=q_shape[2],
              num_kv_heads=k_shape[2], head_dim=q_shape[3], value_dim=v_shape[3])


def _check_broadcastable(name: str, x: Any, dims: Dims) -> None:
  target = (dims.batch, dims.num_heads, dims.q_len, dims.kv_len)
  shape = getattr(x, "shape", None)
  # Rank 4 only: a [B, Lk] padding mask silently read as [Lq, Lk] is exactly the bug to prevent.
  ok = shape is not None and len(shape) == 4 and all(s in (1, t) for s, t in zip(shape, target))
  if not ok:
    raise ValueError(
        f"{name} must have rank 4 and be broadcastable to [batch, num_heads, q_length, kv_length] "
        f"= {list(target)} (each axis of size 1 or the full size); got shape "
        f"{None if shape is None else tuple(shape)}. E.g. a key-padding mask is [B, 1, 1, Lk].")


def check_mask_and_bias(mask: Any, bias: Any, dims: Dims) -> None:
  if mask is not None:
    _check_broadcastable("mask", mask, dims)
    if jnp.asarray(mask).dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = may attend); got dtype {mask.dtype}. "
                       "Pass e.g. `mask.astype(bool)`; use `bias` for additive logits.")
  if bias is not None:
    _check_broadcastable("bias", bias, dims)
    if not jnp.issubdtype(jnp.asarray(bias).dtype, jnp.floating):
      raise ValueError(f"bias must be a floating-point array of additive logits; got dtype "
                       f"{bias.dtype}. Use `mask` for a boolean mask.")


def check_scale(scale: Any) -> None:
  if scale is not None and np.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar (default 1/sqrt(head_dim)); got shape "
                     f"{np.shape(scale)}.")



def check_q_offset(q_offset: Any, is_causal: bool, dims: Dims) -> None:
  """`q_offset`: None, or an integer scalar (traced is fine) with is_causal=True; a Python
  int must leave every query inside the keys (0 <= q_offset <= Lk - Lq)."""
  if q_offset is None:
    return
  if not checks.is_int_scalar(q_offset):
    raise ValueError(f"q_offset must be None or an integer scalar (the first query's position "
                     f"among the keys); got {q_offset!r}.")
  if not is_causal:
    raise ValueError("q_offset places the queries for causal attention (decoding against a KV "
                     "cache); pass is_causal=True with it, or leave q_offset=None.")
  if isinstance(q_offset, (int, np.integer)) and not 0 <= q_offset <= dims.kv_len - dims.q_len:
    raise ValueError(f"q_offset={q_offset} puts queries outside the {dims.kv_len} keys (Lq="
                     f"{dims.q_len}); expected 0 <= q_offset <= {dims.kv_len - dims.q_len}.")
