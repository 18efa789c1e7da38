"""Mosaic GPU building blocks of the fused kernels (`flash_mgpu`, `flash_mgpu_bwd`).

Shared-memory tiles in the form wgmma reads, wgmma into fresh or running float32
accumulators, register-layout helpers, the causal / padding mask of a tile, and the
producer/consumer skeleton every kernel uses: one producer warpgroup streams tiles of the
operands it does not own through `stages` SMEM slots with TMA, signalling a slot's "loaded"
barrier; `COMPUTE_WGS` consumer warpgroups compute on each slot and arrive on its "free"
barrier. Also the interpret switch (Mosaic GPU's CPU simulation of all of this).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnlab.kernels import common
from attnlab.kernels.common import KernelConfig

COMPUTE_WGS = 2  # consumer warpgroups per program (a producer warpgroup comes on top)
DEFAULT_STAGES = 2  # shared-memory slots per streamed operand (TMA runs this far ahead)
F32 = jnp.float32


def interpret_params() -> Any:
  """Mosaic GPU's interpret mode (a CPU simulation of warpgroups, SMEM, TMA and barriers),
  or None where this jax has no complete one: it is public from jax 0.12.1; earlier
  versions' private interpreter cannot load a register layout from SMEM."""
  params = getattr(plgpu, "InterpretGPUParams", None)
  return None if params is None else params()


def compiler_params(cfg: KernelConfig) -> Any:
  # approx_math: tanh.approx / ex2.approx, one MUFU op each (16-bit inputs only run here).
  return plgpu.CompilerParams(approx_math=cfg.fast_tanh)


def interpret(cfg: KernelConfig) -> Any:
  if not cfg.interpret:
    return None
  params = interpret_params()
  if params is None:
    raise ValueError("this jax has no Mosaic GPU interpret mode; run backend='mgpu' on a "
                     "Hopper GPU, or use backend='gpu' with interpret=True.")
  return params


def smem_tiles(shape: tuple[int, ...], dtype: Any) -> Any:
  """A shared-memory buffer in the (8, 64)-tiled, 128-byte-swizzled form wgmma reads."""
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def wgmma_iota(dtype, shape, dim) -> jax.Array:
  """`lax.broadcasted_iota`'s signature, in wgmma's register layout."""
  return plgpu.broadcasted_iota(dtype, shape, dim, layout=plgpu.Layout.WGMMA)


# jax < 0.11 spells plgpu.load(ref, idx, layout=...); later jax drops idx.
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters


def load_row_stat(smem, along: int) -> jax.Array:
  """A [block] float32 vector from SMEM, laid out to broadcast along dim `along` of a tile."""
  layout = plgpu.Layout.WGMMA.reduce(1 - along)
  return plgpu.load(smem, (), layout=layout) if _LOAD_TAKES_IDX else plgpu.load(smem,
                                                                               layout=layout)


