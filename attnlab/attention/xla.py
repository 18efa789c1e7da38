"""The materialising implementation: full [B, H, Lq, Lk] scores, then weights @ values.

It is the plain reference the blockwise and fused kernels are checked against,
and the path that can hand attention maps to diagnostics (`attention_weights`, which
attention dropout and `return_weights` use). `attend` materialises the weights only
for kinds without the flash-style backward; the kinds `blockwise` covers run there in
tiles of at most `BLOCK_K` keys (one tile, no loop, up to that length).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import blockwise, core
from attnlab.attention.kinds import Mechanism, RowContext

Array = jax.Array

# Keys per tile of the blockwise kinds. One [Lq, Lk] tile of float32 scores falls out of the
# CPU caches long before Lk = 2048: measured side by side against jax.nn.dot_product_attention
# (B1 H2 D64 float32, 2 CPU cores), one tile ran softmax fwd / fwd+bwd at 0.76x / 0.99x dpa at
# L = 2048, tiles of 512 keys at 0.36x / 0.81x (sigmoid 0.56x / 0.92x -> 0.32x / 0.58x); at
# L = 1024, 256 to 1024 keys were level, and 512 was at least level with 256 everywhere.
BLOCK_K = 512


def attention_weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
                      mask: Array | None, bias: Array | None, is_causal: bool,
                      scale: float, q_offset: Array | int | None = None) -> Array:
  """The kind's attention weights, float32 [B, H, Lq, Lk]; exactly 0 where masked."""
  lq, lk = q.shape[1], k.shape[1]
  s_BHQK = mech.logits(q, k, scale)
  if bias is not None:
    s_BHQK = s_BHQK + bias.astype(jnp.float32)
  valid = core.valid_mask(lq, lk, jnp.arange(lk), mech, options, is_causal=is_causal,
                          user_mask=mask, q_offset=q_offset)
  if mech.row_map is not None:
    return mech.row_map(s_BHQK, valid, options)
  counts = _row_counts(valid, lq, lk) if _uses_row_counts(mech, options) else None
  ctx = RowContext(kv_len=lk, row_counts=counts)
  u = core.unnormalized(s_BHQK, valid, mech, ctx, options)
  normalization = mech.normalization(options)
  if normalization == "softmax":
    return core.softmax_rows(u)
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
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           q_offset: Array | int | None = None) -> Array:
  """The materialising attention, [B, Lq, H, Dv] in q.dtype.

  Kinds `blockwise` covers run there in tiles of `BLOCK_K` keys (with the flash-style
  backward that recomputes them); the others build the weights and let autodiff
  differentiate them.
  """
  common = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale, q_offset=q_offset)
  if blockwise.supports(mech, options):
    out_BQHD = blockwise.attend(q, k, v, mech, options, block_k=_even_blocks(k.shape[1]),
                                **common)
    return core.finish(out_BQHD, mech, options, q.dtype)
  return apply_weights(attention_weights(q, k, mech, options, **common), v, mech, options,
                       q.dtype)


def _even_blocks(kv_len: int) -> int:
  """Keys per tile: as few tiles as `BLOCK_K` allows, of equal size (600 keys: 2 x 300, not
  512 + 88 padded to 512)."""
  num_blocks = -(-kv_len // BLOCK_K)
  return -(-kv_len // num_blocks)


def apply_weights(w_BHQK: Array, v: Array, mech: Mechanism, options: Mapping[str, Any],
                  out_dtype: Any) -> Array:
  """weights @ values, then the kind's output post-op; [B, Lq, H, Dv] in `out_dtype`."""
  out_BQHD = core.weights_times_values(w_BHQK, v).transpose(0, 2, 1, 3)
  return core.finish(out_BQHD, mech, options, out_dtype)
