"""Linear attention (Katharopoulos et al. 2020, Transformers are RNNs, arXiv 2006.16236).

out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i), with S = sum_j phi(k_j) v_j^T and
z = sum_j phi(k_j) over the keys row i may see: O(L) memory, never an [Lq, Lk]
array. Causal rows use cumulative sums over the keys. Only key-padding masks
([B, 1, 1, Lk]) keep the O(L) form, so other masks and additive biases are
rejected rather than silently materialised.

Decoding keeps the recurrent form instead of keys and values: `LinearState` holds S and z
over the tokens so far, and `decode_step` folds new tokens in, O(1) in the sequence length
per token (`Mechanism.decode_step`; `attnlab.attention.attend_with_state`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.attention import core
from attnlab.attention.kinds import Mechanism, register_kind

Array = jax.Array

FEATURE_MAPS = {
    "elu+1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}


def key_padding_masks_only(kind: str) -> Callable[[Array | None], None]:
  """A `Mechanism.check_mask` for the O(L) kinds: key-padding masks [B or 1, 1, 1, Lk] only."""
  def check_mask(mask: Array | None) -> None:
    if mask is not None and mask.shape[1:3] != (1, 1):
      raise ValueError(
          f"kind={kind!r} supports only key-padding masks of shape [B or 1, 1, 1, Lk] (a "
          f"general [.., Lq, Lk] mask would need the [Lq, Lk] matrix it avoids); got mask "
          f"shape {tuple(mask.shape)}. Use is_causal=True for causal attention.")
  return check_mask


def prefix_rows(q_len: int, kv_len: int, q_offset: Array | int | None = None
                ) -> tuple[Array, Array]:
  """For causal rows read from prefix sums over the keys: the index of each query's last
  visible key (its position, `core.query_positions`, clipped into range), and whether it
  sees any key at all."""
  last_key_Q = core.query_positions(q_len, kv_len, q_offset)
  return jnp.clip(last_key_Q, 0, kv_len - 1), last_key_Q >= 0


def _features(q: Array, k: Array, mask: Array | None, options: Mapping[str, Any]):
  phi = FEATURE_MAPS[options["feature_map"]]
  phi_q_BQHD = phi(q.astype(jnp.float32))
  phi_k_BKhD = phi(k.astype(jnp.float32))
  if mask is not None:
    keep_BK = mask[:, 0, 0, :]  # [B or 1, Lk]
    phi_k_BKhD = jnp.where(keep_BK[:, :, None, None], phi_k_BKhD, 0.0)
  return phi_q_BQHD, phi_k_BKhD


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearState:
  """Linear attention's recurrent state: the sums a causal row reads, over the keys so far.

  float32 whatever the compute dtype: the sums accumulate every token, and 16 bits would
  round the late ones away.

  Attributes:
    s_BhDE: S = sum_j phi(k_j) v_j^T, [B, Hkv, D, Dv].
    z_BhD: z = sum_j phi(k_j), [B, Hkv, D].
  """
  s_BhDE: Array
  z_BhD: Array


def running_sums(phi_k_BKhD: Array, v_BKhE: Array, start: LinearState | None = None
                 ) -> tuple[Array, Array]:
  """S and z after each key, [B, Lk, Hkv, D, Dv] and [B, Lk, Hkv, D]: prefix sums over the
  keys, on top of the sums in `start` (None: none before them)."""
  s_BKhDE = jnp.cumsum(jnp.einsum("bkhd,bkhe->bkhde", phi_k_BKhD, v_BKhE), axis=1)
  z_BKhD = jnp.cumsum(phi_k_BKhD, axis=1)
  if start is not None:
    s_BKhDE = s_BKhDE + start.s_BhDE[:, None]
    z_BKhD = z_BKhD + start.z_BhD[:, None]
  return s_BKhDE, z_BKhD


def query_products(phi_q_BQhGD: Array, s_BQhDE: Array, z_BQhD: Array) -> tuple[Array, Array]:
  """phi(q_i)^T S_i [B, Lq, Hkv, G, Dv] and phi(q_i).z_i [B, Lq, Hkv, G, 1], each query
  against its own sums (causal rows)."""
  return (jnp.einsum("bqhgd,bqhde->bqhge", phi_q_BQhGD, s_BQhDE),
          jnp.einsum("bqhgd,bqhd->bqhg", phi_q_BQhGD, z_BQhD)[..., None])


def _causal_rows(phi_q_BQhGD: Array, s_BQhDE: Array, z_BQhD: Array,
                 sees_any_Q: Array | None = None) -> Array:
  """phi(q_i)^T S_i / phi(q_i)^T z_i per query from its own sums, [B, Lq, Hkv, G, Dv]; rows
  that see no key (sees_any_Q False) give zeros."""
  num, den = query_products(phi_q_BQhGD, s_BQhDE, z_BQhD)
  if sees_any_Q is not None:
    den = jnp.where(sees_any_Q[None, :, None, None, None], den, 0.0)
  return core.safe_divide(num, den)


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           q_offset: Array | int | None = None, **unused_impl_options) -> Array:
  del mech, bias, scale  # rejected earlier: linear attention has no logits to scale or bias
  b, lq, h, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g = h // hkv
  phi_q_BQHD, phi_k_BKhD = _features(q, k, mask, options)
  phi_q_BQhGD = phi_q_BQHD.reshape(b, lq, hkv, g, d)
  v_BKhD = v.astype(jnp.float32)
  if not is_causal:
    state_BhDE = jnp.einsum("bkhd,bkhe->bhde", phi_k_BKhD, v_BKhD)
    norm_BhD = jnp.sum(phi_k_BKhD, axis=1).reshape(b, hkv, d)
    num = jnp.einsum("bqhgd,bhde->bqhge", phi_q_BQhGD, state_BhDE)
    den = jnp.einsum("bqhgd,bhd->bqhg", phi_q_BQhGD, norm_BhD)[..., None]
    out_BQhGE = core.safe_divide(num, den)
  else:
    # Prefix sums over keys; query i reads the prefix ending at its own position.
    s_BKhDE, z_BKhD = running_sums(phi_k_BKhD, v_BKhD)
    idx_Q, sees_any_Q = prefix_rows(lq, lk, q_offset)
    out_BQhGE = _causal_rows(phi_q_BQhGD, s_BKhDE[:, idx_Q], z_BKhD[:, idx_Q], sees_any_Q)
  return out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype)


def init_state(batch: int, num_kv_heads: int, head_dim: int, value_dim: int,
               options: Mapping[str, Any]) -> LinearState:
  """The state before any token: zero sums (`Mechanism.decode_state_init`)."""
  del options  # the feature map keeps the sums' shapes
  return LinearState(jnp.zeros((batch, num_kv_heads, head_dim, value_dim), jnp.float32),
                     jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32))


def decode_step(q: Array, k: Array, v: Array, state: LinearState, options: Mapping[str, Any],
                scale: float, keep_BL: Array | None = None) -> tuple[Array, LinearState]:
  """L new tokens attending causally to themselves and to the tokens folded into `state`;
  returns their output [B, L, H, Dv] and the state with them folded in
  (`Mechanism.decode_step`). O(L) work, whatever the number of tokens before them.
  keep_BL: bool [B, L], False for padding tokens, which are not folded in."""
  del scale  # no logits to scale
  b, lq, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  mask = None if keep_BL is None else keep_BL[:, None, None, :]
  phi_q_BQHD, phi_k_BQhD = _features(q, k, mask, options)
  s_BQhDE, z_BQhD = running_sums(phi_k_BQhD, v.astype(jnp.float32), state)
  out_BQhGE = _causal_rows(phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d), s_BQhDE, z_BQhD)
  return (out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype),
          LinearState(s_BQhDE[:, -1], z_BQhD[:, -1]))


def weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
            mask: Array | None, bias: Array | None, is_causal: bool, scale: float) -> Array:
  """The [B, H, Lq, Lk] weights linear attention implies (for diagnostics only)."""
  del mech, bias, scale
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  phi_q_BQHD, phi_k_BKhD = _features(q, k, mask, options)
  phi_q_BQhGD = phi_q_BQHD.reshape(b, lq, hkv, h // hkv, d)
  a_BhGQK = jnp.einsum("bqhgd,bkhd->bhgqk", phi_q_BQhGD, phi_k_BKhD)
  a_BHQK = a_BhGQK.reshape(b, h, lq, lk)
  if is_causal:
    keep_QK = jnp.arange(lk)[None, :] <= (jnp.arange(lq) + (lk - lq))[:, None]
    a_BHQK = jnp.where(keep_QK[None, None], a_BHQK, 0.0)
  return core.safe_divide(a_BHQK, jnp.sum(a_BHQK, axis=-1, keepdims=True))


def _check_linear(options: Mapping[str, Any]) -> None:
  if options["feature_map"] not in FEATURE_MAPS:
    raise ValueError(f"kind='linear': feature_map={options['feature_map']!r} is not one of "
                     f"{sorted(FEATURE_MAPS)}.")


LINEAR = register_kind(Mechanism(
    name="linear",
    paper=("Katharopoulos et al. 2020, Transformers are RNNs: Fast Autoregressive Transformers "
           "with Linear Attention (arXiv 2006.16236); feature map elu(x)+1."),
    options={"feature_map": "elu+1"},
    activate=None,
    normalization=lambda options: "l1",
    check=_check_linear,
    attend_override=attend,
    weights_override=weights,
    check_mask=key_padding_masks_only("linear"),
    decode_state_init=init_state,
    decode_step=decode_step,
    has_logits=False,
    takes_bias=False,
))
