"""InLine: injective linear attention (Han et al. 2024, arXiv 2412.06590).

Linear attention divides phi(q_i).phi(k_j) by its row sum, which makes the weights
invariant to scaling phi(q_i): different queries get the same weights (not injective).
InLine subtracts the row mean instead and adds 1/N, so each row still sums to 1:

    a_ij = scale * phi(q_i).phi(k_j) / N,    w_ij = a_ij - (1/N) sum_s a_is + 1/N,

with N the number of keys row i sees. scale / N is the factor the official code folds
into phi (LeapLabTHU/InLine, models/inline_deit.py: kv = k^T v * scale / n); scale is
`attend`'s (default 1/sqrt(D)). The output needs only sums over the visible keys:

    out_i = (scale / N) (phi(q_i)^T S - (phi(q_i).z) vbar) + vbar,
    S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j),  vbar = (1/N) sum_j v_j,

so it is O(L) in time and memory, never an [Lq, Lk] array; causal rows use prefix sums
(N, S, z and vbar over the visible prefix). As for linear attention, only key-padding
masks keep this form; no additive bias (there are no [Lq, Lk] scores to add it to).
Decoding keeps those four sums as a recurrent state (`InlineState`), O(1) in the sequence
length per token, instead of caching keys and values.

The paper's second ingredient, its local term, is the option `local_kernel` (with `grid`
and `leading_tokens`): the values of the image tokens, laid out on their [h, w] grid, are
convolved with a 3x3 kernel per (example, head, channel) (zero padding 1, as torch's
conv2d: out[i, j] = sum_{a, b} kernel[a, b] v[i + a - 1, j + b - 1]) and the result added
to those tokens' outputs; tokens before the grid (a class token) get no local term. The
kernels come from the caller (the ViT predicts them from the block input,
`models.layers.InlineLocal`, as the official code does). A spatial neighbourhood has no
causal order, so the local term is bidirectional only; keys hidden by a padding mask add
nothing to it. It is no part of `weights` (a per-channel map of v, not a weight per
(query, key) pair).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import core
from attnlab.attention.kinds import Mechanism, register_kind
from attnlab.attention.linear import (LinearState, key_padding_masks_only, prefix_rows,
                                     query_products, running_sums)
from attnlab.attention.validate import Dims

Array = jax.Array

# The kernels of the official code (models/inline_swin.py, `kernel_func`); "identity", its
# default, is what InLine-DeiT uses. InLine needs no non-negative phi: its rows sum to 1
# by construction, and weights may be negative.
FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch's default negative slope
    "exp": lambda x: jnp.exp(0.2 * x),  # the official exp_kernel, t = 0.2
}


def _features(q: Array, k: Array, mask: Array | None, options: Mapping[str, Any]):
  """phi(q) [B, Lq, H, D], phi(k) [B, Lk, Hkv, D] (0 on padding keys) and the keys kept
  [B or 1, Lk] as float32."""
  phi = FEATURE_MAPS[options["feature_map"]]
  phi_q_BQHD = phi(q.astype(jnp.float32))
  phi_k_BKhD = phi(k.astype(jnp.float32))
  if mask is None:
    return phi_q_BQHD, phi_k_BKhD, jnp.ones((1, k.shape[1]), jnp.float32)
  keep_BK = mask[:, 0, 0, :]
  phi_k_BKhD = jnp.where(keep_BK[:, :, None, None], phi_k_BKhD, 0.0)
  return phi_q_BQHD, phi_k_BKhD, keep_BK.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InlineState:
  """InLine's recurrent state: the sums a causal row reads, over the keys so far (float32,
  as `linear.LinearState`, whose S and z it shares).

  Attributes:
    sums: S = sum_j phi(k_j) v_j^T [B, Hkv, D, Dv] and z = sum_j phi(k_j) [B, Hkv, D].
    v_sum_BhE: sum_j v_j, [B, Hkv, Dv].
    n_B: N, the number of keys, [B].
  """
  sums: LinearState
  v_sum_BhE: Array
  n_B: Array


def _rows(qs: Array, qz: Array, v_sum: Array, n: Array, scale: float) -> Array:
  """out_i = (scale / N)(phi(q_i)^T S - (phi(q_i).z) vbar) + vbar, [B, Lq, Hkv, G, Dv], from
  phi(q_i)^T S [B, Lq, Hkv, G, Dv], phi(q_i).z [.., 1], sum_j v_j [B, Lq or 1, Hkv, 1, Dv]
  and N (broadcastable to those)."""
  v_mean = core.safe_divide(v_sum, n)
  # A row with no visible key (n = 0) gives zeros, as every kind does.
  return core.safe_divide(scale * (qs - qz * v_mean), n) + v_mean


def local_term(v_BKhE: Array, kernel: Array, grid: tuple[int, int], leading: int,
               num_heads: int) -> Array:
  """The depthwise 3x3 convolution of the grid tokens' values, float32 [B, Lk, H, Dv] (zero
  on the `leading` tokens): v [B, Lk, Hkv, Dv], kernel [B, H, Dv, 3, 3] or [B, H*Dv, 3, 3]."""
  b, lk, hkv, dv = v_BKhE.shape
  gh, gw = grid
  g = num_heads // hkv
  w_BhGE33 = kernel.astype(jnp.float32).reshape(b, hkv, g, dv, 3, 3)
  v_BYXhE = v_BKhE[:, leading:].astype(jnp.float32).reshape(b, gh, gw, hkv, dv)
  padded = jnp.pad(v_BYXhE, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  out_BYXhGE = sum(padded[:, a:a + gh, c:c + gw, :, None, :] * w_BhGE33[:, None, None, ..., a, c]
                   for a in range(3) for c in range(3))
  out_BNHE = out_BYXhGE.reshape(b, gh * gw, num_heads, dv)
  return jnp.pad(out_BNHE, ((0, 0), (leading, 0), (0, 0), (0, 0)))


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           q_offset: Array | int | None = None, **unused_impl_options) -> Array:
  del mech, bias  # bias is rejected earlier: InLine builds no [Lq, Lk] scores
  local = options["local_kernel"]
  if local is not None and is_causal:
    raise ValueError("kind='inline': local_kernel (a 3x3 neighbourhood on the image grid) is "
                     "bidirectional, so it takes no is_causal=True; leave local_kernel None.")
  b, lq, h, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  phi_q_BQHD, phi_k_BKhD, keep_BK = _features(q, k, mask, options)
  phi_q_BQhGD = phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d)
  v_BKhE = jnp.where(keep_BK[:, :, None, None] > 0, v.astype(jnp.float32), 0.0)
  if not is_causal:
    state_BhDE = jnp.einsum("bkhd,bkhe->bhde", phi_k_BKhD, v_BKhE)
    qs = jnp.einsum("bqhgd,bhde->bqhge", phi_q_BQhGD, state_BhDE)
    qz = jnp.einsum("bqhgd,bhd->bqhg", phi_q_BQhGD, jnp.sum(phi_k_BKhD, axis=1))[..., None]
    v_sum = jnp.sum(v_BKhE, axis=1)[:, None, :, None, :]  # [B, 1, Hkv, 1, Dv]
    n = jnp.sum(keep_BK, axis=1)[:, None, None, None, None]  # [B or 1, 1, 1, 1, 1]
  else:
    # Prefix sums over keys; query i reads the prefix ending at its own position.
    idx_Q, sees_any_Q = prefix_rows(lq, lk, q_offset)
    s_BKhDE, z_BKhD = running_sums(phi_k_BKhD, v_BKhE)
    qs, qz = query_products(phi_q_BQhGD, s_BKhDE[:, idx_Q], z_BKhD[:, idx_Q])
    v_sum = jnp.cumsum(v_BKhE, axis=1)[:, idx_Q][:, :, :, None, :]  # [B, Lq, Hkv, 1, Dv]
    n_BQ = jnp.where(sees_any_Q[None, :], jnp.cumsum(keep_BK, axis=1)[:, idx_Q], 0.0)
    n = n_BQ[:, :, None, None, None]
  out_BQHE = _rows(qs, qz, v_sum, n, scale).reshape(b, lq, h, dv)
  if local is not None:
    out_BQHE = out_BQHE + local_term(v_BKhE, local, options["grid"], options["leading_tokens"], h)
  return out_BQHE.astype(q.dtype)


def init_state(batch: int, num_kv_heads: int, head_dim: int, value_dim: int,
               options: Mapping[str, Any]) -> InlineState:
  """The state before any token: zero sums, N = 0 (`Mechanism.decode_state_init`)."""
  del options  # the feature map keeps the sums' shapes
  return InlineState(
      LinearState(jnp.zeros((batch, num_kv_heads, head_dim, value_dim), jnp.float32),
                  jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32)),
      jnp.zeros((batch, num_kv_heads, value_dim), jnp.float32),
      jnp.zeros((batch,), jnp.float32))


def decode_step(q: Array, k: Array, v: Array, state: InlineState, options: Mapping[str, Any],
                scale: float, keep_BL: Array | None = None) -> tuple[Array, InlineState]:
  """L new tokens attending causally to themselves and to the tokens folded into `state`;
  their output [B, L, H, Dv] and the state with them folded in (`Mechanism.decode_step`).
  keep_BL: bool [B, L], False for padding tokens, which are not folded in (nor counted in N)."""
  if options["local_kernel"] is not None:
    raise ValueError("kind='inline': local_kernel (a 3x3 neighbourhood on the image grid) is "
                     "bidirectional, so it has no causal decoding; leave local_kernel None.")
  b, lq, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  mask = None if keep_BL is None else keep_BL[:, None, None, :]
  phi_q_BQHD, phi_k_BQhD, keep_BQ = _features(q, k, mask, options)
  v_BQhE = jnp.where(keep_BQ[:, :, None, None] > 0, v.astype(jnp.float32), 0.0)
  s_BQhDE, z_BQhD = running_sums(phi_k_BQhD, v_BQhE, state.sums)
  v_sum_BQhE = jnp.cumsum(v_BQhE, axis=1) + state.v_sum_BhE[:, None]
  n_BQ = state.n_B[:, None] + jnp.cumsum(keep_BQ, axis=1)
  qs, qz = query_products(phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d), s_BQhDE, z_BQhD)
  out_BQhGE = _rows(qs, qz, v_sum_BQhE[:, :, :, None, :], n_BQ[:, :, None, None, None], scale)
  state = InlineState(LinearState(s_BQhDE[:, -1], z_BQhD[:, -1]), v_sum_BQhE[:, -1], n_BQ[:, -1])
  return out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype), state


def weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
            mask: Array | None, bias: Array | None, is_causal: bool, scale: float) -> Array:
  """The [B, H, Lq, Lk] weights InLine implies (materialised, for inspection): each row with
  a visible key sums to 1; masked keys and rows without one are exactly 0."""
  del mech, bias
  if options["local_kernel"] is not None:
    raise ValueError("kind='inline': weights has no local term (local_kernel mixes each "
                     "channel of v over the grid, not one weight per query and key); leave "
                     "local_kernel None here and add `inline.local_term` to apply_weights' "
                     "output.")
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  phi_q_BQHD, phi_k_BKhD, keep_BK = _features(q, k, mask, options)
  phi_q_BQhGD = phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d)
  a_BHQK = scale * jnp.einsum("bqhgd,bkhd->bhgqk", phi_q_BQhGD, phi_k_BKhD).reshape(b, h, lq, lk)
  valid = (keep_BK > 0)[:, None, None, :]
  if is_causal:
    idx_Q, sees_any_Q = prefix_rows(lq, lk)
    valid = valid & ((jnp.arange(lk)[None, :] <= idx_Q[:, None]) & sees_any_Q[:, None])[None, None]
  n = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
  a_BHQK = jnp.where(valid, a_BHQK, 0.0)
  w = core.safe_divide(a_BHQK - core.safe_divide(jnp.sum(a_BHQK, -1, keepdims=True), n) + 1.0, n)
  return jnp.where(valid, w, 0.0)


def _check_inline(options: Mapping[str, Any]) -> None:
  if options["feature_map"] not in FEATURE_MAPS:
    raise ValueError(f"kind='inline': option feature_map={options['feature_map']!r} is not one "
                     f"of {sorted(FEATURE_MAPS)}; 'identity' is the official code's default.")
  grid, leading = options["grid"], options["leading_tokens"]
  if options["local_kernel"] is None:
    if grid is not None or leading != 0:
      raise ValueError(f"kind='inline': grid={grid!r} and leading_tokens={leading!r} place the "
                       "local term, which needs local_kernel too; pass local_kernel or leave "
                       "them at None and 0.")
    return
  if (not isinstance(grid, (tuple, list)) or len(grid) != 2
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid)):
    raise ValueError(f"kind='inline': local_kernel needs grid=(height, width), the image grid "
                     f"of the tokens, two positive ints; got grid={grid!r}.")
  if not isinstance(leading, int) or isinstance(leading, bool) or leading < 0:
    raise ValueError(f"kind='inline': leading_tokens (tokens before the grid, e.g. 1 for a "
                     f"class token) must be an int >= 0; got {leading!r}.")


def _check_local_shapes(options: Mapping[str, Any], dims: Dims) -> None:
  kernel = options["local_kernel"]
  if kernel is None:
    return
  (gh, gw), leading = options["grid"], options["leading_tokens"]
  if dims.q_len != dims.kv_len or dims.kv_len != leading + gh * gw:
    raise ValueError(f"kind='inline': local_kernel needs self-attention over leading_tokens + "
                     f"grid height * width = {leading} + {gh}*{gw} = {leading + gh * gw} tokens "
                     f"(q and k alike); got q_length={dims.q_len}, kv_length={dims.kv_len}.")
  b, h, dv = dims.batch, dims.num_heads, dims.value_dim
  shape = tuple(getattr(kernel, "shape", ()))
  if shape not in ((b, h, dv, 3, 3), (b, h * dv, 3, 3)):
    raise ValueError(f"kind='inline': local_kernel must be [batch, heads, value_dim, 3, 3] = "
                     f"{[b, h, dv, 3, 3]} or [batch, heads * value_dim, 3, 3] = "
                     f"{[b, h * dv, 3, 3]}; got {list(shape) if shape else type(kernel).__name__}.")


INLINE = register_kind(Mechanism(
    name="inline",
    paper=("Han et al. 2024, Bridging the Divide: Reconsidering Softmax and Linear Attention "
           "(InLine, NeurIPS 2024, arXiv 2412.06590): injective linear attention, w_ij = a_ij - "
           "mean_s a_is + 1/N with a_ij = scale * phi(q_i).phi(k_j) / N; phi the identity by "
           "default, as in the official code (LeapLabTHU/InLine), which also offers relu, "
           "leakyrelu and exp(0.2 x). The paper's local residual (a 3x3 depthwise convolution "
           "of v over the image grid) is the option local_kernel, with grid and "
           "leading_tokens."),
    # local_kernel: the local term's 3x3 kernels, [B, H, Dv, 3, 3] or [B, H*Dv, 3, 3] (None:
    # none); grid: the (height, width) the tokens after the first leading_tokens lie on.
    options={"feature_map": "identity", "local_kernel": None, "grid": None,
             "leading_tokens": 0},
    activate=None,
    normalization=lambda options: "none",  # its own additive normalisation, in `attend`
    check=_check_inline,
    check_shapes=_check_local_shapes,
    attend_override=attend,
    weights_override=weights,
    check_mask=key_padding_masks_only("inline"),
    decode_state_init=init_state,
    decode_step=decode_step,
    takes_bias=False,
))
