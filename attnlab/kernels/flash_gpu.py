"""FlashSigmoid (and FlashAttention-2 softmax on the same tiling) as Pallas GPU (Triton) kernels.

The file holds the Pallas kernels (forward, dK/dV over query blocks, dQ over key
blocks) and their `pallas_call`s; the `interpret` switch (`KernelConfig.interpret`)
runs the same kernels on CPU. The plain jnp reference they must match is
`attnlab.attention.attend(impl="xla")` (see `flash.py`).

Layout is attnlab's [B, L, H, D] throughout; the grid is (query or key block, batch,
head) and a GQA query head h reads key/value head h // group through the BlockSpec
index map, so K/V are never repeated in memory.

Sigmoid (Apple's FlashSigmoid, arXiv 2409.04431): P = sigmoid(scale * QK^T + b) needs
no row max and no row sum, so the forward is one accumulation and the backward is
  dV = P^T dO,  dP = dO V^T,  dS = dP * P * (1 - P),  dQ = scale dS K,  dK = scale dS^T Q
with no delta pre-pass. The bias b is an input, [B, H] float32, of which each
(batch, head) program reads its one scalar; d b = sum of dS over queries and keys:
the dQ kernel, which already walks every key of its query block, writes the row
sums of dS and XLA adds them up. Softmax uses the usual online normaliser, saves
the log-sum-exp (base 2) and uses delta = rowsum(dO * O) (computed by XLA, it is
one fused elementwise pass).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnlab.kernels import common
from attnlab.kernels.common import KernelConfig

_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # a @ b.T
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))  # a.T @ b
# Softmax runs in base 2 (exp2 is one MUFU op; Triton's exp is libdevice's accurate
# expf), with log2(e) folded into the logit scale; the saved lse is base 2 as well.
LOG2_E = 1.4426950408889634


# ------------------------------------------------------------------------ configuration
def default_blocks(q_len: int, kv_len: int, head_dim: int, dtype: Any
                   ) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_q_bwd, block_k_bwd) for the Triton kernels.

  128 x 64 forward tiles and 64 x 64 backward tiles (the backward keeps four
  tiles live: K, V, dK, dV) are the FlashAttention-2 choices for head_dim <= 128 on
  Hopper; float32 halves them to stay within registers / shared memory.
  """
  big = jnp.dtype(dtype).itemsize >= 4 or head_dim > 128
  bq, bk, bq_bwd, bk_bwd = (64, 32, 32, 32) if big else (128, 64, 64, 64)
  fit_q = max(16, common.next_power_of_two(q_len))
  fit_k = max(16, common.next_power_of_two(kv_len))
  return min(bq, fit_q), min(bk, fit_k), min(bq_bwd, fit_q), min(bk_bwd, fit_k)


length_multiples = common.length_multiples  # whole forward and backward tiles


def check_blocks(block_q: int | None = None, block_k: int | None = None) -> None:
  """Raises a ValueError unless the explicit tiles are powers of two >= 16."""
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block is not None:
      common.check_block(name, block, "gpu", multiple=16)


def padded_head_dim(d: int) -> int:
  """Triton tiles are powers of two (and >= 16 for tensor-core dots)."""
  return max(16, common.next_power_of_two(d))


def compiler_params(num_warps: int | None, num_stages: int | None) -> Any:
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tanh_fn(cfg: KernelConfig):
  if cfg.fast_tanh:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.approx_tanh  # tanh.approx.f32: one MUFU instruction (FlashSigmoid's trick)
  return jnp.tanh


def _num_warps(cfg: KernelConfig, head_dim_padded: int) -> int:
  if cfg.num_warps is not None:
    return cfg.num_warps
  return 4 if head_dim_padded <= 64 else 8


# ------------------------------------------------------------------------------ kernels
def dot_t(a_XD: jax.Array, b_YD: jax.Array, precision: Any) -> jax.Array:
  """a @ b.T accumulated in float32: the scores S = Q K^T and dP = dO V^T."""
  return lax.dot_general(a_XD, b_YD, _CONTRACT_LAST, precision=precision,
                         preferred_element_type=jnp.float32)


