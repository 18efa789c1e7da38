"""FlashSigmoid / FlashAttention-2 softmax as Pallas TPU (Mosaic) kernels.

Same algorithm, masks and causal block ranges as the GPU kernels in `flash_gpu.py`
(both must match the plain jnp reference, `attnlab.attention.attend(impl="xla")`),
laid out the way Mosaic wants it:
  * [B, H, L, D] inside the kernels (a block's two minor dims must tile (8, 128)),
    so q/k/v are transposed on the way in;
  * the innermost grid axis walks the reduction (key blocks for forward/dQ, query
    blocks for dK/dV) with "arbitrary" semantics; accumulators live in VMEM scratch,
    are zeroed on its first step and written out on its last;
  * causally skipped blocks are not computed (`pl.when`) and not fetched: their
    index map repeats the neighbouring needed block, and Pallas skips the DMA of
    an unchanged block;
  * row statistics (lse, delta) and q segment ids are [.., L, 1] columns, kv segment
    ids [.., 1, L] rows, so a tile's mask is a plain broadcast compare;
  * the sigmoid bias is a [B, H, 1, 1] float32 input of which each (batch, head)
    reads its [1, 1] VMEM block (a windowed SMEM block obeys the same (8, 128) rule,
    so SMEM would have to hold the whole [B, H], which grows with B * H and SMEM is
    small); the dQ kernel also writes the row sums of dS, [B, H, Lq, 1], which XLA
    sums into d bias.
The `interpret` switch runs the kernels in TPU interpret mode on CPU.
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
from attnlab.kernels.common import KernelConfig

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b.T
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a.T @ b
_MAX_BLOCK, _MAX_BLOCK_BWD = 512, 256


# ------------------------------------------------------------------------ configuration
def default_blocks(q_len: int, kv_len: int, head_dim: int, dtype: Any
                   ) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_q_bwd, block_k_bwd): 512-wide forward, 256-wide backward tiles.

  Short sequences use one block (rounded to the (8, 128) tiling) for both passes,
  so the padded length stays a multiple of every tile.
  """
  del head_dim, dtype

  def fit(length, multiple):
    whole = common.round_up(length, multiple)
    return (whole, whole) if whole <= _MAX_BLOCK else (_MAX_BLOCK, _MAX_BLOCK_BWD)

  (bq, bq_bwd), (bk, bk_bwd) = fit(q_len, 8), fit(kv_len, 128)
  return bq, bk, bq_bwd, bk_bwd


length_multiples = common.length_multiples  # whole forward and backward tiles


def check_blocks(block_q: int | None = None, block_k: int | None = None) -> None:
  """block_q must be a multiple of 8 (sublanes), block_k of 128 (lanes: it is a tile's minor dim)."""
  if block_q is not None:
    common.check_block("block_q", block_q, "tpu", multiple=8)
  if block_k is not None:
    common.check_block("block_k", block_k, "tpu", multiple=128)


def padded_head_dim(d: int) -> int:
  """The MXU contracts 128-wide; 64 is kept as is (a full-dim block, as jax's own kernel)."""
  return d if d == 64 else common.round_up(d, 128)


def _compiler_params(num_parallel: int) -> Any:
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_parallel + ("arbitrary",))


def _interpret(cfg: KernelConfig) -> Any:
  """TPU interpret mode, which simulates VMEM/DMA semantics on the CPU."""
  return pltpu.InterpretParams() if cfg.interpret else False


# ------------------------------------------------------------------------------ kernels
def _scores(q_QD, k_KD, cfg: KernelConfig):
  return lax.dot_general(q_QD, k_KD, _CONTRACT_LAST, precision=common.dot_precision(q_QD.dtype),
                         preferred_element_type=jnp.float32)


def _mask(q_block, k_block, bq, bk, cfg, q_seg_ref, kv_seg_ref, masked):
  if not masked:
    return None
  q_seg_Q1 = q_seg_ref[...] if q_seg_ref is not None else None
  kv_seg_1K = kv_seg_ref[...] if kv_seg_ref is not None else None
  return common.tile_mask(q_block * bq, k_block * bk, (bq, bk), cfg, q_seg_Q1, kv_seg_1K)


