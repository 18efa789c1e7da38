"""The O(L) kinds of issue 24, soft (SOFT) and inline (InLine), against float64 NumPy references.

The references are written here from the papers' definitions, by other means than the
library: InLine materialises every [Lq, Lk] weight w_ij = a_ij - mean_s a_is + 1/N over the
visible keys; SOFT pools landmarks with a Python loop over segments, takes the kernel from
explicit differences q_i - k_j (not the dot-product expansion), and runs the same Newton
iteration in float64 (checked against numpy.linalg.pinv). They never call back into the
library. The tolerance rule is tests/test_attention.py's, with SOFT's pseudo-inverse
amplifying float32 rounding by the condition number of its landmark kernel.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import attention
from attnlab.attention import api, inline, soft
from attnlab.kernels import capabilities as kernel_capabilities
from attnlab.models import TransformerConfig, ViT, ViTConfig
from kind_cases import (F32_EPS, SHAPES, assert_close, directional_fd, make_inputs,
                        off_by_one_mask, padding_mask, tolerance)

INLINE_VARIANTS = [{}, {"feature_map": "relu"}, {"feature_map": "leakyrelu"},
                   {"feature_map": "exp"}]
SOFT_VARIANTS = [{}, {"landmarks": 8}, {"landmarks": 5, "newton_iters": 12}]


def ids(variants):
  return ["-".join(f"{n}={v}" for n, v in o.items()) or "default" for o in variants]


# ----------------------------------------------------------------------------------------------
# Independent NumPy float64 references.
# ----------------------------------------------------------------------------------------------
def f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


def repeat_kv(x, num_heads):
  """GQA: query head i reads kv head i // (H // Hkv)."""
  return np.repeat(x, num_heads // x.shape[2], axis=2)


def np_valid(b, h, lq, lk, mask=None, is_causal=False):
  valid = np.ones((b, h, lq, lk), bool)
  if mask is not None:
    valid &= np.broadcast_to(np.asarray(mask), valid.shape)
  if is_causal:  # bottom-right: query i sees keys j <= i + (Lk - Lq)
    valid &= (np.arange(lk)[None, :] <= np.arange(lq)[:, None] + (lk - lq))[None, None]
  return valid


NP_FEATURE_MAPS = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "leakyrelu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "exp": lambda x: np.exp(0.2 * x),
}


def np_inline_weights(q, k, mask=None, is_causal=False, scale=None, feature_map="identity"):
  """InLine (Han et al. 2024, eq. 5 with the code's scale / N): a_ij = scale phi(q_i).phi(k_j)
  / N, w_ij = a_ij - (1/N) sum_s a_is + 1/N over the N visible keys; 0 elsewhere."""
  q, k = f64(q, k)
  b, lq, h, d = q.shape
  k = repeat_kv(k, h)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  phi = NP_FEATURE_MAPS[feature_map]
  dots = np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
  valid = np_valid(b, h, lq, k.shape[1], mask, is_causal)
  w = np.zeros_like(dots)
  for row in np.ndindex(dots.shape[:3]):
    keys = np.flatnonzero(valid[row])
    if len(keys):
      n = len(keys)
      a = scale * dots[row][keys] / n
      w[row + (keys,)] = a - a.mean() + 1.0 / n
  return w


def np_gaussian(x, y, scale):
  """exp(-(scale / 2) ||x_i - y_j||^2) from explicit differences: [B, Lx, H, D] x [B, Ly, H, D]
  -> [B, H, Lx, Ly]."""
  d2 = np.sum((x[:, :, None] - y[:, None]) ** 2, axis=-1)  # [B, Lx, Ly, H]
  return np.exp(-0.5 * scale * d2).transpose(0, 3, 1, 2)


