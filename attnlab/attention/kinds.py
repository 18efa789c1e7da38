"""The attention mechanisms of the literature, one small pure function each.

Every score-based mechanism is described by three pieces that both the
materialising (`xla`) and the blockwise (`chunked`) implementations share:

* ``logits(q, k, scale)`` -> ``s_BHQK``: the pairwise scores (scaled dot product,
  or a negative squared distance for the Gaussian kernel);
* ``activate(s, ctx, options)`` -> ``u``: an elementwise map of the scores to
  unnormalised weights (sigmoid, ReLU, ...);
* ``normalization(options)``: how ``u`` becomes weights along the key axis —
  ``"softmax"`` (u are logits, exponentiated against an online row max),
  ``"l1"`` (divide by the row sum), ``"count"`` / ``"sqrt_count"`` (divide by
  the number, or its root, of visible keys), ``"none"``, or ``"row"``: a map of the
  whole row of scores to its weights (``row_map``: sparsemax, entmax, top-k; `sparse.py`).

Because the row normaliser is a plain sum (or a count), the blockwise version
only accumulates sums over key blocks; softmax additionally keeps the row max. A
``"row"`` kind needs every score of a row at once, so only the materialising
implementation runs it (`api.impl_kinds`), except top-k: a running top-k over key
blocks finds its kept set, and chunked runs softmax over that.
Linear attention, InLine and SOFT never build [Lq, Lk] scores and bring their own
``attend_override`` (see `linear.py`, `inline.py`, `soft.py`). A causal kind whose rows
read running sums over the keys (linear, InLine) also brings a constant-size decode state
(``decode_state_init``, ``decode_step``), which decoding keeps instead of a KV cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention.matmul import einsum_f32
# The sigmoid bias is defined below the kernels and the attention library, which both use it.
from attnlab.sigmoid_bias import SIGMOID_BIAS_FORMS, sigmoid_bias_logits
from attnlab.attention.validate import Dims

Array = jax.Array

NORMALIZATIONS = ("softmax", "l1", "count", "sqrt_count", "none", "row")


@dataclasses.dataclass(frozen=True)
class RowContext:
  """What an activation may know about the row it acts on.

  Attributes:
    kv_len: the (unpadded) key length Lk of the call.
    row_counts: number of keys each query row may attend, broadcastable to
      ``[B, H, Lq, 1]``; only filled for mechanisms with ``needs_row_counts``.
  """
  kv_len: int
  row_counts: Array | None = None


def dot_logits(q_BQHD: Array, k_BKhD: Array, scale: float) -> Array:
  """Scaled dot-product scores in float32, [B, H, Lq, Lk]; GQA by grouping query heads.

  q and k are contracted in their own dtype (bf16 stays bf16) with float32 accumulation,
  heads first: the layout XLA's CPU matmul fuses with the scale and the activation that
  follow (contracting [B, L, H, D] directly cost a copy of the [Lq, Lk] scores).
  """
  b, lq, h, d = q_BQHD.shape
  lk, hkv = k_BKhD.shape[1], k_BKhD.shape[2]
  # float32 q takes the scale before the product (one rounding, and no pass over the scores);
  # 16-bit q would lose bits to it, so its float32 scores are scaled instead.
  prescale = q_BQHD.dtype == jnp.float32
  q_BhGQD = q_BQHD.reshape(b, lq, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
  if prescale:
    q_BhGQD = q_BhGQD * jnp.float32(scale)
  s_BhGQK = _scores(q_BhGQD, k_BKhD.transpose(0, 2, 1, 3)).reshape(b, h, lq, lk)
  return s_BhGQK if prescale else s_BhGQK * jnp.float32(scale)


@jax.custom_vjp
def _scores(q_BhGQD: Array, k_BhKD: Array) -> Array:
  """q k^T in float32, [B, Hkv, G, Lq, Lk], with a backward that never transposes the scores.

  Autodiff's dk = dS^T q makes XLA CPU copy the whole [Lq, Lk] cotangent into key-major
  order first; dk^T = q^T dS reads dS as it lies, and only the small [D, Lk] result turns.
  """
  return einsum_f32("bhgqd,bhkd->bhgqk", q_BhGQD, k_BhKD)


def _scores_fwd(q_BhGQD, k_BhKD):
  return _scores(q_BhGQD, k_BhKD), (q_BhGQD, k_BhKD)


def _scores_bwd(residuals, ds_BhGQK):
  q_BhGQD, k_BhKD = residuals
  # 16-bit q/k: dS is rounded to their dtype, so both products run in 16 bits with float32
  # accumulation (as FlashAttention-2's backward does) instead of promoting q and k to
  # float32 copies (dk on CPU: see `einsum_f32`); float32 inputs: a no-op.
  ds_BhGQK = ds_BhGQK.astype(k_BhKD.dtype)
  dq = einsum_f32("bhgqk,bhkd->bhgqd", ds_BhGQK, k_BhKD)
  dk_BhDK = einsum_f32("bhgqd,bhgqk->bhdk", q_BhGQD, ds_BhGQK.astype(q_BhGQD.dtype),
                       contracts_leading_axes=True)
  return dq.astype(q_BhGQD.dtype), dk_BhDK.transpose(0, 1, 3, 2).astype(k_BhKD.dtype)


_scores.defvjp(_scores_fwd, _scores_bwd)


def neg_sq_distance_logits(q_BQHD: Array, k_BKhD: Array, scale: float) -> Array:
  """-(scale / 2) * ||q_i - k_j||^2 in float32, expanded as a dot product plus norms."""
  h, hkv = q_BQHD.shape[2], k_BKhD.shape[2]
  qq_BHQ1 = jnp.sum(jnp.square(q_BQHD.astype(jnp.float32)), -1).transpose(0, 2, 1)[..., None]
  kk_BhK = jnp.sum(jnp.square(k_BKhD.astype(jnp.float32)), -1).transpose(0, 2, 1)
  kk_BH1K = jnp.repeat(kk_BhK, h // hkv, axis=1)[:, :, None, :]
  cross = dot_logits(q_BQHD, k_BKhD, scale)
  # Rounding can make a distance slightly negative; clip so the kernel stays <= 1.
  return jnp.minimum(cross - 0.5 * jnp.float32(scale) * (qq_BHQ1 + kk_BH1K), 0.0)


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """One registered attention mechanism.

  Attributes:
    name: the name `attend(kind=...)` takes.
    paper: where the mechanism comes from.
    options: the options the kind takes, with their defaults.
    activate: ``(s, ctx, options) -> u``, elementwise; ``None`` for softmax.
    normalization: ``options -> one of NORMALIZATIONS``.
    logits: ``(q, k, scale) -> s`` in float32.
    check: validates option values without any array (config time; raises ValueError).
    check_shapes: ``(options, dims) -> None``, validates array-valued options against
      the call's sizes (`validate.Dims`; call time; raises ValueError).
    position_mask: ``(q_pos, k_pos, options) -> bool`` extra structural mask
      from absolute positions (local windows), or ``None``.
    output_post: ``(out_BQHDv, options) -> out``, applied after weights @ v.
    attend_override: a complete `attend` for kinds without pairwise scores.
    weights_override: their `weights` (the [B, H, Lq, Lk] map they imply).
    check_mask: rejects masks the kind cannot honour (raises ValueError).
    needs_row_counts: `activate` reads ``ctx.row_counts``.
    has_logits: the kind scores pairs, so `scale` applies to it.
    takes_bias: an additive [.., Lq, Lk] logits `bias` applies to it (False for the kinds
      that never build an [Lq, Lk] array: linear, soft, inline).
    supports_causal: the kind runs with ``is_causal=True`` (False: soft, whose landmarks
      pool the whole sequence).
    row_map: ``(s, valid, options) -> weights``, float32 [B, H, Lq, Lk] scores (bias
      added) and the bool mask of visible pairs (broadcastable, or None) to the weights,
      exactly 0 where masked and on rows with no visible key; for kinds whose weights
      depend on the whole row at once (sparsemax, entmax, top-k). Such a kind has
      ``activate=None`` and normalization ``"row"``, and runs only in the materialising
      impl: a blockwise scan never holds a whole row, unless it also has ``top_k_of``.
    top_k_of: ``options -> k`` for a row_map that is softmax over each row's k largest
      scores (ties to the lower key index): the chunked impl then runs the kind in two
      streaming passes (a running top-k, then softmax over the kept set) instead.
    decode_state_init: ``(batch, num_kv_heads, head_dim, value_dim, options) -> state``,
      the constant-size state a causal kind decodes from instead of a cache of keys and
      values (a pytree of arrays, each leading with the batch axis); ``None`` (the
      default): the kind decodes from a KV cache.
    decode_step: ``(q, k, v, state, options, scale, keep_BL) -> (out, state)``: L new
      tokens (q [B, L, H, D], their k and v) attend causally to themselves and to every
      token folded into `state`; returns out [B, L, H, Dv] and the state with them folded
      in, except the tokens that ``keep_BL`` (bool [B, L], or None: all) marks False
      (padding of a ragged batch). Set with `decode_state_init`.
  """
  name: str
  paper: str
  options: Mapping[str, Any]
  activate: Callable[[Array, RowContext, Mapping[str, Any]], Array] | None
  normalization: Callable[[Mapping[str, Any]], str]
  logits: Callable[[Array, Array, float], Array] = dot_logits
  check: Callable[[Mapping[str, Any]], None] = lambda options: None
  check_shapes: Callable[[Mapping[str, Any], Dims], None] = lambda options, dims: None
  position_mask: Callable[[Array, Array, Mapping[str, Any]], Array] | None = None
  output_post: Callable[[Array, Mapping[str, Any]], Array] | None = None
  attend_override: Callable[..., Array] | None = None
  weights_override: Callable[..., Array] | None = None
  check_mask: Callable[[Array | None], None] = lambda mask: None
  needs_row_counts: bool = False
  has_logits: bool = True
  takes_bias: bool = True
  supports_causal: bool = True
  row_map: Callable[[Array, Array | None, Mapping[str, Any]], Array] | None = None
  top_k_of: Callable[[Mapping[str, Any]], int] | None = None
  decode_state_init: Callable[[int, int, int, int, Mapping[str, Any]], Any] | None = None
  decode_step: Callable[..., tuple[Array, Any]] | None = None

  def __post_init__(self):
    if (self.decode_state_init is None) != (self.decode_step is None):
      raise ValueError(f"kind={self.name!r}: decode_state_init and decode_step come together "
                       "(a recurrent decode state needs both); set both or neither.")


KINDS: dict[str, Mechanism] = {}


def register_kind(mechanism: Mechanism) -> Mechanism:
  """Adds a mechanism to `KINDS` (for a researcher's own variant); returns it."""
  if mechanism.name in KINDS:
    raise ValueError(f"attention kind {mechanism.name!r} is already registered.")
  KINDS[mechanism.name] = mechanism
  return mechanism


def get_kind(kind: str) -> Mechanism:
  if not isinstance(kind, str) or kind not in KINDS:
    raise ValueError(f"Unknown attention kind {kind!r}; registered kinds: {sorted(KINDS)}.")
  return KINDS[kind]


def _constant(value: str) -> Callable[[Mapping[str, Any]], str]:
  return lambda options: value


def _one_of(name: str, value: Any, allowed: tuple[Any, ...], kind: str) -> None:
  if value not in allowed:
    raise ValueError(f"kind={kind!r}: option {name}={value!r} is not one of {list(allowed)}.")


def _positive_int(name: str, value: Any, kind: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"kind={kind!r}: option {name} must be a positive int; got {value!r}.")


# --- softmax -----------------------------------------------------------------------------------
SOFTMAX = register_kind(Mechanism(
    name="softmax",
    paper="Vaswani et al. 2017, Attention Is All You Need (arXiv 1706.03762).",
    options={},
    activate=None,  # the online max/normaliser lives in the implementations
    normalization=_constant("softmax"),
))


# --- sigmoid -----------------------------------------------------------------------------------
def _check_sigmoid_bias(b: Any, kind: str) -> None:
  """Config-time check: a number or an array of an accepted rank (its sizes come at call time)."""
  if b is None:
    return
  if isinstance(b, (int, float)) and not isinstance(b, bool):
    return
  dtype, shape = getattr(b, "dtype", None), getattr(b, "shape", None)
  # bool is neither floating nor integer to NumPy, so True/np.bool_ arrays fail here too.
  numeric = (dtype is not None and shape is not None
             and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)))
  if not numeric:
    seen = (f"{b!r} of type {type(b).__name__}" if dtype is None
            else f"an array of dtype {dtype}")
    hint = " For per-head values pass an array, e.g. jnp.asarray(...)." if isinstance(
        b, (list, tuple)) else ""
    raise ValueError(f"kind={kind!r}: sigmoid_bias must be None (= -log(Lk)) or "
                     f"{SIGMOID_BIAS_FORMS}; got {seen}.{hint}")
  shape = tuple(shape)
  if len(shape) not in (0, 1, 4) or (len(shape) == 4 and shape[2:] != (1, 1)):
    raise ValueError(f"kind={kind!r}: sigmoid_bias has shape {shape}; it must be "
                     f"{SIGMOID_BIAS_FORMS}. A bias that varies over queries or keys belongs "
                     "in `bias`.")


