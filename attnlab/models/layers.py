"""The modules every attnlab model shares: projections, norms, attention, MLP.

A ViT and a language model differ only in how tokens are embedded and how the
final hidden states are read out; everything in between is built from these
layers (stacked by `attnlab.models.encoder.Encoder`), so an attention option
(kind, implementation, QK-norm, output gate, GQA, a learned sigmoid bias)
means the same thing in both. The fields they read are `BackboneConfig`'s
(`attnlab.models.config`), validated there.

Every parameter is created through `params.with_logical_axes`, which attaches
logical axis names (``"embed"``, ``"heads"``, ``"mlp"``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import attention
from attnlab.attention.inline import local_term
from attnlab.models.config import ACTIVATIONS, SIGMOID_BIAS, BackboneConfig
from attnlab.models.params import Axes, constant_param, named_param, with_logical_axes

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Projections, norms, dropout
# ---------------------------------------------------------------------------------------------
def _dense_init(fan_in_axes: tuple[int, ...], fan_out_axes: tuple[int, ...]):
  """Xavier-uniform over grouped axes, so an [E, H, D] kernel is scaled like an [E, H*D] one."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                              in_axis=fan_in_axes, out_axis=fan_out_axes)


def dense(einsum: str, kernel_shape: tuple[int, ...], kernel_axes: Axes, *,
          bias_axes: Axes | None, cfg: BackboneConfig, rngs: nnx.Rngs,
          kernel_init: Callable[..., Array] | None = None,
          bias_init: Callable[..., Array] = jax.nn.initializers.zeros,
          n_in: int = 1) -> nnx.Einsum:
  """A projection `einsum` with a named kernel and (unless bias_axes is None) a named bias.

  Args:
    einsum: e.g. "...E,EHD->...HD"; the kernel is the second operand.
    kernel_shape, kernel_axes: the kernel's shape and one logical name per axis.
    bias_axes: logical names of the bias (shape = the kernel's output axes), or None.
    n_in: how many leading kernel axes are contracted (the fan-in).
  """
  if len(kernel_shape) != len(kernel_axes):
    raise ValueError(f"kernel_axes {kernel_axes} must name every axis of {kernel_shape}.")
  out_axes = tuple(range(n_in, len(kernel_shape)))
  if kernel_init is None:
    kernel_init = _dense_init(tuple(range(n_in)), out_axes)
  bias_shape = None
  if bias_axes is not None:
    bias_shape = kernel_shape[n_in:]
    bias_init = with_logical_axes(bias_init, bias_axes)
  return nnx.Einsum(einsum, kernel_shape, bias_shape, dtype=cfg.compute_dtype,
                    param_dtype=jnp.dtype(cfg.param_dtype),
                    kernel_init=with_logical_axes(kernel_init, kernel_axes), bias_init=bias_init,
                    rngs=rngs)


