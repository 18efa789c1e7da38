"""The building blocks every attnlab model shares: config, attention block, MLP, encoder.

A ViT and a language model differ only in how tokens are embedded and how the
final hidden states are read out; everything in between is `Encoder`, so an
attention option (kind, implementation, QK-norm, LayerScale, output gate, GQA)
means the same thing in both.

Every parameter is created through `_param_init`, which attaches logical axis
names (``"embed"``, ``"heads"``, ``"mlp"``, ...) as Flax sharding metadata; a
mesh mapping can later turn them into shardings without touching model code
(see `attnlab.models.logical_axes`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab import attention

Array = jax.Array
Axes = tuple[str, ...]

ATTENTION_IMPLS = attention.IMPLS  # stated once, in attnlab.attention
QK_NORMS = (None, "rms", "layernorm")
OUTPUT_GATES = (None, "headwise", "elementwise")
NORMS = ("layernorm", "rms")
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,  # tanh approximation, as flax.linen / big_vision
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

# nnx.List holds submodules as graph nodes (flax >= 0.12); a plain list did so before.
_ModuleList = getattr(nnx, "List", list)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def config_error(owner: str, field: str, value: Any, expected: str) -> ValueError:
  """A ValueError that names the config field, what it holds and what would be valid."""
  return ValueError(f"{owner}.{field}={value!r} is invalid: {expected}")


def freeze_options(owner: str, field: str, value: Any) -> tuple[tuple[str, Any], ...]:
  """A mapping (or pairs) as a sorted tuple of pairs, so the frozen config stays hashable."""
  if value is None:
    return ()
  # Duck-typed: a dict, a Mapping or an ml_collections ConfigDict all have items().
  items = value.items() if hasattr(value, "items") else value
  try:
    pairs = tuple((k, v) for k, v in items)
  except (TypeError, ValueError):
    raise config_error(owner, field, value, "expected a dict of option name -> value.") from None
  for k, v in pairs:
    if not isinstance(k, str):
      raise config_error(owner, field, value, f"option names must be strings; got {k!r}.")
    try:
      hash(v)
    except TypeError:
      raise config_error(owner, field, value,
                         f"option {k!r} must be hashable (a number, string, bool or None); "
                         f"got {type(v).__name__}.") from None
  if len({k for k, _ in pairs}) != len(pairs):
    raise config_error(owner, field, value, "an option name appears twice.")
  return tuple(sorted(pairs))


def _dtype_name(owner: str, field: str, value: Any) -> str:
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise config_error(owner, field, value, "expected a dtype such as 'float32' or "
                       "'bfloat16'.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise config_error(owner, field, value, "expected a floating-point dtype.")
  return dtype.name


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackboneConfig:
  """The encoder stack shared by `ViTConfig` and `TransformerConfig`.

  Attributes:
    width: model (embedding) dimension.
    depth: number of pre-norm encoder blocks.
    num_heads: query heads; must divide `width` (head_dim = width // num_heads).
    mlp_dim: hidden size of the MLP; None = 4 * width.
    num_kv_heads: key/value heads for grouped-query attention; must divide
      `num_heads`. None = num_heads (plain multi-head attention).
    attention: attention kind, any key of `attnlab.attention.KINDS`.
    attention_impl: "xla" (materialises scores) | "chunked" (blockwise jnp) |
      "pallas" (fused kernel; softmax/sigmoid, no bias arrays).
    attention_options: the kind's own options (the maths), e.g.
      {"sigmoid_bias": -2.0}; must be names the kind accepts. Stored as sorted
      pairs so the config stays hashable.
    attention_impl_options: implementation tuning that must not change the
      result, e.g. {"block_k": 128} or {"interpret": True}.
    qk_norm: None | "rms" | "layernorm" on q and k per head (over head_dim) —
      stabilises attention logits; recommended for sigmoid attention
      (Ramapuram et al. 2024, arXiv 2409.04431).
    layer_scale: None, or the initial value (e.g. 1e-4) of a learned
      per-channel scale on each residual branch (Touvron et al. 2021, CaiT).
    output_gate: None | "headwise" | "elementwise": multiply the attention
      output by sigmoid(x W_g) computed from the block's (normed) input, one
      gate per head or per head channel (Qiu et al. 2025, arXiv 2505.06708).
    norm: "layernorm" | "rms" for the block and final norms.
    mlp_activation: one of `ACTIVATIONS`.
    use_bias: biases in the dense projections.
    dropout_rate: dropout on embeddings, MLP hidden units and residual branches.
    attention_dropout_rate: dropout on attention weights (needs the
      materialised weights, so only with attention_impl="xla").
    norm_epsilon: epsilon of every norm.
    dtype: compute dtype (activations, matmul inputs); logits come out float32.
    param_dtype: storage dtype of the parameters.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int | None = None
  num_kv_heads: int | None = None
  attention: str = "softmax"
  attention_impl: str = "xla"
  attention_options: Any = ()
  attention_impl_options: Any = ()
  qk_norm: str | None = None
  layer_scale: float | None = None
  output_gate: str | None = None
  norm: str = "layernorm"
  mlp_activation: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    owner = type(self).__name__
    set_ = functools.partial(object.__setattr__, self)
    set_("attention_options", freeze_options(owner, "attention_options", self.attention_options))
    set_("attention_impl_options",
         freeze_options(owner, "attention_impl_options", self.attention_impl_options))
    set_("dtype", _dtype_name(owner, "dtype", self.dtype))
    set_("param_dtype", _dtype_name(owner, "param_dtype", self.param_dtype))
    self._check_sizes(owner)
    self._check_attention(owner)
    self._check_choices(owner)

  def _check_sizes(self, owner: str) -> None:
    for field in ("width", "depth", "num_heads"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise config_error(owner, field, value, "expected a positive int.")
    if self.width % self.num_heads:
      raise config_error(owner, "num_heads", self.num_heads,
                         f"it must divide width={self.width} (head_dim = width // num_heads); "
                         f"pick a divisor of {self.width} or change width.")
    if self.mlp_dim is not None and (not isinstance(self.mlp_dim, int) or self.mlp_dim < 1):
      raise config_error(owner, "mlp_dim", self.mlp_dim, "expected a positive int or None "
                         "(= 4 * width).")
    kv = self.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or kv < 1 or self.num_heads % kv):
      raise config_error(owner, "num_kv_heads", kv,
                         f"it must be a positive divisor of num_heads={self.num_heads} "
                         "(grouped-query attention), or None for num_heads.")

  def _check_attention(self, owner: str) -> None:
    if self.attention not in attention.KINDS:
      raise config_error(owner, "attention", self.attention,
                         f"expected one of {sorted(attention.KINDS)}.")
    if self.attention_impl not in attention.IMPLS:
      raise config_error(owner, "attention_impl", self.attention_impl,
                         f"expected one of {list(attention.IMPLS)}.")
    impl_options = dict(self.attention_impl_options)
    kind_options = dict(self.attention_options)
    # Kind options are the maths, impl options the tuning: keep each in its own field.
    impl_accepts = attention.api.IMPL_OPTIONS[self.attention_impl]
    misplaced = sorted(set(kind_options) & set(impl_accepts))
    if misplaced:
      raise config_error(owner, "attention_options", kind_options,
                         f"{misplaced} are settings of attention_impl={self.attention_impl!r}; "
                         "put them in attention_impl_options.")
    unknown = sorted(set(impl_options) - set(impl_accepts))
    if unknown:
      raise config_error(owner, "attention_impl_options", impl_options,
                         f"attention_impl={self.attention_impl!r} takes "
                         f"{sorted(impl_accepts) or 'no options'}; unknown: {unknown}. The "
                         "kind's own options go in attention_options.")
    try:
      attention.check_options(self.attention, self.attention_impl, **kind_options,
                              **impl_options)
    except ValueError as e:
      if self.attention not in attention.impl_kinds(self.attention_impl):
        raise config_error(owner, "attention_impl", self.attention_impl, str(e)) from None
      raise config_error(owner, "attention_options", kind_options, str(e)) from None
    if self.attention_dropout_rate and self.attention_impl != "xla":
      raise config_error(owner, "attention_dropout_rate", self.attention_dropout_rate,
                         "dropout on attention weights needs the materialised weights; use "
                         "attention_impl='xla' or set attention_dropout_rate=0.")

  def _check_choices(self, owner: str) -> None:
    for field, allowed in (("qk_norm", QK_NORMS), ("output_gate", OUTPUT_GATES),
                           ("norm", NORMS), ("mlp_activation", tuple(ACTIVATIONS))):
      if getattr(self, field) not in allowed:
        raise config_error(owner, field, getattr(self, field), f"expected one of {list(allowed)}.")
    if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float))
                                             and self.layer_scale > 0):
      raise config_error(owner, "layer_scale", self.layer_scale,
                         "expected None or a positive initial value such as 1e-4.")
    for field in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, field)
      if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise config_error(owner, field, rate, "expected a probability in [0, 1).")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def effective_mlp_dim(self) -> int:
    return 4 * self.width if self.mlp_dim is None else self.mlp_dim

  @property
  def effective_num_kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Parameters with logical axis names
