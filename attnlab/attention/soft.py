"""SOFT: the Gaussian-kernel attention in linear time (Lu et al. 2021, arXiv 2110.11945).

The exact kernel is the `gaussian` kind's, G(x, y) = exp(-(scale / 2) ||x - y||^2) with
scale = 1/sqrt(D) by default: exp(-||q - k||^2 / (2 sqrt(D))). SOFT approximates the
[Lq, Lk] matrix G(Q, K) by the Nystrom form over m landmarks,

    G(Q, K) ~= G(Q, K~) pinv(G(Q~, K~)) G(Q~, K),

with Q~, K~ the averages of m contiguous segments of the queries and of the keys (segment
i of L tokens is [floor(i L / m), floor((i + 1) L / m)): sizes differ by at most one), and
the pseudo-inverse by Newton iterations (`newton_pinv`). The output is
G(Q, K~) (pinv (G(Q~, K) V)): O(L m) time and memory, never an [Lq, Lk] array.

SOFT ties keys to queries (one projection, so Q~ = K~ and G(Q~, K~) is symmetric);
`attend` receives q and k, so the landmarks are pooled from each. With k = q this is
SOFT's form; otherwise it is the same Nystrom approximation of the asymmetric G(Q, K).
With every token its own landmark (m = L) it is exact: G pinv(G) G = G.

`landmarks` above a sequence's length is clamped to it (that side is then exact), so one
setting serves every length. The kind is bidirectional only: landmarks pool the whole
sequence, so a causal row would see the future through them, and a padded token would
still shape them; causal calls, masks and bias arrays are refused. Like `gaussian`, the
weights are unnormalised (no row sum of 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import core
from attnlab.attention.kinds import (Mechanism, _positive_int, neg_sq_distance_logits,
                                    register_kind)

Array = jax.Array

HIGHEST = jax.lax.Precision.HIGHEST


def segment_pooling(length: int, landmarks: int) -> np.ndarray:
  """The [m, L] matrix averaging m = min(landmarks, L) contiguous segments of L tokens."""
  m = min(landmarks, length)
  starts = (np.arange(m + 1) * length) // m
  seg_L = np.searchsorted(starts, np.arange(length), side="right") - 1
  pool_ML = (seg_L[None, :] == np.arange(m)[:, None]).astype(np.float32)
  return pool_ML / pool_ML.sum(axis=1, keepdims=True)


def newton_pinv(a: Array, iters: int) -> Array:
  """Moore-Penrose pseudo-inverse of a batch of [m, n] float32 matrices by Newton-Schulz.

  V <- 2V - V A V from V0 = A^T / (||A||_1 ||A||_inf) (Ben-Israel & Cohen 1966; Pan &
  Schreiber 1991). sigma_max(A)^2 <= ||A||_1 ||A||_inf, so every singular value of A V0
  lies in (0, 1] and V converges to pinv(A) for any A, square or not, of any rank. Each
  iteration squares 1 - alpha sigma^2 (alpha = 1 / (||A||_1 ||A||_inf)), so the singular
  values of A - A V A, sigma (1 - alpha sigma^2)^(2^iters), stay below
  sqrt(||A||_1 ||A||_inf / (2e 2^iters)) however ill-conditioned A is. SOFT's reference
  code (newton_inv) starts from 2 A / ||A||_1^2, for its symmetric A on the edge of
  convergence, and halves it until ||I - A V0||_1 <= 1.01; this start needs no search.

  The products run at full float32 precision (never TF32: the iteration amplifies rounding
  in them). More iterations are not always better in float32: once the large singular
  values have converged, each further one doubles the rounding noise in the near-null
  directions of an ill-conditioned A (smooth tokens give kernels of rapidly decaying
  spectrum); on such kernels 20 (SOFT's count) was as good as or better than 60.
  """
  norm_1 = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)  # max column sum
  norm_inf = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)  # max row sum
  alpha = core.safe_divide(jnp.ones_like(norm_1), norm_1 * norm_inf)[..., None, None]
  v = alpha * jnp.swapaxes(a, -1, -2)

  def step(_, v):
    av = jnp.matmul(a, v, precision=HIGHEST)
    return 2.0 * v - jnp.matmul(v, av, precision=HIGHEST)

  return jax.lax.fori_loop(0, iters, step, v)


def _landmarks(x_BLHD: Array, landmarks: int) -> Array:
  """Segment means of the tokens, [B, m, H, D] float32."""
  pool_ML = jnp.asarray(segment_pooling(x_BLHD.shape[1], landmarks))
  return jnp.einsum("ml,blhd->bmhd", pool_ML, x_BLHD, precision=HIGHEST)


def _factors(q: Array, k: Array, options: Mapping[str, Any], scale: float):
  """G(Q, K~) [B, H, Lq, mk], pinv(G(Q~, K~)) [B, H, mk, mq] and G(Q~, K) [B, H, mq, Lk]."""
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  q_land = _landmarks(q32, options["landmarks"])
  k_land = _landmarks(k32, options["landmarks"])
  gauss = lambda x, y: jnp.exp(neg_sq_distance_logits(x, y, scale))  # the `gaussian` kind's
  inverse = newton_pinv(gauss(q_land, k_land), options["newton_iters"])
  return gauss(q32, k_land), inverse, gauss(q_land, k32)


def _refuse(kind: str, mask: Array | None, bias: Array | None, is_causal: bool) -> None:
  # api._prepare refuses these first (Mechanism.check_mask, supports_causal, takes_bias);
  # this guards a direct call of the module.
  if mask is not None or bias is not None or is_causal:
    raise ValueError(f"kind={kind!r} takes no mask, bias or is_causal=True (its landmarks pool "
                     "the whole sequence).")


def attend(q: Array, k: Array, v: Array, mech: Mechanism, options: Mapping[str, Any], *,
           mask: Array | None, bias: Array | None, is_causal: bool, scale: float,
           **unused_impl_options) -> Array:
  _refuse(mech.name, mask, bias, is_causal)
  b, lq, h, _ = q.shape
  g_q_BHQM, inverse_BHMN, g_k_BHNK = _factors(q, k, options, scale)
  gv_BHND = core.weights_times_values(g_k_BHNK, v.astype(jnp.float32))
  x_BHMD = jnp.matmul(inverse_BHMN, gv_BHND, precision=HIGHEST)
  out_BHQD = jnp.matmul(g_q_BHQM, x_BHMD, precision=HIGHEST)
  return out_BHQD.transpose(0, 2, 1, 3).astype(q.dtype)


def weights(q: Array, k: Array, mech: Mechanism, options: Mapping[str, Any], *,
            mask: Array | None, bias: Array | None, is_causal: bool, scale: float) -> Array:
  """The [B, H, Lq, Lk] matrix SOFT approximates G(Q, K) by (materialised, for inspection)."""
  _refuse(mech.name, mask, bias, is_causal)
  g_q_BHQM, inverse_BHMN, g_k_BHNK = _factors(q, k, options, scale)
  return jnp.matmul(jnp.matmul(g_q_BHQM, inverse_BHMN, precision=HIGHEST), g_k_BHNK,
                    precision=HIGHEST)


def _check_soft(options: Mapping[str, Any]) -> None:
  _positive_int("landmarks", options["landmarks"], "soft")
  _positive_int("newton_iters", options["newton_iters"], "soft")


def _check_mask(mask: Array | None) -> None:
  if mask is not None:
    raise ValueError(f"kind='soft' takes no mask (got shape {tuple(mask.shape)}): its landmarks "
                     "average every query and key, so a masked token would still shape the "
                     "result. Use kind='gaussian' (the exact kernel) for masked attention.")


SOFT = register_kind(Mechanism(
    name="soft",
    paper=("Lu et al. 2021, SOFT: Softmax-free Transformer with Linear Complexity (NeurIPS "
           "2021, arXiv 2110.11945): the `gaussian` kind's kernel exp(-scale/2 * ||q - k||^2) "
           "by the Nystrom form G(Q, K~) pinv(G(Q~, K~)) G(Q~, K) over `landmarks` segment "
           "means of the queries and keys, the pseudo-inverse by `newton_iters` Newton-"
           "Schulz iterations; bidirectional, no masks."),
    # landmarks: m, segment means per side (SOFT's 7 x 7 = 49 per stage), clamped to the
    # length; newton_iters: iterations of the pseudo-inverse (SOFT's max_iter = 20).
    options={"landmarks": 49, "newton_iters": 20},
    activate=None,
    normalization=lambda options: "none",  # unnormalised, like `gaussian`
    check=_check_soft,
    attend_override=attend,
    weights_override=weights,
    check_mask=_check_mask,
    takes_bias=False,
    supports_causal=False,
))