def _check_sigmoid_bias_shape(options: Mapping[str, Any], dims: Dims) -> None:
  """Call-time check: a per-head sigmoid_bias matches the call's batch and query heads."""
  shape = tuple(getattr(options.get("sigmoid_bias"), "shape", ()))
  if len(shape) == 1:
    ok, want = shape[0] in (1, dims.num_heads), f"[{dims.num_heads}]"
  elif len(shape) == 4:
    ok = shape[0] in (1, dims.batch) and shape[1] in (1, dims.num_heads)
    want = f"broadcastable to [{dims.batch}, {dims.num_heads}, 1, 1]"
  else:
    return
  if not ok:
    raise ValueError(f"sigmoid_bias has shape {shape} but q has num_heads={dims.num_heads} and "
                     f"batch={dims.batch}; pass shape {want} (one bias per query head) or a "
                     "scalar.")


def _sigmoid(s: Array, ctx: RowContext, options: Mapping[str, Any]) -> Array:
  # float32 sigmoid is saturating and finite for any finite logit, so huge bf16 scores are safe.
  return jax.nn.sigmoid(s + sigmoid_bias_logits(options["sigmoid_bias"], ctx.kv_len))


def _check_sigmoid(options: Mapping[str, Any]) -> None:
  _check_sigmoid_bias(options["sigmoid_bias"], "sigmoid")


