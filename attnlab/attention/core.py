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
from attnlab.attention.matmul import einsum_f32

Array = jax.Array


def default_scale(head_dim: int, scale: float | None) -> float:
  return head_dim ** -0.5 if scale is None else scale


def query_positions(q_len: int, kv_len: int, q_offset: Array | int | None) -> Array:
  """Absolute positions of the queries among the keys, [Lq]: from `q_offset` on, or (None)
  bottom-right, the last query at the last key."""
  return jnp.arange(q_len) + (kv_len - q_len if q_offset is None else q_offset)


def valid_mask(q_len: int, kv_len: int, k_pos: Array, mech: Mechanism, options: Mapping[str, Any],
               *, is_causal: bool, user_mask: Array | None, has_padding: bool = False,
               q_offset: Array | int | None = None) -> Array | None:
  """Which (query, key) pairs may attend, as a bool array broadcastable to [B, H, Lq, K].

  Args:
    q_len, kv_len: real lengths; causality aligns the last query with the last key.
    k_pos: absolute positions of the keys in this tile, [K].
    user_mask: the caller's mask restricted to this tile, or None.
    has_padding: the tile may hold padding keys (positions >= kv_len) to mask out.
    q_offset: the first query's position (`query_positions`); None = bottom-right.
  Returns:
    The mask, or None when every pair may attend.
  """
  q_pos_Q = query_positions(q_len, kv_len, q_offset)
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


def key_blocks(x: Array, axis: int, block_k: int, fill: Any) -> Array:
  """`x` padded with `fill` along its key `axis` to whole blocks of `block_k` keys, the block
  index moved to the front: [num_blocks, ..., block_k, ...], what `lax.scan` walks over."""
  num_blocks = -(-x.shape[axis] // block_k)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, num_blocks * block_k - x.shape[axis])
  x = jnp.pad(x, pad, constant_values=fill)
  x = x.reshape(x.shape[:axis] + (num_blocks, block_k) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


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


def softmax_rows(logits: Array) -> Array:
  """Softmax along the key axis of float32 logits that are -inf where masked.

  Masked keys get exactly 0 and a row with no finite logit gives zeros. The row max only
  stabilises exp(); the result does not depend on it, so it takes no gradient.
  """
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(logits - m)
  return safe_divide(e, jnp.sum(e, axis=-1, keepdims=True))


def finish(out_BQHD: Array, mech: Mechanism, options: Mapping[str, Any], dtype: Any) -> Array:
  """The kind's output post-op (e.g. ReLA's RMS norm) on the float32 output, then `dtype`."""
  if mech.output_post is not None:
    out_BQHD = mech.output_post(out_BQHD, options)
  return out_BQHD.astype(dtype)


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


# The three [Lq, Lk] x [Lk, D] products below put the batch and head axes first on every
# operand ([B, Hkv, G, Lq, .] and [B, Hkv, Lk, .]): that is the layout XLA's CPU matmul
# fusions take without copying the [Lq, Lk] tile (measured: 2.5x faster forward at L = 2048
# than contracting the [B, L, H, D] layout directly).
def _grouped(x_BHQX: Array, num_kv_heads: int) -> Array:
  b, h = x_BHQX.shape[:2]
  return x_BHQX.reshape(b, num_kv_heads, h // num_kv_heads, *x_BHQX.shape[2:])


def weights_times_values(w_BHQK: Array, v_BKhD: Array) -> Array:
  """sum_j w_ij v_j for GQA layouts: [B, H, Lq, Lk] x [B, Lk, Hkv, Dv] -> [B, H, Lq, Dv] f32.

  The weights (float32: the nonlinearity's precision) are rounded to v's dtype, so 16-bit
  values multiply 16-bit weights with float32 accumulation, as FlashAttention does, instead
  of promoting v to a float32 copy; float32 values: a no-op.
  """
  b, h, lq, _ = w_BHQK.shape
  w_BhGQK = _grouped(w_BHQK.astype(v_BKhD.dtype), v_BKhD.shape[2])
  out_BhGQD = einsum_f32("bhgqk,bhkd->bhgqd", w_BhGQK, v_BKhD.transpose(0, 2, 1, 3))
  return out_BhGQD.reshape(b, h, lq, v_BKhD.shape[3])


def values_cotangent(do_BHQD: Array, v_BKhD: Array) -> Array:
  """dP = dO v^T, the cotangent of the weights in `weights_times_values`: [B, H, Lq, Lk] f32.

  dO is rounded to v's dtype: lossless when the output has v's dtype (its cotangent arrives
  in that dtype and was only upcast on the way).
  """
  b, h, lq, _ = do_BHQD.shape
  dp_BhGQK = einsum_f32("bhgqd,bhkd->bhgqk",
                        _grouped(do_BHQD.astype(v_BKhD.dtype), v_BKhD.shape[2]),
                        v_BKhD.transpose(0, 2, 1, 3))
  return dp_BhGQK.reshape(b, h, lq, v_BKhD.shape[1])


def weights_cotangent_values(w_BHQK: Array, do_BHQD: Array, num_kv_heads: int,
                             dtype: Any) -> Array:
  """dv = w^T dO summed over each kv head's query group: [B, Lk, Hkv, Dv] in `dtype`."""
  hkv = num_kv_heads
  # dv^T = dO^T w reads w as it lies; w^T dO made XLA CPU copy w into key-major order first.
  # Both factors in v's dtype, as in `weights_times_values`.
  dv_BhDK = einsum_f32("bhgqd,bhgqk->bhdk", _grouped(do_BHQD.astype(dtype), hkv),
                       _grouped(w_BHQK.astype(dtype), hkv), contracts_leading_axes=True)
  return dv_BhDK.transpose(0, 3, 1, 2).astype(dtype)
