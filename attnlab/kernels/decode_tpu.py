"""Split-key decode attention for sigmoid and softmax as a Pallas TPU (Mosaic) kernel.

The algorithm of `decode_gpu.py` (the valid key tiles shared out among `num_splits`
splits, the GQA group's queries as the rows of one tile, partials merged by
`decode.py`), laid out the way Mosaic wants it:
  * the grid is (batch, kv head, split, tile) with the tile axis the sequential
    reduction ("arbitrary"); accumulators live in VMEM scratch, zeroed on a split's first
    tile and written out on its last;
  * the decoding positions are scalar-prefetched (SMEM), so the index maps know each
    split's valid tiles: steps past them repeat the last needed block (Pallas skips the
    DMA of an unchanged block) and do no work, so the cache past the valid length is
    never read;
  * the cache keeps attnlab's [B, Lk, Hkv, D] layout, viewed (a free reshape) as
    [B, Lk, Hkv * D] of which a program reads the [block_k, D] column block of its kv
    head: no transposed copy of the cache per step. That needs D a multiple of 128
    (the lane width), so other head dims are padded (a copy).
The `interpret` switch runs the kernel in TPU interpret mode on CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnlab.kernels import common
from attnlab.kernels import flash_tpu
from attnlab.kernels.common import DecodeConfig

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b.T


def padded_head_dim(d: int) -> int:
  """A kv head's column block of the [B, Lk, Hkv * D] view must be lane-aligned."""
  return common.round_up(d, 128)


def padded_rows(rows: int) -> int:
  """Query tile rows: a multiple of 16 (bfloat16 packs two rows per sublane)."""
  return common.round_up(rows, 16)


def default_block_k(kv_len: int, head_dim: int, dtype: Any) -> int:
  """512-key tiles, halved (down to 128) while that does not divide Lk (padding copies)."""
  del head_dim, dtype
  for block in (512, 256, 128):
    if kv_len % block == 0:
      return block
  return 128 if kv_len <= 128 else 256


def check_block_k(block_k: int) -> None:
  common.check_block("block_k", block_k, "tpu", multiple=128)


def default_num_splits(programs: int, num_tiles: int) -> int:
  """Splits per (batch, kv head): a few per TensorCore's worth of parallel programs."""
  return max(1, min(num_tiles, -(-8 // programs)))


def _tiles_per_split(cfg: DecodeConfig) -> int:
  return -(-cfg.num_tiles // cfg.num_splits)


def _tile(offsets_ref, b, s, t, cfg: DecodeConfig):
  """Key tile of grid step t of split s (clamped into the split's valid tiles)."""
  start, _, end = common.decode_split_range(offsets_ref[b], s, cfg)
  return jnp.clip(start + t, 0, jnp.maximum(end - 1, 0))


def _decode_kernel(offsets_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, *rest, cfg: DecodeConfig):
  if cfg.kind == "softmax":
    m_out_ref, l_out_ref, acc_ref, m_ref, l_ref = rest
  else:
    (acc_ref,), m_ref, l_ref = rest, None, None
  b, s, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  offset = offsets_ref[b]
  start, unmasked_end, end = common.decode_split_range(offset, s, cfg)
  tile = start + t

  @pl.when(t == 0)
  def _init():
    flash_tpu.init_accumulators(acc_ref, m_ref, l_ref, cfg)

  def step(masked):
    q_RD, k_KD, v_KD = q_ref[...], k_ref[...], v_ref[...]
    precision = common.dot_precision(q_RD.dtype)
    s_RK = lax.dot_general(q_RD, k_KD, _CONTRACT_LAST, precision=precision,
                           preferred_element_type=jnp.float32)
    mask_RK = (common.decode_tile_mask(offset, tile * cfg.block_k, s_RK.shape, cfg)
               if masked else None)
    half_bias = 0.5 * bias_ref[...] if cfg.kind == "sigmoid" else None
    flash_tpu.accumulate_tile(s_RK, mask_RK, v_KD, half_bias, cfg, precision,
                              acc_ref, m_ref, l_ref)

  pl.when(tile < unmasked_end)(functools.partial(step, masked=False))
  pl.when(jnp.logical_and(tile >= unmasked_end, tile < end))(functools.partial(step, masked=True))

  @pl.when(t == pl.num_programs(3) - 1)
  def _finalize():
    o_ref[...] = acc_ref[...]
    if cfg.kind == "softmax":
      m_out_ref[...] = m_ref[...]
      l_out_ref[...] = l_ref[...]


def partials(offset_B, q_BhRD, k, v, bias_BhR, cfg: DecodeConfig):
  """Same contract as `decode_gpu.partials` (natural-log row max)."""
  b, hkv, rows, d = q_BhRD.shape
  dv, lk, splits = v.shape[-1], k.shape[1], cfg.num_splits
  bk = cfg.block_k
  k_view, v_view = k.reshape(b, lk, hkv * d), v.reshape(b, lk, hkv * dv)  # free: no copy
  kv_map = lambda b_, h, s, t, off: (b_, _tile(off, b_, s, t, cfg), h)
  split_map = lambda b_, h, s, t, off: (b_, h, s, 0, 0)
  out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, rows, dv), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, None, rows, dv), split_map)]
  scratch = [pltpu.VMEM((rows, dv), jnp.float32)]
  if cfg.kind == "softmax":
    out_shape += [jax.ShapeDtypeStruct((b, hkv, splits, rows, 1), jnp.float32)] * 2
    out_specs += [pl.BlockSpec((None, None, None, rows, 1), split_map)] * 2
    scratch += [pltpu.VMEM((rows, 1), jnp.float32)] * 2
  bias_spec = None
  if cfg.kind == "sigmoid":
    bias_BhR = bias_BhR[..., None]  # [B, Hkv, R, 1]: a column, broadcast against [R, K]
    bias_spec = pl.BlockSpec((None, None, rows, 1), lambda b_, h, s, t, off: (b_, h, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, hkv, splits, _tiles_per_split(cfg)),
      in_specs=[pl.BlockSpec((None, None, rows, d), lambda b_, h, s, t, off: (b_, h, 0, 0)),
                pl.BlockSpec((None, bk, d), kv_map),
                pl.BlockSpec((None, bk, dv), kv_map),
                bias_spec],
      out_specs=out_specs,
      scratch_shapes=scratch)
  outs = pl.pallas_call(
      functools.partial(_decode_kernel, cfg=cfg),
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if cfg.interpret else False,
      name=f"decode_{cfg.kind}_tpu",
  )(offset_B, q_BhRD, k_view, v_view, bias_BhR)
  if cfg.kind == "softmax":
    return outs[0], outs[1][..., 0], outs[2][..., 0]
  return outs[0], None, None
