"""The materialising implementation: full [B, H, Lq, Lk] scores, then weights @ values.

It is the plain reference the blockwise and fused kernels are checked against,
and the path that can hand attention maps to diagnostics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import blockwise, core
from attnlab.attention.kinds import Mechanism, RowContext

Array = jax.Array


def attention_weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
                      mask: Array | None, bias: Array | None, is_causal: bool,
                      scale: float) -> Array:
  """The kind's attention weights, float32 [B, H, Lq, Lk]; exactly 0 where masked."""
  lq, lk = q.shape[1], k.shape[1]
  s_BHQK = mech.logits(q, k, scale)
  if bias is not None:
    s_BHQK = s_BHQK + bias.astype(jnp.float32)
  valid = core.valid_mask(lq, lk, jnp.arange(lk), mech, options, is_causal=is_causal,
                          user_mask=mask)
  counts = _row_counts(valid, lq, lk) if _uses_row_counts(mech, options) else None
  ctx = RowContext(kv_len=lk, row_counts=counts)
  u = core.unnormalized(s_BHQK, valid, mech, ctx, options)
  normalization = mech.normalization(options)
  if normalization == "softmax":
    # The row max only stabilises exp(); the result does not depend on it, so no gradient.
    m = jnp.max(u, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    u = jnp.exp(u - m)
  divisor = core.row_divisor(normalization, jnp.sum(u, axis=-1, keepdims=True), counts)
  return u if divisor is None else core.safe_divide(u, divisor)


def _uses_row_counts(mech: Mechanism, options: Mapping[str, Any]) -> bool:
  return mech.needs_row_counts or mech.normalization(options) in ("count", "sqrt_count")


def _row_counts(valid: Array | None, lq: int, lk: int) -> Array:
  """Visible keys per row, [B|1, H|1, Lq, 1] float32 (a full-size mask only when there is one)."""
  if valid is None:
    return jnp.full((1, 1, 1, 1), lk, jnp.float32)
  valid = jnp.broadcast_to(valid, valid.shape[:2] + (lq, lk))
  return jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float) -> Array:
  """The materialising attention, [B, Lq, H, Dv] in q.dtype.

  Kinds `blockwise` covers run as its single block (the whole [Lq, Lk] tile, with the
  flash-style backward that recomputes it); the others build the weights and let autodiff
  differentiate them.
  """
  common = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale)
  if blockwise.supports(mech, options):
    out_BQHD = blockwise.attend(q, k, v, mech, options, block_k=k.shape[1], **common)
    return core.finish(out_BQHD, mech, options, q.dtype)
  return apply_weights(attention_weights(q, k, mech, options, **common), v, mech, options,
                       q.dtype)


def apply_weights(w_BHQK: Array, v: Array, mech: Mechanism, options: Mapping[str, Any],
                  out_dtype: Any) -> Array:
  """weights @ values, then the kind's output post-op; [B, Lq, H, Dv] in `out_dtype`."""
  out_BQHD = core.weights_times_values(w_BHQK, v).transpose(0, 2, 1, 3)
  return core.finish(out_BQHD, mech, options, out_dtype)