def np_segment_means(x, landmarks, segmentation="floor"):
  """Means of min(landmarks, L) contiguous segments [floor(i L / m), floor((i + 1) L / m));
  segmentation="array_split" puts the longer segments first instead (a wrong variant the
  tolerances must reject)."""
  length = x.shape[1]
  m = min(landmarks, length)
  if segmentation == "array_split":
    return np.stack([s.mean(axis=1) for s in np.array_split(x, m, axis=1)], axis=1)
  return np.stack([x[:, (i * length) // m:((i + 1) * length) // m].mean(axis=1)
                   for i in range(m)], axis=1)


def np_newton_pinv(a, iters):
  """V <- 2V - V A V from V0 = A^T / (||A||_1 ||A||_inf), matrix by matrix, float64."""
  out = np.empty(a.shape[:-2] + a.shape[:-3:-1])
  for idx in np.ndindex(a.shape[:-2]):
    m = a[idx]
    v = m.T / (np.abs(m).sum(0).max() * np.abs(m).sum(1).max())
    for _ in range(iters):
      v = 2 * v - v @ m @ v
    out[idx] = v
  return out


def np_soft_factors(q, k, scale=None, landmarks=49, newton_iters=20, segmentation="floor"):
  q, k = f64(q, k)
  k = repeat_kv(k, q.shape[2])
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
  q_land = np_segment_means(q, landmarks, segmentation)
  k_land = np_segment_means(k, landmarks, segmentation)
  return (np_gaussian(q, k_land, scale), np_gaussian(q_land, k_land, scale),
          np_gaussian(q_land, k, scale), newton_iters)


def np_soft_weights(q, k, scale=None, **opts):
  """SOFT (Lu et al. 2021): G(Q, K~) pinv_Newton(G(Q~, K~)) G(Q~, K)."""
  g_q, g_land, g_k, iters = np_soft_factors(q, k, scale, **opts)
  return g_q @ np_newton_pinv(g_land, iters) @ g_k


def np_weights(kind, q, k, **kw):
  return np_inline_weights(q, k, **kw) if kind == "inline" else np_soft_weights(q, k, **kw)


def np_attend(kind, q, k, v, **kw):
  w = np_weights(kind, q, k, **kw)
  return np.einsum("bhqk,bkhd->bqhd", w, repeat_kv(np.asarray(v, np.float64), w.shape[1]))


# ----------------------------------------------------------------------------------------------
# Inputs and the tolerance rule: tests/kind_cases.py. Float32 errors scale with the
# magnitude of the compared quantity (x cond); 16-bit outputs add half an ulp relative and,
# with 16-bit inputs, one of the magnitude. SOFT's cond is SOFT_COND: its Newton iterations
# add roundings that the landmark kernel's conditioning (condition numbers 60 to 31,000 on
# these N(0, 1) inputs) amplifies; measured over the 45 shape x seed x option cases of
# tests/test_linear_kinds.py, the output error was at most 102 float32 units of the
# magnitude (most 5-20), so 8 x 128 units leave about 10x room. A different segmentation of
# the landmarks moves the outputs by millions of units (test_soft_values_float32).
# ----------------------------------------------------------------------------------------------
SOFT_COND = 8.0


def segmentations_differ(shape, opts):
  """Whether np.array_split's segments differ clearly from floor(i L / m)'s for q or k: they
  agree when m divides L, and nearly so when most segments hold one token (m > L / 2)."""
  _, lq, lk, *_ = SHAPES[shape]
  m = opts.get("landmarks", 49)
  return any(length % m and 2 * m <= length for length in (lq, lk))


# ----------------------------------------------------------------------------------------------
# Registration, papers, capabilities.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,arxiv,options", [
    ("soft", "2110.11945", {"landmarks": 49, "newton_iters": 20}),
    ("inline", "2412.06590", {"feature_map": "identity", "local_kernel": None, "grid": None,
                              "leading_tokens": 0}),
])
def test_registered_with_paper_options_and_capabilities(kind, arxiv, options):
  mech = attention.KINDS[kind]
  assert arxiv in mech.paper and mech.options == options
  assert mech.attend_override is not None and mech.weights_override is not None
  assert not mech.takes_bias and mech.supports_causal == (kind == "inline")
  # Their own O(L) path under every impl but the fused kernels, which run sigmoid and softmax.
  assert kind not in kernel_capabilities.KINDS and kind not in attention.impl_kinds("pallas")
  impls = ("xla", "chunked", "split", "auto")
  assert api.kind_impls(kind) == impls
  q, k, v = make_inputs("gqa_odd", seed=1)
  outs = [attention.attend(q, k, v, kind=kind, impl=impl) for impl in impls]
  for out in outs[1:]:
    np.testing.assert_array_equal(outs[0], out)


# ----------------------------------------------------------------------------------------------
# InLine: values, weights, gradients.
# ----------------------------------------------------------------------------------------------
INLINE_CASES = [("gqa_odd", False, "none"), ("gqa_odd", True, "padding"),
                ("mha_square", True, "none"), ("mha_square", False, "padding"),
                ("mqa_long_q", True, "padding"), ("mqa_long_q", False, "none")]


@pytest.mark.parametrize("shape,causal,masking", INLINE_CASES)
@pytest.mark.parametrize("opts", INLINE_VARIANTS, ids=ids(INLINE_VARIANTS))
def test_inline_values_float32(opts, shape, causal, masking):
  q, k, v = make_inputs(shape)
  mask = padding_mask(shape) if masking == "padding" else None
  got = attention.attend(q, k, v, kind="inline", mask=mask, is_causal=causal, **opts)
  assert got.shape == q.shape[:3] + v.shape[3:] and got.dtype == q.dtype
  assert_close(got, np_attend("inline", q, k, v, mask=mask, is_causal=causal, **opts))


def test_inline_scale_is_attends():
  q, k, v = make_inputs("gqa_odd", seed=2)
  got = attention.attend(q, k, v, kind="inline", scale=0.7, is_causal=True)
  assert_close(got, np_attend("inline", q, k, v, scale=0.7, is_causal=True))


@pytest.mark.parametrize("opts", INLINE_VARIANTS, ids=ids(INLINE_VARIANTS))
def test_inline_values_bfloat16(opts):
  q, k, v = make_inputs("gqa_odd", seed=4, dtype=jnp.bfloat16)
  mask = padding_mask("gqa_odd")
  got = attention.attend(q, k, v, kind="inline", mask=mask, is_causal=True, **opts)
  assert got.dtype == jnp.bfloat16
  # The reference sees the same bf16-rounded inputs, in float64.
  want = np_attend("inline", q, k, v, mask=mask, is_causal=True, **opts)
  assert_close(got.astype(jnp.float32), want, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", INLINE_VARIANTS, ids=ids(INLINE_VARIANTS))
def test_inline_weights_rows_sum_to_one_and_compose_to_attend(opts, causal):
  shape = "gqa_odd"
  q, k, v = make_inputs(shape, seed=7)
  mask = padding_mask(shape)
  w = attention.weights(q, k, kind="inline", mask=mask, is_causal=causal, **opts)
  assert w.shape == (2, 4, 37, 53) and w.dtype == jnp.float32
  assert_close(w, np_inline_weights(q, k, mask=mask, is_causal=causal, **opts))
  w = np.asarray(w)
  valid = np_valid(*w.shape, np.asarray(mask), causal)
  live = valid.any(-1)
  assert live.all()
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=16 * F32_EPS)
  assert np.all(w[~valid] == 0.0)
  if opts.get("feature_map", "identity") in ("identity", "leakyrelu"):
    assert np.any(w < 0)  # not a convex combination: InLine's weights may be negative
  composed = attention.apply_weights(jnp.asarray(w), v, kind="inline")
  direct = attention.attend(q, k, v, kind="inline", mask=mask, is_causal=causal, **opts)
  assert_close(direct, composed)