def norm_layer(kind: str, features: int, axis_name: str, cfg: BackboneConfig,
               rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm or RMSNorm over the last axis, with named scale (and bias)."""
  common = dict(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                scale_init=with_logical_axes(jax.nn.initializers.ones, (axis_name,)))
  if kind == "rms":
    return nnx.RMSNorm(features, **common)
  bias_init = with_logical_axes(jax.nn.initializers.zeros, (axis_name,))
  return nnx.LayerNorm(features, bias_init=bias_init, **common)


def dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """Dropout drawing from the "dropout" stream; with rate 0 it holds no RNG state at all,
  so a model without dropout has only parameters in its state."""
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


# ---------------------------------------------------------------------------------------------
# Rotary embedding (used by the language model; lives here because it acts on q and k)
# ---------------------------------------------------------------------------------------------
def rope_tables(length: int, head_dim: int, base: float) -> tuple[Array, Array]:
  """sin and cos tables [L, head_dim // 2] of rotary position embedding (Su et al. 2021)."""
  inv_freq_K = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angle_LK = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K[None, :]
  return jnp.sin(angle_LK), jnp.cos(angle_LK)


def apply_rope(x_BLHD: Array, sin_LK: Array, cos_LK: Array) -> Array:
  """Rotates channel pairs (i, i + D/2) of every head by position-dependent angles.

  sin and cos: [L, D/2], the same positions for every sequence, or [B, L, D/2], each
  sequence its own (a ragged batch's decoding)."""
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  # [1 or B, L, 1, D/2]: explicit ranks (the tests raise on implicit rank promotion).
  sin, cos = ((t[None] if t.ndim == 2 else t)[:, :, None, :] for t in (sin_LK, cos_LK))
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLHD.dtype)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------
class MultiHeadAttention(nnx.Module):
  """Self-attention with pluggable kind/impl, optional QK-norm, output gate and GQA.

  Parameters (logical axes): query (embed, heads, head_dim); key, value
  (embed, kv_heads, head_dim); out (heads, head_dim, embed); q_norm / k_norm
  (head_dim,); gate (embed, heads) headwise or (embed, heads, head_dim)
  elementwise; sigmoid_bias (heads,) with `learn_sigmoid_bias`.
  """

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h, kv, d = cfg.width, cfg.num_heads, cfg.effective_num_kv_heads, cfg.head_dim
    bias = lambda *axes: axes if cfg.use_bias else None  # noqa: E731
    self.query = dense("...E,EHD->...HD", (e, h, d), ("embed", "heads", "head_dim"),
                       bias_axes=bias("heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.key = dense("...E,EHD->...HD", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                     bias_axes=bias("kv_heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.value = dense("...E,EHD->...HD", (e, kv, d), ("embed", "kv_heads", "head_dim"),
                       bias_axes=bias("kv_heads", "head_dim"), cfg=cfg, rngs=rngs)
    self.out = dense("...HD,HDE->...E", (h, d, e), ("heads", "head_dim", "embed"),
                     bias_axes=bias("embed"), cfg=cfg, rngs=rngs, n_in=2)
    if cfg.qk_norm is not None:
      self.q_norm = norm_layer(cfg.qk_norm, d, "head_dim", cfg, rngs)
      self.k_norm = norm_layer(cfg.qk_norm, d, "head_dim", cfg, rngs)
    if cfg.output_gate == "headwise":
      self.gate = dense("...E,EH->...H", (e, h), ("embed", "heads"),
                        bias_axes=bias("heads"), cfg=cfg, rngs=rngs)
    elif cfg.output_gate == "elementwise":
      self.gate = dense("...E,EHD->...HD", (e, h, d), ("embed", "heads", "head_dim"),
                        bias_axes=bias("heads", "head_dim"), cfg=cfg, rngs=rngs)
    if cfg.learn_sigmoid_bias:
      # Starts at the fixed default for the length the model is built for, so the learned
      # model is the fixed-bias model at init; one bias per query head (also under GQA).
      b0 = attention.default_sigmoid_bias(cfg.sequence_length)
      self.sigmoid_bias = constant_param(b0, (h,), ("heads",), cfg)
    if cfg.inline_local:
      self.local = InlineLocal(cfg, rngs=rngs)
    self.weights_dropout = dropout(cfg.attention_dropout_rate, rngs)

  def __call__(self, x_BLE: Array, *, kv_mask_BL: Array | None = None, is_causal: bool = False,
               bias: Array | None = None, rope: tuple[Array, Array] | None = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
               return_weights: bool = False) -> tuple[Array, Array | None]:
    """Attends x to itself.

    Args:
      x_BLE: the (already normed) block input.
      kv_mask_BL: bool [B, L], True for real tokens; padding keys get no weight.
      is_causal: query i sees keys j <= i.
      bias: additive logits bias broadcastable to [B, H, L, L] (e.g. ALiBi).
      rope: (sin, cos) tables from `rope_tables`, applied to q and k after QK-norm.
      deterministic: disables attention dropout (None: the module's setting).
      rngs: the "dropout" stream to draw from (None: the module's own stream).
      return_weights: also return the attention weights [B, H, L, L] (float32),
        computed in the same pass (the output is then apply_weights(weights, v)).

    Returns:
      (out_BLE, weights or None).
    """
    cfg = self.cfg
    q_BLHD, k_BLhD, v_BLhD = self._project(x_BLE, rope)
    kind_options = self._kind_options()
    local_options = {}
    if cfg.inline_local:
      grid, leading = cfg.token_grid
      local_options = dict(local_kernel=self.local(x_BLE), grid=grid, leading_tokens=leading)
    drop_weights = cfg.attention_dropout_rate > 0 and not self._is_deterministic(deterministic)
    use_weights = return_weights or drop_weights
    weights_BHLL = None
    if use_weights:
      weights_BHLL = attention.weights(q_BLHD, k_BLhD, kind=cfg.attention,
                                       mask=key_padding_mask(kv_mask_BL),
                                       is_causal=is_causal, bias=bias, **kind_options)
      dropped = self.weights_dropout(weights_BHLL, deterministic=deterministic, rngs=rngs)
      out_BLHD = attention.apply_weights(dropped, v_BLhD, kind=cfg.attention,
                                         out_dtype=q_BLHD.dtype, **kind_options)
      if local_options:  # the weights carry no local term (a per-channel map of v): add it
        local_BLHD = local_term(v_BLhD, local_options["local_kernel"], grid, leading,
                                cfg.num_heads)
        out_BLHD = (out_BLHD.astype(jnp.float32) + local_BLHD).astype(q_BLHD.dtype)
    else:
      out_BLHD = attention.attend(q_BLHD, k_BLhD, v_BLhD, kind=cfg.attention,
                                  is_causal=is_causal, bias=bias, impl=cfg.attention_impl,
                                  **self._mask_args(kv_mask_BL), **kind_options,
                                  **local_options, **dict(cfg.attention_impl_options))
    return self._output(x_BLE, out_BLHD), weights_BHLL

  def decode(self, x_BLE: Array, cache: LayerCache, pos: Array, *, bias: Array | None = None,
             rope: tuple[Array, Array] | None = None, start_B: Array | None = None,
             impl: str = "auto", impl_options: dict[str, Any] | None = None
             ) -> tuple[Array, LayerCache]:
    """Causal attention of L new tokens at positions pos..pos+L-1 over the tokens before.

    A kind with a recurrent decode state (`attention.recurrent_kinds`: linear, inline)
    folds the new tokens into it (`attention.attend_with_state`): O(L) work whatever the
    tokens before, and no impl to choose. Every other kind writes their keys and values
    into the `KVCache` first; the queries then attend to the whole preallocated cache
    with `q_offset=pos`, so the slots past pos+L-1 (zeros, or stale) are in every
    query's future and get no weight, for every kind.

    Args:
      x_BLE: the (already normed) block input of the new tokens.
      cache: this layer's `empty_cache`, as the previous call returned it.
      pos: int32 scalar, the new tokens' first position (traced: one compiled step serves
        every position).
      bias: additive logits bias [1|B, H, L, max_len] for these queries (ALiBi).
      rope: (sin, cos) of the new tokens' positions, [L or B, L, head_dim // 2] each.
      start_B: int32 [B], the slot of each sequence's first real token in a left-padded
        ragged batch (None: 0 for all): the slots before it are padding, which no query
        sees (the KV cache's mask) and a recurrent state never takes in.
      impl, impl_options: the attention implementation to decode with (KV cache).

    Returns:
      (out_BLE, the updated cache).
    """
    cfg = self.cfg
    q_BLHD, k_BLhD, v_BLhD = self._project(x_BLE, rope)
    if cfg.attention in attention.recurrent_kinds():
      new_BL = None if start_B is None else real_slots(start_B, pos + jnp.arange(x_BLE.shape[1]))
      out_BLHD, cache = attention.attend_with_state(q_BLHD, k_BLhD, v_BLhD, cache,
                                                    kind=cfg.attention, kv_mask_BL=new_BL,
                                                    **self._kind_options())
      return self._output(x_BLE, out_BLHD), cache
    cache = cache.write(k_BLhD, v_BLhD, pos)
    mask = (None if start_B is None else
            key_padding_mask(real_slots(start_B, jnp.arange(cache.k_BLhD.shape[1]))))
    out_BLHD = attention.attend(q_BLHD, cache.k_BLhD, cache.v_BLhD, kind=cfg.attention,
                                is_causal=True, q_offset=pos, bias=bias, mask=mask, impl=impl,
                                **self._kind_options(pin_sigmoid_bias=True),
                                **(impl_options or {}))
    return self._output(x_BLE, out_BLHD), cache

  def _project(self, x_BLE: Array, rope: tuple[Array, Array] | None
               ) -> tuple[Array, Array, Array]:
    """q [B, L, H, D], k and v [B, L, Hkv, D], QK-normed and rotated."""
    q_BLHD, k_BLhD, v_BLhD = self.query(x_BLE), self.key(x_BLE), self.value(x_BLE)
    if self.cfg.qk_norm is not None:
      q_BLHD, k_BLhD = self.q_norm(q_BLHD), self.k_norm(k_BLhD)
    if rope is not None:
      q_BLHD, k_BLhD = apply_rope(q_BLHD, *rope), apply_rope(k_BLhD, *rope)
    return q_BLHD, k_BLhD, v_BLhD

  def _kind_options(self, pin_sigmoid_bias: bool = False) -> dict[str, Any]:
    """The kind's options, with the learned sigmoid bias when there is one.

    pin_sigmoid_bias: a default (None) sigmoid bias becomes the training one, -log(n) of the
    length the model is built for (`sequence_length`), instead of -log(Lk) of whatever key
    array the call sees: cached decoding must not change the bias with the cache size.
    """
    cfg = self.cfg
    kind_options = dict(cfg.attention_options)
    if cfg.learn_sigmoid_bias:
      kind_options[SIGMOID_BIAS] = self.sigmoid_bias[...]  # [H], traced: attention grads it
    elif (pin_sigmoid_bias and cfg.sequence_length is not None
          and SIGMOID_BIAS in attention.KINDS[cfg.attention].options
          and kind_options.get(SIGMOID_BIAS) is None):
      kind_options[SIGMOID_BIAS] = attention.default_sigmoid_bias(cfg.sequence_length)
    return kind_options

  def _output(self, x_BLE: Array, out_BLHD: Array) -> Array:
    """The output gate (from the block input) and the output projection."""
    cfg = self.cfg
    if cfg.output_gate is not None:
      gate = jax.nn.sigmoid(self.gate(x_BLE))
      out_BLHD = out_BLHD * (gate[..., None] if cfg.output_gate == "headwise" else gate)
    return self.out(out_BLHD)

  def _is_deterministic(self, deterministic: bool | None) -> bool:
    return self.weights_dropout.deterministic if deterministic is None else deterministic

  def _mask_args(self, kv_mask_BL: Array | None) -> dict[str, Array]:
    if kv_mask_BL is None:
      return {}
    if self.cfg.attention_impl == "pallas":
      # The fused kernel takes no mask arrays: real tokens form segment 1, padding segment 0,
      # so real queries see only real keys (padding rows see padding and are ignored later).
      seg_BL = kv_mask_BL.astype(jnp.int32)
      return {"q_segment_ids": seg_BL, "kv_segment_ids": seg_BL}
    return {"mask": key_padding_mask(kv_mask_BL)}


class InlineLocal(nnx.Module):
  """InLine's kernel predictor (Han et al. 2024; the official InLine-DeiT's local residual):
  the mean of the block input's tokens, split into heads, through a per-head MLP (d -> d,
  exact GELU, d -> 9 d: torch's 1x1 convolutions grouped by heads) to a 3x3 kernel per head
  channel, [B, H, head_dim, 3, 3], which `attention.attend(kind="inline", local_kernel=...)`
  convolves the values with.

  Parameters (logical axes): w_in (heads, head_dim, head_dim) and b_in (heads, head_dim),
  torch's default initialisation as in the official code (uniform, +-1/sqrt(head_dim));
  w_out (heads, head_dim, head_dim, taps) and b_out (heads, head_dim, taps), zero at init
  (unlike the official code): the local term starts at 0, so a model with it starts as the
  one without, and w_in learns once w_out has moved off zero.
  """

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    h, d = cfg.num_heads, cfg.head_dim
    torch_default = jax.nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=1, out_axis=2, batch_axis=0)
    bound = d ** -0.5
    bias_init = lambda key, shape, dtype: jax.random.uniform(  # noqa: E731
        key, shape, dtype, -bound, bound)
    zeros = jax.nn.initializers.zeros
    self.w_in = named_param(torch_default, (h, d, d), ("heads", "head_dim", "head_dim"), cfg,
                            rngs)
    self.b_in = named_param(bias_init, (h, d), ("heads", "head_dim"), cfg, rngs)
    self.w_out = named_param(zeros, (h, d, d, 9), ("heads", "head_dim", "head_dim", "taps"),
                             cfg, rngs)
    self.b_out = named_param(zeros, (h, d, 9), ("heads", "head_dim", "taps"), cfg, rngs)
    self.dtype = cfg.compute_dtype

  def __call__(self, x_BLE: Array) -> Array:
    """The kernels [B, H, head_dim, 3, 3] from the block input [B, L, width]."""
    h, d = self.w_in.shape[:2]
    cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
    mean_BHD = jnp.mean(x_BLE, axis=1).astype(self.dtype).reshape(-1, h, d)
    hid_BHF = jax.nn.gelu(jnp.einsum("bhd,hdf->bhf", mean_BHD, cast(self.w_in))
                          + cast(self.b_in)[None], approximate=False)
    taps_BHET = jnp.einsum("bhf,hfet->bhet", hid_BHF, cast(self.w_out)) + cast(self.b_out)[None]
    return taps_BHET.reshape(-1, h, d, 3, 3)  # tap t = 3 a + c: torch's [9] -> [3, 3]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of the tokens seen so far, preallocated to the model's max_len.

  Only the Hkv key/value heads are stored (grouped-query attention shares them across
  query groups). One layer's cache is [B, max_len, Hkv, D]; a model's stacks its layers'
  along a leading [depth] axis (`attnlab.models.decode.init_cache`). The decode cache of
  every kind without a recurrent state (`empty_cache`).
  """
  k_BLhD: Array
  v_BLhD: Array

  def write(self, k_BLhD: Array, v_BLhD: Array, pos: Array) -> KVCache:
    """The cache with L new keys and values written at positions pos..pos+L-1."""
    at = (0, pos, 0, 0)
    return KVCache(jax.lax.dynamic_update_slice(self.k_BLhD, k_BLhD.astype(self.k_BLhD.dtype), at),
                   jax.lax.dynamic_update_slice(self.v_BLhD, v_BLhD.astype(self.v_BLhD.dtype), at))


# One layer's decode cache: a `KVCache`, or the recurrent state of a kind that has one
# (`attention.init_decode_state`); a pytree whose every array leads with the batch axis.
LayerCache = Any


def empty_cache(cfg: BackboneConfig, batch: int, max_len: int, dtype: Any) -> LayerCache:
  """One attention layer's decode cache before any token.

  A kind with a recurrent state (`attention.recurrent_kinds`) gets that state: float32
  sums whose size does not depend on max_len (`dtype` does not apply). Every other kind
  gets a zero `KVCache` of `max_len` slots in `dtype`.
  """
  hkv, d = cfg.effective_num_kv_heads, cfg.head_dim
  if cfg.attention in attention.recurrent_kinds():
    return attention.init_decode_state(cfg.attention, batch, hkv, d,
                                       **dict(cfg.attention_options))
  shape = (batch, max_len, hkv, d)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def real_slots(start_B: Array, slots_L: Array) -> Array:
  """bool [B, L]: which of `slots_L` hold real tokens in a batch left-padded up to
  `start_B` (int [B], each sequence's first real slot)."""
  return slots_L[None, :] >= start_B[:, None]


def key_padding_mask(kv_mask_BL: Array | None) -> Array | None:
  """[B, L] real-token flags as the attention mask [B, 1, 1, L] (every query, every head)."""
  return None if kv_mask_BL is None else kv_mask_BL[:, None, None, :]


class Mlp(nnx.Module):
  """Two-layer MLP: fc_in (embed, mlp) -> activation -> dropout -> fc_out (mlp, embed)."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    bias_init = jax.nn.initializers.normal(stddev=1e-6)  # as big_vision's MlpBlock
    self.fc_in = dense("...E,EM->...M", (cfg.width, cfg.effective_mlp_dim), ("embed", "mlp"),
                       bias_axes=("mlp",) if cfg.use_bias else None, cfg=cfg, rngs=rngs,
                       bias_init=bias_init)
    self.fc_out = dense("...M,ME->...E", (cfg.effective_mlp_dim, cfg.width), ("mlp", "embed"),
                        bias_axes=("embed",) if cfg.use_bias else None, cfg=cfg, rngs=rngs,
                        bias_init=bias_init)
    self.activation = cfg.mlp_activation
    self.dropout = dropout(cfg.dropout_rate, rngs)

  def __call__(self, x_BLE: Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None) -> Array:
    h_BLM = ACTIVATIONS[self.activation](self.fc_in(x_BLE))
    return self.fc_out(self.dropout(h_BLM, deterministic=deterministic, rngs=rngs))
