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

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnlab.kernels import common
from attnlab.kernels.common import KernelConfig

COMPUTE_WGS = 2  # consumer warpgroups per program (a producer warpgroup comes on top)
DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma's 16-bit inputs; float32 stays on Triton
LOG2_E = 1.4426950408889634
DEFAULT_STAGES = 2  # shared-memory slots per streamed operand (TMA runs this far ahead)
_F32 = jnp.float32


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
  if jnp.dtype(dtype) not in tuple(map(jnp.dtype, DTYPES)):
    return (f"the Mosaic GPU kernel takes bfloat16 or float16 inputs (wgmma); got {dtype}. "
            "Use backend='gpu' (Triton) for float32.")
  if has_segments:
    return ("the Mosaic GPU kernel does not take segment ids yet; use backend='gpu' (Triton).")
  return None


def interpret_params() -> Any:
  """Mosaic GPU's interpret mode (a CPU simulation of warpgroups, SMEM, TMA and barriers),
  or None where this jax has no complete one: it is public from jax 0.12.1; earlier
  versions' private interpreter cannot load a register layout from SMEM."""
  params = getattr(plgpu, "InterpretGPUParams", None)
  return None if params is None else params()


def _compiler_params(cfg: KernelConfig) -> Any:
  # approx_math: tanh.approx / ex2.approx, one MUFU op each (16-bit inputs only run here).
  return plgpu.CompilerParams(approx_math=cfg.fast_tanh)


def _interpret(cfg: KernelConfig) -> Any:
  if not cfg.interpret:
    return None
  params = interpret_params()
  if params is None:
    raise ValueError("this jax has no Mosaic GPU interpret mode; run backend='mgpu' on a "
                     "Hopper GPU, or use backend='gpu' with interpret=True.")
  return params


def _smem_tiles(shape: tuple[int, ...], dtype: Any) -> Any:
  """A shared-memory buffer in the (8, 64)-tiled, 128-byte-swizzled form wgmma reads."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _iota(dtype, shape, dim) -> jax.Array:
  """`lax.broadcasted_iota`'s signature, in wgmma's register layout."""
  return plgpu.broadcasted_iota(dtype, shape, dim, layout=plgpu.Layout.WGMMA)


# jax < 0.11 spells plgpu.load(ref, idx, layout=...); later jax drops idx.
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters


def _load_row_stat(smem, along: int) -> jax.Array:
  """A [block] float32 vector from SMEM, laid out to broadcast along dim `along` of a tile."""
  layout = plgpu.Layout.WGMMA.reduce(1 - along)
  return plgpu.load(smem, (), layout=layout) if _LOAD_TAKES_IDX else plgpu.load(smem,
                                                                               layout=layout)


def _rows(x_R: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A per-row vector broadcast over the columns of a [R, C] tile."""
  return lax.broadcast_in_dim(x_R, shape, [0])


