"""FlashSigmoid (and flash softmax) as Pallas Mosaic GPU kernels for Hopper: warp-specialised,
TMA-fed, wgmma.

The same algorithm and tiling contract as `flash_gpu` (Triton), the backend `flash.py`
dispatches to under `backend="mgpu"`; the plain jnp reference both must match is
`attnlab.attention.attend(impl="xla")`. The `interpret` switch (`KernelConfig.interpret`) runs
these kernels in Mosaic GPU's interpret mode on CPU, which simulates the warpgroups, shared
memory, TMA copies and barriers, so CI checks the synchronisation as well as the maths.

Structure (FlashAttention-3's, read in jax's `attention_mgpu` and rewritten here for sigmoid):
each program runs `COMPUTE_WGS` consumer warpgroups, each owning `block` rows of queries (or,
in dK/dV, of keys), and one producer warpgroup that streams the other operand's tiles
through `stages` shared-memory slots with TMA copies. A slot's "loaded" barrier is signalled
by the TMA unit, its "free" barrier by every consumer once its wgmma has read the slot.
Both consumers walk the same tiles (the union of their ranges); under the causal mask a
consumer releases, without computing, the tiles it cannot see.

Sigmoid needs no running max, no row sum and no rescaling of the accumulator, so its forward
is two wgmmas and one tanh per element; its backward has no delta pre-pass:
  dV = P^T dO,  dP = dO V^T,  dS = dP * P * (1 - P),  dQ = scale dS K,  dK = scale dS^T Q.
The bias enters per query row ([B, H, Lq] float32, broadcast from [B, H] by `forward`), loaded
like the softmax statistics, and d bias is the dQ kernel's row sums of dS.

Limits (checked by `check_supported`, which the dispatcher reads): bfloat16 or float16
inputs (float32 accumulation), no segment ids. Head dims are padded to a multiple of 64 and
lengths to whole programs; the padding is masked where it would change a result.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnlab.kernels import capabilities
from attnlab.kernels import common
from attnlab.kernels import flash_mgpu_bwd
from attnlab.kernels import mgpu_pipeline as mp
from attnlab.kernels.common import KernelConfig
from attnlab.kernels.mgpu_pipeline import COMPUTE_WGS
from attnlab.kernels.mgpu_pipeline import interpret_params  # noqa: F401  (public here)

DTYPES = tuple(jnp.dtype(name) for name in capabilities.MGPU_DTYPES)  # wgmma's inputs
LOG2_E = 1.4426950408889634


# ------------------------------------------------------------------------ configuration
def default_blocks(q_len: int, kv_len: int, head_dim: int, dtype: Any
                   ) -> tuple[int, int, int, int]:
  """(block_q, block_k, block_q_bwd, block_k_bwd): rows per consumer warpgroup and tile
  lengths, all multiples of 64 (wgmma's M is 64 per warpgroup).

  Forward: 64 query rows per warpgroup against 128-key tiles (64 past head dim 128, where
  two K/V slots of 128 rows would not fit in shared memory). Backward: 64 x 64 tiles (each
  consumer keeps two [64, D] float32 accumulators live: dK and dV).
  """
  del q_len, kv_len, dtype
  return 64, (128 if head_dim <= 128 else 64), 64, 64


def check_blocks(block_q: int | None = None, block_k: int | None = None) -> None:
  """Raises a ValueError unless the explicit tiles are positive multiples of 64."""
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block is not None and (not isinstance(block, int) or block <= 0 or block % 64):
      raise ValueError(f"{name}={block!r} is invalid for the Mosaic GPU kernel: tiles must be a "
                       "positive multiple of 64 (a warpgroup's wgmma is 64 rows).")


def padded_head_dim(d: int) -> int:
  """Shared-memory tiles are (8, 64) with a 128-byte swizzle: head dims in whole 64s."""
  return common.round_up(d, 64)


def length_multiples(block_q: int, block_k: int, block_q_bwd: int, block_k_bwd: int
                     ) -> tuple[int, int]:
  """(query, key) lengths are padded to these: every program owns COMPUTE_WGS blocks of rows
  (queries in the forward and dQ, keys in dK/dV) and streams whole tiles of the other."""
  return (math.lcm(COMPUTE_WGS * block_q, COMPUTE_WGS * block_q_bwd, block_q_bwd),
          math.lcm(block_k, block_k_bwd, COMPUTE_WGS * block_k_bwd))


def check_supported(dtype: Any, has_segments: bool) -> str | None:
  """Why this backend cannot run a call, or None if it can."""
  if jnp.dtype(dtype) not in DTYPES:
    return (f"the Mosaic GPU kernel takes bfloat16 or float16 inputs (wgmma); got {dtype}. "
            "Use backend='gpu' (Triton) for float32.")
  if has_segments:
    return ("the Mosaic GPU kernel does not take segment ids yet; use backend='gpu' (Triton).")
  return None


# ------------------------------------------------------------------------------ forward
def forward(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  """Padded inputs and bias [B, H] float32 (None for softmax) -> (out [B, Lq, H, Dv],
  base-2 lse [B, H, Lq] float32; None for sigmoid)."""
  del q_seg, kv_seg  # refused by check_supported
  b, lq, h, d = q.shape
  dv = v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_k
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = mp.stages_of(cfg)

  def kernel(q_ref, k_ref, v_ref, row_in_ref, out_ref, row_out_ref, scratch, barriers):
    q_smem2, k_smem, v_smem, row_smem2 = scratch
    q_loaded, row_loaded, k_loaded, v_loaded, k_free, v_free = barriers
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    n_tiles = mp.stream_keys(k_ref, v_ref, cfg, bq, bk, (k_smem, v_smem), (k_loaded, v_loaded),
                             (k_free, v_free), wg, stages)

    @mp.consumer(wg)
    def _consumer():
      q_block, q_start, rows = mp.own_block(wg, bq)
      q_smem, row_smem = q_smem2.at[wg], row_smem2.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_loaded.at[wg])
      if sigmoid:
        plgpu.copy_gmem_to_smem(row_in_ref.at[batch, head, rows], row_smem, row_loaded.at[wg])
        plgpu.barrier_wait(row_loaded.at[wg])
        half_bias = mp.rows(0.5 * mp.load_row_stat(row_smem, 0), (bq, bk))
      plgpu.barrier_wait(q_loaded.at[wg])

      def body(i, slot, carry, masked):
        plgpu.barrier_wait(k_loaded.at[slot])
        s = mp.matmul(q_smem, mp.transposed(k_smem.at[slot]), (bq, bk))
        plgpu.barrier_arrive(k_free.at[slot])
        if sigmoid:
          acc = carry
          p = mp.sigmoid(s, half_bias, cfg)
          if masked:
            p = mp.mask(p, q_start, i * bk, cfg, 0.0)
        else:
          acc, m, l = carry
          s = s * (cfg.scale * LOG2_E)
          if masked:
            s = mp.mask(s, q_start, i * bk, cfg, common.MASK_VALUE)
          m_next = jnp.maximum(m, s.max(axis=1))
          alpha = jnp.exp2(m - m_next)
          p = jnp.exp2(s - mp.rows(m_next, s.shape))
          if masked:  # a row masked so far has m = MASK_VALUE and p = exp2(0)
            p = mp.mask(p, q_start, i * bk, cfg, 0.0)
          l = alpha * l + p.sum(axis=1)
          m = m_next
          acc = acc * mp.rows(alpha, acc.shape)
        plgpu.barrier_wait(v_loaded.at[slot])
        acc = mp.matmul_add(acc, p.astype(dtype), v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc if sigmoid else (acc, m, l)

      end = common.kv_blocks_end(q_block, cfg, bq, bk)
      unmasked_end = common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, False)
      acc = mp.zeros((bq, dv))
      if sigmoid:
        carry = acc
      else:
        reduce = plgpu.Layout.WGMMA.reduce(1)
        carry = (acc, plgpu.layout_cast(jnp.full((bq,), common.MASK_VALUE, mp.F32), reduce),
                 plgpu.layout_cast(jnp.zeros((bq,), mp.F32), reduce))
      carry = mp.consume(n_tiles, (0, 0, unmasked_end, end), body, carry,
                         (k_loaded, v_loaded), (k_free, v_free), stages)
      if sigmoid:
        out = carry
      else:
        acc, m, l = carry
        empty = l == 0.0  # a row that sees no key: output 0, and P = exp2(s - inf) = 0 later
        l_safe = jnp.where(empty, 1.0, l)
        out = acc / mp.rows(l_safe, acc.shape)
        row_smem[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))
      q_smem[...] = out.astype(dtype)  # Q is no longer needed: its buffer stages the output
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, rows, head])
      if not sigmoid:
        plgpu.copy_smem_to_gmem(row_smem, row_out_ref.at[batch, head, rows])
      plgpu.wait_smem_to_gmem(0)

  if d != dv:
    raise ValueError(f"the Mosaic GPU kernel needs equal head dims for keys and values; got "
                     f"{d} and {dv}. Use backend='gpu'.")
  row_in = (jnp.broadcast_to(bias[:, :, None], (b, h, lq)) if sigmoid
            else jnp.zeros((b, h, lq), mp.F32))
  out_type = (jax.ShapeDtypeStruct((b, lq, h, dv), dtype),
              jax.ShapeDtypeStruct((b, h, lq), mp.F32))
  out, lse = mp.launch(
      kernel,
      out_type=out_type,
      scratch_types=(
          (mp.smem_tiles((COMPUTE_WGS, bq, d), dtype), mp.smem_tiles((stages, bk, d), dtype),
           mp.smem_tiles((stages, bk, dv), dtype), plgpu.SMEM((COMPUTE_WGS, bq), mp.F32)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS),
           plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)),
      ),
      grid=(h, lq // (COMPUTE_WGS * bq), b),
      cfg=cfg,
  )(q, k, v, row_in)
  return out, (None if sigmoid else lse)


def backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, cfg: KernelConfig):
  """Padded inputs and dO -> (dq, dk, dv, dbias), as `flash_gpu.backward`.

  dq, dk, dv have the inputs' shapes and dtypes; dbias is [B, H] float32 with
  `cfg.bias_grad`, else None. Under GQA, dK and dV are written per query head (rounded to
  the input dtype) and summed over each group in float32.
  """
  del q_seg, kv_seg  # refused by check_supported
  b, lq, h, d = q.shape
  hkv = k.shape[2]
  sigmoid = cfg.kind == "sigmoid"
  # Per query row: sigmoid's bias (passed twice: the kernels take two row statistics and
  # read only the first for sigmoid), or softmax's lse and delta = rowsum(dO * O).
  if sigmoid:
    stat_a = stat_b = jnp.broadcast_to(bias[:, :, None], (b, h, lq))
  else:
    stat_a, stat_b = lse, common.softmax_delta(out, do)
  dq, ds_sum = flash_mgpu_bwd.dq(q, k, v, do, stat_a, stat_b, cfg)
  dk, dv = flash_mgpu_bwd.dkv(q, k, v, do, stat_a, stat_b, cfg)
  if cfg.group > 1:
    dk = common.sum_kv_groups(dk.astype(mp.F32), hkv, k.dtype)
    dv = common.sum_kv_groups(dv.astype(mp.F32), hkv, v.dtype)
  # Padded query rows (dO = 0) and masked pairs (P = 0) have dS = 0: summing all rows is exact.
  return dq, dk, dv, (ds_sum.sum(axis=2) if cfg.bias_grad else None)
