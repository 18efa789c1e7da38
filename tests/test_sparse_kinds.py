"""The input-dependent sparse kinds (sparsemax, entmax, topk) against float64 NumPy references.

The references below are written from the papers' definitions, by other algorithms
than the library's: sparsemax and entmax by bisection on the threshold tau of
sum_j max((alpha - 1) z_j - tau, 0)^(1/(alpha - 1)) = 1 in float64 (alpha = 2 is
sparsemax), top-k by a stable sort of each row in a Python loop. They never call
back into the library. The tolerance rule is tests/test_attention.py's.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import attention
from attnlab.attention import api, chunked
from attnlab.models import ViTConfig
from kind_cases import (F32_EPS, SHAPES, assert_close, directional_fd, make_inputs,
                        off_by_one_mask, padding_mask, tolerance)

SPARSE_KINDS = ("entmax", "sparsemax", "topk")
# Each kind with the options that reach each of its code paths: entmax's exact sort
# (alpha = 1.5, the default) and its bisection (other alpha); top_k below the visible
# keys (the default 8 keeps fewer than the 13 to 53 keys of SHAPES) and a small one.
VARIANTS = [
    ("sparsemax", {}),
    ("entmax", {}),
    ("entmax", {"alpha": 1.25}),
    ("entmax", {"alpha": 2.5}),
    ("topk", {}),
    ("topk", {"top_k": 3}),
]
IDS = [f"{k}-{'-'.join(f'{n}={v}' for n, v in o.items()) or 'default'}" for k, o in VARIANTS]
# Every variant materialised (impl="xla"); top-k also streamed by chunked, in key blocks of 8
# that leave a padded last block on every shape of SHAPES (13 to 53 keys).
CHUNKED = {"impl": "chunked", "block_k": 8}
RUNS = [(k, o, {}) for k, o in VARIANTS] + [(k, o, CHUNKED) for k, o in VARIANTS if k == "topk"]
RUN_IDS = IDS + [f"{i}-chunked" for (k, _), i in zip(VARIANTS, IDS) if k == "topk"]


# ----------------------------------------------------------------------------------------------
# Independent NumPy float64 reference.
# ----------------------------------------------------------------------------------------------
def np_scores(q, k, bias=None, scale=None):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  h, hkv = q.shape[2], k.shape[2]
  k = np.repeat(k, h // hkv, axis=2)  # GQA: query head i reads kv head i // (H // Hkv)
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  return s if bias is None else s + np.asarray(bias, np.float64)


def np_valid(shape, mask=None, is_causal=False):
  b, h, lq, lk = shape
  valid = np.ones(shape, bool)
  if mask is not None:
    valid &= np.broadcast_to(np.asarray(mask), shape)
  if is_causal:  # bottom-right: query i sees keys j <= i + (Lk - Lq)
    valid &= (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq))[None, None]
  return valid


def np_entmax(z, valid, alpha, iters=200):
  """alpha-entmax of each row by bisection on tau (Peters et al. 2019, eq. 11), float64."""
  d = alpha - 1.0
  x = np.where(valid, d * z, -np.inf)
  n = valid.sum(-1, keepdims=True)
  live = n > 0
  top = np.where(live, np.max(np.where(valid, x, -1e300), -1, keepdims=True), 0.0)
  mass = lambda tau: np.sum(np.maximum(x - tau, 0.0) ** (1.0 / d), -1, keepdims=True)
  lo, hi = top - 1.0, top - np.maximum(n, 1) ** -d  # mass(lo) >= 1 >= mass(hi)
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    heavy = mass(mid) >= 1.0
    lo, hi = np.where(heavy, mid, lo), np.where(heavy, hi, mid)
  p = np.maximum(x - lo, 0.0) ** (1.0 / d)
  tot = p.sum(-1, keepdims=True)
  return np.where(live & valid, p / np.where(tot > 0, tot, 1.0), 0.0)


def np_topk(z, valid, k):
  """Softmax over the k largest visible scores of each row, ties to the lower key index."""
  out = np.zeros_like(z)
  for row in np.ndindex(z.shape[:-1]):
    order = np.argsort(-z[row], kind="stable")  # stable: equal scores keep index order
    keep = [j for j in order if valid[row][j]][:k]
    if keep:
      e = np.exp(z[row][keep] - z[row][keep].max())
      out[row + (keep,)] = e / e.sum()
  return out


def np_weights(q, k, kind, mask=None, is_causal=False, bias=None, **opts):
  z = np_scores(q, k, bias)
  valid = np_valid(z.shape, mask, is_causal)
  if kind == "topk":
    return np_topk(z, valid, opts.get("top_k", 8))
  if kind == "softmax":
    return np_topk(z, valid, z.shape[-1])
  return np_entmax(z, valid, 2.0 if kind == "sparsemax" else opts.get("alpha", 1.5))


def np_attend(q, k, v, kind, **kw):
  w = np_weights(q, k, kind, **kw)
  v = np.asarray(v, np.float64)
  v = np.repeat(v, w.shape[1] // v.shape[2], axis=2)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


# ----------------------------------------------------------------------------------------------
# Inputs: tests/kind_cases.py (shared with tests/test_linear_kinds.py); a random full mask.
# ----------------------------------------------------------------------------------------------
def full_mask(shape, seed=2):
  b, lq, lk, h, *_ = SHAPES[shape]
  return jnp.asarray(np.random.default_rng(seed).random((b, h, lq, lk)) < 0.7)


def topk_gap(q, k, kind, opts, mask=None, is_causal=False, bias=None):
  """The smallest gap between a row's k-th and (k+1)-th visible score (inf for other kinds):
  top-k is discontinuous where they cross, so value and finite-difference checks need it
  well above the errors they allow."""
  if kind != "topk":
    return np.inf
  z = np_scores(q, k, bias)
  valid = np_valid(z.shape, mask, is_causal)
  top_k, gaps = opts.get("top_k", 8), [np.inf]
  for row in np.ndindex(z.shape[:-1]):
    vis = np.sort(z[row][valid[row]])[::-1]
    if len(vis) > top_k:
      gaps.append(vis[top_k - 1] - vis[top_k])
  return min(gaps)


# ----------------------------------------------------------------------------------------------
# Registration, papers, what each impl runs.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,arxiv", [("sparsemax", "1602.02068"), ("entmax", "1905.05702"),
                                        ("topk", "1912.11637")])
def test_registered_with_paper_defaults_and_impls(kind, arxiv):
  mech = attention.KINDS[kind]
  assert arxiv in mech.paper
  assert mech.row_map is not None and mech.normalization(mech.options) == "row"
  assert kind in attention.impl_kinds("xla") and kind in attention.impl_kinds("auto")
  assert kind not in attention.impl_kinds("pallas")
  # top-k streams its kept set through key blocks; sparsemax/entmax thresholds need the row.
  streams = kind == "topk"
  assert (kind in attention.impl_kinds("chunked")) == streams
  assert api.kind_impls(kind) == (("xla", "chunked", "auto") if streams else ("xla", "auto"))
  assert attention.KINDS["entmax"].options == {"alpha": 1.5}
  assert attention.KINDS["topk"].options == {"top_k": 8}


# ----------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------
CASES = [("gqa_odd", False, "none"), ("gqa_odd", True, "padding"), ("mha_square", True, "none"),
         ("mha_square", False, "full"), ("mqa_long_q", True, "full")]


@pytest.mark.parametrize("shape,causal,masking", CASES)
@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_values_float32(kind, opts, impl, shape, causal, masking):
  q, k, v = make_inputs(shape)
  mask = {"none": None, "padding": padding_mask(shape), "full": full_mask(shape)}[masking]
  assert topk_gap(q, k, kind, opts, mask, causal) > 1e-5  # float32 scores are good to ~1e-6
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=causal, **opts, **impl)
  assert got.shape == q.shape[:3] + v.shape[3:] and got.dtype == q.dtype
  assert_close(got, np_attend(q, k, v, kind, mask=mask, is_causal=causal, **opts))


@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_values_bfloat16(kind, opts, impl):
  q, k, v = make_inputs("gqa_odd", seed=4, dtype=jnp.bfloat16)
  mask = padding_mask("gqa_odd")
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, **opts, **impl)
  assert got.dtype == jnp.bfloat16
  # The reference sees the same bf16-rounded inputs, in float64.
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  assert topk_gap(q32, k32, kind, opts, mask, True) > 1e-5  # float32 scores are good to ~1e-6
  want = np_attend(q32, k32, v32, kind, mask=mask, is_causal=True, **opts)
  assert_close(got.astype(jnp.float32), want, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_bias_is_added_to_the_scores(kind, opts, impl):
  q, k, v = make_inputs("mha_square", seed=5)
  bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 2, 16, 16)), jnp.float32)
  assert topk_gap(q, k, kind, opts, bias=bias) > 1e-5  # float32 scores are good to ~1e-6
  got = attention.attend(q, k, v, kind=kind, bias=bias, **opts, **impl)
  assert_close(got, np_attend(q, k, v, kind, bias=bias, **opts))


@pytest.mark.parametrize("kind,opts", VARIANTS, ids=IDS)
def test_weights_are_sparse_rows_summing_to_one_and_compose_to_attend(kind, opts):
  shape = "gqa_odd"
  q, k, v = make_inputs(shape, seed=7)
  mask = full_mask(shape)
  w = attention.weights(q, k, kind=kind, mask=mask, is_causal=True, **opts)
  assert w.shape == (2, 4, 37, 53) and w.dtype == jnp.float32
  want = np_weights(q, k, kind, mask=mask, is_causal=True, **opts)
  assert_close(w, want)
  w = np.asarray(w)
  valid = np_valid(w.shape, np.asarray(mask), True)
  live = valid.any(-1)
  assert live.sum() > 250
  # Rows with a visible key sum to 1; masked keys and rows without one are exactly 0.
  np.testing.assert_allclose(w.sum(-1)[live], 1.0, rtol=0, atol=8 * F32_EPS)
  assert np.all(w[~valid] == 0.0) and np.all(w[~live] == 0.0)
  # The support is the reference's: exact zeros where it has zeros (clear of the threshold).
  clear = (want == 0.0) | (want > 1e-5)
  np.testing.assert_array_equal((w > 0)[clear], (want > 0)[clear])
  zeros = np.mean(w[valid] == 0.0)
  assert zeros > 0.1, zeros  # sparse for these N(0, 1) scores over up to 53 keys
  if kind == "topk":
    np.testing.assert_array_equal((w > 0).sum(-1), np.minimum(valid.sum(-1), opts.get("top_k", 8)))
  composed = attention.apply_weights(jnp.asarray(w), v, kind=kind, **opts)
  direct = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, **opts)
  np.testing.assert_array_equal(composed, direct)


def test_sparsemax_and_entmax_by_hand():
  """Scores [1, 0.5, -1]: sparsemax tau = 0.25 gives [0.75, 0.25, 0]; 1.5-entmax of
  [0, 0] halves; entmax with alpha = 2 is sparsemax, bit for bit (the same sort)."""
  zeros = jnp.zeros((1, 1, 1, 4))

  def weights(kind, scores, **opts):
    bias = jnp.asarray(scores, jnp.float32)[None, None, None, :]
    return np.asarray(attention.weights(zeros, jnp.zeros((1, len(scores), 1, 4)), kind=kind,
                                        bias=bias, **opts))[0, 0, 0]

  np.testing.assert_allclose(weights("sparsemax", [1.0, 0.5, -1.0]), [0.75, 0.25, 0.0],
                             rtol=0, atol=F32_EPS)
  assert weights("sparsemax", [1.0, 0.5, -1.0])[2] == 0.0
  np.testing.assert_allclose(weights("entmax", [0.0, 0.0]), [0.5, 0.5], rtol=0, atol=F32_EPS)
  # 1.5-entmax of [2, 0]: x = [0, -1] after the shift and halving; the max alone, tau = -1.
  np.testing.assert_array_equal(weights("entmax", [2.0, 0.0]), [1.0, 0.0])
  q, k, _ = make_inputs("gqa_odd", seed=8)
  np.testing.assert_array_equal(attention.weights(q, k, kind="entmax", alpha=2.0),
                                attention.weights(q, k, kind="sparsemax"))
  np.testing.assert_array_equal(attention.weights(q, k, kind="entmax", alpha=2),
                                attention.weights(q, k, kind="sparsemax"))


# ----------------------------------------------------------------------------------------------
# Gradients: JAX's VJP (the closed forms; autodiff for top-k) against central differences of
# the float64 reference, in q, k, v and the bias.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,causal,masking", [("mqa_long_q", True, "padding"),
                                                  ("gqa_odd", False, "full")])
@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_gradients_against_float64_finite_differences(kind, opts, impl, shape, causal, masking):
  q, k, v = make_inputs(shape, seed=11)
  mask = padding_mask(shape) if masking == "padding" else full_mask(shape)
  b, lq, lk, h, *_ = SHAPES[shape]
  rng = np.random.default_rng(12)
  bias = jnp.asarray(0.5 * rng.normal(size=(1, h, lq, lk)), jnp.float32)
  cot = rng.normal(size=q.shape[:3] + v.shape[3:])
  x64 = [np.asarray(x, np.float64) for x in (q, k, v, bias)]
  dirs = [rng.normal(size=x.shape) for x in x64]
  # Central differences are the derivative only if no key enters or leaves a support between
  # the two points (a kink for sparsemax and entmax, a jump for top-k): these inputs are such.
  support = lambda sign: np_weights(*(a + sign * 1e-5 * d for a, d in zip(x64[:2], dirs[:2])),
                                    kind, mask=mask, is_causal=causal,
                                    bias=x64[3] + sign * 1e-5 * dirs[3], **opts) > 0
  np.testing.assert_array_equal(support(-1), support(1))

  def loss(q, k, v, bias):
    out = attention.attend(q, k, v, kind=kind, mask=mask, bias=bias, is_causal=causal, **opts,
                           **impl)
    return jnp.sum(out * cot)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
  assert all(np.all(np.isfinite(g)) for g in grads)
  terms = [np.asarray(g, np.float64) * d for g, d in zip(grads, dirs)]
  got = sum(float(np.sum(t)) for t in terms)

  def fd(m):
    ref = lambda *a: float(np.sum(np_attend(*a[:3], kind, mask=m, is_causal=causal,
                                            bias=a[3], **opts) * cot))
    return directional_fd(ref, x64, dirs)

  tol = tolerance(None, magnitude=sum(float(np.sum(np.abs(t))) for t in terms))
  np.testing.assert_allclose(got, fd(mask), **tol)
  # The same tolerance rejects the gradient of a mask that is off by one key.
  wrong = fd(mask & off_by_one_mask(shape))
  assert abs(got - wrong) > tol["atol"] + tol["rtol"] * abs(wrong)


@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_bfloat16_gradients_follow_float32(kind, opts, impl):
  q, k, v = make_inputs("gqa_odd", seed=11, dtype=jnp.bfloat16)
  mask = padding_mask("gqa_odd")
  cot = jnp.asarray(np.random.default_rng(12).normal(size=q.shape[:3] + v.shape[3:]),
                    jnp.float32)

  def grads(q, k, v):
    f = lambda q, k, v: jnp.sum(cot * attention.attend(
        q, k, v, kind=kind, mask=mask, is_causal=True, **opts, **impl).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  want = grads(*(x.astype(jnp.float32) for x in (q, k, v)))
  for name, got, ref in zip("qkv", grads(q, k, v), want):
    assert got.dtype == jnp.bfloat16, name
    # bf16 rounds the outputs' cotangent, dS and the weights: a few 2^-8 of the magnitude.
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0,
                               atol=2e-2 * float(jnp.max(jnp.abs(ref))), err_msg=name)


def test_topk_gradient_flows_through_the_kept_logits_only():
  q, k, _ = make_inputs("mha_square", seed=13)
  bias = jnp.zeros((1, 2, 16, 16))
  cot = jnp.asarray(np.random.default_rng(14).normal(size=(1, 2, 16, 16)), jnp.float32)
  f = lambda bias: jnp.sum(cot * attention.weights(q, k, kind="topk", top_k=4, bias=bias))
  g = np.asarray(jax.grad(f)(bias))
  kept = np.asarray(attention.weights(q, k, kind="topk", top_k=4)) > 0
  assert np.all(g[~kept] == 0.0)
  assert np.all(g[kept] != 0.0)
  # On the kept set it is softmax's gradient: w * (c - sum(w * c)).
  w = np.asarray(attention.weights(q, k, kind="topk", top_k=4), np.float64)
  c = np.asarray(cot, np.float64)
  np.testing.assert_allclose(g, w * (c - np.sum(w * c, -1, keepdims=True)), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The limits: entmax between softmax (alpha -> 1) and sparsemax (alpha = 2); top-k of every
# visible key is softmax.
# ----------------------------------------------------------------------------------------------
def test_entmax_alpha_to_2_is_sparsemax():
  q, k, v = make_inputs("gqa_odd", seed=15)
  mask = padding_mask("gqa_odd")
  sparse = np.asarray(attention.weights(q, k, kind="sparsemax", mask=mask, is_causal=True))
  gaps = []
  for alpha in (1.9, 1.99, 1.999, 2.001):  # bisection, approaching the exact sort's alpha = 2
    w = attention.weights(q, k, kind="entmax", alpha=alpha, mask=mask, is_causal=True)
    assert_close(w, np_weights(q, k, "entmax", mask=mask, is_causal=True, alpha=alpha))
    gaps.append(float(np.max(np.abs(np.asarray(w) - sparse))))
  assert gaps[0] > 5 * gaps[1] > 25 * gaps[2] and gaps[2] < 2e-3 and gaps[3] < 2e-3, gaps
  # The bisection at alpha = 2 + 1e-6 agrees with sparsemax to float32 rounding.
  w = attention.weights(q, k, kind="entmax", alpha=2.000001, mask=mask, is_causal=True)
  np.testing.assert_allclose(w, sparse, rtol=0, atol=1e-5)

  def grads(kind, **opts):
    f = lambda q, v: jnp.sum(jnp.sin(attention.attend(q, k, v, kind=kind, mask=mask,
                                                      is_causal=True, **opts)))
    return jax.grad(f, argnums=(0, 1))(q, v)

  for a, b in zip(grads("entmax", alpha=2.000001), grads("sparsemax")):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_entmax_alpha_to_1_approaches_softmax():
  q, k, _ = make_inputs("gqa_odd", seed=16)
  mask = full_mask("gqa_odd")
  soft = np.asarray(attention.weights(q, k, kind="softmax", mask=mask, is_causal=True))
  gaps = []
  for alpha in (1.1, 1.01, 1.001):
    w = attention.weights(q, k, kind="entmax", alpha=alpha, mask=mask, is_causal=True)
    assert_close(w, np_weights(q, k, "entmax", mask=mask, is_causal=True, alpha=alpha))
    gaps.append(float(np.max(np.abs(np.asarray(w) - soft))))
  assert gaps[0] > 5 * gaps[1] > 25 * gaps[2] and gaps[2] < 2e-3, gaps
  assert np.all(np.asarray(w)[np_valid(w.shape, np.asarray(mask), True)] > 0)  # dense


@pytest.mark.parametrize("top_k", [16, 17, 1000])
def test_topk_of_at_least_the_visible_keys_is_softmax_exactly(top_k):
  q, k, v = make_inputs("mha_square", seed=17)
  for mask, causal in ((None, False), (padding_mask("mha_square"), True),
                       (full_mask("mha_square"), False)):
    common = dict(mask=mask, is_causal=causal)
    soft = attention.weights(q, k, kind="softmax", **common)
    np.testing.assert_array_equal(attention.weights(q, k, kind="topk", top_k=top_k, **common),
                                  soft)
    out = attention.attend(q, k, v, kind="topk", top_k=top_k, **common)
    np.testing.assert_array_equal(out, attention.apply_weights(soft, v, kind="softmax"))
    # attend(kind="softmax") takes the flash-style path: the same up to float32 rounding.
    assert_close(out, attention.attend(q, k, v, kind="softmax", **common))
  # Fewer keys than top_k but not every key visible: a padding mask leaving 9 of 16.
  mask = jnp.asarray(np.arange(16) < 9)[None, None, None, :]
  np.testing.assert_array_equal(attention.weights(q, k, kind="topk", top_k=9, mask=mask),
                                attention.weights(q, k, kind="softmax", mask=mask))


def test_topk_ties_keep_the_lower_key_indices_and_never_masked_keys():
  zeros_q = jnp.zeros((1, 1, 1, 4))
  zeros_k = jnp.zeros((1, 6, 1, 4))
  bias = jnp.asarray([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])[None, None, None, :]

  def kept(top_k, mask=None):
    w = attention.weights(zeros_q, zeros_k, kind="topk", top_k=top_k, bias=bias, mask=mask)
    return list(np.flatnonzero(np.asarray(w)[0, 0, 0]))

  assert kept(3) == [1, 2, 3]
  assert kept(2) == [1, 2]
  assert kept(5) == [0, 1, 2, 3, 5]
  hide = jnp.asarray([True, False, True, True, True, True])[None, None, None, :]
  assert kept(3, hide) == [2, 3, 5]
  assert kept(6, hide) == [0, 2, 3, 4, 5]  # more room than visible keys: the masked one stays out
  np.testing.assert_allclose(
      np.asarray(attention.weights(zeros_q, zeros_k, kind="topk", top_k=3, bias=bias))[0, 0, 0],
      [0, 1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("block_k", [1, 2, 4, 6])
def test_chunked_topk_keeps_the_same_tied_keys_across_block_boundaries(block_k):
  """The by-hand ties above, streamed: v = one-hot key positions, so the output row shows
  the weight each key got. Blocks of 1 ... 6 keys put the ties on and across boundaries."""
  zeros_q = jnp.zeros((1, 1, 1, 4))
  zeros_k = jnp.zeros((1, 6, 1, 4))
  eye_v = jnp.eye(6)[None, :, None, :]
  bias = jnp.asarray([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])[None, None, None, :]
  hide = jnp.asarray([True, False, True, True, True, True])[None, None, None, :]
  for top_k, mask in ((2, None), (3, None), (5, None), (3, hide), (6, hide)):
    common = dict(kind="topk", top_k=top_k, bias=bias, mask=mask)
    want = attention.weights(zeros_q, zeros_k, **common)[0, 0, 0]
    got = attention.attend(zeros_q, zeros_k, eye_v, impl="chunked", block_k=block_k,
                           **common)[0, 0, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_EPS)
    np.testing.assert_array_equal(got > 0, want > 0)


def test_chunked_topk_of_every_visible_key_is_chunked_softmax():
  q, k, v = make_inputs("gqa_odd", seed=23)
  mask = full_mask("gqa_odd")
  common = dict(mask=mask, is_causal=True, impl="chunked", block_k=8)
  assert_close(attention.attend(q, k, v, kind="topk", top_k=1000, **common),
               np_attend(q, k, v, "softmax", mask=mask, is_causal=True))
  np.testing.assert_allclose(attention.attend(q, k, v, kind="topk", top_k=1000, **common),
                             attention.attend(q, k, v, kind="softmax", **common),
                             rtol=0, atol=4 * F32_EPS)


def test_chunked_topk_holds_no_full_row_of_scores():
  """The streamed kind's compiled program has no [Lq, Lk] array: its largest intermediate
  is a [Lq, block_k + top_k] candidate tile (the materialising path holds [Lq, Lk])."""
  lq = lk = 512
  q = jax.ShapeDtypeStruct((1, lq, 1, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, lk, 1, 8), jnp.float32)

  def largest_buffer(impl, **opts):
    f = lambda q, k, v: attention.attend(q, k, v, kind="topk", top_k=8, impl=impl, **opts)
    text = jax.jit(f).lower(q, kv, kv).as_text()
    return max(math.prod(int(d) for d in dims.split("x") if d)
               for dims in re.findall(r"tensor<((?:\d+x)+)f32>", text))

  assert largest_buffer("xla") >= lq * lk
  assert largest_buffer("chunked", block_k=64) <= lq * (64 + 8)


# ----------------------------------------------------------------------------------------------
# Masking edge cases and numerical safety.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(kind, opts, impl):
  q, k, v = make_inputs("mha_square", seed=18)
  mask = jnp.ones((1, 2, 16, 16), bool).at[:, :, 3, :].set(False)
  f = lambda q, k, v: attention.attend(q, k, v, kind=kind, mask=mask, **opts, **impl)
  out = np.asarray(f(q, k, v))
  assert np.all(out[:, 3] == 0.0) and np.all(np.isfinite(out))
  assert np.all(np.asarray(attention.weights(q, k, kind=kind, mask=mask, **opts))[:, :, 3] == 0.0)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[:, 3] == 0.0)  # a dead query row gets no gradient


@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("masking,causal", [("none", False), ("mask", False), ("none", True)])
def test_single_key(kind, opts, impl, masking, causal):
  """Lk = 1: the one visible key gets weight 1 (0 where masked)."""
  rng = np.random.default_rng(19)
  b, lq, h, hkv, d, dv = 2, 5, 4, 2, 8, 4
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((b, lq, h, d), (b, 1, hkv, d), (b, 1, hkv, dv)))
  mask = jnp.asarray(rng.random((b, h, lq, 1)) < 0.5) if masking == "mask" else None
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=causal, **opts, **impl)
  assert_close(got, np_attend(q, k, v, kind, mask=mask, is_causal=causal, **opts))


@pytest.mark.parametrize("kind,opts,impl", RUNS, ids=RUN_IDS)
def test_huge_bfloat16_logits_stay_finite(kind, opts, impl):
  q, k, v = make_inputs("mha_square", seed=20, dtype=jnp.bfloat16)
  q, k = q * 300, k * 300  # logits ~ 1e5
  mask = padding_mask("mha_square")
  f = lambda q, k, v: attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, **opts,
                                       **impl)
  out = np.asarray(f(q, k, v), np.float32)
  assert np.all(np.isfinite(out))
  w = np.asarray(attention.weights(q, k, kind=kind, mask=mask, is_causal=True, **opts))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-6)
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_under_jit_and_vmap():
  q, k, v = make_inputs("mha_square", seed=21)
  for kind, opts in VARIANTS:
    f = lambda q, kind=kind, opts=opts: attention.attend(q, k, v, kind=kind, is_causal=True,
                                                         **opts)
    want = f(q)
    np.testing.assert_allclose(jax.jit(f)(q), want, rtol=0, atol=1e-6)
    stacked = jax.vmap(f)(jnp.stack([q, 2 * q]))
    np.testing.assert_allclose(stacked[0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stacked[1], f(2 * q), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Options and impls: errors that name the option, the value and the fix, at config time.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,options,pattern", [
    ("entmax", {"alpha": 1.0}, r"kind='entmax': option alpha must be a Python number > 1 .*"
                               r"got 1\.0\. For softmax use kind='softmax'"),
    ("entmax", {"alpha": 0.5}, r"option alpha must be .*got 0\.5"),
    ("entmax", {"alpha": -2}, r"option alpha must be .*got -2"),
    ("entmax", {"alpha": float("nan")}, r"option alpha must be .*got nan"),
    ("entmax", {"alpha": float("inf")}, r"option alpha must be .*got inf"),
    ("entmax", {"alpha": "1.5"}, r"option alpha must be .*got '1\.5'"),
    ("entmax", {"alpha": True}, r"option alpha must be .*got True"),
    ("entmax", {"alpha": jnp.asarray(1.5)}, r"option alpha must be a Python number"),
    ("entmax", {"top_k": 3}, r"kind='entmax' with impl='xla' does not take option\(s\) "
                             r"\['top_k'\]; the kind accepts \['alpha'\]"),
    ("topk", {"top_k": 0}, r"kind='topk': option top_k must be a positive int; got 0"),
    ("topk", {"top_k": -3}, r"option top_k must be a positive int; got -3"),
    ("topk", {"top_k": 2.0}, r"option top_k must be a positive int; got 2\.0"),
    ("topk", {"top_k": True}, r"option top_k must be a positive int; got True"),
    ("topk", {"top_k": None}, r"option top_k must be a positive int; got None"),
    ("sparsemax", {"alpha": 2.0}, r"kind='sparsemax' with impl='xla' does not take option\(s\) "
                                  r"\['alpha'\]; the kind accepts none"),
])
def test_bad_options_are_rejected_at_config_time_and_call_time_alike(kind, options, pattern):
  with pytest.raises(ValueError, match=pattern) as config_time:
    attention.check_options(kind, "xla", **options)
  q, k, v = make_inputs("mha_square")
  with pytest.raises(ValueError) as call_time:
    attention.attend(q, k, v, kind=kind, **options)
  assert str(config_time.value) == str(call_time.value)


@pytest.mark.parametrize("alpha", [1.5, 2, 1.0001, 3, np.float32(1.25), np.float64(1.75)])
def test_good_alphas_are_accepted(alpha):
  assert attention.check_options("entmax", "xla", alpha=alpha)[0] == {"alpha": alpha}


@pytest.mark.parametrize("kind", ("entmax", "sparsemax"))
def test_chunked_and_pallas_refuse_naming_the_impl_that_works(kind):
  with pytest.raises(ValueError, match=re.escape(
      f"impl='chunked' supports kinds {list(attention.impl_kinds('chunked'))}; got kind="
      f"{kind!r} (its weights need a whole row of scores at once; chunked scans key blocks). "
      "Use impl='xla' for it.")):
    attention.check_options(kind, "chunked")
  with pytest.raises(ValueError, match=r"impl='pallas' supports kinds .*Use impl='xla' for it"):
    attention.check_options(kind, "pallas")
  q, k, v = make_inputs("mha_square")
  with pytest.raises(ValueError, match=r"impl='chunked' supports kinds"):
    attention.attend(q, k, v, kind=kind, impl="chunked", block_k=4)
  # The module itself refuses too, rather than scanning a row map it cannot honour.
  mech = attention.KINDS[kind]
  with pytest.raises(ValueError, match=r"impl='chunked' cannot run kind=.*Use impl='xla'"):
    chunked.attend(q, k, v, mech, mech.options, mask=None, bias=None, is_causal=False,
                   scale=1.0, block_k=4)


def test_pallas_refuses_topk_naming_the_impls_that_work():
  with pytest.raises(ValueError, match=r"impl='pallas' supports kinds .*got kind='topk'\. "
                     r"Use impl='xla' or 'chunked' for it"):
    attention.check_options("topk", "pallas")


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_auto_materialises_them_and_streams_long_topk(monkeypatch, kind, platform):
  monkeypatch.setattr(api, "platform", lambda: platform)
  q = jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float32)
  for kv_len in (16, api.AUTO_CHUNKED_MIN_KV_LEN, 4 * api.AUTO_CHUNKED_MIN_KV_LEN):
    k = jax.ShapeDtypeStruct((1, kv_len, 2, 8), jnp.float32)
    long = kv_len >= api.AUTO_CHUNKED_MIN_KV_LEN
    assert api.auto_impl(kind, q, k, k) == ("chunked" if long and kind == "topk" else "xla")
  q, k, v = make_inputs("mha_square", seed=22)
  np.testing.assert_array_equal(attention.attend(q, k, v, kind=kind, impl="auto"),
                                attention.attend(q, k, v, kind=kind, impl="xla"))


# ----------------------------------------------------------------------------------------------
# In the models, by name.
# ----------------------------------------------------------------------------------------------
def vit_cfg(**overrides):
  fields = dict(width=16, depth=1, num_heads=4, mlp_dim=32, head_zero_init=False)
  return ViTConfig.from_variant("mu/2", num_classes=5, image_size=8, **{**fields, **overrides})


def test_model_configs_check_the_options_and_the_impl():
  assert vit_cfg(attention="entmax", attention_options={"alpha": 1.25}).attention == "entmax"
  with pytest.raises(ValueError, match=r"attention_options=.*option alpha must be a Python "
                                       r"number > 1.*got 1"):
    vit_cfg(attention="entmax", attention_options={"alpha": 1})
  with pytest.raises(ValueError, match=r"attention_options=.*option top_k must be a positive "
                                       r"int; got 0"):
    vit_cfg(attention="topk", attention_options={"top_k": 0})
  with pytest.raises(ValueError, match=r"attention_impl='chunked'.*got attention='sparsemax'\. "
                                       r"Use attention_impl='xla' for it"):
    vit_cfg(attention="sparsemax", attention_impl="chunked")