def _visit_key_block(step, q_block, k_block, cfg: KernelConfig, bq: int, bk: int,
                     has_segments: bool) -> None:
  """`step(masked)` on key block `k_block` if any row of `q_block` sees it (the forward's and
  dQ's grid walks key blocks): masked only where some pair of the tile is not visible."""
  n_end = common.kv_blocks_end(q_block, cfg, bq, bk)
  n_unmasked = common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, has_segments)
  _run_masked_and_unmasked(step, k_block < n_unmasked, k_block < n_end,
                           common.needs_mask(cfg, has_segments))


def _run_masked_and_unmasked(step, unmasked, in_range, needs_mask):
  """Runs step(masked=False) where no mask is needed, step(masked=True) elsewhere in range."""
  pl.when(jnp.logical_and(in_range, unmasked))(functools.partial(step, masked=False))
  if needs_mask:
    pl.when(jnp.logical_and(in_range, jnp.logical_not(unmasked)))(
        functools.partial(step, masked=True))


def _half_bias(bias_ref, cfg: KernelConfig) -> jax.Array | None:
  """b / 2 of this program's (batch, head) as a [1, 1] tile (broadcast against [Q, K])."""
  return 0.5 * bias_ref[...] if cfg.kind == "sigmoid" else None


def init_accumulators(acc_ref, m_ref, l_ref, cfg) -> None:
  """Zero output; for softmax also the running max (MASK_VALUE) and row sum. Shared by the
  training forward kernel and the decode kernel (`decode_tpu`)."""
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  if cfg.kind == "softmax":
    m_ref[...] = jnp.full(m_ref.shape, common.MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def accumulate_tile(s_RK, mask_RK, v_KD, half_bias, cfg, precision, acc_ref, m_ref, l_ref):
  """One key tile's scores (unscaled, f32) into the running output, in place.

  Sigmoid adds its weights times the values; softmax rescales the running sum and output
  to the new row max first (the online softmax). Masked pairs get exactly 0. Shared by
  the training forward kernel and the decode kernel (`decode_tpu`); `m_ref`/`l_ref` are
  None for sigmoid.
  """
  if cfg.kind == "sigmoid":
    p_RK = common.sigmoid_probs(s_RK, half_bias, cfg)
    if mask_RK is not None:
      p_RK = jnp.where(mask_RK, p_RK, 0.0)
    acc_ref[...] += jnp.dot(p_RK.astype(v_KD.dtype), v_KD, precision=precision,
                            preferred_element_type=jnp.float32)
    return
  s_RK = s_RK * cfg.scale
  if mask_RK is not None:
    s_RK = jnp.where(mask_RK, s_RK, common.MASK_VALUE)
  m_R1 = m_ref[...]
  m_next_R1 = jnp.maximum(m_R1, jnp.max(s_RK, axis=1, keepdims=True))
  alpha_R1 = jnp.exp(m_R1 - m_next_R1)
  p_RK = jnp.exp(s_RK - m_next_R1)
  if mask_RK is not None:  # a row masked so far has m = MASK_VALUE and p = exp(0)
    p_RK = jnp.where(mask_RK, p_RK, 0.0)
  l_ref[...] = alpha_R1 * l_ref[...] + jnp.sum(p_RK, axis=1, keepdims=True)
  m_ref[...] = m_next_R1
  acc_ref[...] = alpha_R1 * acc_ref[...] + jnp.dot(
      p_RK.astype(v_KD.dtype), v_KD, precision=precision, preferred_element_type=jnp.float32)


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, o_ref, *rest,
                    cfg: KernelConfig):
  if cfg.kind == "softmax":
    lse_ref, acc_ref, m_ref, l_ref = rest
  else:
    (acc_ref,), m_ref, l_ref = rest, None, None
  bq, bk = cfg.block_q, cfg.block_k
  q_block, k_block = pl.program_id(2), pl.program_id(3)
  has_segments = q_seg_ref is not None

  @pl.when(k_block == 0)
  def _init():
    init_accumulators(acc_ref, m_ref, l_ref, cfg)

  def step(masked):
    q_QD, k_KD, v_KD = q_ref[...], k_ref[...], v_ref[...]
    precision = common.dot_precision(q_QD.dtype)
    s_QK = _scores(q_QD, k_KD, cfg)
    mask_QK = _mask(q_block, k_block, bq, bk, cfg, q_seg_ref, kv_seg_ref, masked)
    accumulate_tile(s_QK, mask_QK, v_KD, _half_bias(bias_ref, cfg), cfg, precision,
                    acc_ref, m_ref, l_ref)

  _visit_key_block(step, q_block, k_block, cfg, bq, bk, has_segments)

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _finalize():
    if cfg.kind == "sigmoid":
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)
      return
    l_Q1 = l_ref[...]
    empty_Q1 = l_Q1 == 0.0  # fully masked row: output 0, and P = exp(s - inf) = 0 in backward
    l_safe_Q1 = jnp.where(empty_Q1, 1.0, l_Q1)
    o_ref[...] = (acc_ref[...] / l_safe_Q1).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty_Q1, jnp.inf, m_ref[...] + jnp.log(l_safe_Q1))