def test_inline_by_hand_zero_queries_average_the_visible_values():
  """q = 0 makes every a_ij 0, so the weights are 1/N: the mean of the visible values."""
  _, k, v = make_inputs("mqa_long_q", seed=8)
  q = jnp.zeros((1, 21, 3, 8))
  mask = jnp.asarray(np.arange(13) != 4)[None, None, None, :]
  out = np.asarray(attention.attend(q, k, v, kind="inline", mask=mask, is_causal=True))
  v64, keep = np.asarray(v, np.float64)[0, :, 0], np.asarray(mask)[0, 0, 0]
  for i in range(21):
    seen = [j for j in range(13) if keep[j] and j <= i - 8]
    want = v64[seen].mean(0) if seen else np.zeros(4)
    np.testing.assert_allclose(out[0, i], np.broadcast_to(want, (3, 4)), rtol=0, atol=1e-6)


def test_inline_is_injective_where_linear_attention_is_not():
  """Scaling a query leaves linear attention's normalised weights unchanged (Han et al.'s
  point); InLine's change, and by a*(c - 1)/N around the mean."""
  q, k, _ = make_inputs("mha_square", seed=9)
  lin = [np.asarray(attention.weights(c * (jnp.maximum(q, 0) + 0.1), k, kind="linear",
                                      feature_map="relu")) for c in (1.0, 3.0)]
  np.testing.assert_allclose(lin[0], lin[1], rtol=1e-5, atol=1e-7)
  inl = [np.asarray(attention.weights(c * q, k, kind="inline")) for c in (1.0, 3.0)]
  assert np.max(np.abs(inl[0] - inl[1])) > 1e-2
  # w(c q) - 1/N = c (w(q) - 1/N): the weights move linearly away from uniform.
  np.testing.assert_allclose(inl[1] - 1 / 16, 3.0 * (inl[0] - 1 / 16), rtol=0, atol=1e-6)


def check_gradients(kind, q, k, v, opts, mask=None, causal=False, wrong=None, cond=1.0):
  """JAX's VJP in q, k, v against central differences of the float64 reference; the same
  tolerance rejects the reference with the keyword arguments `wrong` changed."""
  rng = np.random.default_rng(12)
  cot = rng.normal(size=q.shape[:3] + v.shape[3:])
  x64 = f64(q, k, v)
  dirs = [rng.normal(size=x.shape) for x in x64]
  common = dict(mask=mask, is_causal=causal) if kind == "inline" else {}

  def loss(q, k, v):
    return jnp.sum(attention.attend(q, k, v, kind=kind, **common, **opts) * cot)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  terms = [np.asarray(g, np.float64) * d for g, d in zip(grads, dirs)]
  got = sum(float(np.sum(t)) for t in terms)

  def fd(**kw):
    ref = lambda *a: float(np.sum(np_attend(kind, *a, **kw, **opts) * cot))
    return directional_fd(ref, x64, dirs)

  tol = tolerance(None, magnitude=sum(float(np.sum(np.abs(t))) for t in terms), cond=cond)
  np.testing.assert_allclose(got, fd(**common), **tol)
  if wrong is not None:
    bad = fd(**{**common, **wrong})
    assert abs(got - bad) > tol["atol"] + tol["rtol"] * abs(bad), (got, bad, tol)


@pytest.mark.parametrize("shape,causal", [("mqa_long_q", True), ("gqa_odd", False),
                                          ("gqa_odd", True)])
@pytest.mark.parametrize("opts", INLINE_VARIANTS, ids=ids(INLINE_VARIANTS))
def test_inline_gradients_against_float64_finite_differences(opts, shape, causal):
  q, k, v = make_inputs(shape, seed=11)
  mask = padding_mask(shape)
  check_gradients("inline", q, k, v, opts, mask=mask, causal=causal,
                  wrong={"mask": mask & off_by_one_mask(shape)})


def test_inline_bfloat16_gradients_follow_float32():
  q, k, v = make_inputs("gqa_odd", seed=11, dtype=jnp.bfloat16)
  mask = padding_mask("gqa_odd")
  cot = jnp.asarray(np.random.default_rng(12).normal(size=q.shape[:3] + v.shape[3:]),
                    jnp.float32)

  def grads(q, k, v):
    f = lambda q, k, v: jnp.sum(cot * attention.attend(
        q, k, v, kind="inline", mask=mask, is_causal=True).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  want = grads(*(x.astype(jnp.float32) for x in (q, k, v)))
  for name, got, ref in zip("qkv", grads(q, k, v), want):
    assert got.dtype == jnp.bfloat16, name
    # Computed in float32 from the bf16 inputs; only the output and gradients are rounded.
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0,
                               atol=2e-2 * float(jnp.max(jnp.abs(ref))), err_msg=name)


def test_inline_rows_without_a_visible_key_give_zeros_and_finite_gradients():
  q, k, v = make_inputs("mqa_long_q", seed=13)  # Lq = 21 > Lk = 13: causal rows 0-7 see none
  mask = jnp.asarray(np.arange(13) >= 2)[None, None, None, :]  # and rows 8-9 see only padding
  f = lambda q, k, v: attention.attend(q, k, v, kind="inline", mask=mask, is_causal=True)
  out = np.asarray(f(q, k, v))
  assert np.all(out[:, :10] == 0.0) and np.all(out[:, 10:] != 0.0)
  w = np.asarray(attention.weights(q, k, kind="inline", mask=mask, is_causal=True))
  assert np.all(w[:, :, :10] == 0.0)
  np.testing.assert_allclose(w[:, :, 10:].sum(-1), 1.0, rtol=0, atol=8 * F32_EPS)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[:, :10] == 0.0)  # a dead query row gets no gradient


