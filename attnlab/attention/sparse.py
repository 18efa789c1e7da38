"""Input-dependent sparse attention: sparsemax, alpha-entmax and top-k.

Each maps a whole row of scores to weights that are exactly 0 outside an
input-dependent support (a `Mechanism.row_map`):

* sparsemax (Martins & Astudillo 2016): the Euclidean projection of the scores onto
  the simplex, p = max(s - tau, 0) with tau such that sum(p) = 1;
* alpha-entmax (Peters, Niculae & Martins 2019): p = max((alpha - 1) s - tau, 0)^(1/(alpha-1)),
  sum(p) = 1; alpha = 2 is sparsemax and alpha -> 1 approaches softmax;
* top-k (Zhao et al. 2019): the softmax of each query's k largest scores, 0 elsewhere.

The thresholds need every score of the row at once, so sparsemax and entmax run in the
materialising impl only (`api.impl_kinds`); top-k also runs in chunked, which finds the
kept set by a running top-k over key blocks (`chunked._attend_top_k`). Masked keys enter as -inf scores: they
never reach the support, and a row with no visible key gives zeros, as softmax does
here. sparsemax and entmax have closed-form backward passes (`jax.custom_vjp`), so
autodiff never differentiates the sort or the bisection.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention import core
from attnlab.attention.kinds import Mechanism, _positive_int, register_kind

Array = jax.Array

# Bisection steps of alpha-entmax for alpha other than 1.5 and 2 (which have exact sorts).
# The threshold's bracket is at most log(Lk) < 16 wide; 32 halvings leave < 4e-9, below
# float32's resolution of thresholds of order 1, before the weights are renormalised.
ENTMAX_BISECTION_STEPS = 32


def _shift(z: Array) -> Array:
  """z minus its row max (0 on rows with no finite score): every map here ignores a shift."""
  m = jnp.max(z, axis=-1, keepdims=True)
  return z - jnp.where(jnp.isfinite(m), m, 0.0)


def _sorted_support(x: Array, in_support_of_sorted) -> Array:
  """The support {j: x_j >= x_(k)} as a bool mask, where k counts the sorted (descending)
  positions r at which `in_support_of_sorted(xs, rank, visible)` holds (a prefix)."""
  xs = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # descending; -inf (masked) last
  rank = jax.lax.broadcasted_iota(jnp.float32, xs.shape, xs.ndim - 1) + 1.0
  visible = jnp.isfinite(xs)
  k = jnp.sum(in_support_of_sorted(jnp.where(visible, xs, 0.0), rank) & visible, axis=-1,
              keepdims=True)
  kth = jnp.take_along_axis(xs, jnp.maximum(k - 1, 0), axis=-1)
  # Ties at the boundary are in or out together; k = 0 (no visible key) gives kth = -inf.
  return jnp.isfinite(x) & (x >= kth) & (k > 0)


def _sparsemax_forward(z: Array) -> Array:
  """Martins & Astudillo 2016, Algorithm 1: sort, then the largest k with 1 + k x_(k) >
  sum_{r <= k} x_(r); tau is recomputed from a plain sum over the support (tighter than
  the running sum)."""
  x = _shift(z)
  support = _sorted_support(x, lambda xs, rank: 1.0 + rank * xs > jnp.cumsum(xs, axis=-1))
  size = jnp.sum(support, axis=-1, keepdims=True, dtype=jnp.float32)
  tau = core.safe_divide(jnp.sum(jnp.where(support, x, 0.0), -1, keepdims=True) - 1.0, size)
  return jnp.where(support, jnp.maximum(x - tau, 0.0), 0.0)


def _entmax15_forward(z: Array) -> Array:
  """Peters, Niculae & Martins 2019, Algorithm 2 (alpha = 1.5): with x = (z - max) / 2 sorted,
  tau_k = mean_k - sqrt((1 - k var_k) / k) over the k largest, and the support is the largest
  k with tau_k <= x_(k); then p = max(x - tau, 0)^2, tau recomputed over the support with a
  two-pass variance."""
  x = _shift(z) / 2.0

  def in_support(xs, rank):
    mean = jnp.cumsum(xs, axis=-1) / rank
    mean_sq = jnp.cumsum(jnp.square(xs), axis=-1) / rank
    delta = (1.0 - rank * (mean_sq - jnp.square(mean))) / rank
    return mean - jnp.sqrt(jnp.maximum(delta, 0.0)) <= xs

  support = _sorted_support(x, in_support)
  size = jnp.sum(support, axis=-1, keepdims=True, dtype=jnp.float32)
  x_in = jnp.where(support, x, 0.0)
  mean = core.safe_divide(jnp.sum(x_in, -1, keepdims=True), size)
  var = jnp.sum(jnp.where(support, jnp.square(x_in - mean), 0.0), -1, keepdims=True)
  # sum_S (x - tau)^2 = 1  <=>  tau = mean - sqrt((1 - sum_S (x - mean)^2) / |S|).
  tau = mean - jnp.sqrt(jnp.maximum(core.safe_divide(1.0 - var, size), 0.0))
  return jnp.where(support, jnp.square(jnp.maximum(x - tau, 0.0)), 0.0)


def _entmax_bisect_forward(z: Array, alpha: float) -> Array:
  """alpha-entmax by bisection, for any alpha > 1.

  With d = alpha - 1 and y = z - max(z), write the threshold as (alpha - 1) max(z) - 1 + d t:
  p_j(t) = max(1 + d (y_j - t), 0)^(1/d), evaluated as exp(log1p(d (y_j - t)) / d), which
  stays accurate as alpha -> 1 (where it tends to exp(y_j - t), softmax). sum_j p_j(t) falls
  from >= 1 at t = 0 (the max alone weighs 1) to <= 1 at t = (1 - n^-d) / d (every weight
  <= 1/n, n visible keys); bisection keeps the lower end, whose support is never empty, and
  the weights are renormalised to sum to 1.
  """
  d = alpha - 1.0
  y = _shift(z)
  n = jnp.maximum(jnp.sum(jnp.isfinite(y), axis=-1, keepdims=True, dtype=jnp.float32), 1.0)

  def weights(t):
    # max(., -1): log1p(-1) = -inf gives exactly 0 below the threshold and on masked keys.
    return jnp.exp(jnp.log1p(jnp.maximum(d * (y - t), -1.0)) / d)

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    heavy = jnp.sum(weights(mid), axis=-1, keepdims=True) >= 1.0
    return jnp.where(heavy, mid, lo), jnp.where(heavy, hi, mid)

  lo = jnp.zeros_like(n)
  hi = -jnp.expm1(-d * jnp.log(n)) / d
  lo, _ = jax.lax.fori_loop(0, ENTMAX_BISECTION_STEPS, step, (lo, hi))
  p = weights(lo)
  return core.safe_divide(p, jnp.sum(p, axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def entmax(z: Array, alpha: float) -> Array:
  """alpha-entmax along the last axis of float32 scores z that are -inf where masked.

  alpha = 2 (sparsemax) and alpha = 1.5 are solved exactly by sorting, other alpha > 1 by
  bisection. Rows sum to 1 with exact zeros outside the support; a row with no finite
  score gives zeros. The gradient is the closed form (`_entmax_bwd`).
  """
  if alpha == 2.0:
    return _sparsemax_forward(z)
  if alpha == 1.5:
    return _entmax15_forward(z)
  return _entmax_bisect_forward(z, alpha)


def _entmax_fwd(z, alpha):
  p = entmax(z, alpha)
  return p, p


def _entmax_bwd(alpha, p, g):
  """Peters, Niculae & Martins 2019, Proposition 2: with s_j = p_j^(2 - alpha) on the support
  (0 elsewhere), dz = s * g - s * sum(s * g) / sum(s). alpha = 2: sparsemax's Jacobian, g
  minus its mean over the support."""
  on = p > 0
  s = on.astype(jnp.float32) if alpha == 2.0 else jnp.where(
      on, jnp.where(on, p, 1.0) ** (2.0 - alpha), 0.0)
  sg = s * g
  return (sg - s * core.safe_divide(jnp.sum(sg, -1, keepdims=True),
                                    jnp.sum(s, -1, keepdims=True)),)


entmax.defvjp(_entmax_fwd, _entmax_bwd)


def top_k_softmax(logits: Array, k: int) -> Array:
  """Softmax over each row's k largest of float32 logits that are -inf where masked.

  Ties at the k-th value keep the lower key indices; masked keys are never kept (they stay
  -inf), and k >= the visible keys is exactly `core.softmax_rows`. The kept set is piecewise
  constant, so the gradient flows through the kept logits only.
  """
  k = min(k, logits.shape[-1])
  kth = jax.lax.top_k(jax.lax.stop_gradient(logits), k)[0][..., k - 1:]
  above = logits > kth
  tied = logits == kth
  room = k - jnp.sum(above, axis=-1, keepdims=True)
  kept = above | (tied & (jnp.cumsum(tied, axis=-1) <= room))
  return core.softmax_rows(jnp.where(kept, logits, -jnp.inf))


def _masked(s: Array, valid: Array | None) -> Array:
  return core.sanitize(s, valid, -jnp.inf)


# --- sparsemax ---------------------------------------------------------------------------------
SPARSEMAX = register_kind(Mechanism(
    name="sparsemax",
    paper=("Martins & Astudillo 2016, From Softmax to Sparsemax: A Sparse Model of Attention "
           "and Multi-Label Classification (arXiv 1602.02068): the Euclidean projection of "
           "the scores onto the simplex, max(s - tau, 0)."),
    options={},
    activate=None,
    normalization=lambda options: "row",
    row_map=lambda s, valid, options: entmax(_masked(s, valid), 2.0),
))


# --- alpha-entmax ------------------------------------------------------------------------------
def _check_entmax(options: Mapping[str, Any]) -> None:
  alpha = options["alpha"]
  # A number, not an array: the forward's method (sort or bisection) is chosen from its value.
  real = isinstance(alpha, numbers.Real) and not isinstance(alpha, (bool, np.bool_))
  if not (real and math.isfinite(alpha) and alpha > 1):
    raise ValueError(f"kind='entmax': option alpha must be a Python number > 1 (1.5 is the "
                     f"default, 2 is sparsemax, alpha -> 1 approaches softmax); got "
                     f"{alpha!r}. For softmax use kind='softmax'.")


ENTMAX = register_kind(Mechanism(
    name="entmax",
    paper=("Peters, Niculae & Martins 2019, Sparse Sequence-to-Sequence Models (arXiv "
           "1905.05702): alpha-entmax, max((alpha - 1) s - tau, 0)^(1/(alpha - 1)); as "
           "attention in Correia, Niculae & Martins 2019, Adaptively Sparse Transformers "
           "(arXiv 1909.00015)."),
    options={"alpha": 1.5},
    activate=None,
    normalization=lambda options: "row",
    check=_check_entmax,
    row_map=lambda s, valid, options: entmax(_masked(s, valid), float(options["alpha"])),
))


# --- top-k -------------------------------------------------------------------------------------
def _check_top_k(options: Mapping[str, Any]) -> None:
  _positive_int("top_k", options["top_k"], "topk")


TOPK = register_kind(Mechanism(
    name="topk",
    paper=("Zhao et al. 2019, Explicit Sparse Transformer: Concentrated Attention Through "
           "Explicit Selection (arXiv 1912.11637): softmax over each query's top_k largest "
           "scores, 0 elsewhere."),
    options={"top_k": 8},
    activate=None,
    normalization=lambda options: "row",
    check=_check_top_k,
    row_map=lambda s, valid, options: top_k_softmax(_masked(s, valid), options["top_k"]),
    top_k_of=lambda options: options["top_k"],  # chunked: a streaming top-k (chunked.py)
))