def _probs_and_ds(q_QD, k_KD, v_KD, do_QD, bias_ref, lse_ref, delta_ref, mask_QK, cfg):
  """Recomputes P of one tile and returns (P, dS) (masked entries exactly 0)."""
  s_QK = _scores(q_QD, k_KD, cfg)
  if cfg.kind == "sigmoid":
    p_QK = common.sigmoid_probs(s_QK, _half_bias(bias_ref, cfg), cfg)
  else:
    p_QK = jnp.exp(s_QK * cfg.scale - lse_ref[...])
  if mask_QK is not None:
    p_QK = jnp.where(mask_QK, p_QK, 0.0)
  dp_QK = lax.dot_general(do_QD, v_KD, _CONTRACT_LAST, precision=common.dot_precision(v_KD.dtype),
                          preferred_element_type=jnp.float32)
  delta_Q1 = delta_ref[...] if cfg.kind == "softmax" else None
  return p_QK, common.score_grad(p_QK, dp_QK, delta_Q1, cfg)


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, cfg: KernelConfig):
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  k_block, q_block = pl.program_id(2), pl.program_id(3)
  has_segments = q_seg_ref is not None

  @pl.when(q_block == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def step(masked):
    q_QD, k_KD, v_KD, do_QD = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    precision = common.dot_precision(q_QD.dtype)
    mask_QK = _mask(q_block, k_block, bq, bk, cfg, q_seg_ref, kv_seg_ref, masked)
    p_QK, ds_QK = _probs_and_ds(q_QD, k_KD, v_KD, do_QD, bias_ref, lse_ref, delta_ref,
                                mask_QK, cfg)
    dv_acc_ref[...] += lax.dot_general(p_QK.astype(do_QD.dtype), do_QD, _CONTRACT_FIRST,
                                       precision=precision, preferred_element_type=jnp.float32)
    dk_acc_ref[...] += lax.dot_general(ds_QK.astype(q_QD.dtype), q_QD, _CONTRACT_FIRST,
                                       precision=precision, preferred_element_type=jnp.float32)

  start = common.q_blocks_start(k_block, cfg, bq, bk)
  unmasked_start = common.q_blocks_unmasked_start(k_block, cfg, bq, bk, has_segments)
  _run_masked_and_unmasked(step, q_block >= unmasked_start, q_block >= start,
                           common.needs_mask(cfg, has_segments))

  @pl.when(q_block == pl.num_programs(3) - 1)
  def _finalize():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *rest, cfg: KernelConfig):
  """dQ; with `cfg.bias_grad` also the row sums of dS ([bq, 1]: d bias before XLA's sum)."""
  if cfg.bias_grad:
    ds_sum_ref, dq_acc_ref, ds_sum_acc_ref = rest
  else:
    (dq_acc_ref,) = rest
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  q_block, k_block = pl.program_id(2), pl.program_id(3)
  has_segments = q_seg_ref is not None

  @pl.when(k_block == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)
    if cfg.bias_grad:
      ds_sum_acc_ref[...] = jnp.zeros(ds_sum_acc_ref.shape, jnp.float32)

  def step(masked):
    q_QD, k_KD, v_KD, do_QD = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    mask_QK = _mask(q_block, k_block, bq, bk, cfg, q_seg_ref, kv_seg_ref, masked)
    _, ds_QK = _probs_and_ds(q_QD, k_KD, v_KD, do_QD, bias_ref, lse_ref, delta_ref, mask_QK,
                             cfg)
    dq_acc_ref[...] += jnp.dot(ds_QK.astype(k_KD.dtype), k_KD,
                               precision=common.dot_precision(k_KD.dtype),
                               preferred_element_type=jnp.float32)
    if cfg.bias_grad:
      ds_sum_acc_ref[...] += jnp.sum(ds_QK, axis=1, keepdims=True)

  _visit_key_block(step, q_block, k_block, cfg, bq, bk, has_segments)

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _finalize():
    dq_ref[...] = (dq_acc_ref[...] * cfg.scale).astype(dq_ref.dtype)
    if cfg.bias_grad:
      ds_sum_ref[...] = ds_sum_acc_ref[...]


