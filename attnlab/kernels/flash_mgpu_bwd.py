"""The Mosaic GPU kernels' backward: dQ (with the row sums of dS for d bias) and dK/dV.

Called by `flash_mgpu.backward`. dQ: each consumer warpgroup owns 64 query rows (with their
dO, and the per-row bias or softmax lse and delta) and walks the key tiles the producer
streams. dK/dV: each consumer owns 64 keys (K, V) and walks the query tiles (Q, dO and the
per-row statistics) streamed to it, computing the transposed tiles S^T = K Q^T so that
P^T is already the wgmma input dV needs. Under the causal mask both start or stop where
`attnlab.kernels.common`'s block ranges say, as the Triton kernel does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnlab.kernels import common
from attnlab.kernels import mgpu_pipeline as mp
from attnlab.kernels.common import KernelConfig

LOG2_E = 1.4426950408889634


def _probs(s, stats, masked, q_start, k_start, cfg: KernelConfig, transposed: bool):
  """P of one tile from the scores (sigmoid: stats = b / 2 broadcast; softmax: the base-2 lse
  broadcast), invisible pairs exactly 0. `transposed`: the tile is [keys, queries]."""
  if cfg.kind == "sigmoid":
    p = mp.sigmoid(s, stats, cfg)
  else:
    p = jnp.exp2(s * (cfg.scale * LOG2_E) - stats)
  if masked:
    p = (mp.mask_t(p, k_start, q_start, cfg, 0.0) if transposed
         else mp.mask(p, q_start, k_start, cfg, 0.0))
  return p


def dq(q, k, v, do, stat_a, stat_b, cfg: KernelConfig):
  """dQ [B, Lq, H, D] and the row sums of dS [B, H, Lq] float32 (zeros without bias_grad)."""
  b, lq, h, d = q.shape
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = mp.stages_of(cfg)

  def kernel(q_ref, k_ref, v_ref, do_ref, a_ref, b_ref, dq_ref, ds_sum_ref, scratch, barriers):
    q_smem2, do_smem2, a_smem2, b_smem2, k_smem, v_smem = scratch
    rows_loaded, k_loaded, v_loaded, k_free, v_free = barriers
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    n_tiles = mp.stream_keys(k_ref, v_ref, cfg, bq, bk, (k_smem, v_smem), (k_loaded, v_loaded),
                             (k_free, v_free), wg, stages)

    @mp.consumer(wg)
    def _consumer():
      q_block, q_start, rows = mp.own_block(wg, bq)
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      a_smem, b_smem = a_smem2.at[wg], b_smem2.at[wg]
      loaded = rows_loaded.at[wg]
      own = [(q_ref.at[batch, rows, head], q_smem), (do_ref.at[batch, rows, head], do_smem),
             (a_ref.at[batch, head, rows], a_smem)]
      if not sigmoid:  # softmax's delta (sigmoid's second row statistic is unused)
        own.append((b_ref.at[batch, head, rows], b_smem))
      mp.copy_in(own, loaded)
      shape = (bq, bk)
      stat = mp.rows(mp.load_row_stat(a_smem, 0) * (0.5 if sigmoid else 1.0), shape)
      delta = None if sigmoid else mp.rows(mp.load_row_stat(b_smem, 0), shape)

      def body(i, slot, carry, masked):
        dq_acc, ds_sum = carry
        plgpu.barrier_wait(k_loaded.at[slot])
        s = mp.matmul(q_smem, mp.transposed(k_smem.at[slot]), shape)
        p = _probs(s, stat, masked, q_start, i * bk, cfg, transposed=False)
        plgpu.barrier_wait(v_loaded.at[slot])
        dp = mp.matmul(do_smem, mp.transposed(v_smem.at[slot]), shape)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = common.score_grad(p, dp, delta, cfg)
        dq_acc = mp.matmul_add(dq_acc, ds.astype(dtype), k_smem.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        if cfg.bias_grad:
          ds_sum = ds_sum + ds.sum(axis=1)
        return dq_acc, ds_sum

      end = common.kv_blocks_end(q_block, cfg, bq, bk)
      unmasked_end = common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, False)
      carry = (mp.zeros((bq, d)),
               plgpu.layout_cast(jnp.zeros((bq,), mp.F32), plgpu.Layout.WGMMA.reduce(1)))
      dq_acc, ds_sum = mp.consume(n_tiles, (0, 0, unmasked_end, end), body, carry,
                                  (k_loaded, v_loaded), (k_free, v_free), stages)
      q_smem[...] = (dq_acc * cfg.scale).astype(dtype)
      a_smem[...] = ds_sum
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
      plgpu.copy_smem_to_gmem(a_smem, ds_sum_ref.at[batch, head, rows])
      plgpu.wait_smem_to_gmem(0)

  return mp.launch(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, h, lq), mp.F32)),
      scratch_types=(
          (mp.smem_tiles((mp.COMPUTE_WGS, bq, d), dtype),
           mp.smem_tiles((mp.COMPUTE_WGS, bq, d), dtype),
           plgpu.SMEM((mp.COMPUTE_WGS, bq), mp.F32), plgpu.SMEM((mp.COMPUTE_WGS, bq), mp.F32),
           mp.smem_tiles((stages, bk, d), dtype), mp.smem_tiles((stages, bk, d), dtype)),
          (plgpu.Barrier(num_barriers=mp.COMPUTE_WGS),
           plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=mp.COMPUTE_WGS, num_barriers=stages),
           plgpu.Barrier(num_arrivals=mp.COMPUTE_WGS, num_barriers=stages)),
      ),
      grid=(h, lq // (mp.COMPUTE_WGS * bq), b),
      cfg=cfg,
  )(q, k, v, do, stat_a, stat_b)


def dkv(q, k, v, do, stat_a, stat_b, cfg: KernelConfig):
  """dK, dV per query head, [B, Lk, H, D] in the input dtype (dK already scaled).

  The producer streams Q and dO tiles, and for softmax each tile's lse and delta rows;
  sigmoid's bias is the same on every row of a head, so each consumer reads it once.
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = mp.stages_of(cfg)
  n_streamed = 2 if sigmoid else 4  # Q, dO (, lse, delta)

  def kernel(q_ref, k_ref, v_ref, do_ref, a_ref, b_ref, dk_ref, dv_ref, scratch, barriers):
    k_smem2, v_smem2, bias_smem2, slots = scratch
    keys_loaded, loaded, free = barriers
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    first_block = lax.axis_index("tiles") * mp.COMPUTE_WGS
    kv_head = lax.div(head, jnp.int32(cfg.group))
    n_q = cfg.q_len_padded // bq
    # Causal: the first consumer's keys are seen by the earliest queries; start there.
    first = common.q_blocks_start(first_block, cfg, bq, bk)
    q_rows = lambda i: pl.ds((first + i) * bq, bq)
    sources = (lambda i: q_ref.at[batch, q_rows(i), head],
               lambda i: do_ref.at[batch, q_rows(i), head],
               lambda i: a_ref.at[batch, head, q_rows(i)],
               lambda i: b_ref.at[batch, head, q_rows(i)])[:n_streamed]
    mp.stream(n_q - first, sources, slots, loaded, free, wg, stages)
    q_smem, do_smem = slots[:2]

    @mp.consumer(wg)
    def _consumer():
      k_block, k_start, keys = mp.own_block(wg, bk)
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      ready = keys_loaded.at[wg]
      own = [(k_ref.at[batch, keys, kv_head], k_smem), (v_ref.at[batch, keys, kv_head], v_smem)]
      if sigmoid:
        own.append((a_ref.at[batch, head, pl.ds(0, bq)], bias_smem2.at[wg]))
      mp.copy_in(own, ready)
      shape = (bk, bq)
      if sigmoid:
        half_bias = mp.cols(0.5 * mp.load_row_stat(bias_smem2.at[wg], 1), shape)

      def body(i, slot, carry, masked):
        dk_acc, dv_acc = carry
        q_start = (first + i) * bq
        for j in range(n_streamed):
          plgpu.barrier_wait(loaded[j].at[slot])
        s_t = mp.matmul(k_smem, mp.transposed(q_smem.at[slot]), shape)
        if sigmoid:
          stat, delta = half_bias, None
        else:
          stat = mp.cols(mp.load_row_stat(slots[2].at[slot], 1), shape)
          delta = mp.cols(mp.load_row_stat(slots[3].at[slot], 1), shape)
          plgpu.barrier_arrive(free[2].at[slot])
          plgpu.barrier_arrive(free[3].at[slot])
        p_t = _probs(s_t, stat, masked, q_start, k_start, cfg, transposed=True)
        dv_acc = mp.matmul_add(dv_acc, p_t.astype(dtype), do_smem.at[slot])
        dp_t = mp.matmul(v_smem, mp.transposed(do_smem.at[slot]), shape)
        plgpu.barrier_arrive(free[1].at[slot])
        ds_t = common.score_grad(p_t, dp_t, delta, cfg)
        dk_acc = mp.matmul_add(dk_acc, ds_t.astype(dtype), q_smem.at[slot])
        plgpu.barrier_arrive(free[0].at[slot])
        return dk_acc, dv_acc

      start = common.q_blocks_start(k_block, cfg, bq, bk) - first
      unmasked_start = common.q_blocks_unmasked_start(k_block, cfg, bq, bk, False) - first
      carry = (mp.zeros((bk, d)), mp.zeros((bk, d)))
      n_steps = n_q - first
      dk_acc, dv_acc = mp.consume(n_steps, (start, unmasked_start, n_steps, n_steps), body,
                                  carry, loaded, free, stages)
      k_smem[...] = (dk_acc * cfg.scale).astype(dtype)  # K and V are done: stage dK, dV there
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, head])
      plgpu.wait_smem_to_gmem(0)

  per_head = jax.ShapeDtypeStruct((b, lk, h, d), dtype)
  slots = (mp.smem_tiles((stages, bq, d), dtype), mp.smem_tiles((stages, bq, d), dtype),
           plgpu.SMEM((stages, bq), mp.F32), plgpu.SMEM((stages, bq), mp.F32))[:n_streamed]
  return mp.launch(
      kernel,
      out_type=(per_head, per_head),
      scratch_types=(
          (mp.smem_tiles((mp.COMPUTE_WGS, bk, d), dtype),
           mp.smem_tiles((mp.COMPUTE_WGS, bk, d), dtype),
           plgpu.SMEM((mp.COMPUTE_WGS, bq), mp.F32), slots),
          (plgpu.Barrier(num_barriers=mp.COMPUTE_WGS),
           (plgpu.Barrier(num_barriers=stages),) * n_streamed,
           (plgpu.Barrier(num_arrivals=mp.COMPUTE_WGS, num_barriers=stages),) * n_streamed),
      ),
      grid=(h, lk // (mp.COMPUTE_WGS * bk), b),
      cfg=cfg,
  )(q, k, v, do, stat_a, stat_b)