SIGMOID = register_kind(Mechanism(
    name="sigmoid",
    paper=("Ramapuram et al. 2024, Theory, Analysis, and Best Practices for Sigmoid "
           "Self-Attention (arXiv 2409.04431); Yan et al. 2025 (arXiv 2502.00281)."),
    # sigmoid_bias: b in sigmoid(s + b); None = default_sigmoid_bias(Lk). See SIGMOID_BIAS_FORMS.
    options={"sigmoid_bias": None},
    activate=_sigmoid,
    normalization=_constant("none"),
    check=_check_sigmoid,
    check_shapes=_check_sigmoid_bias_shape,
))


# --- ReLU (ReLA) -------------------------------------------------------------------------------
def _rms_normalize(out_BQHD: Array, options: Mapping[str, Any]) -> Array:
  # ReLA's normalisation is an RMSNorm of each head's output (its learned gain belongs to the
  # model); eps keeps an all-zero row (every weight ReLU'd away) at exactly zero.
  ms = jnp.mean(jnp.square(out_BQHD), axis=-1, keepdims=True)
  return out_BQHD * jax.lax.rsqrt(ms + 1e-6)


def _check_relu(options: Mapping[str, Any]) -> None:
  _one_of("relu_normalization", options["relu_normalization"], ("rms", "count", None), "relu")


