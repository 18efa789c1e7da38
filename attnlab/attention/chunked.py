"""Memory-efficient blockwise attention in plain jnp.

A `lax.scan` over key blocks holds one [B, H, Lq, block_k] score tile at a time.
Sigmoid-like kinds (no row normaliser) just add the blocks' contributions;
l1/count normalisations also add up the row sums or counts and divide at the
end; softmax keeps the running row max and rescales (the online softmax of
Milakov & Gimelshein 2018, as in FlashAttention). The kinds `blockwise` covers
(softmax, sigmoid and every kind with an elementwise activation and no row
normaliser) run there, with a flash-style custom backward; for the others the
block body here is rematerialised in the backward pass, so gradients do not
store the tiles either.

Split mode (`key_splits`, the "split" impl) runs the same block body on every key
block at once and merges the blocks' partial sums (log-sum-exp for softmax, plain sums
otherwise): the split-K decoding of Flash-Decoding (Dao et al. 2023), where a few
queries against a long KV cache leave a sequential scan with nothing to run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import blockwise, core
from attnlab.attention.kinds import SOFTMAX, Mechanism, RowContext

Array = jax.Array

DEFAULT_BLOCK_K = 256  # one [Lq, 256] tile: < 1/8 of the dense peak at L = 4096 (benchmarks/)


def _broadcast_key_blocks(x: Array | None, axis: int, kv_len: int, block_k: int,
                          fill: Any) -> Array | None:
  """Key blocks of a mask or bias, or None when it has none to split.

  A mask or bias may broadcast along the key axis (size 1 where Lk > 1): then
  every tile uses it whole and scanning over it would be wrong. k and v always
  hold Lk keys and go through `core.key_blocks` directly, Lk = 1 included.
  """
  if x is None or x.shape[axis] != kv_len:
    return None
  return core.key_blocks(x, axis, block_k, fill)


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           block_k: int = DEFAULT_BLOCK_K, q_offset: Array | int | None = None,
           key_splits: int | None = None) -> Array:
  """Same result as the materialising path, [B, Lq, H, Dv] in q.dtype.

  Kinds `blockwise` covers get its flash-style custom_vjp; top-k two streaming passes
  (`_attend_top_k`); the rest (l1/count normalisations, activations that read row counts)
  the rematerialised scan below.

  With `key_splits` (the "split" impl, for a few queries against a long KV cache) the keys
  are cut into that many blocks that run side by side (vmap, not a scan) and are merged at
  the end (`_merge_blocks`); `block_k` is then ignored.
  """
  if mech.row_map is not None and (mech.top_k_of is None or key_splits is not None):
    # api.impl_kinds leaves these kinds out of chunked (and split), so `attend` never gets
    # here with one.
    raise ValueError(f"impl={'chunked' if key_splits is None else 'split'!r} cannot run "
                     f"kind={mech.name!r}: its weights need every score of a row at once, and "
                     "the scan holds one key block. Use impl='xla'.")
  common = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale, q_offset=q_offset)
  if key_splits is None and blockwise.supports(mech, options):
    out_BQHD = blockwise.attend(q, k, v, mech, options, block_k=block_k, **common)
    return core.finish(out_BQHD, mech, options, q.dtype)
  tiles = _Tiles(q, k, v, mech, options, block_k=block_k, key_splits=key_splits, **common)
  if mech.top_k_of is not None:
    out_BHQD = _attend_top_k(tiles, mech.top_k_of(options))
  else:
    out_BHQD = _scan(tiles, mech, options)
  return core.finish(out_BHQD.transpose(0, 2, 1, 3), mech, options, q.dtype)


class _Tiles:
  """The key blocks a scan walks over (`xs`) and, per block, its visible pairs and scores.

  `reduce(step, init, xs)` walks them: `lax.scan`, or in split mode every block at once.
  """

  def __init__(self, q, k, v, mech, options, *, mask, bias, is_causal, scale, block_k,
               q_offset, key_splits):
    self.q, self.mech, self.options, self.scale = q, mech, options, scale
    self.mask, self.bias, self.is_causal, self.q_offset = mask, bias, is_causal, q_offset
    self.lq, self.lk = q.shape[1], k.shape[1]
    if key_splits is None:
      self.block_k = block_k = min(block_k, self.lk)
      self.reduce = jax.lax.scan
    else:
      self.block_k = block_k = -(-self.lk // key_splits)
      self.reduce = _parallel_blocks
    num_blocks = -(-self.lk // block_k)
    self.has_padding = num_blocks * block_k != self.lk
    self.xs = {
        "k": core.key_blocks(k, 1, block_k, 0),
        "v": core.key_blocks(v, 1, block_k, 0),
        "pos": jnp.arange(num_blocks * block_k).reshape(num_blocks, block_k),
        "mask": _broadcast_key_blocks(mask, 3, self.lk, block_k, False),
        "bias": _broadcast_key_blocks(bias, 3, self.lk, block_k, 0),
    }

  def valid(self, blk) -> Array | None:
    """The block's visible pairs, [B or 1, H or 1, Lq, block_k] bool, or None (all)."""
    mask = self.mask
    user_mask = mask if blk["mask"] is None and mask is not None else blk["mask"]
    valid = core.valid_mask(self.lq, self.lk, blk["pos"], self.mech, self.options,
                            is_causal=self.is_causal, user_mask=user_mask,
                            has_padding=self.has_padding, q_offset=self.q_offset)
    return None if valid is None else jnp.broadcast_to(valid, valid.shape[:2]
                                                       + (self.lq, self.block_k))

  def scores(self, blk) -> Array:
    """The block's float32 scores [B, H, Lq, block_k], the bias added."""
    s_BHQK = self.mech.logits(self.q, blk["k"], self.scale)
    bias = self.bias if blk["bias"] is None else blk["bias"]
    return s_BHQK if bias is None else s_BHQK + bias.astype(jnp.float32)

  def count_step(self, count, blk):
    """Adds the block's visible keys per row to `count`; a `lax.scan` step."""
    valid = self.valid(blk)
    add = self.block_k if valid is None else jnp.sum(valid, -1, keepdims=True,
                                                     dtype=jnp.float32)
    return count + add, None


