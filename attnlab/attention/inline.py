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

The paper's second ingredient, a local residual (a 3x3 depthwise convolution of v over
the image grid with weights predicted from the block input), is left out: it needs the
2-D token layout and the block input, which attention over (q, k, v) never sees.
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


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           q_offset: Array | int | None = None, **unused_impl_options) -> Array:
  del mech, bias  # bias is rejected earlier: InLine builds no [Lq, Lk] scores
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
  out_BQhGE = _rows(qs, qz, v_sum, n, scale)
  return out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype)


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
                scale: float) -> tuple[Array, InlineState]:
  """L new tokens attending causally to themselves and to the tokens folded into `state`;
  their output [B, L, H, Dv] and the state with them folded in (`Mechanism.decode_step`)."""
  b, lq, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  phi_q_BQHD, phi_k_BQhD, _ = _features(q, k, None, options)
  v_BQhE = v.astype(jnp.float32)
  s_BQhDE, z_BQhD = running_sums(phi_k_BQhD, v_BQhE, state.sums)
  v_sum_BQhE = jnp.cumsum(v_BQhE, axis=1) + state.v_sum_BhE[:, None]
  n_BQ = state.n_B[:, None] + jnp.arange(1, lq + 1, dtype=jnp.float32)[None, :]
  qs, qz = query_products(phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d), s_BQhDE, z_BQhD)
  out_BQhGE = _rows(qs, qz, v_sum_BQhE[:, :, :, None, :], n_BQ[:, :, None, None, None], scale)
  state = InlineState(LinearState(s_BQhDE[:, -1], z_BQhD[:, -1]), v_sum_BQhE[:, -1], n_BQ[:, -1])
  return out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype), state


def weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
            mask: Array | None, bias: Array | None, is_causal: bool, scale: float) -> Array:
  """The [B, H, Lq, Lk] weights InLine implies (materialised, for inspection): each row with
  a visible key sums to 1; masked keys and rows without one are exactly 0."""
  del mech, bias
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


INLINE = register_kind(Mechanism(
    name="inline",
    paper=("Han et al. 2024, Bridging the Divide: Reconsidering Softmax and Linear Attention "
           "(InLine, NeurIPS 2024, arXiv 2412.06590): injective linear attention, w_ij = a_ij - "
           "mean_s a_is + 1/N with a_ij = scale * phi(q_i).phi(k_j) / N; phi the identity by "
           "default, as in the official code (LeapLabTHU/InLine), which also offers relu, "
           "leakyrelu and exp(0.2 x). The paper's local residual (a depthwise convolution "
           "over the image grid) is left out."),
    options={"feature_map": "identity"},
    activate=None,
    normalization=lambda options: "none",  # its own additive normalisation, in `attend`
    check=_check_inline,
    attend_override=attend,
    weights_override=weights,
    check_mask=key_padding_masks_only("inline"),
    decode_state_init=init_state,
    decode_step=decode_step,
    takes_bias=False,
))