def _key_tile(k_ref, v_ref, kv_seg_ref, k_block, q_QD, q_start, q_seg_Q1, cfg: KernelConfig,
              bk: int, masked: bool):
  """Key block `k_block` for a kernel that walks key blocks of whole K/V rows (forward, dQ).

  Returns (K, V, S = Q K^T in float32, mask or None). kv segment ids are read only for
  masked tiles.
  """
  k_start = k_block * bk
  k_KD = k_ref[pl.ds(k_start, bk), :]
  v_KD = v_ref[pl.ds(k_start, bk), :]
  s_QK = dot_t(q_QD, k_KD, common.dot_precision(q_QD.dtype))
  mask_QK = None
  if masked:
    kv_seg_1K = kv_seg_ref[pl.ds(k_start, bk)][None, :] if kv_seg_ref is not None else None
    mask_QK = common.tile_mask(q_start, k_start, s_QK.shape, cfg, q_seg_Q1, kv_seg_1K)
  return k_KD, v_KD, s_QK, mask_QK


def _over_key_blocks(body, carry, q_block, cfg: KernelConfig, bq: int, bk: int,
                     has_segments: bool):
  """Folds `body(k_block, carry, masked)` over the key blocks query block `q_block` sees.

  Key blocks [0, n_unmasked) are visible to every row: no mask work there. Causal
  blocks past the diagonal are never visited.
  """
  n_end = common.kv_blocks_end(q_block, cfg, bq, bk)
  needs_mask = common.needs_mask(cfg, has_segments)
  n_unmasked = (common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, has_segments)
                if needs_mask else n_end)
  carry = lax.fori_loop(0, n_unmasked, functools.partial(body, masked=False), carry)
  if needs_mask:
    carry = lax.fori_loop(n_unmasked, n_end, functools.partial(body, masked=True), carry)
  return carry


def _half_bias(bias_ref, cfg: KernelConfig) -> jax.Array | None:
  """b / 2 of this program's (batch, head), read once (the bias ref is a scalar block)."""
  return 0.5 * bias_ref[...] if cfg.kind == "sigmoid" else None


def _probs(s_QK: jax.Array, mask_QK: jax.Array | None, lse_Q1: jax.Array | None,
           half_bias: jax.Array | None, cfg: KernelConfig, tanh) -> jax.Array:
  """Recomputes P for one tile in the backward pass (masked entries are exactly 0)."""
  if cfg.kind == "sigmoid":
    p_QK = common.sigmoid_probs(s_QK, half_bias, cfg, tanh)
  else:
    p_QK = jnp.exp2(s_QK * (cfg.scale * LOG2_E) - lse_Q1)
  return p_QK if mask_QK is None else jnp.where(mask_QK, p_QK, 0.0)


def sigmoid_tile(acc_RD, s_RK, mask_RK, v_KD, half_bias, cfg, tanh, pv):
  """The running output plus one key tile's sigmoid weights times its values (masked pairs
  exactly 0). Shared by the training forward and the decode kernel (`decode_gpu`)."""
  p_RK = common.sigmoid_probs(s_RK, half_bias, cfg, tanh)
  if mask_RK is not None:
    p_RK = jnp.where(mask_RK, p_RK, 0.0)
  return acc_RD + pv(p_RK, v_KD)