def test_inline_single_key_gets_weight_one():
  rng = np.random.default_rng(19)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 5, 4, 8), (2, 1, 2, 8), (2, 1, 2, 4)))
  every_row = np.repeat(np.broadcast_to(np.asarray(v), (2, 5, 2, 4)), 2, axis=2)
  out = attention.attend(q, k, v, kind="inline")
  np.testing.assert_allclose(out, every_row, rtol=0, atol=1e-6)
  # Causal, bottom-right: only the last query sees the key.
  out = np.asarray(attention.attend(q, k, v, kind="inline", is_causal=True))
  assert np.all(out[:, :4] == 0.0)
  np.testing.assert_allclose(out[:, 4], every_row[:, 4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(2, 4, 37, 53), (1, 1, 37, 53), (2, 4, 1, 53)])
def test_inline_refuses_all_but_key_padding_masks_and_any_bias(mask_shape):
  q, k, v = make_inputs("gqa_odd")
  with pytest.raises(ValueError, match=re.escape(
      f"kind='inline' supports only key-padding masks of shape [B or 1, 1, 1, Lk] (a general "
      f"[.., Lq, Lk] mask would need the [Lq, Lk] matrix it avoids); got mask shape "
      f"{mask_shape}")):
    attention.attend(q, k, v, kind="inline", mask=jnp.ones(mask_shape, bool))
  with pytest.raises(ValueError, match=r"kind='inline' never builds the \[Lq, Lk\] scores an "
                                       r"additive bias would enter, so it takes no bias"):
    attention.attend(q, k, v, kind="inline", bias=jnp.zeros((1, 1, 1, 53)))


# ----------------------------------------------------------------------------------------------
# SOFT: values, the Nystrom limit, gradients.
# ----------------------------------------------------------------------------------------------
SOFT_SHAPES = ["gqa_odd", "mha_square", "mqa_long_q"]


@pytest.mark.parametrize("shape", SOFT_SHAPES)
@pytest.mark.parametrize("opts", SOFT_VARIANTS, ids=ids(SOFT_VARIANTS))
def test_soft_values_float32(opts, shape):
  q, k, v = make_inputs(shape, seed=3)
  got = attention.attend(q, k, v, kind="soft", **opts)
  assert got.shape == q.shape[:3] + v.shape[3:] and got.dtype == q.dtype
  assert_close(got, np_attend("soft", q, k, v, **opts), cond=SOFT_COND)
  if segmentations_differ(shape, opts):
    # The same tolerance rejects landmarks from other segments (longer ones first).
    wrong = np_attend("soft", q, k, v, segmentation="array_split", **opts)
    with pytest.raises(AssertionError):
      assert_close(got, wrong, cond=SOFT_COND)


@pytest.mark.parametrize("opts", SOFT_VARIANTS, ids=ids(SOFT_VARIANTS))
def test_soft_values_bfloat16(opts):
  q, k, v = make_inputs("gqa_odd", seed=4, dtype=jnp.bfloat16)
  got = attention.attend(q, k, v, kind="soft", **opts)
  assert got.dtype == jnp.bfloat16
  want = np_attend("soft", q, k, v, **opts)
  assert_close(got.astype(jnp.float32), want, out_dtype=jnp.bfloat16,
               cond=SOFT_COND)


def test_soft_weights_match_the_reference_and_compose_to_attend():
  q, k, v = make_inputs("gqa_odd", seed=5)
  opts = {"landmarks": 8}
  w = attention.weights(q, k, kind="soft", **opts)
  assert w.shape == (2, 4, 37, 53) and w.dtype == jnp.float32
  cond = SOFT_COND
  assert_close(w, np_soft_weights(q, k, **opts), cond=cond)
  assert_close(attention.apply_weights(w, v, kind="soft"),
               attention.attend(q, k, v, kind="soft", **opts), cond=cond)


def test_soft_reference_newton_is_the_pseudo_inverse():
  """The float64 reference's iteration converges to numpy.linalg.pinv, square or not."""
  rng = np.random.default_rng(6)
  for shape in ((6, 6), (5, 8), (8, 5)):
    a = rng.normal(size=(2,) + shape) + 2 * np.eye(*shape)
    np.testing.assert_allclose(np_newton_pinv(a, 60), np.linalg.pinv(a), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SOFT_SHAPES)
