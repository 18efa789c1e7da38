"""Flash-style attention in plain jnp: a `jax.custom_vjp` over key blocks.

The forward walks the key blocks once (the online softmax of Milakov & Gimelshein
2018 for softmax; a plain sum of the blocks' contributions for kinds without a row
normaliser, such as sigmoid) and keeps only the output and, for softmax, each
row's log-sum-exp. The backward recomputes every block's scores from q and k, as
FlashAttention-2 does, instead of differentiating through the forward's scan:
autodiff would store or rematerialise the online-max rescaling, which made the
chunked softmax backward 1.7x slower than `jax.nn.dot_product_attention` on CPU.

Both jnp implementations use it for the kinds it covers (`supports`): `chunked`
with its `block_k`, and `xla` with tiles of `xla.BLOCK_K` keys (one tile, without a
scan, up to that length).
Kinds it does not cover keep their autodiff paths (`xla.py`, `chunked.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import core
from attnlab.attention.kinds import Mechanism, RowContext

Array = jax.Array

# Row normalisations the custom backward implements: softmax needs each row's log-sum-exp,
# "none" needs no statistic at all (sigmoid: dS = dP * P * (1 - P)). The l1 and count
# normalisations (and activations that read the row counts) would need a row-sum pre-pass or
# a second backward statistic: they stay on the autodiff paths.
NORMALIZATIONS = ("softmax", "none")


def supports(mech: Mechanism, options: Mapping[str, Any]) -> bool:
  """Whether `attend` below can run this kind with these options."""
  return (mech.attend_override is None and not mech.needs_row_counts
          and mech.normalization(options) in NORMALIZATIONS)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call: the kind, the sizes, the tiling."""
  mech: Mechanism
  static_options: Mapping[str, Any]
  is_causal: bool
  scale: float
  q_len: int
  kv_len: int
  block_k: int
  mask_blocked: bool   # the mask has a key axis of Lk (else it broadcasts over keys)
  bias_blocked: bool

  @property
  def num_blocks(self) -> int:
    return -(-self.kv_len // self.block_k)

  @property
  def softmax(self) -> bool:
    return self.mech.normalization(self.static_options) == "softmax"


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           block_k: int, q_offset: Array | int | None = None) -> Array:
  """Attention for a kind `supports` accepts: [B, Lq, H, Dv] float32, before `output_post`.

  Array-valued kind options (a traced `sigmoid_bias`) are differentiable inputs; the
  rest are static. block_k >= Lk means one block (no scan). `q_offset` (may be traced:
  a decoding position) places the queries (`core.query_positions`).
  """
  if not supports(mech, options):
    raise ValueError(f"blockwise.attend cannot run kind={mech.name!r} with options "
                     f"{dict(options)}; the jnp paths route it to their autodiff version.")
  lk = k.shape[1]
  block_k = min(block_k, lk)
  arrays = {n: _as_float(x) for n, x in options.items() if _is_array(x)}
  plan = _Plan(mech=mech, static_options={n: x for n, x in options.items() if n not in arrays},
               is_causal=is_causal, scale=scale, q_len=q.shape[1], kv_len=lk, block_k=block_k,
               mask_blocked=mask is not None and mask.shape[3] == lk > 1,
               bias_blocked=bias is not None and bias.shape[3] == lk > 1)
  out_BHQD = _attention(plan)(q, k, v, mask, bias, arrays, q_offset)
  return out_BHQD.transpose(0, 2, 1, 3)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _as_float(x: Any) -> Array:
  # An integer bias has no gradient; as float32 (how the activation reads it anyway) it can
  # be a custom_vjp input like any other.
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


# --------------------------------------------------------------------------- tiles
def _blocks(plan: _Plan, k, v, mask, bias) -> dict[str, Array | None]:
  """The scanned inputs: k, v, key positions, and the mask/bias tiles that vary over keys."""
  return {
      "k": core.key_blocks(k, 1, plan.block_k, 0), "v": core.key_blocks(v, 1, plan.block_k, 0),
      "pos": jnp.arange(plan.num_blocks * plan.block_k).reshape(plan.num_blocks, plan.block_k),
      "mask": core.key_blocks(mask, 3, plan.block_k, False) if plan.mask_blocked else None,
      "bias": core.key_blocks(bias, 3, plan.block_k, 0) if plan.bias_blocked else None,
  }