def _cols(x_C: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A per-column vector broadcast over the rows of a [R, C] tile."""
  return lax.broadcast_in_dim(x_C, shape, [1])


def _matmul(a, b, shape: tuple[int, int]) -> jax.Array:
  """a @ b into a fresh float32 accumulator (a: SMEM or registers, b: SMEM)."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, _F32))


def _matmul_add(acc, a, b) -> jax.Array:
  """acc + a @ b, accumulated in place by wgmma."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(run)(plgpu.ACC.init(acc))


def _zeros(shape: tuple[int, ...]) -> jax.Array:
  return plgpu.layout_cast(jnp.zeros(shape, _F32), plgpu.Layout.WGMMA)


def _t(ref):
  return ref.transpose((1, 0))


# ---------------------------------------------------------------- the streaming skeleton
def _stages(cfg: KernelConfig) -> int:
  """Shared-memory slots per streamed operand: `num_stages`, the tuned knob (default 2)."""
  return cfg.num_stages or DEFAULT_STAGES


def _stream(n_tiles, sources, slots, loaded, free, wg, stages: int) -> None:
  """The producer warpgroup: copies tile i of every source into slot i % stages, once every
  consumer has freed that slot (`free`), signalling `loaded` when the TMA has landed.

  `sources[j](i)` is the GMEM ref of tile i of operand j; `slots[j]` its [stages, ...] SMEM.
  """
  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, n_tiles)
    def _copy(i):
      slot = lax.rem(i, stages)
      for source, smem, loaded_j, free_j in zip(sources, slots, loaded, free):
        @pl.when(i >= stages)
        def _wait_free():
          plgpu.barrier_wait(free_j.at[slot])
        plgpu.copy_gmem_to_smem(source(i), smem.at[slot], loaded_j.at[slot])


def _consume(n_tiles, visible, body, carry, loaded, free, stages: int):
  """A consumer warpgroup walks tiles [0, n_tiles): those in `visible` = (start, unmasked
  start, unmasked end, end) run `body(i, slot, carry, masked)` (masked in [start, unmasked
  start) and [unmasked end, end)); the rest are only freed, so the producer can go on.

  `body` waits on the slot's `loaded` barriers it needs and frees them itself.
  """
  start, unmasked_start, unmasked_end, end = visible

  def skip(i, carry):
    slot = lax.rem(i, stages)
    for loaded_j, free_j in zip(loaded, free):
      plgpu.barrier_wait(loaded_j.at[slot])
      plgpu.barrier_arrive(free_j.at[slot])
    return carry

  def run(masked):
    def step(i, carry):
      return body(i, lax.rem(i, stages), carry, masked)
    return step

  carry = lax.fori_loop(0, start, skip, carry)
  carry = lax.fori_loop(start, unmasked_start, run(True), carry)
  carry = lax.fori_loop(unmasked_start, unmasked_end, run(False), carry)
  carry = lax.fori_loop(unmasked_end, end, run(True), carry)
  return lax.fori_loop(end, n_tiles, skip, carry)


def _mask(s, q_start, k_start, cfg: KernelConfig, fill) -> jax.Array:
  """The tile with its invisible (query, key) pairs (causal, padded keys) set to `fill`."""
  mask = common.tile_mask(q_start, k_start, s.shape, cfg, None, None, iota=_iota)
  return s if mask is None else jnp.where(mask, s, fill)


def _mask_t(s_KQ, k_start, q_start, cfg: KernelConfig, fill) -> jax.Array:
  """`_mask` for a transposed [keys, queries] tile (the dK/dV kernel's S^T): the same mask,
  its positions read from the swapped axes."""
  swapped = lambda dtype, shape, dim: _iota(dtype, shape, 1 - dim)
  mask = common.tile_mask(q_start, k_start, s_KQ.shape, cfg, None, None, iota=swapped)
  return s_KQ if mask is None else jnp.where(mask, s_KQ, fill)


def _sigmoid(s, half_bias, cfg: KernelConfig) -> jax.Array:
  return common.sigmoid_probs(s, half_bias, cfg)


# ------------------------------------------------------------------------------ forward
def forward(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  """Padded inputs and bias [B, H] float32 (None for softmax) -> (out [B, Lq, H, Dv],
  base-2 lse [B, H, Lq] float32; None for sigmoid)."""
  del q_seg, kv_seg  # refused by check_supported
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_k
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = _stages(cfg)

  def kernel(q_ref, k_ref, v_ref, row_in_ref, out_ref, row_out_ref, scratch, barriers):
    q_smem2, k_smem, v_smem, row_smem2 = scratch
    q_loaded, row_loaded, k_loaded, v_loaded, k_free, v_free = barriers
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    first_block = lax.axis_index("tiles") * COMPUTE_WGS
    kv_head = lax.div(head, jnp.int32(cfg.group))
    # The last consumer's rows see the most keys (causal): stream up to their last tile.
    n_tiles = common.kv_blocks_end(first_block + COMPUTE_WGS - 1, cfg, bq, bk)
    _stream(n_tiles,
            (lambda i: k_ref.at[batch, pl.ds(i * bk, bk), kv_head],
             lambda i: v_ref.at[batch, pl.ds(i * bk, bk), kv_head]),
            (k_smem, v_smem), (k_loaded, v_loaded), (k_free, v_free), wg, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_block = first_block + wg
      rows = pl.ds(q_block * bq, bq)
      q_smem, row_smem = q_smem2.at[wg], row_smem2.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_loaded.at[wg])
      if sigmoid:
        plgpu.copy_gmem_to_smem(row_in_ref.at[batch, head, rows], row_smem, row_loaded.at[wg])
        plgpu.barrier_wait(row_loaded.at[wg])
        half_bias = _rows(0.5 * _load_row_stat(row_smem, 0), (bq, bk))
      plgpu.barrier_wait(q_loaded.at[wg])
      q_start = q_block * bq

      def body(i, slot, carry, masked):
        plgpu.barrier_wait(k_loaded.at[slot])
        s = _matmul(q_smem, _t(k_smem.at[slot]), (bq, bk))
        plgpu.barrier_arrive(k_free.at[slot])
        if sigmoid:
          acc = carry
          p = _sigmoid(s, half_bias, cfg)
          if masked:
            p = _mask(p, q_start, i * bk, cfg, 0.0)
        else:
          acc, m, l = carry
          s = s * (cfg.scale * LOG2_E)
          if masked:
            s = _mask(s, q_start, i * bk, cfg, common.MASK_VALUE)
          m_next = jnp.maximum(m, s.max(axis=1))
          alpha = jnp.exp2(m - m_next)
          p = jnp.exp2(s - _rows(m_next, s.shape))
          if masked:  # a row masked so far has m = MASK_VALUE and p = exp2(0)
            p = _mask(p, q_start, i * bk, cfg, 0.0)
          l = alpha * l + p.sum(axis=1)
          m = m_next
          acc = acc * _rows(alpha, acc.shape)
        plgpu.barrier_wait(v_loaded.at[slot])
        acc = _matmul_add(acc, p.astype(dtype), v_smem.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc if sigmoid else (acc, m, l)

      end = common.kv_blocks_end(q_block, cfg, bq, bk)
      unmasked_end = common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, False)
      acc = _zeros((bq, dv))
      if sigmoid:
        carry = acc
      else:
        reduce = plgpu.Layout.WGMMA.reduce(1)
        carry = (acc, plgpu.layout_cast(jnp.full((bq,), common.MASK_VALUE, _F32), reduce),
                 plgpu.layout_cast(jnp.zeros((bq,), _F32), reduce))
      carry = _consume(n_tiles, (0, 0, unmasked_end, end), body, carry,
                       (k_loaded, v_loaded), (k_free, v_free), stages)
      if sigmoid:
        out = carry
      else:
        acc, m, l = carry
        empty = l == 0.0  # a row that sees no key: output 0, and P = exp2(s - inf) = 0 later
        l_safe = jnp.where(empty, 1.0, l)
        out = acc / _rows(l_safe, acc.shape)
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
            else jnp.zeros((b, h, lq), _F32))
  out_type = (jax.ShapeDtypeStruct((b, lq, h, dv), dtype),
              jax.ShapeDtypeStruct((b, h, lq), _F32))
  out, lse = plgpu.kernel(
      kernel,
      out_type=out_type,
      scratch_types=(
          (_smem_tiles((COMPUTE_WGS, bq, d), dtype), _smem_tiles((stages, bk, d), dtype),
           _smem_tiles((stages, bk, dv), dtype), plgpu.SMEM((COMPUTE_WGS, bq), _F32)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS),
           plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)),
      ),
      grid=(h, lq // (COMPUTE_WGS * bq), b),
      grid_names=("heads", "tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(cfg),
      interpret=_interpret(cfg),
  )(q, k, v, row_in)
  del lk
  return out, (None if sigmoid else lse)


# ----------------------------------------------------------------------------- backward
def _probs(s, stats, masked, q_start, k_start, cfg: KernelConfig, transposed: bool):
  """P of one tile from the scores (sigmoid: stats = b / 2 broadcast; softmax: the base-2 lse
  broadcast), invisible pairs exactly 0. `transposed`: the tile is [keys, queries]."""
  if cfg.kind == "sigmoid":
    p = _sigmoid(s, stats, cfg)
  else:
    p = jnp.exp2(s * (cfg.scale * LOG2_E) - stats)
  if masked:
    p = (_mask_t(p, k_start, q_start, cfg, 0.0) if transposed
         else _mask(p, q_start, k_start, cfg, 0.0))
  return p


def _score_grad(p, dp, delta, cfg: KernelConfig):
  """dS from P and dP (delta broadcast like P for softmax): `common.score_grad`'s formula."""
  return dp * p * (1.0 - p) if cfg.kind == "sigmoid" else p * (dp - delta)


def backward(q, k, v, bias, q_seg, kv_seg, out, lse, do, cfg: KernelConfig):
  """Padded inputs and dO -> (dq, dk, dv, dbias), as `flash_gpu.backward`.

  dq, dk, dv have the inputs' shapes and dtypes; dbias is [B, H] float32 with
  `cfg.bias_grad`, else None. Under GQA, dK and dV are written per query head (rounded to
  the input dtype) and summed over each group in float32.
  """
  del q_seg, kv_seg  # refused by check_supported
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  sigmoid = cfg.kind == "sigmoid"
  # Per query row: sigmoid's bias (twice, so both kernels read the same layout), or
  # softmax's lse and delta = rowsum(dO * O).
  if sigmoid:
    stat_a = jnp.broadcast_to(bias[:, :, None], (b, h, lq))
    stat_b = jnp.zeros((b, h, lq), _F32)
  else:
    stat_a, stat_b = lse, common.softmax_delta(out, do)
  dq, ds_sum = _dq(q, k, v, do, stat_a, stat_b, cfg)
  dk, dv = _dkv(q, k, v, do, stat_a, stat_b, cfg)
  if cfg.group > 1:
    dk = common.sum_kv_groups(dk.astype(_F32), hkv, k.dtype)
    dv = common.sum_kv_groups(dv.astype(_F32), hkv, v.dtype)
  del lk
  # Padded query rows (dO = 0) and masked pairs (P = 0) have dS = 0: summing all rows is exact.
  return dq, dk, dv, (ds_sum.sum(axis=2) if cfg.bias_grad else None)


def _dq(q, k, v, do, stat_a, stat_b, cfg: KernelConfig):
  """dQ [B, Lq, H, D] and the row sums of dS [B, H, Lq] float32 (zeros without bias_grad)."""
  b, lq, h, d = q.shape
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = _stages(cfg)

  def kernel(q_ref, k_ref, v_ref, do_ref, a_ref, b_ref, dq_ref, ds_sum_ref, scratch, barriers):
    q_smem2, do_smem2, a_smem2, b_smem2, k_smem, v_smem = scratch
    rows_loaded, k_loaded, v_loaded, k_free, v_free = barriers
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    first_block = lax.axis_index("tiles") * COMPUTE_WGS
    kv_head = lax.div(head, jnp.int32(cfg.group))
    n_tiles = common.kv_blocks_end(first_block + COMPUTE_WGS - 1, cfg, bq, bk)
    _stream(n_tiles,
            (lambda i: k_ref.at[batch, pl.ds(i * bk, bk), kv_head],
             lambda i: v_ref.at[batch, pl.ds(i * bk, bk), kv_head]),
            (k_smem, v_smem), (k_loaded, v_loaded), (k_free, v_free), wg, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_block = first_block + wg
      q_start = q_block * bq
      rows = pl.ds(q_start, bq)
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      a_smem, b_smem = a_smem2.at[wg], b_smem2.at[wg]
      loaded = rows_loaded.at[wg]
      for src, dst in ((q_ref.at[batch, rows, head], q_smem),
                       (do_ref.at[batch, rows, head], do_smem),
                       (a_ref.at[batch, head, rows], a_smem),
                       (b_ref.at[batch, head, rows], b_smem)):
        plgpu.copy_gmem_to_smem(src, dst, loaded)
        plgpu.barrier_wait(loaded)
      shape = (bq, bk)
      stat = _rows(_load_row_stat(a_smem, 0) * (0.5 if sigmoid else 1.0), shape)
      delta = None if sigmoid else _rows(_load_row_stat(b_smem, 0), shape)

      def body(i, slot, carry, masked):
        dq_acc, ds_sum = carry
        plgpu.barrier_wait(k_loaded.at[slot])
        s = _matmul(q_smem, _t(k_smem.at[slot]), shape)
        p = _probs(s, stat, masked, q_start, i * bk, cfg, transposed=False)
        plgpu.barrier_wait(v_loaded.at[slot])
        dp = _matmul(do_smem, _t(v_smem.at[slot]), shape)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = _score_grad(p, dp, delta, cfg)
        dq_acc = _matmul_add(dq_acc, ds.astype(dtype), k_smem.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        if cfg.bias_grad:
          ds_sum = ds_sum + ds.sum(axis=1)
        return dq_acc, ds_sum

      end = common.kv_blocks_end(q_block, cfg, bq, bk)
      unmasked_end = common.kv_blocks_unmasked_end(q_block, cfg, bq, bk, False)
      carry = (_zeros((bq, d)),
               plgpu.layout_cast(jnp.zeros((bq,), _F32), plgpu.Layout.WGMMA.reduce(1)))
      dq_acc, ds_sum = _consume(n_tiles, (0, 0, unmasked_end, end), body, carry,
                                (k_loaded, v_loaded), (k_free, v_free), stages)
      q_smem[...] = (dq_acc * cfg.scale).astype(dtype)
      a_smem[...] = ds_sum
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
      plgpu.copy_smem_to_gmem(a_smem, ds_sum_ref.at[batch, head, rows])
      plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, h, lq), _F32)),
      scratch_types=(
          (_smem_tiles((COMPUTE_WGS, bq, d), dtype), _smem_tiles((COMPUTE_WGS, bq, d), dtype),
           plgpu.SMEM((COMPUTE_WGS, bq), _F32), plgpu.SMEM((COMPUTE_WGS, bq), _F32),
           _smem_tiles((stages, bk, d), dtype), _smem_tiles((stages, bk, d), dtype)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS),
           plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
           plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)),
      ),
      grid=(h, lq // (COMPUTE_WGS * bq), b),
      grid_names=("heads", "tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(cfg),
      interpret=_interpret(cfg),
  )(q, k, v, do, stat_a, stat_b)


def _dkv(q, k, v, do, stat_a, stat_b, cfg: KernelConfig):
  """dK, dV per query head, [B, Lk, H, D] in the input dtype (dK already scaled)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  sigmoid = cfg.kind == "sigmoid"
  dtype = q.dtype
  stages = _stages(cfg)

  def kernel(q_ref, k_ref, v_ref, do_ref, a_ref, b_ref, dk_ref, dv_ref, scratch, barriers):
    k_smem2, v_smem2, q_smem, do_smem, a_smem, b_smem = scratch
    keys_loaded, q_loaded, do_loaded, a_loaded, b_loaded, q_free, do_free, a_free, b_free = (
        barriers)
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    first_block = lax.axis_index("tiles") * COMPUTE_WGS
    kv_head = lax.div(head, jnp.int32(cfg.group))
    n_q = cfg.q_len_padded // bq
    # Causal: the first consumer's keys are seen by the earliest queries; start there.
    first = common.q_blocks_start(first_block, cfg, bq, bk)
    q_rows = lambda i: pl.ds((first + i) * bq, bq)
    _stream(n_q - first,
            (lambda i: q_ref.at[batch, q_rows(i), head],
             lambda i: do_ref.at[batch, q_rows(i), head],
             lambda i: a_ref.at[batch, head, q_rows(i)],
             lambda i: b_ref.at[batch, head, q_rows(i)]),
            (q_smem, do_smem, a_smem, b_smem), (q_loaded, do_loaded, a_loaded, b_loaded),
            (q_free, do_free, a_free, b_free), wg, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      k_block = first_block + wg
      k_start = k_block * bk
      keys = pl.ds(k_start, bk)
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      loaded = keys_loaded.at[wg]
      for src, dst in ((k_ref.at[batch, keys, kv_head], k_smem),
                       (v_ref.at[batch, keys, kv_head], v_smem)):
        plgpu.copy_gmem_to_smem(src, dst, loaded)
        plgpu.barrier_wait(loaded)
      shape = (bk, bq)

      def body(i, slot, carry, masked):
        dk_acc, dv_acc = carry
        q_start = (first + i) * bq
        plgpu.barrier_wait(q_loaded.at[slot])
        plgpu.barrier_wait(a_loaded.at[slot])
        s_t = _matmul(k_smem, _t(q_smem.at[slot]), shape)
        stat = _cols(_load_row_stat(a_smem.at[slot], 1), shape)
        p_t = _probs(s_t, 0.5 * stat if sigmoid else stat, masked, q_start, k_start, cfg,
                     transposed=True)
        plgpu.barrier_arrive(a_free.at[slot])
        plgpu.barrier_wait(do_loaded.at[slot])
        dv_acc = _matmul_add(dv_acc, p_t.astype(dtype), do_smem.at[slot])
        dp_t = _matmul(v_smem, _t(do_smem.at[slot]), shape)
        plgpu.barrier_arrive(do_free.at[slot])
        plgpu.barrier_wait(b_loaded.at[slot])
        delta = None if sigmoid else _cols(_load_row_stat(b_smem.at[slot], 1), shape)
        plgpu.barrier_arrive(b_free.at[slot])
        ds_t = _score_grad(p_t, dp_t, delta, cfg)
        dk_acc = _matmul_add(dk_acc, ds_t.astype(dtype), q_smem.at[slot])
        plgpu.barrier_arrive(q_free.at[slot])
        return dk_acc, dv_acc

      start = common.q_blocks_start(k_block, cfg, bq, bk) - first
      unmasked_start = common.q_blocks_unmasked_start(k_block, cfg, bq, bk, False) - first
      carry = (_zeros((bk, d)), _zeros((bk, d)))
      dk_acc, dv_acc = _consume(n_q - first, (start, unmasked_start, n_q - first, n_q - first),
                                body, carry, (q_loaded, do_loaded, a_loaded, b_loaded),
                                (q_free, do_free, a_free, b_free), stages)
      k_smem[...] = (dk_acc * cfg.scale).astype(dtype)  # K and V are done: stage dK, dV there
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, keys, head])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, keys, head])
      plgpu.wait_smem_to_gmem(0)

  per_head = jax.ShapeDtypeStruct((b, lk, h, d), dtype)
  return plgpu.kernel(
      kernel,
      out_type=(per_head, per_head),
      scratch_types=(
          (_smem_tiles((COMPUTE_WGS, bk, d), dtype), _smem_tiles((COMPUTE_WGS, bk, d), dtype),
           _smem_tiles((stages, bq, d), dtype), _smem_tiles((stages, bq, d), dtype),
           plgpu.SMEM((stages, bq), _F32), plgpu.SMEM((stages, bq), _F32)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS),)
          + (plgpu.Barrier(num_barriers=stages),) * 4
          + (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 4,
      ),
      grid=(h, lk // (COMPUTE_WGS * bk), b),
      grid_names=("heads", "tiles", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(cfg),
      interpret=_interpret(cfg),
  )(q, k, v, do, stat_a, stat_b)