def test_soft_is_the_exact_gaussian_kind_when_every_token_is_a_landmark(shape):
  """m = L: G(Q, K) pinv(G(Q, K)) G(Q, K) = G(Q, K), to float32 rounding where the kernel is
  well conditioned: keys near the queries (Lq >= Lk) keep it diagonal-dominant, as SOFT's
  shared queries and keys (k = q) do; the wide 37 x 53 kernel of independent tokens is well
  conditioned too."""
  q, k, v = make_inputs(shape, seed=14)
  b, lq, lk, h, hkv, *_ = SHAPES[shape]
  k = q[:, lq - lk:, ::h // hkv] + 0.1 * k if lq >= lk else k
  length = max(lq, lk)
  exact = attention.weights(q, k, kind="gaussian")
  for landmarks in (length, length + 1, 1000):
    w = attention.weights(q, k, kind="soft", landmarks=landmarks, newton_iters=30)
    np.testing.assert_allclose(w, exact, rtol=0, atol=64 * F32_EPS)
  np.testing.assert_allclose(attention.attend(q, k, v, kind="soft", landmarks=length),
                             attention.attend(q, k, v, kind="gaussian"), rtol=0,
                             atol=64 * F32_EPS * float(jnp.max(jnp.abs(v))))
  # More landmarks than tokens are clamped to the length: the same computation.
  np.testing.assert_array_equal(attention.attend(q, k, v, kind="soft", landmarks=length),
                                attention.attend(q, k, v, kind="soft", landmarks=10 * length))


def smooth_tokens(b, length, heads, dim, seed):
  """Tokens along a smooth closed curve (a few Fourier modes, mapped at random) plus a little
  noise: neighbours are alike, as neighbouring image patches are, so segment means are
  representative landmarks."""
  rng = np.random.default_rng(seed)
  t = 2 * np.pi * np.arange(length) / length
  modes = np.stack([f(j * t) for j in (1, 2) for f in (np.cos, np.sin)], -1)  # [L, 4]
  x = np.einsum("lf,bhfd->blhd", modes, rng.normal(size=(b, heads, 4, dim)))
  return jnp.asarray(x + 0.05 * rng.normal(size=x.shape), jnp.float32)


@pytest.mark.parametrize("shared", [True, False], ids=["k=q", "k!=q"])
def test_soft_error_against_the_exact_kernel_falls_as_landmarks_reach_the_length(shared):
  length = 53
  q = smooth_tokens(2, length, 4, 16, seed=1)
  k = q[:, :, ::2] if shared else smooth_tokens(2, length, 2, 16, seed=2)
  exact = np.asarray(attention.weights(q, k, kind="gaussian"), np.float64)
  errors = [float(np.max(np.abs(np.asarray(attention.weights(
      q, k, kind="soft", landmarks=m, newton_iters=30)) - exact))) for m in (4, 16, 27, 53)]
  assert errors[0] > 0.2 and all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-3 * np.max(exact), errors


@pytest.mark.parametrize("shape", ["gqa_odd", "mqa_long_q"])
@pytest.mark.parametrize("opts", SOFT_VARIANTS, ids=ids(SOFT_VARIANTS))
def test_soft_gradients_against_float64_finite_differences(opts, shape):
  q, k, v = make_inputs(shape, seed=15)
  check_gradients("soft", q, k, v, opts, cond=SOFT_COND, wrong={"segmentation": "array_split"}
                  if segmentations_differ(shape, opts) else None)


def test_soft_refuses_causal_masks_and_bias_naming_the_exact_kind():
  q, k, v = make_inputs("gqa_odd")
  with pytest.raises(ValueError, match=r"kind='soft' is not causal \(every output mixes the "
                                       r"whole sequence\), so it takes no is_causal=True.*"
                                       r"kind='gaussian'"):
    attention.attend(q, k, v, kind="soft", is_causal=True)
  with pytest.raises(ValueError, match=r"kind='soft' takes no mask \(got shape \(2, 1, 1, 53\)"
                                       r"\).*Use kind='gaussian' \(the exact kernel\)"):
    attention.weights(q, k, kind="soft", mask=jnp.ones((2, 1, 1, 53), bool))
  with pytest.raises(ValueError, match=r"kind='soft' never builds the \[Lq, Lk\] scores"):
    attention.attend(q, k, v, kind="soft", bias=jnp.zeros((1, 1, 1, 53)))
  # The modules refuse too when called directly.
  mech = attention.KINDS["soft"]
  with pytest.raises(ValueError, match=r"kind='soft' takes no mask, bias or is_causal=True"):
    soft.attend(q, k, v, mech, mech.options, mask=None, bias=None, is_causal=True, scale=1.0)


def test_segment_pooling_covers_every_token_once_in_near_equal_segments():
  for length in (1, 5, 16, 37, 53):
    for landmarks in (1, 3, 8, 16, 53, 100):
      pool = soft.segment_pooling(length, landmarks)
      m = min(landmarks, length)
      assert pool.shape == (m, length)
      np.testing.assert_allclose(pool.sum(1), 1.0, rtol=1e-6)
      members = pool > 0
      np.testing.assert_array_equal(members.sum(0), 1)  # each token in exactly one segment
      sizes = members.sum(1)
      assert sizes.max() - sizes.min() <= 1
      first = np.argmax(members, axis=1)
      assert np.all(np.diff(first) > 0)  # contiguous, in order
      if m == length:
        np.testing.assert_array_equal(pool, np.eye(length))


def test_newton_pinv_matches_numpy_on_well_conditioned_matrices():
  rng = np.random.default_rng(16)
  for shape in ((7, 7), (4, 9), (9, 4)):
    a = rng.normal(size=(3,) + shape) + 3 * np.eye(*shape)
    got = soft.newton_pinv(jnp.asarray(a, jnp.float32), 30)
    want = np.linalg.pinv(a)
    cond = float(np.max(np.linalg.cond(a)))
    np.testing.assert_allclose(got, want, **tolerance(want, cond=cond))
  # An all-zero matrix (every kernel entry underflowed) gives zeros, not NaN.
  np.testing.assert_array_equal(soft.newton_pinv(jnp.zeros((2, 3, 3)), 5), 0.0)


# ----------------------------------------------------------------------------------------------
# Both: O(L) memory, jit/vmap, options checked at config time, the models by name.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,causal", [("inline", False), ("inline", True), ("soft", False)])
def test_memory_is_linear_in_length(kind, causal):
  """Compiled temporaries grow O(L), far below one [L, L] float32 matrix."""
  def temp_bytes(length):
    q = jnp.zeros((1, length, 1, 16))
    f = jax.jit(lambda q, k, v: attention.attend(q, k, v, kind=kind, is_causal=causal))
    mem = f.lower(q, q, q).compile().memory_analysis()
    if mem is None:
      pytest.skip("this jaxlib reports no memory analysis")
    return mem.temp_size_in_bytes

  small, large = temp_bytes(1024), temp_bytes(2048)
  assert large < 2048 * 2048 * 4 / 2, large
  assert large <= 2.5 * max(small, 1), (small, large)


@pytest.mark.parametrize("kind,opts", [("inline", {"is_causal": True}), ("soft", {})])
def test_under_jit_and_vmap(kind, opts):
  q, k, v = make_inputs("mha_square", seed=21)
  f = lambda q: attention.attend(q, k, v, kind=kind, **opts)
  # XLA fuses the jitted and vmapped programs differently: equal up to float32 rounding.
  cond = SOFT_COND if kind == "soft" else 1.0
  want = f(q)
  assert_close(jax.jit(f)(q), want, cond=cond)
  stacked = jax.vmap(f)(jnp.stack([q, 2 * q]))
  assert_close(stacked[0], want, cond=cond)
  assert_close(stacked[1], f(2 * q), cond=cond)


@pytest.mark.parametrize("kind,options,pattern", [
    ("soft", {"landmarks": 0}, r"kind='soft': option landmarks must be a positive int; got 0"),
    ("soft", {"landmarks": -4}, r"option landmarks must be a positive int; got -4"),
    ("soft", {"landmarks": 8.0}, r"option landmarks must be a positive int; got 8\.0"),
    ("soft", {"landmarks": True}, r"option landmarks must be a positive int; got True"),
    ("soft", {"landmarks": None}, r"option landmarks must be a positive int; got None"),
    ("soft", {"newton_iters": 0}, r"kind='soft': option newton_iters must be a positive int; "
                                  r"got 0"),
    ("soft", {"newton_iters": "20"}, r"option newton_iters must be a positive int; got '20'"),
    ("soft", {"num_landmarks": 8}, r"kind='soft' with impl='xla' does not take option\(s\) "
                                   r"\['num_landmarks'\]; the kind accepts \['landmarks', "
                                   r"'newton_iters'\]"),
    ("inline", {"feature_map": "elu+1"}, r"kind='inline': option feature_map='elu\+1' is not one "
                                         r"of \['exp', 'identity', 'leakyrelu', 'relu'\]; "
                                         r"'identity' is the official code's default"),
    ("inline", {"landmarks": 8}, r"kind='inline' with impl='xla' does not take option\(s\) "
                                 r"\['landmarks'\]; the kind accepts \['feature_map', 'grid', "
                                 r"'leading_tokens', 'local_kernel'\]"),
    ("inline", {"grid": (4, 4)}, r"kind='inline': grid=\(4, 4\) and leading_tokens=0 place the "
                                 r"local term, which needs local_kernel too"),
])
def test_bad_options_are_rejected_at_config_time_and_call_time_alike(kind, options, pattern):
  with pytest.raises(ValueError, match=pattern) as config_time:
    attention.check_options(kind, "xla", **options)
  q, k, v = make_inputs("mha_square")
  with pytest.raises(ValueError) as call_time:
    attention.attend(q, k, v, kind=kind, **options)
  assert str(config_time.value) == str(call_time.value)


@pytest.mark.parametrize("kind", ["soft", "inline"])
def test_pallas_refuses_naming_the_impls_that_work(kind):
  with pytest.raises(ValueError, match=re.escape(
      f"impl='pallas' supports kinds {list(attention.impl_kinds('pallas'))}; got kind="
      f"{kind!r}. Use impl='xla' or 'chunked' or 'split' for it.")):
    attention.check_options(kind, "pallas")


def vit_cfg(**overrides):
  fields = dict(width=16, depth=1, num_heads=4, mlp_dim=32, head_zero_init=False)
  return ViTConfig.from_variant("mu/2", num_classes=5, image_size=8, **{**fields, **overrides})


def lm_cfg(**overrides):
  fields = dict(vocab_size=11, width=16, depth=1, num_heads=4, max_len=16)
  return TransformerConfig(**{**fields, **overrides})


def test_model_configs_check_the_options_causality_and_alibi():
  assert vit_cfg(attention="soft", attention_options={"landmarks": 4}).attention == "soft"
  assert lm_cfg(attention="inline", attention_options={"feature_map": "relu"}).causal
  assert lm_cfg(attention="soft", causal=False, num_classes=3).attention == "soft"
  with pytest.raises(ValueError, match=r"attention_options=.*option landmarks must be a "
                                       r"positive int; got 0"):
    vit_cfg(attention="soft", attention_options={"landmarks": 0})
  with pytest.raises(ValueError, match=r"attention_options=.*feature_map='elu\+1' is not one of"):
    vit_cfg(attention="inline", attention_options={"feature_map": "elu+1"})
  with pytest.raises(ValueError, match=r"TransformerConfig\.attention='soft' is invalid: this "
                                       r"kind is not causal.*causal=False"):
    lm_cfg(attention="soft")
  for kind in ("soft", "inline"):
    with pytest.raises(ValueError, match=rf"positions='alibi'.*attention='{kind}' takes no "
                                         r"additive logits bias"):
      lm_cfg(attention=kind, causal=False, num_classes=3, positions="alibi")


@pytest.mark.parametrize("kind,opts", [("soft", {}), ("soft", {"landmarks": 4}),
                                       ("inline", {})])
def test_in_the_vit_by_name_with_gradients(kind, opts):
  # 16 tokens: soft's default 49 landmarks are clamped to them (exact); 4 approximate.
  model = ViT(vit_cfg(attention=kind, attention_options=opts, qk_norm="rms"), rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(23).normal(size=(2, 8, 8, 3)), jnp.float32)
  logits = model(images, deterministic=True)
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
  grads = nnx.grad(lambda m: jnp.sum(m(images, deterministic=True) ** 2))(model)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


# ----------------------------------------------------------------------------------------------
# InLine's local term: a 3x3 depthwise convolution of v over the image grid (option local_kernel).
# ----------------------------------------------------------------------------------------------
def np_local_term(v, kernel, grid, leading, num_heads, mask=None):
  """sum over the 3x3 neighbourhood (zero outside the grid) of kernel[a, c] * v at (i + a - 1,
  j + c - 1), per (example, head, channel), by explicit loops; 0 on the leading tokens."""
  v = repeat_kv(np.asarray(v, np.float64), num_heads)  # [B, L, H, Dv]
  if mask is not None:
    v = v * np.asarray(mask, np.float64)[:, 0, 0, :, None, None]
  b, length, h, dv = v.shape
  ker = np.asarray(kernel, np.float64).reshape(b, h, dv, 3, 3)
  gh, gw = grid
  out = np.zeros_like(v)
  for i, j, a, c in np.ndindex(gh, gw, 3, 3):
    y, x = i + a - 1, j + c - 1
    if 0 <= y < gh and 0 <= x < gw:
      out[:, leading + i * gw + j] += ker[..., a, c] * v[:, leading + y * gw + x]
  return out


# name: (B, H, Hkv, D, Dv, grid, leading tokens)
LOCAL_CASES = {
    "gqa_3x5_cls": (2, 4, 2, 8, 6, (3, 5), 1),
    "mha_3x5": (1, 2, 2, 8, 8, (3, 5), 0),
    "mqa_4x3_cls": (2, 3, 1, 4, 4, (4, 3), 1),
}


def local_inputs(case, seed=0, dtype=jnp.float32, flat_kernel=False):
  b, h, hkv, d, dv, (gh, gw), leading = LOCAL_CASES[case]
  n = leading + gh * gw
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype)
             for s in ((b, n, h, d), (b, n, hkv, d), (b, n, hkv, dv)))
  kernel = rng.normal(size=(b, h * dv, 3, 3) if flat_kernel else (b, h, dv, 3, 3))
  opts = {"grid": (gh, gw), "leading_tokens": leading}
  return q, k, v, jnp.asarray(kernel, dtype), opts