def rows(x_R: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A per-row vector broadcast over the columns of a [R, C] tile."""
  return lax.broadcast_in_dim(x_R, shape, [0])


def cols(x_C: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """A per-column vector broadcast over the rows of a [R, C] tile."""
  return lax.broadcast_in_dim(x_C, shape, [1])


def matmul(a, b, shape: tuple[int, int]) -> jax.Array:
  """a @ b into a fresh float32 accumulator (a: SMEM or registers, b: SMEM)."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, F32))


def matmul_add(acc, a, b) -> jax.Array:
  """acc + a @ b, accumulated in place by wgmma."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(run)(plgpu.ACC.init(acc))


def zeros(shape: tuple[int, ...]) -> jax.Array:
  return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)


def transposed(ref):
  return ref.transpose((1, 0))


# ---------------------------------------------------------------- the streaming skeleton
def stages_of(cfg: KernelConfig) -> int:
  """Shared-memory slots per streamed operand: `num_stages`, the tuned knob (default 2)."""
  return cfg.num_stages or DEFAULT_STAGES


def stream(n_tiles, sources, slots, loaded, free, wg, stages: int) -> None:
  """The producer warpgroup: copies tile i of every source into slot i % stages, once every
  consumer has freed that slot (`free`), signalling `loaded` when the TMA has landed.

  `sources[j](i)` is the GMEM ref of tile i of operand j; `slots[j]` its [stages, ...] SMEM.
  """
  @pl.when(wg == COMPUTE_WGS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")  # it only issues copies

    @pl.loop(0, n_tiles)
    def _copy(i):
      slot = lax.rem(i, stages)
      for source, smem, loaded_j, free_j in zip(sources, slots, loaded, free):
        @pl.when(i >= stages)
        def _wait_free():
          plgpu.barrier_wait(free_j.at[slot])
        plgpu.copy_gmem_to_smem(source(i), smem.at[slot], loaded_j.at[slot])


def consume(n_tiles, visible, body, carry, loaded, free, stages: int):
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


def mask(s, q_start, k_start, cfg: KernelConfig, fill) -> jax.Array:
  """The tile with its invisible (query, key) pairs (causal, padded keys) set to `fill`."""
  visible = common.tile_mask(q_start, k_start, s.shape, cfg, None, None, iota=wgmma_iota)
  return s if visible is None else jnp.where(visible, s, fill)


def mask_t(s_KQ, k_start, q_start, cfg: KernelConfig, fill) -> jax.Array:
  """`mask` for a transposed [keys, queries] tile (the dK/dV kernel's S^T): the same mask,
  its positions read from the swapped axes."""
  swapped = lambda dtype, shape, dim: wgmma_iota(dtype, shape, 1 - dim)
  visible = common.tile_mask(q_start, k_start, s_KQ.shape, cfg, None, None, iota=swapped)
  return s_KQ if visible is None else jnp.where(visible, s_KQ, fill)


def sigmoid(s, half_bias, cfg: KernelConfig) -> jax.Array:
  return common.sigmoid_probs(s, half_bias, cfg)


def launch(body, *, out_type, scratch_types, grid: tuple[int, int, int], cfg: KernelConfig):
  """`plgpu.kernel` as every fused kernel runs: a grid (heads, row tiles, batch) of programs
  of `COMPUTE_WGS` consumer warpgroups and one producer (thread axis "wg")."""
  return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, grid=grid,
                      grid_names=("heads", "tiles", "batch"), num_threads=COMPUTE_WGS + 1,
                      thread_name="wg", compiler_params=compiler_params(cfg),
                      interpret=interpret(cfg))


def consumer(wg):
  """Decorator: the function runs on the consumer warpgroups only, which take the registers
  the producer gives up (it only issues TMA copies)."""
  def wrap(fn):
    @pl.when(wg < COMPUTE_WGS)
    def _run():
      plgpu.set_max_registers(232, action="increase")
      fn()
    return fn
  return wrap


def copy_in(pairs, barrier) -> None:
  """Copies each (GMEM ref, SMEM ref) pair with TMA and waits for it, one after another on
  `barrier` (a warpgroup's own operands, loaded once)."""
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
    plgpu.barrier_wait(barrier)


def stream_keys(k_ref, v_ref, cfg: KernelConfig, block_q: int, block_k: int, smem, loaded,
                free, wg, stages: int):
  """`stream` of the K and V tiles ([B, Lk, Hkv, D], `block_k` keys) that this program's
  query blocks see (the forward's and dQ's); returns how many tiles that is."""
  batch, head = lax.axis_index("batch"), lax.axis_index("heads")
  kv_head = lax.div(head, jnp.int32(cfg.group))
  # The last consumer's rows see the most keys (causal): stream up to their last tile.
  last_block = lax.axis_index("tiles") * COMPUTE_WGS + COMPUTE_WGS - 1
  n_tiles = common.kv_blocks_end(last_block, cfg, block_q, block_k)
  stream(n_tiles, (lambda i: k_ref.at[batch, pl.ds(i * block_k, block_k), kv_head],
                   lambda i: v_ref.at[batch, pl.ds(i * block_k, block_k), kv_head]),
         smem, loaded, free, wg, stages)
  return n_tiles


def own_block(wg, block: int) -> tuple[Any, Any, Any]:
  """(block index, first row, rows) of the block of `block` rows this consumer owns: program
  `tiles` owns blocks tiles * COMPUTE_WGS ... + COMPUTE_WGS - 1, one per consumer."""
  index = lax.axis_index("tiles") * COMPUTE_WGS + wg
  return index, index * block, pl.ds(index * block, block)

