"""Linear attention (Katharopoulos et al. 2020, Transformers are RNNs, arXiv 2006.16236).

out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i), with S = sum_j phi(k_j) v_j^T and
z = sum_j phi(k_j) over the keys row i may see: O(L) memory, never an [Lq, Lk]
array. Causal rows use cumulative sums over the keys. Only key-padding masks
([B, 1, 1, Lk]) keep the O(L) form, so other masks and additive biases are
rejected rather than silently materialised.
"""

from __future__ import annotations

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
  else:
    # Prefix sums over keys; query i reads the prefix ending at its own position.
    state_BKhDE = jnp.cumsum(jnp.einsum("bkhd,bkhe->bkhde", phi_k_BKhD, v_BKhD), axis=1)
    norm_BKhD = jnp.cumsum(phi_k_BKhD, axis=1)
    idx_Q, sees_any_Q = prefix_rows(lq, lk, q_offset)
    num = jnp.einsum("bqhgd,bqhde->bqhge", phi_q_BQhGD, state_BKhDE[:, idx_Q])
    den = jnp.einsum("bqhgd,bqhd->bqhg", phi_q_BQhGD, norm_BKhD[:, idx_Q])[..., None]
    den = jnp.where(sees_any_Q[None, :, None, None, None], den, 0.0)
  out_BQhGE = core.safe_divide(num, den)
  return out_BQhGE.reshape(b, lq, h, dv).astype(q.dtype)


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
    has_logits=False,
    takes_bias=False,
))