def _scan(tiles: _Tiles, mech: Mechanism, options: Mapping[str, Any],
          select: Callable[[Array, Array], Array] | None = None) -> Array:
  """sum_j w_ij v_j in float32, [B, H, Lq, Dv], by a rematerialised walk over key blocks.

  `select(scores, pos)`, if given, narrows each block's visible pairs further (top-k's
  kept set, known from a first pass).
  """
  q, v_blocks = tiles.q, tiles.xs["v"]
  b, lq, h, _ = q.shape
  dv = v_blocks.shape[-1]
  normalization = mech.normalization(options)
  # Row counts broadcast like the caller's mask: [B or 1, H or 1, Lq, 1].
  count_shape = (1, 1) if tiles.mask is None else tiles.mask.shape[:2]
  zero_count = jnp.zeros(count_shape + (lq, 1), jnp.float32)
  if mech.needs_row_counts:
    # A cheap boolean pre-pass: the activation itself needs each row's number of visible keys.
    counts, _ = tiles.reduce(tiles.count_step, zero_count, tiles.xs)
  else:
    counts = None
  ctx = RowContext(kv_len=tiles.lk, row_counts=counts)

  @jax.checkpoint
  def step(carry, blk):
    m, row_sum, count, acc = carry
    s = tiles.scores(blk)
    valid = tiles.valid(blk)
    if select is not None:
      chosen = select(s, blk["pos"])
      valid = chosen if valid is None else valid & chosen
    u = core.unnormalized(s, valid, mech, ctx, options)
    if normalization == "softmax":
      # The running max only stabilises exp(): the normalised result does not depend on it.
      m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(u, axis=-1, keepdims=True)))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      rescale = jnp.exp(m - m_safe)
      u = jnp.exp(u - m_safe)
      row_sum, acc, m = row_sum * rescale, acc * rescale, m_new
    row_sum = row_sum + jnp.sum(u, axis=-1, keepdims=True)
    count, _ = tiles.count_step(count, blk)
    acc = acc + core.weights_times_values(u, blk["v"])
    return (m, row_sum, count, acc), None

  init = (jnp.full((b, h, lq, 1), -jnp.inf, jnp.float32),
          jnp.zeros((b, h, lq, 1), jnp.float32), zero_count,
          jnp.zeros((b, h, lq, dv), jnp.float32))
  (_, row_sum, count, acc_BHQD), _ = tiles.reduce(step, init, tiles.xs)
  divisor = core.row_divisor(normalization, row_sum, count)
  return acc_BHQD if divisor is None else core.safe_divide(acc_BHQD, divisor)