def _scan(step: Callable, carry: Any, xs: Any, num_blocks: int) -> tuple[Any, Any]:
  """lax.scan, or one direct call for a single block (no loop for XLA to see through)."""
  if num_blocks > 1:
    return jax.lax.scan(step, carry, xs)
  carry, ys = step(carry, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda y: y[None], ys)


def _tile_valid(plan: _Plan, blk, mask, q_offset) -> Array | None:
  has_padding = plan.num_blocks * plan.block_k != plan.kv_len
  return core.valid_mask(plan.q_len, plan.kv_len, blk["pos"], plan.mech, plan.static_options,
                         is_causal=plan.is_causal,
                         user_mask=blk["mask"] if plan.mask_blocked else mask,
                         has_padding=has_padding, q_offset=q_offset)


def _tile_scores(plan: _Plan, q, k_blk, bias_tile) -> Array:
  s_BHQK = plan.mech.logits(q, k_blk, plan.scale)
  return s_BHQK if bias_tile is None else s_BHQK + bias_tile.astype(jnp.float32)


def _tile_weights(plan: _Plan, s_BHQK, valid, arrays) -> Array:
  """Softmax: the masked logits (-inf where masked); otherwise the kind's weights u."""
  ctx = RowContext(kv_len=plan.kv_len)
  return core.unnormalized(s_BHQK, valid, plan.mech, ctx, {**plan.static_options, **arrays})


def _bias_tile(plan: _Plan, blk, bias):
  return blk["bias"] if plan.bias_blocked else bias


# --------------------------------------------------------------------------- custom_vjp
def _attention(plan: _Plan) -> Callable:
  """(q, k, v, mask, bias, arrays, q_offset) -> out [B, H, Lq, Dv] float32, with the flash
  backward."""

  @jax.custom_vjp
  def attention(q, k, v, mask, bias, arrays, q_offset):
    return _forward(plan, q, k, v, mask, bias, arrays, q_offset)[0]

  def fwd(q, k, v, mask, bias, arrays, q_offset):
    out_BHQD, lse_BHQ1 = _forward(plan, q, k, v, mask, bias, arrays, q_offset)
    return out_BHQD, (q, k, v, mask, bias, arrays, q_offset, out_BHQD, lse_BHQ1)

  def bwd(residuals, do_BHQD):
    return _backward(plan, *residuals, do_BHQD)

  attention.defvjp(fwd, bwd)
  return attention


def _forward(plan: _Plan, q, k, v, mask, bias, arrays, q_offset):
  """One pass over the key blocks: (out [B, H, Lq, Dv] f32, log-sum-exp [B, H, Lq, 1] or None)."""
  b, lq, h, _ = q.shape

  def step(carry, blk):
    m, row_sum, acc = carry
    valid = _tile_valid(plan, blk, mask, q_offset)
    u = _tile_weights(plan, _tile_scores(plan, q, blk["k"], _bias_tile(plan, blk, bias)),
                      valid, arrays)
    if plan.softmax:
      m_new = jnp.maximum(m, jnp.max(u, axis=-1, keepdims=True))
      m_safe = _finite_or_zero(m_new)  # a row with no visible key yet stays all -inf
      rescale = jnp.exp(m - m_safe)
      u = jnp.exp(u - m_safe)
      row_sum = row_sum * rescale + jnp.sum(u, axis=-1, keepdims=True)
      acc, m = acc * rescale, m_new
    v_blk = blk["v"]
    if plan.softmax or valid is not None:
      # The weights are a tile of their own here (not fused into the product): make v's
      # [B, Hkv, Lk, D] copy only once they exist, or XLA schedules it first, beside both the
      # score and weight tiles (measured at L = 512: a peak 0.25 MiB above
      # jax.nn.dot_product_attention's, level with it after). Where the kind's weights fuse
      # into the product (sigmoid, no mask) the barrier would force them out: 2.5 -> 4 MiB.
      u, v_blk = jax.lax.optimization_barrier((u, v_blk))
    return (m, row_sum, acc + core.weights_times_values(u, v_blk)), None

  init = (jnp.full((b, h, lq, 1), -jnp.inf, jnp.float32), jnp.zeros((b, h, lq, 1), jnp.float32),
          jnp.zeros((b, h, lq, v.shape[3]), jnp.float32))
  (m, row_sum, acc_BHQD), _ = _scan(step, init, _blocks(plan, k, v, mask, bias), plan.num_blocks)
  if not plan.softmax:
    return acc_BHQD, None
  # A row with no visible key: output 0, and log-sum-exp 0 so the backward's exp(-inf - 0) = 0.
  lse = jnp.where(row_sum > 0, _finite_or_zero(m) + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)),
                  0.0)
  return core.safe_divide(acc_BHQD, row_sum), lse


