"""`decode_attention`: split-key ("flash-decoding") sigmoid/softmax attention for a KV cache.

For a few queries (one token per decoding step, or a short chunk) against a long cache,
a query-blocked kernel has one tile of work per (batch, head) and leaves most of a GPU
idle. Here the valid keys are cut into `num_splits` ranges that the grid runs side by
side, and the partial results are merged: for sigmoid they simply add (no row
statistics: sigmoid has no normaliser), for softmax each split also returns its row max
and row sum and the merge is the log-sum-exp one (Dao et al., Flash-Decoding, 2023).

Forward only (decoding takes no gradient). This file validates, lays the queries of
each GQA group out as the rows of one tile, pads, calls the backend (one per file:
`decode_gpu` for Triton, `decode_tpu` for Mosaic) and merges. The plain jnp reference it must match is
`attnlab.attention.attend(impl="xla", is_causal=True, q_offset=...)`; the jnp split
impl (`impl="split"`) is the same algorithm without the kernel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab import checks
from attnlab.kernels import capabilities
from attnlab.kernels import common
from attnlab.kernels import decode_gpu
from attnlab.kernels import decode_tpu
from attnlab.kernels import sharded
from attnlab.kernels.common import DecodeConfig

_BACKENDS = {"gpu": decode_gpu, "tpu": decode_tpu}


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: Any, *,
                     kind: str = "sigmoid", sigmoid_bias: Any = None, scale: float | None = None,
                     num_splits: int | None = None, block_k: int | None = None,
                     backend: str | None = None, interpret: bool | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """Causal attention of Lq new queries at positions q_offset.. over a KV cache, split over keys.

  Args:
    q: [B, Lq, H, D] queries, Lq <= `capabilities.DECODE_MAX_Q_LEN`.
    k: [B, Lk, Hkv, D] the key cache; H a multiple of Hkv (GQA). Only the keys below
      q_offset + Lq are read: the slots past them (unwritten, stale) get no weight.
    v: [B, Lk, Hkv, Dv] the value cache.
    q_offset: the first query's position among the keys: an int or an integer scalar
      (traced: one compiled step serves every position). Query i sees keys
      j <= q_offset + i (and j < Lk); a query that sees no key gives 0.
    kind: "sigmoid" or "softmax".
    sigmoid_bias: as `flash_attention`'s (None: -log(Lk), Lk the cache size; decoding
      models pass their training length's). No gradient.
    scale: logit scale; default 1 / sqrt(D).
    num_splits: key ranges per (batch, kv head) run in parallel (default: enough programs
      to fill a GPU, at most one per key tile). The result does not depend on it.
    block_k: key tile length. GPU: a power of two >= 16, default 128 for 16-bit inputs
      and 64 for float32; TPU: a multiple of 128, default 512; halved while it does not
      divide Lk (a cache of a multiple of the tile is never padded, i.e. copied).
    backend: "gpu" (Triton) or "tpu" (Mosaic); default from the platform, the GPU kernel
      in interpret mode on CPU.
    interpret: run in Pallas interpret mode; default True exactly when the backend does
      not match the platform.
    num_warps, num_stages: GPU only, Triton's (defaults 4 and 2).

  Returns:
    [B, Lq, H, Dv] in q.dtype.

  Raises:
    ValueError: bad shapes, dtypes, q_offset or options, too many queries, or a backend
      without a decode kernel.
  """
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, value_dim = common.check_inputs(
      q, k, v, None, None, kind)
  _check_sizes(q_len, head_dim, value_dim)
  offset_B = _offsets(q_offset, batch)
  backend, interpret = common.resolve_backend(backend, interpret)
  if backend not in capabilities.DECODE_BACKENDS:
    raise ValueError(f"no decode kernel for backend={backend!r} (decode kernels: "
                     f"{capabilities.DECODE_BACKENDS}); decode with "
                     "attnlab.attention.attend(impl='split', q_offset=...) there.")
  scale = common.check_scalar("scale", scale)
  module = _BACKENDS[backend]
  if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):  # ignored on TPU
    raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16 (Triton); got {num_warps!r}.")
  if num_stages is not None and not (isinstance(num_stages, int) and num_stages >= 1):
    raise ValueError(f"num_stages must be a positive int (Triton pipelining); got {num_stages!r}.")

  d_pad, dv_pad = module.padded_head_dim(head_dim), module.padded_head_dim(value_dim)
  if block_k is None:
    block_k = module.default_block_k(kv_len, max(d_pad, dv_pad), q.dtype)
  module.check_block_k(block_k)
  kv_len_padded = common.round_up(kv_len, block_k)
  num_tiles = kv_len_padded // block_k
  if num_splits is None:
    num_splits = module.default_num_splits(batch * num_kv_heads, num_tiles)
  if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1:
    raise ValueError(f"num_splits must be a positive int (key ranges per batch row and kv "
                     f"head); got {num_splits!r}.")
  group = num_heads // num_kv_heads
  cfg = DecodeConfig(
      kind=kind, backend=backend, interpret=interpret,
      scale=head_dim ** -0.5 if scale is None else scale, q_len=q_len, kv_len=kv_len,
      kv_len_padded=kv_len_padded, group=group,
      rows_padded=module.padded_rows(group * q_len), block_k=block_k,
      # More splits than key tiles would only add idle programs.
      num_splits=min(num_splits, num_tiles),
      fast_tanh=backend == "gpu" and not interpret and q.dtype != jnp.float32,
      num_warps=num_warps, num_stages=num_stages)

  q_rows = common.pad_axis(common.pad_axis(_group_rows(q, num_kv_heads), 2, cfg.rows_padded),
                           3, d_pad)
  bias_rows = None
  if kind == "sigmoid":
    bias_BH = jax.lax.stop_gradient(common.bias_per_head(sigmoid_bias, kv_len, batch, num_heads))
    bias_rows = jnp.repeat(bias_BH.reshape(batch, num_kv_heads, group), q_len, axis=2)
    bias_rows = common.pad_axis(bias_rows, 2, cfg.rows_padded)
  k_p = common.pad_axis(common.pad_axis(k, 1, kv_len_padded), 3, d_pad)
  v_p = common.pad_axis(common.pad_axis(v, 1, kv_len_padded), 3, dv_pad)
  # Under a mesh: one kernel call per (batch, kv heads) shard (`attnlab.kernels.sharded`).
  acc, m, l = sharded.call_decode(module.partials, offset_B, q_rows, k_p, v_p, bias_rows, cfg)
  out_BhRD = merge_splits(acc, m, l)
  return _ungroup_rows(out_BhRD[:, :, :group * q_len, :value_dim], q_len).astype(q.dtype)


def merge_splits(acc: jax.Array, m: jax.Array | None, l: jax.Array | None) -> jax.Array:
  """Merges partials over the split axis (2): acc [B, Hkv, S, R, Dv] -> [B, Hkv, R, Dv].

  Sigmoid (m None): the partial outputs add up. Softmax: each split's sums are rescaled
  from its row max to the global one (log-sum-exp); a split with no visible key (l = 0,
  acc = 0) adds nothing, and a row with none in any split gives 0.
  """
  if m is None:
    return jnp.sum(acc, axis=2)
  m_max = jnp.max(m, axis=2, keepdims=True)
  w_S = jnp.exp(m - m_max)
  l_sum = jnp.sum(w_S * l, axis=2)
  acc_sum = jnp.sum(w_S[..., None] * acc, axis=2)
  return acc_sum / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]


def _group_rows(q_BQHD: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, Lq, H, D] -> [B, Hkv, G * Lq, D]: row g * Lq + i is query i of head g of the group."""
  b, lq, h, d = q_BQHD.shape
  g = h // num_kv_heads
  x = q_BQHD.reshape(b, lq, num_kv_heads, g, d).transpose(0, 2, 3, 1, 4)
  return x.reshape(b, num_kv_heads, g * lq, d)