def np_attend_local(q, k, v, kernel, grid, leading_tokens, mask=None):
  return (np_attend("inline", q, k, v, mask=mask)
          + np_local_term(v, kernel, grid, leading_tokens, q.shape[2], mask=mask))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("flat_kernel", [False, True])
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_inline_local_term_values_float32(case, flat_kernel, masked):
  q, k, v, kernel, opts = local_inputs(case, flat_kernel=flat_kernel)
  mask = None
  if masked:
    mask = jnp.asarray(np.arange(q.shape[1]) != 4)[None, None, None, :]
  got = attention.attend(q, k, v, kind="inline", mask=mask, local_kernel=kernel, **opts)
  assert_close(got, np_attend_local(q, k, v, kernel, mask=mask, **opts))
  # The reference without the local term is far off: the test sees the term.
  assert not np.allclose(np.asarray(got), np_attend("inline", q, k, v, mask=mask), atol=1e-2)


def test_inline_local_term_values_bfloat16():
  q, k, v, kernel, opts = local_inputs("gqa_3x5_cls", dtype=jnp.bfloat16)
  got = attention.attend(q, k, v, kind="inline", local_kernel=kernel, **opts)
  assert got.dtype == jnp.bfloat16
  # Computed in float32 from the bf16 inputs; only the output is rounded.
  assert_close(got, np_attend_local(q, k, v, kernel, **opts), out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_inline_local_term_gradients_against_float64_finite_differences(case):
  q, k, v, kernel, opts = local_inputs(case, seed=3)
  rng = np.random.default_rng(4)
  cot = rng.normal(size=q.shape[:3] + v.shape[3:])
  args = (q, k, v, kernel)
  loss = lambda q, k, v, w: jnp.sum(cot * attention.attend(
      q, k, v, kind="inline", local_kernel=w, **opts))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  dirs = [rng.normal(size=x.shape) for x in args]
  terms = [np.asarray(g, np.float64) * d for g, d in zip(grads, dirs)]
  got = sum(float(np.sum(t)) for t in terms)
  ref = lambda *a: float(np.sum(cot * np_attend_local(*a, **opts)))
  want = directional_fd(ref, f64(*args), dirs)
  np.testing.assert_allclose(got, want, **tolerance(
      None, magnitude=sum(float(np.sum(np.abs(t))) for t in terms)))
  # The kernel's gradient alone: d loss / d kernel[b, h, e, a, c] = sum over the grid of cot *
  # the shifted v, which the loop reference gives by finite differences too.
  only_kernel = [np.zeros_like(d) for d in dirs[:3]] + [dirs[3]]
  np.testing.assert_allclose(float(np.sum(terms[3])),
                             directional_fd(ref, f64(*args), only_kernel),
                             **tolerance(None, magnitude=float(np.sum(np.abs(terms[3])))))


def test_inline_local_term_bfloat16_gradients_follow_float32():
  q, k, v, kernel, opts = local_inputs("gqa_3x5_cls", seed=3, dtype=jnp.bfloat16)
  cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape[:3] + v.shape[3:]), jnp.float32)

  def grads(*args):
    f = lambda q, k, v, w: jnp.sum(cot * attention.attend(
        q, k, v, kind="inline", local_kernel=w, **opts).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2, 3))(*args)

  want = grads(*(x.astype(jnp.float32) for x in (q, k, v, kernel)))
  for name, got, ref in zip(("q", "k", "v", "kernel"), grads(q, k, v, kernel), want):
    assert got.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0,
                               atol=2e-2 * float(jnp.max(jnp.abs(ref))), err_msg=name)


