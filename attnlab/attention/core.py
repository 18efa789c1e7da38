"""Shared pieces of the materialising and blockwise implementations.

Both implementations see the key axis through absolute positions, so causal and
local masks are computed from `iota` per tile instead of being materialised as
[Lq, Lk] arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention.kinds import Mechanism, RowContext

Array = jax.Array


def default_scale(head_dim: int, scale: float | None) -> float:
  return head_dim ** -0.5 if scale is None else scale


def valid_mask(q_len: int, kv_len: int, k_pos: Array, mech: Mechanism, options: Mapping[str, Any],
               *, is_causal: bool, user_mask: Array | None, has_padding: bool = False
               ) -> Array | None:
  """Which (query, key) pairs may attend, as a bool array broadcastable to [B, H, Lq, K].

  Args:
    q_len, kv_len: real lengths; causality aligns the last query with the last key.
    k_pos: absolute positions of the keys in this tile, [K].
    user_mask: the caller's mask restricted to this tile, or None.
    has_padding: the tile may hold padding keys (positions >= kv_len) to mask out.
  Returns:
    The mask, or None when every pair may attend.
  """
  q_pos_Q = jnp.arange(q_len) + (kv_len - q_len)
  structural = []
  if has_padding:
    structural.append(jnp.broadcast_to(k_pos[None, :] < kv_len, (q_len, k_pos.shape[0])))
  if is_causal:
    structural.append(k_pos[None, :] <= q_pos_Q[:, None])
  if mech.position_mask is not None:
    structural.append(mech.position_mask(q_pos_Q, k_pos, options))
  valid = None
  for m_QK in structural:
    valid = m_QK if valid is None else valid & m_QK
  if valid is not None:
    valid = valid[None, None]
  if user_mask is not None:
    valid = user_mask if valid is None else valid & user_mask
  return valid


def sanitize(s: Array, valid: Array | None, fill: float) -> Array:
  """Replaces masked scores by `fill` BEFORE any nonlinearity.

  Masking after the nonlinearity (where(valid, f(s), 0)) would let an inf/NaN in
  f(s) at a masked position poison the gradient (0 * inf = NaN).
  """
  return s if valid is None else jnp.where(valid, s, fill)


def unnormalized(s: Array, valid: Array | None, mech: Mechanism, ctx: RowContext,
                 options: Mapping[str, Any]) -> Array:
  """The kind's elementwise weights u, exactly zero where masked (softmax: its logits)."""
  if mech.normalization(options) == "softmax":
    # Logits stay logits; masked ones become -inf so exp() gives exactly 0.
    s = s if mech.activate is None else mech.activate(s, ctx, options)
    return sanitize(s, valid, -jnp.inf)
  u = mech.activate(sanitize(s, valid, 0.0), ctx, options)
  return u if valid is None else jnp.where(valid, u, 0.0)


def safe_divide(num: Array, den: Array) -> Array:
  """num / den with 0 where den == 0 (fully masked rows give zeros, not NaN)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def row_divisor(normalization: str, row_sum: Array, row_count: Array) -> Array | None:
  """The per-row divisor of a normalisation, or None for `none` (and softmax's own sum)."""
  if normalization in ("softmax", "l1"):
    return row_sum
  if normalization == "count":
    return row_count
  if normalization == "sqrt_count":
    return jnp.sqrt(row_count)
  return None


def weights_times_values(w_BHQK: Array, v_BKhD: Array) -> Array:
  """sum_j w_ij v_j for GQA layouts: [B, H, Lq, Lk] x [B, Lk, Hkv, Dv] -> [B, H, Lq, Dv] f32."""
  b, h, lq, lk = w_BHQK.shape
  hkv, dv = v_BKhD.shape[2], v_BKhD.shape[3]
  w_BhGQK = w_BHQK.reshape(b, hkv, h // hkv, lq, lk)
  out_BhGQD = jnp.einsum("bhgqk,bkhd->bhgqd", w_BhGQK, v_BKhD.astype(jnp.float32))
  return out_BhGQD.reshape(b, h, lq, dv)
