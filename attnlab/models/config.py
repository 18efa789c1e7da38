"""What an attnlab model is made of, as a frozen dataclass, and the checks that keep it valid.

`BackboneConfig` holds the encoder fields that `ViTConfig` and
`TransformerConfig` share; every field is validated when the config is built,
so a bad choice fails with a message naming the field, the value seen and what
would be valid, before anything is traced. The modules (`layers`, `encoder`)
only read a config; they never validate one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attnlab import attention

Array = jax.Array

QK_NORMS = (None, "rms", "layernorm")
OUTPUT_GATES = (None, "headwise", "elementwise")
NORMS = ("layernorm", "rms")
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,  # tanh approximation, as flax.linen / big_vision
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
# The attention option a learnable per-head bias stands in for (see learn_sigmoid_bias).
SIGMOID_BIAS = "sigmoid_bias"


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
    pairs_ = tuple((k, v) for k, v in items)
  except (TypeError, ValueError):
    raise config_error(owner, field, value, "expected a dict of option name -> value.") from None
  for k, v in pairs_:
    if not isinstance(k, str):
      raise config_error(owner, field, value, f"option names must be strings; got {k!r}.")
    try:
      hash(v)
    except TypeError:
      raise config_error(owner, field, value,
                         f"option {k!r} must be hashable (a number, string, bool or None); "
                         f"got {type(v).__name__}.") from None
  if len({k for k, _ in pairs_}) != len(pairs_):
    raise config_error(owner, field, value, "an option name appears twice.")
  return tuple(sorted(pairs_))


def _dtype_name(owner: str, field: str, value: Any) -> str:
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise config_error(owner, field, value, "expected a dtype such as 'float32' or "
                       "'bfloat16'.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise config_error(owner, field, value, "expected a floating-point dtype.")
  return dtype.name


def pairs(value: int | Sequence[int]) -> tuple[int, int]:
  """An int or a pair as a pair (image and patch sizes)."""
  if isinstance(value, int):
    return (value, value)
  return tuple(value)  # type: ignore[return-value]


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  """ValueError unless `x` has the given rank (shapes are static: safe under jit/vmap)."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != rank:
    raise ValueError(f"{name} must have shape {layout}; got "
                     f"{None if shape is None else tuple(shape)}.")


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
    attention_impl: one of `attnlab.attention.IMPLS`: "auto" (default: the
      fused kernel on GPU/TPU where it can run the call, else "chunked" for
      long sequences and "xla" for short ones; `attention.api.auto_impl`) |
      "xla" (materialises scores) | "chunked" (blockwise jnp) | "pallas" (fused
      kernel; the kinds of `attention.impl_kinds("pallas")`, no bias arrays).
    attention_options: the kind's own options (the maths), e.g.
      {"sigmoid_bias": -2.0}; must be names the kind accepts. Stored as sorted
      pairs so the config stays hashable.
    attention_impl_options: implementation tuning that must not change the
      result, e.g. {"block_k": 128} or {"interpret": True}.
    learn_sigmoid_bias: give every attention layer a learned bias b [heads] in
      sigmoid(s + b), one per query head, initialised at -log(n) with n the
      sequence length the model is built for (`sequence_length`: the ViT's
      token count, the Transformer's max_len), i.e. the fixed default at that
      length (Ramapuram et al. 2024). Only for kinds that take `sigmoid_bias`
      (sigmoid; local with base="sigmoid"), and not together with a
      sigmoid_bias in attention_options.
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
      materialised weights, so only with attention_impl="xla" or "auto").
    norm_epsilon: epsilon of every norm.
    dtype: compute dtype (activations, matmul inputs); logits come out float32.
    param_dtype: storage dtype of the parameters.
    remat: recompute each encoder block's activations in the backward pass
      (`nnx.remat`) instead of storing them: less memory, about one more
      forward pass of compute. Same values and gradients.
    scan_layers: hold the blocks' parameters stacked along a leading "layers"
      axis and run them with `nnx.scan`, so XLA compiles one block whatever the
      depth. Same function of the same weights, and the same dropout masks for
      the same keys, as the unrolled stack; but the blocks are initialised from
      split keys, so a seed gives different initial weights than with
      scan_layers=False, and parameter paths lose the block index
      (encoder/blocks/attn/... with shape [depth, ...]).
    inline_local: InLine's local term (Han et al. 2024, arXiv 2412.06590): each attention
      layer predicts a 3x3 kernel per head channel from the mean of its input tokens (a
      small MLP per head, `layers.InlineLocal`) and adds the depthwise convolution of the
      values over the image grid to the output (`attention.inline`, option local_kernel).
      Only with attention="inline" and a model whose tokens lie on a grid (`token_grid`:
      the ViT); its last layer starts at zero, so the model at init is the one without.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int | None = None
  num_kv_heads: int | None = None
  attention: str = "softmax"
  attention_impl: str = "auto"
  attention_options: Any = ()
  attention_impl_options: Any = ()
  learn_sigmoid_bias: bool = False
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
  remat: bool = False
  scan_layers: bool = False
  inline_local: bool = False

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
    self._check_learned_sigmoid_bias(owner)
    self._check_choices(owner)
    # The model's own fields next (a subclass hook), then what depends on them.
    self._check_model_fields(owner)
    self._check_inline_local(owner)
    if self.learn_sigmoid_bias and self.sequence_length is None:
      raise config_error(owner, "learn_sigmoid_bias", True,
                         "the learned bias starts at -log(n) with n the model's sequence "
                         "length, which this config does not fix; use ViTConfig, or "
                         "TransformerConfig with max_len.")

  def _check_model_fields(self, owner: str) -> None:
    """Checks (and normalises) a subclass's own fields; the backbone has none."""

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
    if self.attention not in attention.impl_kinds(self.attention_impl):
      raise config_error(owner, "attention_impl", self.attention_impl,
                         f"it supports kinds {list(attention.impl_kinds(self.attention_impl))}; "
                         f"got attention={self.attention!r}. Use attention_"
                         f"{attention.api.impls_phrase(self.attention)} for it.")
    # Checked one field at a time, so an error names the field that holds the bad value.
    for field, options in (("attention_options", kind_options),
                           ("attention_impl_options", impl_options)):
      try:
        attention.check_options(self.attention, self.attention_impl, **options)
      except ValueError as e:
        raise config_error(owner, field, options, str(e)) from None
    # auto is allowed too: a training step with dropout builds the weights whatever the impl.
    if self.attention_dropout_rate and self.attention_impl not in ("xla", "auto"):
      raise config_error(owner, "attention_dropout_rate", self.attention_dropout_rate,
                         "dropout on attention weights needs the materialised weights; use "
                         "attention_impl='xla' or 'auto', or set attention_dropout_rate=0.")

  def _check_choices(self, owner: str) -> None:
    for field, allowed in (("qk_norm", QK_NORMS), ("output_gate", OUTPUT_GATES),
                           ("norm", NORMS), ("mlp_activation", tuple(ACTIVATIONS))):
      if getattr(self, field) not in allowed:
        raise config_error(owner, field, getattr(self, field), f"expected one of {list(allowed)}.")
    for field in ("learn_sigmoid_bias", "remat", "scan_layers", "use_bias", "inline_local"):
      if not isinstance(getattr(self, field), bool):
        raise config_error(owner, field, getattr(self, field), "expected True or False.")
    if self.layer_scale is not None and not (isinstance(self.layer_scale, (int, float))
                                             and self.layer_scale > 0):
      raise config_error(owner, "layer_scale", self.layer_scale,
                         "expected None or a positive initial value such as 1e-4.")
    for field in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, field)
      if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise config_error(owner, field, rate, "expected a probability in [0, 1).")

  def _check_learned_sigmoid_bias(self, owner: str) -> None:
    if self.learn_sigmoid_bias is not True:
      return  # a non-bool is reported by _check_choices
    kind_defaults = attention.KINDS[self.attention].options
    options = {**kind_defaults, **dict(self.attention_options)}
    takes = [k for k, mech in attention.KINDS.items() if SIGMOID_BIAS in mech.options]
    if SIGMOID_BIAS not in kind_defaults:
      raise config_error(owner, "learn_sigmoid_bias", True,
                         f"attention={self.attention!r} has no sigmoid_bias to learn; use a "
                         f"kind that takes one ({takes}) or learn_sigmoid_bias=False.")
    # A kind built on a base activation (local) reads sigmoid_bias only on a sigmoid base.
    if options.get("base", "sigmoid") != "sigmoid":
      raise config_error(owner, "learn_sigmoid_bias", True,
                         f"attention={self.attention!r} with base={options['base']!r} ignores "
                         "sigmoid_bias; set attention_options={'base': 'sigmoid', ...} or "
                         "learn_sigmoid_bias=False.")
    if SIGMOID_BIAS in dict(self.attention_options):
      raise config_error(owner, "learn_sigmoid_bias", True,
                         f"attention_options also sets sigmoid_bias="
                         f"{options[SIGMOID_BIAS]!r}, which the learned bias replaces; drop "
                         "one of learn_sigmoid_bias and attention_options['sigmoid_bias'].")

  def _check_inline_local(self, owner: str) -> None:
    if self.inline_local is not True:
      return  # a non-bool is reported by _check_choices
    if self.attention != "inline":
      raise config_error(owner, "inline_local", True,
                         f"the local term is InLine's (attention='inline'); got attention="
                         f"{self.attention!r}. Set attention='inline' or inline_local=False.")
    if self.token_grid is None:
      raise config_error(owner, "inline_local", True,
                         f"the local term convolves over an image grid, and a {owner}'s tokens "
                         "form a sequence (causal for a language model, while a 3x3 "
                         "neighbourhood is bidirectional); use it in a ViTConfig, or set "
                         "inline_local=False.")

  @property
  def token_grid(self) -> tuple[tuple[int, int], int] | None:
    """((height, width), leading tokens) when the tokens lie on an image grid after some
    leading tokens (the ViT's patches after its CLS token); None for a sequence."""
    return None

  @property
  def sequence_length(self) -> int | None:
    """Tokens per example the model is built for (None: not fixed by the config)."""
    return None

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