# ------------------------------------------------------------------------- pallas calls
# Grids are (batch, head, outer block, inner block). The inner axis is the reduction.
def _bias_spec(cfg: KernelConfig) -> pl.BlockSpec | None:
  """The [1, 1] block of this (batch, head) of the [B, H, 1, 1] sigmoid bias (full minor dims)."""
  if cfg.kind != "sigmoid":
    return None
  return pl.BlockSpec((None, None, 1, 1), lambda b, h, i, j: (b, h, 0, 0))


def _q_major_specs(cfg: KernelConfig, bq: int, bk: int, d: int, dv: int, has_segments: bool):
  """Specs for grids whose outer axis walks query blocks (forward, dQ)."""
  g = cfg.group

  def kv_block(q_block, k_block):  # skipped causal steps re-use the last needed block
    last = jnp.maximum(common.kv_blocks_end(q_block, cfg, bq, bk) - 1, 0)
    return jnp.minimum(k_block, last)

  q_map = lambda b, h, i, j: (b, h, i, 0)
  kv_map = lambda b, h, i, j: (b, h // g, kv_block(i, j), 0)
  return dict(
      q=pl.BlockSpec((None, None, bq, d), q_map),
      k=pl.BlockSpec((None, None, bk, d), kv_map),
      v=pl.BlockSpec((None, None, bk, dv), kv_map),
      do=pl.BlockSpec((None, None, bq, dv), q_map),
      bias=_bias_spec(cfg),
      q_seg=pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)) if has_segments else None,
      kv_seg=(pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))
              if has_segments else None),
      row_stat=pl.BlockSpec((None, None, bq, 1), q_map) if cfg.kind == "softmax" else None,
  )