def test_inline_local_term_refusals_name_the_option_and_the_fix():
  q, k, v, kernel, opts = local_inputs("gqa_3x5_cls")
  call = lambda **kw: attention.attend(q, k, v, kind="inline", **{  # noqa: E731
      "local_kernel": kernel, **opts, **kw})
  with pytest.raises(ValueError, match=r"local_kernel .* is bidirectional, so it takes no "
                     r"is_causal=True"):
    call(is_causal=True)
  with pytest.raises(ValueError, match=re.escape(
      "local_kernel must be [batch, heads, value_dim, 3, 3] = [2, 4, 6, 3, 3] or [batch, "
      "heads * value_dim, 3, 3] = [2, 24, 3, 3]; got [2, 4, 6, 9]")):
    call(local_kernel=kernel.reshape(2, 4, 6, 9))
  with pytest.raises(ValueError, match=re.escape(
      "leading_tokens + grid height * width = 0 + 3*5 = 15 tokens (q and k alike); got "
      "q_length=16, kv_length=16")):
    call(leading_tokens=0)
  with pytest.raises(ValueError, match=r"local_kernel needs grid=\(height, width\)"):
    call(grid=(3, 0))
  with pytest.raises(ValueError, match=r"leading_tokens .* must be an int >= 0; got -1"):
    call(leading_tokens=-1)
  with pytest.raises(ValueError, match=r"grid=\(3, 5\) and leading_tokens=1 place the local "
                     r"term, which needs local_kernel too"):
    call(local_kernel=None)
  with pytest.raises(ValueError, match=r"weights has no local term"):
    attention.weights(q, k, kind="inline", local_kernel=jnp.zeros((2, 4, 8, 3, 3)), **opts)
  state = attention.init_decode_state("inline", 2, 2, 8, 6)
  with pytest.raises(ValueError, match=r"local_kernel .* has no causal decoding"):
    attention.attend_with_state(q[:, :1], k[:, :1], v[:, :1], state, kind="inline",
                                local_kernel=jnp.zeros((2, 4, 6, 3, 3)), grid=(1, 1))