# ---------------------------------------------------------------------------------------------
def _param_init(init: Callable[..., Array], axes: Axes) -> Callable[..., Array]:
  """`init` with logical axis names attached as sharding metadata.

  eager_sharding=False: the names are logical ("embed", "heads"), not mesh axes,
  so nothing may be sharded at creation; a trainer maps them onto its mesh
  (e.g. under `flax.linen.logical_axis_rules` with `nnx.get_partition_spec`).
  """
  return nnx.with_partitioning(init, axes, eager_sharding=False)


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
    bias_init = _param_init(bias_init, bias_axes)
  return nnx.Einsum(einsum, kernel_shape, bias_shape, dtype=cfg.compute_dtype,
                    param_dtype=jnp.dtype(cfg.param_dtype),
                    kernel_init=_param_init(kernel_init, kernel_axes), bias_init=bias_init,
                    rngs=rngs)


def norm_layer(kind: str, features: int, axis_name: str, cfg: BackboneConfig,
               rngs: nnx.Rngs) -> nnx.Module:
  """LayerNorm or RMSNorm over the last axis, with named scale (and bias)."""
  common = dict(epsilon=cfg.norm_epsilon, dtype=cfg.compute_dtype,
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                scale_init=_param_init(jax.nn.initializers.ones, (axis_name,)))
  if kind == "rms":
    return nnx.RMSNorm(features, **common)
  return nnx.LayerNorm(features, bias_init=_param_init(jax.nn.initializers.zeros, (axis_name,)),
                       **common)