RELU = register_kind(Mechanism(
    name="relu",
    paper=("Zhang, Titov, Sennrich 2021, Sparse Attention with Linear Units (ReLA, arXiv "
           "2104.07012): relu(s) then RMS-normalised output; 'count' divides by the number of "
           "visible keys as in Wortsman et al. 2023 (arXiv 2309.08586)."),
    options={"relu_normalization": "rms"},
    activate=lambda s, ctx, options: jax.nn.relu(s),
    normalization=lambda options: "count" if options["relu_normalization"] == "count" else "none",
    check=_check_relu,
    output_post=lambda out, options: (
        _rms_normalize(out, options) if options["relu_normalization"] == "rms" else out),
))


# --- polynomial --------------------------------------------------------------------------------
def _check_polynomial(options: Mapping[str, Any]) -> None:
  _positive_int("degree", options["degree"], "polynomial")


POLYNOMIAL = register_kind(Mechanism(
    name="polynomial",
    paper=("Saratchandran et al. 2024, Rethinking Attention: Polynomial Alternatives to Softmax "
           "in Transformers (arXiv 2410.18613): s^p / sqrt(n), n = visible keys."),
    options={"degree": 3},
    activate=lambda s, ctx, options: s ** options["degree"],
    normalization=_constant("sqrt_count"),
    check=_check_polynomial,
))