def _finite_or_zero(x: Array) -> Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _backward(plan: _Plan, q, k, v, mask, bias, arrays, q_offset, out_BHQD, lse_BHQ1, do_BHQD):
  """Recomputes each block's weights; the cotangents of (q, k, v, mask, bias, arrays, q_offset)."""
  # softmax: dS = P * (dP - rowsum(dO * O)); the row term is computed once, before the blocks.
  delta_BHQ1 = jnp.sum(do_BHQD * out_BHQD, axis=-1, keepdims=True) if plan.softmax else None

  def step(carry, blk):
    dq, d_arrays, d_bias = carry
    bias_tile = _bias_tile(plan, blk, bias)
    valid = _tile_valid(plan, blk, mask, q_offset)
    s_BHQK, scores_vjp = jax.vjp(lambda q_, k_, b_: _tile_scores(plan, q_, k_, b_),
                                 q, blk["k"], bias_tile)
    if plan.softmax:
      p_BHQK = jnp.exp(_tile_weights(plan, s_BHQK, valid, arrays) - lse_BHQ1)
      dp_BHQK = core.values_cotangent(do_BHQD, blk["v"])
      ds_BHQK, d_arrays_blk = p_BHQK * (dp_BHQK - delta_BHQ1), None
    else:
      p_BHQK, weights_vjp = jax.vjp(lambda s_, a_: _tile_weights(plan, s_, valid, a_),
                                    s_BHQK, arrays)
      ds_BHQK, d_arrays_blk = weights_vjp(core.values_cotangent(do_BHQD, blk["v"]))
    dv_blk = core.weights_cotangent_values(p_BHQK, do_BHQD, v.shape[2], v.dtype)
    dq_blk, dk_blk, d_bias_blk = scores_vjp(ds_BHQK)
    dq = dq + dq_blk.astype(jnp.float32)
    if d_arrays_blk is not None:
      d_arrays = jax.tree.map(jnp.add, d_arrays, d_arrays_blk)
    if bias is not None and not plan.bias_blocked:
      d_bias = d_bias + d_bias_blk.astype(jnp.float32)
    return (dq, d_arrays, d_bias), (dk_blk, dv_blk, d_bias_blk if plan.bias_blocked else None)

  zero_bias = None if bias is None or plan.bias_blocked else jnp.zeros(bias.shape, jnp.float32)
  init = (jnp.zeros(q.shape, jnp.float32), jax.tree.map(jnp.zeros_like, arrays), zero_bias)
  (dq, d_arrays, d_bias), (dk_blocks, dv_blocks, d_bias_blocks) = _scan(
      step, init, _blocks(plan, k, v, mask, bias), plan.num_blocks)
  dk = _unblock(dk_blocks, 1, plan.kv_len)
  dv = _unblock(dv_blocks, 1, plan.kv_len)
  if plan.bias_blocked:
    d_bias = _unblock(d_bias_blocks, 3, plan.kv_len)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, d_bias, d_arrays,
          None)


def _unblock(x_blocks: Array, axis: int, kv_len: int) -> Array:
  """Inverse of `core.key_blocks`: the blocks back along `axis`, the padding cut off."""
  x = jnp.moveaxis(x_blocks, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, kv_len, axis=axis)