def softmax_tile(carry, s_RK, mask_RK, v_KD, cfg, pv):
  """One key tile into the online softmax's (output, row max, row sum), in base 2: the
  scores scaled by scale * log2(e), exp2 against the running max. Shared by the training
  forward and the decode kernel (`decode_gpu`)."""
  acc_RD, m_R, l_R = carry
  s_RK = s_RK * (cfg.scale * LOG2_E)
  if mask_RK is not None:
    s_RK = jnp.where(mask_RK, s_RK, common.MASK_VALUE)
  m_next_R = jnp.maximum(m_R, jnp.max(s_RK, axis=1))
  alpha_R = jnp.exp2(m_R - m_next_R)
  p_RK = jnp.exp2(s_RK - m_next_R[:, None])
  if mask_RK is not None:  # a row masked so far has m = MASK_VALUE and p = exp(0)
    p_RK = jnp.where(mask_RK, p_RK, 0.0)
  l_next_R = alpha_R * l_R + jnp.sum(p_RK, axis=1)
  return alpha_R[:, None] * acc_RD + pv(p_RK, v_KD), m_next_R, l_next_R


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, o_ref, *lse_refs,
                    cfg: KernelConfig):
  """One query block against its key blocks. Refs: q [bq, D], k/v [Lk, D] (whole row)."""
  bq, bk = cfg.block_q, cfg.block_k
  q_block = pl.program_id(0)
  q_start = q_block * bq
  q_QD = q_ref[...]
  precision = common.dot_precision(q_QD.dtype)
  has_segments = q_seg_ref is not None
  q_seg_Q1 = q_seg_ref[...][:, None] if has_segments else None
  tanh = tanh_fn(cfg)
  load_tile = functools.partial(_key_tile, k_ref, v_ref, kv_seg_ref, q_QD=q_QD, q_start=q_start,
                                q_seg_Q1=q_seg_Q1, cfg=cfg, bk=bk)

  def pv(p_QK, v_KD):
    return jnp.dot(p_QK.astype(v_KD.dtype), v_KD, precision=precision,
                   preferred_element_type=jnp.float32)

  if cfg.kind == "sigmoid":
    half_bias = _half_bias(bias_ref, cfg)

    def body(k_block, acc_QD, masked):
      _, v_KD, s_QK, mask_QK = load_tile(k_block, masked=masked)
      return sigmoid_tile(acc_QD, s_QK, mask_QK, v_KD, half_bias, cfg, tanh, pv)

    carry = jnp.zeros((bq, o_ref.shape[-1]), jnp.float32)
  else:
    def body(k_block, carry, masked):
      _, v_KD, s_QK, mask_QK = load_tile(k_block, masked=masked)
      return softmax_tile(carry, s_QK, mask_QK, v_KD, cfg, pv)

    carry = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32),
             jnp.full((bq,), common.MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))

  carry = _over_key_blocks(body, carry, q_block, cfg, bq, bk, has_segments)

  if cfg.kind == "sigmoid":
    o_ref[...] = carry.astype(o_ref.dtype)
  else:
    acc_QD, m_Q, l_Q = carry
    empty_Q = l_Q == 0.0  # fully masked row: output 0, and P = exp(s - inf) = 0 in backward
    l_safe_Q = jnp.where(empty_Q, 1.0, l_Q)
    o_ref[...] = (acc_QD / l_safe_Q[:, None]).astype(o_ref.dtype)
    lse_refs[0][...] = jnp.where(empty_Q, jnp.inf, m_Q + jnp.log2(l_safe_Q))


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: KernelConfig):
  """dK, dV of one key block, accumulated over the query blocks that see it."""
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  k_block = pl.program_id(0)
  k_start = k_block * bk
  k_KD = k_ref[...]
  v_KD = v_ref[...]
  precision = common.dot_precision(k_KD.dtype)
  has_segments = q_seg_ref is not None
  kv_seg_1K = kv_seg_ref[...][None, :] if has_segments else None
  half_bias = _half_bias(bias_ref, cfg)
  tanh = tanh_fn(cfg)

  def body(q_block, carry, masked):
    # This kernel walks query blocks of whole Q rows, so the tile slices Q/dO, not K/V.
    dk_KD, dv_KD = carry
    q_start = q_block * bq
    rows = pl.ds(q_start, bq)
    q_QD = q_ref[rows, :]
    do_QD = do_ref[rows, :]
    s_QK = dot_t(q_QD, k_KD, precision)
    mask_QK = None
    if masked:
      q_seg_Q1 = q_seg_ref[rows][:, None] if has_segments else None
      mask_QK = common.tile_mask(q_start, k_start, (bq, bk), cfg, q_seg_Q1, kv_seg_1K)
    lse_Q1 = lse_ref[rows][:, None] if cfg.kind == "softmax" else None
    p_QK = _probs(s_QK, mask_QK, lse_Q1, half_bias, cfg, tanh)
    dv_KD = dv_KD + lax.dot_general(p_QK.astype(do_QD.dtype), do_QD, _CONTRACT_FIRST,
                                    precision=precision, preferred_element_type=jnp.float32)
    dp_QK = dot_t(do_QD, v_KD, precision)
    delta_Q1 = delta_ref[rows][:, None] if cfg.kind == "softmax" else None
    ds_QK = common.score_grad(p_QK, dp_QK, delta_Q1, cfg)
    dk_KD = dk_KD + lax.dot_general(ds_QK.astype(q_QD.dtype), q_QD, _CONTRACT_FIRST,
                                    precision=precision, preferred_element_type=jnp.float32)
    return dk_KD, dv_KD

  carry = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  n_q = cfg.q_len_padded // bq
  needs_mask = common.needs_mask(cfg, has_segments)
  start = common.q_blocks_start(k_block, cfg, bq, bk)
  unmasked_start = (common.q_blocks_unmasked_start(k_block, cfg, bq, bk, has_segments)
                    if needs_mask else start)
  if needs_mask:
    carry = lax.fori_loop(start, unmasked_start, functools.partial(body, masked=True), carry)
  dk_KD, dv_KD = lax.fori_loop(unmasked_start, n_q, functools.partial(body, masked=False), carry)
  dk_ref[...] = (dk_KD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *ds_sum_refs, cfg: KernelConfig):
  """dQ of one query block, accumulated over the key blocks it sees.

  With `cfg.bias_grad` it also writes the block's row sums of dS (`ds_sum_refs[0]`,
  [bq] float32): the bias gradient before XLA sums it over rows.
  """
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  q_block = pl.program_id(0)
  q_start = q_block * bq
  q_QD = q_ref[...]
  do_QD = do_ref[...]
  precision = common.dot_precision(q_QD.dtype)
  has_segments = q_seg_ref is not None
  q_seg_Q1 = q_seg_ref[...][:, None] if has_segments else None
  lse_Q1 = lse_ref[...][:, None] if cfg.kind == "softmax" else None
  delta_Q1 = delta_ref[...][:, None] if cfg.kind == "softmax" else None
  half_bias = _half_bias(bias_ref, cfg)
  tanh = tanh_fn(cfg)
  load_tile = functools.partial(_key_tile, k_ref, v_ref, kv_seg_ref, q_QD=q_QD, q_start=q_start,
                                q_seg_Q1=q_seg_Q1, cfg=cfg, bk=bk)

  def body(k_block, carry, masked):
    dq_QD, ds_sum_Q = carry
    k_KD, v_KD, s_QK, mask_QK = load_tile(k_block, masked=masked)
    p_QK = _probs(s_QK, mask_QK, lse_Q1, half_bias, cfg, tanh)
    ds_QK = common.score_grad(p_QK, dot_t(do_QD, v_KD, precision), delta_Q1, cfg)
    dq_QD = dq_QD + jnp.dot(ds_QK.astype(k_KD.dtype), k_KD, precision=precision,
                            preferred_element_type=jnp.float32)
    if cfg.bias_grad:
      ds_sum_Q = ds_sum_Q + jnp.sum(ds_QK, axis=1)
    return dq_QD, ds_sum_Q

  carry = (jnp.zeros(dq_ref.shape, jnp.float32),
           jnp.zeros((bq,), jnp.float32) if cfg.bias_grad else None)
  dq_QD, ds_sum_Q = _over_key_blocks(body, carry, q_block, cfg, bq, bk, has_segments)
  dq_ref[...] = (dq_QD * cfg.scale).astype(dq_ref.dtype)
  if cfg.bias_grad:
    ds_sum_refs[0][...] = ds_sum_Q