def local_vit_cfg(**overrides):
  # 6x10 images, patch 2: a 3x5 grid; GQA. Depth 2: with one block a CLS-token readout would
  # never see the local term (it adds to the grid tokens only).
  fields = dict(width=16, depth=2, num_heads=4, mlp_dim=32, head_zero_init=False, num_kv_heads=2)
  return ViTConfig.from_variant("mu/2", num_classes=5, image_size=(6, 10), attention="inline",
                                **{**fields, **overrides})


def np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_inline_local_config_is_refused_off_inline_and_off_the_image_grid():
  assert local_vit_cfg(inline_local=True).token_grid == ((3, 5), 1)
  assert local_vit_cfg(inline_local=True, pool="gap").token_grid == ((3, 5), 0)
  with pytest.raises(ValueError, match=r"ViTConfig\.inline_local=True is invalid: the local "
                                       r"term is InLine's \(attention='inline'\); got "
                                       r"attention='softmax'"):
    vit_cfg(attention="softmax", inline_local=True)
  with pytest.raises(ValueError, match=r"TransformerConfig\.inline_local=True is invalid: the "
                                       r"local term convolves over an image grid.*causal"):
    lm_cfg(attention="inline", inline_local=True)
  with pytest.raises(ValueError, match=r"grid=\(3, 5\) and leading_tokens=0 place the local "
                                       r"term, which needs local_kernel too"):
    local_vit_cfg(inline_local=True, attention_options={"grid": (3, 5)})
  with pytest.raises(ValueError, match=r"ViTConfig\.inline_local=1 is invalid: expected True or "
                                       r"False"):
    local_vit_cfg(inline_local=1)


@pytest.mark.parametrize("pool", ["tok", "gap"])
def test_inline_local_in_the_vit_starts_as_without_and_trains_its_mlp(pool):
  images = jnp.asarray(np.random.default_rng(23).normal(size=(2, 6, 10, 3)), jnp.float32)
  plain = ViT(local_vit_cfg(pool=pool), rngs=nnx.Rngs(0))
  model = ViT(local_vit_cfg(pool=pool, inline_local=True), rngs=nnx.Rngs(0))
  local = model.encoder.blocks[0].attn.local
  assert local.w_in.shape == (4, 4, 4) and local.w_out.shape == (4, 4, 4, 9)
  nnx.update(model, nnx.state(plain))  # the shared parameters alike; the local MLP kept
  run = lambda m: np.asarray(m(images, deterministic=True))  # noqa: E731
  # The last layer starts at zero: the local term is 0, so the model is the one without.
  np.testing.assert_array_equal(run(model), run(plain))

  def loss(m):
    return jnp.sum(m(images, deterministic=True) ** 2)

  grads = nnx.grad(loss)(model).encoder.blocks[0].attn.local
  assert np.any(np.asarray(grads.w_out[...]) != 0) and np.any(np.asarray(grads.b_out[...]) != 0)
  rng = np.random.default_rng(5)
  for p in (local.w_out, local.b_out):
    p[...] = jnp.asarray(0.3 * rng.normal(size=p.shape), jnp.float32)
  assert not np.allclose(run(model), run(plain), atol=1e-4)
  grads = nnx.grad(loss)(model).encoder.blocks[0].attn.local
  for name in ("w_in", "b_in", "w_out", "b_out"):
    g = np.asarray(getattr(grads, name)[...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  # The weights path (inspection) adds the same local term.
  logits, _ = model(images, deterministic=True, return_attention_weights=True)
  np.testing.assert_allclose(np.asarray(logits), run(model), rtol=1e-5, atol=1e-5)


def test_inline_local_kernels_follow_the_papers_mlp():
  """mean token -> per-head 1x1 conv -> exact GELU -> per-head 1x1 conv to 9 taps per channel,
  the taps read row-major as [3, 3] (torch's reshape), in float64."""
  model = ViT(local_vit_cfg(inline_local=True), rngs=nnx.Rngs(1))
  local = model.encoder.blocks[0].attn.local
  rng = np.random.default_rng(6)
  for p in (local.w_out, local.b_out):
    p[...] = jnp.asarray(rng.normal(size=p.shape), jnp.float32)
  x = rng.normal(size=(2, 16, 16))
  got = np.asarray(local(jnp.asarray(x, jnp.float32)))
  w_in, b_in, w_out, b_out = (np.asarray(p[...], np.float64)
                              for p in (local.w_in, local.b_in, local.w_out, local.b_out))
  want = np.zeros((2, 4, 4, 3, 3))
  for b, h in np.ndindex(2, 4):
    group = x[b].mean(axis=0)[4 * h:4 * h + 4]  # the head's channels of the mean token
    hidden = np_gelu(group @ w_in[h] + b_in[h])
    out = np.einsum("f,fet->et", hidden, w_out[h]) + b_out[h]  # [channel, 9 taps]
    want[b, h] = out.reshape(4, 3, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # torch's default init of the first layer: uniform within +-1/sqrt(head_dim).
  assert np.all(np.abs(w_in) <= 0.5) and np.all(np.abs(b_in) <= 0.5) and w_in.std() > 0.2