# --- softplus ----------------------------------------------------------------------------------
def _softplus(s: Array, ctx: RowContext, options: Mapping[str, Any]) -> Array:
  if options["length_scale"]:
    # Entropy-invariance scaling: logits grow with log(n) so the weights do not flatten as the
    # number of visible keys n grows. log(1) = 0 is harmless: a single key gets weight 1.
    s = s * jnp.log(jnp.maximum(ctx.row_counts, 1.0))
  u = jax.nn.softplus(s)
  # Re-weighting: normalise(w^p) == normalise(softplus^p), which sharpens the weights.
  return u if options["power"] is None else u ** options["power"]


def _check_softplus(options: Mapping[str, Any]) -> None:
  _one_of("length_scale", options["length_scale"], (True, False), "softplus")
  p = options["power"]
  if p is not None and (not isinstance(p, (int, float)) or p <= 0):
    raise ValueError(f"kind='softplus': power must be a positive number or None; got {p!r}.")


SOFTPLUS = register_kind(Mechanism(
    name="softplus",
    paper=("Gao & Spratling 2025, Softplus Attention with Re-weighting Boosts Length "
           "Extrapolation in Large Language Models (arXiv 2501.13428): l1-normalised "
           "softplus(log(n) * s), optionally re-weighted by a power."),
    options={"length_scale": True, "power": None},
    activate=_softplus,
    normalization=_constant("l1"),
    check=_check_softplus,
    needs_row_counts=True,
))


# --- gaussian (SOFT) ---------------------------------------------------------------------------
GAUSSIAN = register_kind(Mechanism(
    name="gaussian",
    paper=("Lu et al. 2021, SOFT: Softmax-free Transformer with Linear Complexity (arXiv "
           "2110.11945), exact form: exp(-scale/2 * ||q_i - k_j||^2), unnormalised."),
    options={},
    activate=lambda s, ctx, options: jnp.exp(s),
    normalization=_constant("none"),
    logits=neg_sq_distance_logits,
))


# --- local / dilated ---------------------------------------------------------------------------
def _local_position_mask(q_pos: Array, k_pos: Array, options: Mapping[str, Any]) -> Array:
  """Keys within `window` dilated steps of the query: |i - j| <= window*dilation, on the grid."""
  delta = q_pos[:, None] - k_pos[None, :]
  dilation = options["dilation"]
  return (jnp.abs(delta) <= options["window"] * dilation) & (delta % dilation == 0)


def _check_local(options: Mapping[str, Any]) -> None:
  _positive_int("window", options["window"], "local")
  _positive_int("dilation", options["dilation"], "local")
  _one_of("base", options["base"], ("softmax", "sigmoid"), "local")
  _check_sigmoid_bias(options["sigmoid_bias"], "local")


def _local_activate(s: Array, ctx: RowContext, options: Mapping[str, Any]) -> Array:
  return s if options["base"] == "softmax" else _sigmoid(s, ctx, options)


LOCAL = register_kind(Mechanism(
    name="local",
    paper=("Sliding-window attention (Beltagy et al. 2020, Longformer, arXiv 2004.05150) with "
           "optional dilation; `window` keys on each side, `dilation` steps apart."),
    options={"window": 64, "dilation": 1, "base": "softmax", "sigmoid_bias": None},
    activate=_local_activate,
    normalization=lambda options: "softmax" if options["base"] == "softmax" else "none",
    check=_check_local,
    check_shapes=_check_sigmoid_bias_shape,
    position_mask=_local_position_mask,
))