def _attend_top_k(tiles: _Tiles, top_k: int) -> Array:
  """Softmax over each row's top_k scores in two passes over the key blocks, O(Lq * top_k)
  memory beyond one tile.

  Pass 1 streams a running top-k (values and key positions) through the blocks. The kept
  set is then "score above the k-th value, or equal to it at a position up to the k-th
  entry's": the same set as the materialising path's, ties to the lower key index, since
  `lax.top_k` puts the lower index first among equals and the carried entries (earlier
  keys) come before the block's. Pass 2 is the online softmax over that set. The set is
  piecewise constant in the inputs, so pass 1 takes no gradient.
  """
  b, lq, h, _ = tiles.q.shape
  k_kept = min(top_k, tiles.lk)

  def keep_top(carry, blk):
    top_vals, top_pos = carry
    s = jax.lax.stop_gradient(core.sanitize(tiles.scores(blk), tiles.valid(blk), -jnp.inf))
    pos = jnp.broadcast_to(blk["pos"].astype(jnp.int32), s.shape)
    vals, where = jax.lax.top_k(jnp.concatenate([top_vals, s], -1), k_kept)
    return (vals, jnp.take_along_axis(jnp.concatenate([top_pos, pos], -1), where, -1)), None

  init = (jnp.full((b, h, lq, k_kept), -jnp.inf, jnp.float32),
          jnp.full((b, h, lq, k_kept), -1, jnp.int32))
  (top_vals, top_pos), _ = jax.lax.scan(keep_top, init, tiles.xs)
  kth, kth_pos = top_vals[..., -1:], top_pos[..., -1:]

  def kept(s, pos):
    # kth = -inf: fewer visible keys than top_k, and every visible one (finite score) stays.
    return (s > kth) | ((s == kth) & (pos[None, None, None, :] <= kth_pos))

  return _scan(tiles, SOFTMAX, {}, select=kept)


def _parallel_blocks(step: Callable, init: Any, xs: Any) -> tuple[Any, None]:
  """`lax.scan(step, init, xs)`'s final carry, with every block's step run from `init` side by
  side (vmap) and the partial carries merged by `_merge_blocks`."""
  partials = jax.vmap(lambda blk: step(init, blk)[0])(xs)
  return _merge_blocks(partials), None


def _merge_blocks(partials: Any) -> Any:
  """Merges per-block carries stacked on a leading block axis.

  A bare array (row counts) and the plain sums (row sum, count, weights @ values) add up;
  where a block kept a finite row max (softmax), its sums are first rescaled to the global
  max: the log-sum-exp merge. Kinds without a max keep it at -inf, and add plainly.
  """
  if not isinstance(partials, tuple):
    return jnp.sum(partials, axis=0)
  m_N, row_sum_N, count_N, acc_N = partials
  m = jax.lax.stop_gradient(jnp.max(m_N, axis=0))
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  # exp(-inf - m) = 0 drops a block with no visible key; without a row max (m = -inf in
  # every block) the weights stay 1, a plain sum.
  rescale_N = jnp.where(jnp.isfinite(m)[None], jnp.exp(m_N - m_safe[None]), 1.0)
  return (m, jnp.sum(row_sum_N * rescale_N, axis=0), jnp.sum(count_N, axis=0),
          jnp.sum(acc_N * rescale_N, axis=0))