# ------------------------------------------------------------------------- pallas calls
def _specs(cfg: KernelConfig, bq: int, bk: int, d: int, dv: int, has_segments: bool,
           q_blocked: bool):
  """BlockSpecs for (q, k, v, bias, q_seg, kv_seg, do, lse, delta) on a grid (block, b, h).

  `q_blocked`: the grid walks query blocks (forward, dQ) and sees whole K/V rows;
  otherwise it walks key blocks (dK/dV) and sees whole Q rows.
  """
  g = cfg.group
  lq, lk = cfg.q_len_padded, cfg.kv_len_padded
  if q_blocked:
    q_rows, kv_rows = bq, lk
    q_map = lambda i, b, h: (b, i, h, 0)
    kv_map = lambda i, b, h: (b, 0, h // g, 0)
    q_seg = pl.BlockSpec((None, bq), lambda i, b, h: (b, i))
    kv_seg = pl.BlockSpec((None, lk), lambda i, b, h: (b, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  else:
    q_rows, kv_rows = lq, bk
    q_map = lambda i, b, h: (b, 0, h, 0)
    kv_map = lambda i, b, h: (b, i, h // g, 0)
    q_seg = pl.BlockSpec((None, lq), lambda i, b, h: (b, 0))
    kv_seg = pl.BlockSpec((None, bk), lambda i, b, h: (b, i))
    row_stat = pl.BlockSpec((None, None, lq), lambda i, b, h: (b, h, 0))
  return dict(
      q=pl.BlockSpec((None, q_rows, None, d), q_map),
      k=pl.BlockSpec((None, kv_rows, None, d), kv_map),
      v=pl.BlockSpec((None, kv_rows, None, dv), kv_map),
      # One scalar per (batch, head) program of the [B, H] bias.
      bias=pl.BlockSpec((None, None), lambda i, b, h: (b, h)) if cfg.kind == "sigmoid" else None,
      q_seg=q_seg if has_segments else None,
      kv_seg=kv_seg if has_segments else None,
      do=pl.BlockSpec((None, q_rows, None, dv), q_map),
      row_stat=row_stat if cfg.kind == "softmax" else None,
      ds_sum=row_stat if cfg.bias_grad else None,
  )


def forward(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  """Padded inputs and bias [B, H] float32 (None for softmax) -> (out [B, Lq, H, Dv],
  base-2 lse [B, H, Lq] float32; None for sigmoid)."""
  b, lq, h, d = q.shape
  dv = v.shape[-1]
  has_segments = q_seg is not None
  sp = _specs(cfg, cfg.block_q, cfg.block_k, d, dv, has_segments, q_blocked=True)
  out_shape = [jax.ShapeDtypeStruct((b, lq, h, dv), q.dtype)]
  out_specs = [pl.BlockSpec((None, cfg.block_q, None, dv), lambda i, b_, h_: (b_, i, h_, 0))]
  if cfg.kind == "softmax":
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
    out_specs.append(sp["row_stat"])
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(lq // cfg.block_q, b, h),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"]],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler_params(_num_warps(cfg, d), cfg.num_stages or 2),
      interpret=cfg.interpret,
      name=f"flash_{cfg.kind}_fwd",
  )(q, k, v, bias, q_seg, kv_seg)
  return outs[0], (outs[1] if cfg.kind == "softmax" else None)


def backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, cfg: KernelConfig):
  """Padded inputs and dO -> (dq, dk, dv, dbias).

  dq, dk, dv have the inputs' shapes and dtypes; dbias is [B, H] float32 with
  `cfg.bias_grad`, else None.
  """
  b, lq, h, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  has_segments = q_seg is not None
  delta = common.softmax_delta(out, do) if cfg.kind == "softmax" else None
  params = compiler_params(_num_warps(cfg, d), cfg.num_stages or 2)

  # dK/dV per *query* head; GQA sums the group afterwards (as FlashAttention-2 does),
  # in float32 so the sum does not round G times.
  dkv_dtype = k.dtype if cfg.group == 1 else jnp.float32
  sp = _specs(cfg, bq, bk, d, dv, has_segments, q_blocked=False)
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(lk // bk, b, h),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"], sp["do"],
                sp["row_stat"], sp["row_stat"]],
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
                 pl.BlockSpec((None, bk, None, dv), lambda i, b_, h_: (b_, i, h_, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, lk, h, d), dkv_dtype),
                 jax.ShapeDtypeStruct((b, lk, h, dv), dkv_dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name=f"flash_{cfg.kind}_bwd_dkv",
  )(q, k, v, bias, q_seg, kv_seg, do, lse, delta)

  sp = _specs(cfg, bq, bk, d, dv, has_segments, q_blocked=True)
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if cfg.bias_grad:
    out_specs.append(sp["ds_sum"])
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
  dq, *ds_sum = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(lq // bq, b, h),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["bias"], sp["q_seg"], sp["kv_seg"], sp["do"],
                sp["row_stat"], sp["row_stat"]],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=cfg.interpret,
      name=f"flash_{cfg.kind}_bwd_dq",
  )(q, k, v, bias, q_seg, kv_seg, do, lse, delta)

  if cfg.group > 1:
    dk, dv_ = common.sum_kv_groups(dk, hkv, k.dtype), common.sum_kv_groups(dv_, hkv, v.dtype)
  # Padded query rows (dO = 0) and masked pairs (P = 0) have dS = 0: summing all rows is exact.
  dbias = ds_sum[0].sum(axis=2) if cfg.bias_grad else None
  return dq, dk, dv_, dbias
