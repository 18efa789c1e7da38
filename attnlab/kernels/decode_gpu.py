"""Split-key decode attention ("flash-decoding") for sigmoid and softmax as a Pallas GPU (Triton) kernel.

A few queries (one decoded token, or a short chunk) against a long KV cache, forward
only. The grid is (batch, kv head, split): each program takes the G query heads of one
kv head's GQA group as the rows of one query tile (row r = query r % Lq of head
r // Lq; K and V are read once per group), walks its share of the valid key tiles and
writes a partial result; `decode.py` merges the splits. Sigmoid's partials are plain
sums (nothing else to write); softmax also writes each split's row max (natural-log
units) and row sum for the log-sum-exp merge.

The valid keys are those below offset + Lq (the traced decoding position; query i sees
keys j <= offset + i): their tiles are shared out among the splits in the kernel, so
every split has work however full the cache is, and the tiles past the valid length
are never read. K and V are whole rows per program ([Lk, D] refs) of which each step
loads one [block_k, D] tile, as in the training kernel (`flash_gpu.py`), whose tile
helpers this file uses. The `interpret` switch (`DecodeConfig.interpret`) runs the same
kernel on CPU; the plain jnp reference is `attnlab.attention.attend(impl="xla",
q_offset=...)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnlab.kernels import common
from attnlab.kernels import flash_gpu
from attnlab.kernels.common import DecodeConfig

_LN_2 = 0.6931471805599453

padded_head_dim = flash_gpu.padded_head_dim  # Triton tiles: powers of two >= 16


def padded_rows(rows: int) -> int:
  """The query tile's rows: a power of two >= 16 (tensor-core dots need M >= 16)."""
  return max(16, common.next_power_of_two(rows))


def default_block_k(kv_len: int, head_dim: int, dtype: Any) -> int:
  """Key tile length: 128 (16-bit inputs, D <= 128) or 64, and smaller if that divides Lk.

  The query tile is small (<= 16 x group rows), so the key tile can be long; a tile that
  divides the cache length spares the per-call copy that padding the cache would cost.
  """
  cap = 128 if jnp.dtype(dtype).itemsize < 4 and head_dim <= 128 else 64
  for block in (cap, cap // 2, cap // 4, 16):
    if block >= 16 and kv_len % block == 0:
      return block
  return cap


def check_block_k(block_k: int) -> None:
  common.check_block("block_k", block_k, "gpu", multiple=16)


def default_num_splits(programs: int, num_tiles: int) -> int:
  """Splits per (batch, kv head): enough programs to fill a GPU (~256, two per SM of an
  H100/H200), at most one per key tile."""
  return max(1, min(num_tiles, -(-256 // programs)))


# ------------------------------------------------------------------------------- kernel
def _decode_kernel(offset_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, *stat_refs,
                   cfg: DecodeConfig):
  """One split of one (batch, kv head). Refs: offset (scalar), q [R, D], k/v [Lk, D]
  (whole rows), bias [R] (sigmoid), o [R, Dv] float32; softmax also m, l [R] float32."""
  bk = cfg.block_k
  offset = offset_ref[...]
  start, unmasked_end, end = common.decode_split_range(offset, pl.program_id(2), cfg)
  q_RD = q_ref[...]
  precision = common.dot_precision(q_RD.dtype)
  tanh = flash_gpu.tanh_fn(cfg)

  def tile(t, masked):
    k_start = t * bk
    k_KD = k_ref[pl.ds(k_start, bk), :]
    v_KD = v_ref[pl.ds(k_start, bk), :]
    s_RK = flash_gpu.dot_t(q_RD, k_KD, precision)
    mask_RK = common.decode_tile_mask(offset, k_start, s_RK.shape, cfg) if masked else None
    return v_KD, s_RK, mask_RK

  def pv(p_RK, v_KD):
    return jnp.dot(p_RK.astype(v_KD.dtype), v_KD, precision=precision,
                   preferred_element_type=jnp.float32)

  acc0 = jnp.zeros((cfg.rows_padded, o_ref.shape[-1]), jnp.float32)
  if cfg.kind == "sigmoid":
    half_bias_R1 = 0.5 * bias_ref[...][:, None]

    def body(t, acc_RD, masked):
      v_KD, s_RK, mask_RK = tile(t, masked)
      return flash_gpu.sigmoid_tile(acc_RD, s_RK, mask_RK, v_KD, half_bias_R1, cfg, tanh, pv)

    carry = acc0
  else:
    def body(t, carry, masked):  # the online softmax in base 2, as flash_gpu's forward
      v_KD, s_RK, mask_RK = tile(t, masked)
      return flash_gpu.softmax_tile(carry, s_RK, mask_RK, v_KD, cfg, pv)

    carry = (acc0, jnp.full((cfg.rows_padded,), common.MASK_VALUE, jnp.float32),
             jnp.zeros((cfg.rows_padded,), jnp.float32))

  carry = lax.fori_loop(start, unmasked_end, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(unmasked_end, end, functools.partial(body, masked=True), carry)

  if cfg.kind == "sigmoid":
    o_ref[...] = carry
  else:
    acc_RD, m_R, l_R = carry
    o_ref[...] = acc_RD
    stat_refs[0][...] = m_R * _LN_2  # natural-log units for the merge
    stat_refs[1][...] = l_R


# --------------------------------------------------------------------------- pallas call
def partials(offset_B, q_BhRD, k, v, bias_BhR, cfg: DecodeConfig):
  """Per-split partial results.

  Args:
    offset_B: int32 [B], the first query's position per sequence.
    q_BhRD: [B, Hkv, R, D] the query tiles (padded rows and head dim).
    k, v: [B, Lk_padded, Hkv, D or Dv], the cache (padded).
    bias_BhR: float32 [B, Hkv, R], each row's sigmoid bias (None for softmax).

  Returns:
    (acc [B, Hkv, S, R, Dv] float32, m [B, Hkv, S, R] or None, l [B, Hkv, S, R] or None):
    sigmoid's acc is its output; softmax's is unnormalised, with row max m (natural log)
    and row sum l.
  """
  b, hkv, rows, d = q_BhRD.shape
  dv, lk, splits = v.shape[-1], k.shape[1], cfg.num_splits
  split_map = lambda b_, h, s: (b_, h, s, 0)
  out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, rows, dv), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, rows, dv), lambda b_, h, s: (b_, h, s, 0, 0))]
  if cfg.kind == "softmax":
    out_shape += [jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)] * 2
    out_specs += [pl.BlockSpec((None, None, None, rows), split_map)] * 2
  bias_spec = (pl.BlockSpec((None, None, rows), lambda b_, h, s: (b_, h, 0))
               if cfg.kind == "sigmoid" else None)
  outs = pl.pallas_call(
      functools.partial(_decode_kernel, cfg=cfg),
      grid=(b, hkv, splits),
      in_specs=[pl.BlockSpec((None,), lambda b_, h, s: (b_,)),
                pl.BlockSpec((None, None, rows, d), lambda b_, h, s: (b_, h, 0, 0)),
                pl.BlockSpec((None, lk, None, d), lambda b_, h, s: (b_, 0, h, 0)),
                pl.BlockSpec((None, lk, None, dv), lambda b_, h, s: (b_, 0, h, 0)),
                bias_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=flash_gpu.compiler_params(cfg.num_warps or 4, cfg.num_stages or 2),
      interpret=cfg.interpret,
      name=f"decode_{cfg.kind}",
  )(offset_B, q_BhRD, k, v, bias_BhR)
  return (outs[0], outs[1], outs[2]) if cfg.kind == "softmax" else (outs[0], None, None)