def _kv_major_specs(cfg: KernelConfig, bq: int, bk: int, d: int, dv: int, has_segments: bool):
  """Specs for grids whose outer axis walks key blocks (dK/dV)."""
  g = cfg.group

  def q_block(k_block, q_block_):  # skipped causal steps re-use the first needed block
    return jnp.maximum(q_block_, common.q_blocks_start(k_block, cfg, bq, bk))

  q_map = lambda b, h, j, i: (b, h, q_block(j, i), 0)
  kv_map = lambda b, h, j, i: (b, h // g, j, 0)
  return dict(
      q=pl.BlockSpec((None, None, bq, d), q_map),
      k=pl.BlockSpec((None, None, bk, d), kv_map),
      v=pl.BlockSpec((None, None, bk, dv), kv_map),
      do=pl.BlockSpec((None, None, bq, dv), q_map),
      bias=_bias_spec(cfg),
      q_seg=(pl.BlockSpec((None, bq, 1), lambda b, h, j, i: (b, q_block(j, i), 0))
             if has_segments else None),
      kv_seg=pl.BlockSpec((None, 1, bk), lambda b, h, j, i: (b, 0, j)) if has_segments else None,
      row_stat=pl.BlockSpec((None, None, bq, 1), q_map) if cfg.kind == "softmax" else None,
  )


def _to_bhld(x):
  return jnp.swapaxes(x, 1, 2)


def _bias_layout(bias):
  return None if bias is None else bias[:, :, None, None]


def _segment_layout(q_seg, kv_seg):
  if q_seg is None:
    return None, None
  return q_seg[:, :, None], kv_seg[:, None, :]


def forward(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  """Padded [B, L, H, D] inputs and bias [B, H] float32 (None for softmax) ->
  (out [B, Lq, H, Dv], lse [B, H, Lq, 1] float32 or None)."""
  b, lq, h, d = q.shape
  dv = v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_k
  has_segments = q_seg is not None
  sp = _q_major_specs(cfg, bq, bk, d, dv, has_segments)
  q_seg, kv_seg = _segment_layout(q_seg, kv_seg)
  out_shape = [jax.ShapeDtypeStruct((b, h, lq, dv), q.dtype)]
  out_specs = [pl.BlockSpec((None, None, bq, dv), lambda b_, h_, i, j: (b_, h_, i, 0))]
  scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
  if cfg.kind == "softmax":
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32))
    out_specs.append(sp["row_stat"])
    scratch += [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(b, h, lq // bq, cfg.kv_len_padded // bk),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"]],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=_compiler_params(3),
      interpret=_interpret(cfg),
      name=f"flash_{cfg.kind}_fwd_tpu",
  )(_to_bhld(q), _to_bhld(k), _to_bhld(v), _bias_layout(bias), q_seg, kv_seg)
  return _to_bhld(outs[0]), (outs[1] if cfg.kind == "softmax" else None)


def backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, cfg: KernelConfig):
  """Padded inputs and dO -> (dq, dk, dv, dbias).

  dq, dk, dv have the inputs' [B, L, H, D] shapes and dtypes; dbias is [B, H]
  float32 with `cfg.bias_grad`, else None.
  """
  b, lq, h, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  has_segments = q_seg is not None
  delta = common.softmax_delta(out, do)[..., None] if cfg.kind == "softmax" else None
  q_seg, kv_seg = _segment_layout(q_seg, kv_seg)
  args = (_to_bhld(q), _to_bhld(k), _to_bhld(v), _bias_layout(bias), q_seg, kv_seg,
          _to_bhld(do), lse, delta)

  # dK/dV per *query* head; GQA sums the group afterwards in float32.
  dkv_dtype = k.dtype if cfg.group == 1 else jnp.float32
  sp = _kv_major_specs(cfg, bq, bk, d, dv, has_segments)
  out_map = lambda b_, h_, j, i: (b_, h_, j, 0)
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(b, h, lk // bk, lq // bq),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"], sp["do"],
                sp["row_stat"], sp["row_stat"]],
      out_specs=[pl.BlockSpec((None, None, bk, d), out_map),
                 pl.BlockSpec((None, None, bk, dv), out_map)],
      out_shape=[jax.ShapeDtypeStruct((b, h, lk, d), dkv_dtype),
                 jax.ShapeDtypeStruct((b, h, lk, dv), dkv_dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
      compiler_params=_compiler_params(3),
      interpret=_interpret(cfg),
      name=f"flash_{cfg.kind}_bwd_dkv_tpu",
  )(*args)

  sp = _q_major_specs(cfg, bq, bk, d, dv, has_segments)
  q_map = lambda b_, h_, i, j: (b_, h_, i, 0)
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map)]
  out_shape = [jax.ShapeDtypeStruct((b, h, lq, d), q.dtype)]
  scratch = [pltpu.VMEM((bq, d), jnp.float32)]
  if cfg.bias_grad:
    out_specs.append(pl.BlockSpec((None, None, bq, 1), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32))
    scratch.append(pltpu.VMEM((bq, 1), jnp.float32))
  dq, *ds_sum = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(b, h, lq // bq, lk // bk),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"], sp["do"],
                sp["row_stat"], sp["row_stat"]],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=_compiler_params(3),
      interpret=_interpret(cfg),
      name=f"flash_{cfg.kind}_bwd_dq_tpu",
  )(*args)

  dk, dv_ = _to_bhld(dk), _to_bhld(dv_)
  if cfg.group > 1:
    dk, dv_ = common.sum_kv_groups(dk, hkv, k.dtype), common.sum_kv_groups(dv_, hkv, v.dtype)
  # Padded query rows (dO = 0) and masked pairs (P = 0) have dS = 0: summing all rows is exact.
  dbias = ds_sum[0].sum(axis=(2, 3)) if cfg.bias_grad else None
  return _to_bhld(dq), dk, dv_, dbias