def named_param(init: Callable[..., Array], shape: tuple[int, ...], axes: Axes,
                cfg: BackboneConfig, rngs: nnx.Rngs) -> nnx.Param:
  """A free-standing parameter (position embedding, CLS token, LayerScale) with axis names."""
  if len(shape) != len(axes):
    raise ValueError(f"axes {axes} must name every axis of {shape}.")
  return nnx.Param(_param_init(init, axes)(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))


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
  """Rotates channel pairs (i, i + D/2) of every head by position-dependent angles."""
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  sin, cos = sin_LK[None, :, None, :], cos_LK[None, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLHD.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class MultiHeadAttention(nnx.Module):
  """Self-attention with pluggable kind/impl, optional QK-norm, output gate and GQA.

  Parameters (logical axes): query (embed, heads, head_dim); key, value
  (embed, kv_heads, head_dim); out (heads, head_dim, embed); q_norm / k_norm
  (head_dim,); gate (embed, heads) headwise or (embed, heads, head_dim)
  elementwise.
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
    q_BLHD, k_BLhD, v_BLhD = self.query(x_BLE), self.key(x_BLE), self.value(x_BLE)
    if cfg.qk_norm is not None:
      q_BLHD, k_BLhD = self.q_norm(q_BLHD), self.k_norm(k_BLhD)
    if rope is not None:
      q_BLHD, k_BLhD = apply_rope(q_BLHD, *rope), apply_rope(k_BLhD, *rope)

    kind_options = dict(cfg.attention_options)
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
    else:
      out_BLHD = attention.attend(q_BLHD, k_BLhD, v_BLhD, kind=cfg.attention,
                                  is_causal=is_causal, bias=bias, impl=cfg.attention_impl,
                                  **self._mask_args(kv_mask_BL), **kind_options,
                                  **dict(cfg.attention_impl_options))

    if cfg.output_gate is not None:
      gate = jax.nn.sigmoid(self.gate(x_BLE))
      out_BLHD = out_BLHD * (gate[..., None] if cfg.output_gate == "headwise" else gate)
    return self.out(out_BLHD), weights_BHLL

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


class EncoderBlock(nnx.Module):
  """Pre-norm block: x + LS(attn(norm(x))), then x + LS(mlp(norm(x)))."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.attn_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)
    self.attn = MultiHeadAttention(cfg, rngs=rngs)
    self.mlp_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.dropout = dropout(cfg.dropout_rate, rngs)
    self.use_layer_scale = cfg.layer_scale is not None
    if self.use_layer_scale:
      init = jax.nn.initializers.constant(cfg.layer_scale)
      self.attn_scale = named_param(init, (cfg.width,), ("embed",), cfg, rngs)
      self.mlp_scale = named_param(init, (cfg.width,), ("embed",), cfg, rngs)

  def __call__(self, x_BLE: Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None, return_weights: bool = False,
               **attn_kwargs: Any) -> tuple[Array, Array | None]:
    """`attn_kwargs` are `MultiHeadAttention`'s (kv_mask_BL, is_causal, bias, rope)."""
    y_BLE, weights = self.attn(self.attn_norm(x_BLE), deterministic=deterministic, rngs=rngs,
                               return_weights=return_weights, **attn_kwargs)
    x_BLE = x_BLE + self._branch(y_BLE, "attn_scale", deterministic, rngs)
    y_BLE = self.mlp(self.mlp_norm(x_BLE), deterministic=deterministic, rngs=rngs)
    x_BLE = x_BLE + self._branch(y_BLE, "mlp_scale", deterministic, rngs)
    return x_BLE, weights

  def _branch(self, y_BLE: Array, scale_name: str, deterministic: bool | None,
              rngs: nnx.Rngs | None) -> Array:
    y_BLE = self.dropout(y_BLE, deterministic=deterministic, rngs=rngs)
    if self.use_layer_scale:
      scale_E = getattr(self, scale_name)[...].astype(y_BLE.dtype)
      y_BLE = y_BLE * scale_E.reshape((1,) * (y_BLE.ndim - 1) + scale_E.shape)
    return y_BLE


class Encoder(nnx.Module):
  """`depth` encoder blocks and the final norm (`encoder_norm`)."""

  def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs):
    self.blocks = _ModuleList([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.encoder_norm = norm_layer(cfg.norm, cfg.width, "embed", cfg, rngs)

  def __call__(self, x_BLE: Array, *, kv_mask_BL: Array | None = None, is_causal: bool = False,
               bias: Array | None = None, rope: tuple[Array, Array] | None = None,
               deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
               return_weights: bool = False) -> tuple[Array, tuple[Array, ...]]:
    """Runs every block; returns the normed hidden states and (if asked) each layer's weights."""
    maps = []
    for block in self.blocks:
      x_BLE, w = block(x_BLE, kv_mask_BL=kv_mask_BL, is_causal=is_causal, bias=bias, rope=rope,
                       deterministic=deterministic, rngs=rngs, return_weights=return_weights)
      if return_weights:
        maps.append(w)
    return self.encoder_norm(x_BLE), tuple(maps)


# ---------------------------------------------------------------------------------------------
# Helpers over whole models
# ---------------------------------------------------------------------------------------------
_AXES_KEYS = ("out_sharding", "sharding_names", "sharding")  # newest flax first


def _variable_axes(variable: nnx.Variable) -> Axes | None:
  metadata = variable.get_metadata()
  for key in _AXES_KEYS:
    if metadata.get(key) is not None:
      return tuple(metadata[key])
  return None


def logical_axes(model: nnx.Module) -> dict[tuple[Any, ...], Axes | None]:
  """The logical axis names of every parameter, keyed by its path in `nnx.state(model)`.

  Works on abstract models from `nnx.eval_shape` too. A parameter without names
  maps to None (every attnlab parameter has names; the tests check it).

  Example:
    >>> logical_axes(model)[("encoder", "blocks", 0, "attn", "query", "kernel")]
    ('embed', 'heads', 'head_dim')
  """
  return {path: _variable_axes(var)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(model: nnx.Module) -> int:
  """Number of parameter scalars (works on `nnx.eval_shape` models: nothing is allocated)."""
  return sum(math.prod(var.shape) for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def attention_maps(model: nnx.Module, *args: Any, **kwargs: Any) -> list[Array]:
  """Each layer's attention weights [B, H, Lq, Lk] (float32), from one deterministic pass.

  `model` is a `ViT` or `Transformer`; `args`/`kwargs` are what its `__call__`
  takes (images, or tokens and `padding_mask_BL`). Only for kinds that define
  weights (every kind with pairwise scores; not `linear`). Jit it like any pure
  function of the model: ``nnx.jit(attention_maps)(model, x)``.
  """
  _, maps = model(*args, deterministic=True, return_attention_weights=True, **kwargs)
  return list(maps)


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  """ValueError unless `x` has the given rank (shapes are static: safe under jit/vmap)."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != rank:
    raise ValueError(f"{name} must have shape {layout}; got "
                     f"{None if shape is None else tuple(shape)}.")


def pairs(value: int | Sequence[int]) -> tuple[int, int]:
  """An int or a pair as a pair (image and patch sizes)."""
  if isinstance(value, int):
    return (value, value)
  return tuple(value)  # type: ignore[return-value]
