"""`flash_attention`: the public entry point of the fused sigmoid/softmax kernels.

It validates the call, picks the backend and block sizes, pads every length to
whole blocks (the padding is masked, never attended), and wraps the backend's
forward and backward kernels in one `jax.custom_vjp`. Padding and slicing sit
outside the custom_vjp, so autodiff routes zero cotangents to padded rows and
the kernels only ever see block-aligned arrays. The sigmoid bias enters as data, a
[B, H] float32 array (one scalar per batch and query head), with its own cotangent.

The kernels' plain jnp reference is `attnlab.attention.attend(impl="xla")`: the same
semantics (segment ids there are a mask), which tests/test_kernels.py compares the
kernels against, together with an independent float64 NumPy reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.kernels import common
from attnlab.kernels import flash_gpu
from attnlab.kernels import flash_mgpu
from attnlab.kernels import flash_tpu
from attnlab.kernels import sharded
from attnlab.kernels import tuned
from attnlab.kernels.common import KernelConfig

_BACKENDS = {"gpu": flash_gpu, "tpu": flash_tpu, "mgpu": flash_mgpu}


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kind: str = "sigmoid",
                    sigmoid_bias: Any = None, scale: float | None = None,
                    is_causal: bool = False, q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None, block_q: int | None = None,
                    block_k: int | None = None, backend: str | None = None,
                    interpret: bool | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> jax.Array:
  """Fused (flash) sigmoid or softmax attention with Pallas forward and backward kernels.

  Same layout and meaning as `attnlab.attention.attend`.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, Hkv, D] keys; H must be a multiple of Hkv (GQA: head h uses kv head
      h // (H // Hkv)).
    v: [B, Lk, Hkv, Dv] values.
    kind: "sigmoid" (FlashSigmoid: sigmoid(scale * q.k + b), no normaliser) or
      "softmax" (FlashAttention-2 with the same tiling).
    sigmoid_bias: b for kind="sigmoid" (softmax ignores it): None (default) is
      `attnlab.attention.default_sigmoid_bias(Lk)` = -log(Lk) with Lk the real key
      length; otherwise a real scalar (Python, NumPy or a 0-d array of any float
      dtype), an array [H] (one bias per query head), or an array broadcastable to
      [B, H, 1, 1]. It may be traced (under jit) and is differentiable: d bias is the
      sum of dS over the queries and keys of each head (and batch row), summed to
      the shape and dtype given. A bias that varies over queries or keys is not
      supported here (use `attend(impl="xla" or "chunked", bias=...)`).
    scale: logit scale; default 1 / sqrt(D).
    is_causal: query i sees keys j <= i + (Lk - Lq). Key blocks wholly above the
      diagonal are skipped, not masked.
    q_segment_ids: [B, Lq] int; with kv_segment_ids [B, Lk] int, a query attends only
      keys with an equal id (packed sequences, padding). Both or neither.
    kv_segment_ids: see q_segment_ids.
    block_q: query tile length (forward and backward); default per backend and dtype.
    block_k: key tile length; GPU: a power of two >= 16; TPU: block_q a multiple of
      8 and block_k a multiple of 128.
    backend: "gpu" (Triton), "mgpu" (Mosaic GPU: Hopper, bfloat16/float16, no segment
      ids; warp-specialised with TMA and wgmma) or "tpu" (Mosaic TPU); default from the
      platform: on a GPU the backend and tiles measured fastest for its device kind and
      this shape class (`attnlab.kernels.tuned`), Triton where none was measured; the
      Triton-style kernel on CPU.
    interpret: run the kernels in Pallas interpret mode; default True exactly when
      the backend does not match the platform (e.g. on CPU).
    num_warps: Triton only: warps per program (default 4 for D <= 64, else 8).
    num_stages: GPU only: Triton software-pipelining stages, or Mosaic GPU shared-memory
      slots per streamed operand (default 2).

  Returns:
    [B, Lq, H, Dv] in q.dtype. Rows that may attend no key are 0 for both kinds,
    with finite gradients.

  Raises:
    ValueError: bad shapes or dtypes (of q, k, v, segment ids or sigmoid_bias), an
      unknown kind or backend, invalid block sizes for the backend, or a native
      backend requested on another platform.
  """
  batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, value_dim = common.check_inputs(
      q, k, v, q_segment_ids, kv_segment_ids, kind)
  if backend is None and interpret is None and num_warps is None and common.on_gpu():
    # The measured winner for this GPU and shape class (tuned_gpu.json), else Triton.
    pick = tuned.choice(tuned.device_kind(), kind, q.dtype,
                        flash_mgpu.padded_head_dim(max(head_dim, value_dim)), is_causal)
    if pick and (pick["backend"] != "mgpu" or flash_mgpu.check_supported(
        q.dtype, q_segment_ids is not None) is None):
      backend = pick["backend"]
      block_q = pick.get("block_q") if block_q is None else block_q
      block_k = pick.get("block_k") if block_k is None else block_k
      num_stages = pick.get("num_stages") if num_stages is None else num_stages
  backend, interpret = common.resolve_backend(backend, interpret)
  scale = common.check_scalar("scale", scale)
  bias_BH = (common.bias_per_head(sigmoid_bias, kv_len, batch, num_heads)
             if kind == "sigmoid" else None)
  module = _BACKENDS[backend]
  if backend == "mgpu":
    reason = flash_mgpu.check_supported(q.dtype, q_segment_ids is not None)
    if reason is None and num_warps is not None:
      reason = "num_warps is a Triton option; the Mosaic GPU kernel's warpgroups are fixed"
    if reason is not None:
      raise ValueError(f"backend='mgpu': {reason}")
  if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16 (Triton); got {num_warps!r}.")
  if num_stages is not None and not (isinstance(num_stages, int) and num_stages >= 1):
    raise ValueError(f"num_stages must be a positive int (Triton pipelining); got {num_stages!r}.")

  # Head dims are padded to what the backend tiles (zero columns change no dot product).
  d_pad = module.padded_head_dim(head_dim)
  dv_pad = module.padded_head_dim(value_dim)
  bq, bk, bq_bwd, bk_bwd = module.default_blocks(q_len, kv_len, max(d_pad, dv_pad), q.dtype)
  if block_q is not None:
    module.check_blocks(block_q=block_q)
    bq = bq_bwd = block_q
  if block_k is not None:
    module.check_blocks(block_k=block_k)
    bk = bk_bwd = block_k
  # Lengths are padded to a common multiple of the forward and backward tiles.
  q_multiple, kv_multiple = module.length_multiples(bq, bk, bq_bwd, bk_bwd)
  q_len_padded = common.round_up(q_len, q_multiple)
  kv_len_padded = common.round_up(kv_len, kv_multiple)

  cfg = KernelConfig(
      kind=kind, backend=backend, interpret=interpret,
      scale=head_dim ** -0.5 if scale is None else scale,
      # Only a traced bias can be differentiated; a constant one skips the dS row sums.
      bias_grad=kind == "sigmoid" and isinstance(sigmoid_bias, jax.core.Tracer),
      is_causal=bool(is_causal), q_len=q_len, kv_len=kv_len, q_len_padded=q_len_padded,
      kv_len_padded=kv_len_padded, block_q=bq, block_k=bk, block_q_bwd=bq_bwd,
      block_k_bwd=bk_bwd, num_heads=num_heads, num_kv_heads=num_kv_heads,
      # tanh.approx.f32 has ~2^-11 relative error: fine for 16-bit inputs, not for float32.
      fast_tanh=backend in ("gpu", "mgpu") and not interpret and q.dtype != jnp.float32,
      num_warps=num_warps, num_stages=num_stages)

  q_p = common.pad_axis(common.pad_axis(q, 1, q_len_padded), 3, d_pad)
  k_p = common.pad_axis(common.pad_axis(k, 1, kv_len_padded), 3, d_pad)
  v_p = common.pad_axis(common.pad_axis(v, 1, kv_len_padded), 3, dv_pad)
  q_seg = kv_seg = None
  if q_segment_ids is not None:
    q_seg = common.pad_axis(q_segment_ids.astype(jnp.int32), 1, q_len_padded)
    kv_seg = common.pad_axis(kv_segment_ids.astype(jnp.int32), 1, kv_len_padded)
  # Under a mesh: one kernel call per (batch, heads) shard (`attnlab.kernels.sharded`).
  out = sharded.call(_flash, q_p, k_p, v_p, bias_BH, q_seg, kv_seg, cfg)
  return out[:, :q_len, :, :value_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  out, _ = _BACKENDS[cfg.backend].forward(q, k, v, bias, q_seg, kv_seg, cfg)
  return out


def _flash_fwd(q, k, v, bias, q_seg, kv_seg, cfg: KernelConfig):
  out, lse = _BACKENDS[cfg.backend].forward(q, k, v, bias, q_seg, kv_seg, cfg)
  # Sigmoid needs no row statistics: the backward recomputes P from q, k and the bias.
  residuals = (q, k, v, bias, q_seg, kv_seg, out if cfg.kind == "softmax" else None, lse)
  return out, residuals


def _flash_bwd(cfg: KernelConfig, residuals: Any, do):
  q, k, v, bias, q_seg, kv_seg, out, lse = residuals
  dq, dk, dv, dbias = _BACKENDS[cfg.backend].backward(q, k, v, bias, q_seg, kv_seg, out, lse,
                                                      do, cfg)
  # dbias is None (a zero cotangent) for softmax and for a constant bias; integer
  # segment ids have no cotangent.
  return dq, dk, dv, dbias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