def _ungroup_rows(x_BhRD: jax.Array, q_len: int) -> jax.Array:
  """The inverse of `_group_rows`: [B, Hkv, G * Lq, Dv] -> [B, Lq, H, Dv]."""
  b, hkv, rows, dv = x_BhRD.shape
  g = rows // q_len
  return x_BhRD.reshape(b, hkv, g, q_len, dv).transpose(0, 3, 1, 2, 4).reshape(
      b, q_len, hkv * g, dv)


def _check_sizes(q_len: int, head_dim: int, value_dim: int) -> None:
  if q_len > capabilities.DECODE_MAX_Q_LEN:
    raise ValueError(f"the decode kernel takes at most {capabilities.DECODE_MAX_Q_LEN} queries "
                     f"per call; got Lq={q_len}. Run a longer prompt (prefill) through "
                     "flash_attention or attend(impl='chunked' or 'xla', q_offset=...).")
  if max(head_dim, value_dim) > capabilities.DECODE_MAX_HEAD_DIM:
    raise ValueError(f"the decode kernel takes head dims up to "
                     f"{capabilities.DECODE_MAX_HEAD_DIM}; got D={head_dim}, Dv={value_dim}.")


def _offsets(q_offset: Any, batch: int) -> jax.Array:
  """q_offset as the kernel reads it: int32 [B] (one position per sequence)."""
  if not checks.is_int_scalar(q_offset):
    raise ValueError(f"q_offset must be an integer scalar (the first query's position among "
                     f"the keys; traced is fine); got {q_offset!r}.")
  return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
