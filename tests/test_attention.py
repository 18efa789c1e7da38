"""attnlab.attention against an independent float64 NumPy reference.

The reference below is written from the papers' formulas with plain NumPy
broadcasting (materialised [B, H, Lq, Lk], GQA by repeating kv heads); it never
calls back into the library.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import attention
from attnlab import kernels
from attnlab.attention import api, blockwise
from attnlab.kernels import capabilities

# The input-dependent sparse kinds (whole-row maps; top-k also streamed by chunked) have their
# own reference and tests in tests/test_sparse_kinds.py, SOFT's and InLine's O(L) forms theirs
# in tests/test_linear_kinds.py; every other registered kind is tested here.
SPARSE_KINDS = ("entmax", "sparsemax", "topk")
OWN_REFERENCE_KINDS = SPARSE_KINDS + ("inline", "soft")
KINDS = sorted(set(attention.KINDS) - set(OWN_REFERENCE_KINDS))
# Options that make each kind's non-default path visible too.
KIND_OPTIONS = {
    "softmax": {}, "sigmoid": {}, "relu": {}, "linear": {}, "polynomial": {},
    "softplus": {}, "gaussian": {}, "local": {"window": 5, "dilation": 2},
}
EXTRA_VARIANTS = [
    ("sigmoid", {"sigmoid_bias": 0.5}),
    ("relu", {"relu_normalization": "count"}),
    ("relu", {"relu_normalization": None}),
    ("linear", {"feature_map": "relu"}),
    ("polynomial", {"degree": 2}),
    ("softplus", {"length_scale": False, "power": 2.0}),
    ("local", {"window": 3, "base": "sigmoid"}),
]


# ----------------------------------------------------------------------------------------------
# Independent NumPy float64 reference.
# ----------------------------------------------------------------------------------------------
def np_sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def np_softplus(x):
  return np.logaddexp(0.0, x)


def np_phi(x, feature_map):
  return np.where(x > 0, x + 1.0, np.exp(x)) if feature_map == "elu+1" else np.maximum(x, 0.0)


def np_valid(b, h, lq, lk, mask, is_causal, kind, opts):
  valid = np.ones((b, h, lq, lk), bool)
  i = np.arange(lq)[:, None] + (lk - lq)
  j = np.arange(lk)[None, :]
  if mask is not None:
    valid &= np.broadcast_to(np.asarray(mask), valid.shape)
  if is_causal:
    valid &= (j <= i)[None, None]
  if kind == "local":
    dil = opts.get("dilation", 1)
    delta = i - j
    valid &= ((np.abs(delta) <= opts.get("window", 64) * dil) & (delta % dil == 0))[None, None]
  return valid


def np_weights(q, k, kind, mask=None, is_causal=False, bias=None, scale=None, **opts):
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  k = np.repeat(k, h // hkv, axis=2)
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  valid = np_valid(b, h, lq, lk, mask, is_causal, kind, opts)
  counts = valid.sum(-1, keepdims=True).astype(np.float64)
  if kind == "linear":
    a = np.einsum("bqhd,bkhd->bhqk", np_phi(q, opts.get("feature_map", "elu+1")),
                  np_phi(k, opts.get("feature_map", "elu+1"))) * valid
    tot = a.sum(-1, keepdims=True)
    return np.divide(a, tot, out=np.zeros_like(a), where=tot > 0)
  if kind == "gaussian":
    diff = q.transpose(0, 2, 1, 3)[:, :, :, None, :] - k.transpose(0, 2, 1, 3)[:, :, None, :, :]
    s = -0.5 * scale * np.sum(diff ** 2, -1)
  else:
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  base = opts.get("base", "softmax") if kind == "local" else kind
  if base == "softmax":
    m = np.where(valid, s, -np.inf).max(-1, keepdims=True)
    e = np.where(valid, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    tot = e.sum(-1, keepdims=True)
    return np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)
  if base == "sigmoid":
    sb = opts.get("sigmoid_bias")
    sb = -math.log(lk) if sb is None else np.asarray(sb, np.float64)
    if np.ndim(sb) == 1:
      sb = sb[None, :, None, None]  # [H]: one bias per query head
    return np.where(valid, np_sigmoid(s + sb), 0.0)
  if kind == "relu":
    w = np.where(valid, np.maximum(s, 0.0), 0.0)
    if opts.get("relu_normalization", "rms") == "count":
      w = np.divide(w, counts, out=np.zeros_like(w), where=counts > 0)
    return w
  if kind == "polynomial":
    w = np.where(valid, s ** opts.get("degree", 3), 0.0)
    return np.divide(w, np.sqrt(counts), out=np.zeros_like(w), where=counts > 0)
  if kind == "softplus":
    if opts.get("length_scale", True):
      s = s * np.log(np.maximum(counts, 1.0))
    u = np_softplus(s)
    if opts.get("power") is not None:
      u = u ** opts["power"]
    u = np.where(valid, u, 0.0)
    tot = u.sum(-1, keepdims=True)
    return np.divide(u, tot, out=np.zeros_like(u), where=tot > 0)
  if kind == "gaussian":
    return np.where(valid, np.exp(s), 0.0)
  raise AssertionError(kind)


def np_attend(q, k, v, kind, **kw):
  w = np_weights(q, k, kind, **kw)
  v = np.asarray(v, np.float64)
  h = w.shape[1]
  v = np.repeat(v, h // v.shape[2], axis=2)
  out = np.einsum("bhqk,bkhd->bqhd", w, v)
  if kind == "relu" and kw.get("relu_normalization", "rms") == "rms":
    out = out / np.sqrt(np.mean(out ** 2, -1, keepdims=True) + 1e-6)
  return out


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------
SHAPES = {
    # name: (B, Lq, Lk, H, Hkv, D, Dv)
    "gqa_odd": (2, 37, 53, 4, 2, 16, 8),
    "mha_square": (1, 16, 16, 2, 2, 8, 8),
    "mqa_long_q": (1, 21, 13, 3, 1, 8, 4),
}


def make_inputs(shape, seed=0, dtype=jnp.float32):
  b, lq, lk, h, hkv, d, dv = SHAPES[shape]
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, lq, h, d))
  k = rng.normal(size=(b, lk, hkv, d))
  v = rng.normal(size=(b, lk, hkv, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def padding_mask(shape, seed=1):
  """A [B, 1, 1, Lk] key-padding mask with a different valid length per batch row."""
  b, _, lk, *_ = SHAPES[shape]
  lengths = np.random.default_rng(seed).integers(lk // 2, lk, size=b)
  return jnp.asarray(np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]


def full_mask(shape, seed=2):
  """A random [B, H, Lq, Lk] mask (not for linear attention)."""
  b, lq, lk, h, *_ = SHAPES[shape]
  return jnp.asarray(np.random.default_rng(seed).random((b, h, lq, lk)) < 0.7)


# ----------------------------------------------------------------------------------------------
# Tolerances: one rule for every comparison in this file.
#
#   |got - want| <= F32_ROUNDING_UNITS * cond * eps32 * magnitude  +  u(out_dtype) * |want|
#                   (+ u(out_dtype) * magnitude for 16-bit inputs)
#
# * magnitude: the size of the compared quantity, max |want| over the array (for a
#   directional derivative, sum_i |g_i d_i|, the terms it adds up). Float32 rounding
#   errors scale with the numbers a computation goes through, not with each element: a
#   per-element rtol fails where a sum cancels, and a fixed atol is tuned to one output scale
#   (polynomial outputs and gradients are ~50, softmax's ~1).
# * F32_ROUNDING_UNITS = 128: each element goes through tens of float32 roundings and sums of
#   <= 64 terms. The worst error measured when this was set was 11 units (relu's RMS
#   normalisation of small rows); other block sizes or XLA optimisations off changed errors by
#   < 4x, and the one report from another x86 CPU was 5.8x this machine's error. 128 units
#   is 1.5e-5 of the magnitude (x cond), while a mask hiding one key moves outputs by > 0.17
#   of it and a 1e-3 relative change of q by 6-140 tolerances (kinds not invariant to it):
#   test_tolerances_reject_an_off_by_one_mask and the gradient tests check the first.
# * cond: how much the kind amplifies a relative error of the scores: a power p (polynomial
#   degree, softplus power) multiplies it by p; 1 otherwise.
# * u(out_dtype): half an ulp, the rounding of the output to its dtype (2^-8 for bfloat16).
#   With 16-bit inputs the weights are also rounded to that dtype before they multiply the
#   values (FlashAttention's practice: 16-bit products, float32 accumulation); each weight's
#   relative error of up to u moves an output by at most u * sum_j |w_ij v_j|. That sum can
#   exceed the output where it cancels, but the roundings are independent and partly cancel
#   too: one u of the magnitude holds in every bf16 case here (14 fail without it). The
#   scores and the nonlinearity stay float32, which the first term covers.
# ----------------------------------------------------------------------------------------------
F32_EPS = float(np.finfo(np.float32).eps)
F32_ROUNDING_UNITS = 128


def conditioning(kind, opts):
  """The factor by which `kind` amplifies relative errors of its scores."""
  if kind == "polynomial":
    return opts.get("degree", 3)
  if kind == "softplus" and opts.get("power") is not None:
    return max(opts["power"], 1.0)
  return 1.0


def tolerance(want, kind, opts=None, out_dtype=jnp.float32, magnitude=None):
  """assert_allclose's atol/rtol under the rule above."""
  magnitude = float(np.max(np.abs(want))) if magnitude is None else magnitude
  atol = F32_ROUNDING_UNITS * conditioning(kind, opts or {}) * F32_EPS * magnitude
  u = float(jnp.finfo(out_dtype).eps) / 2
  if jnp.finfo(out_dtype).bits < 32:
    atol += u * magnitude
  return dict(atol=atol, rtol=u)


def assert_close(got, want, kind, opts=None, out_dtype=jnp.float32):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             **tolerance(want, kind, opts, out_dtype))


def off_by_one_mask(shape):
  """A deliberately wrong key-padding mask [1, 1, 1, Lk]: it hides one key that matters.

  The hidden key is the one bottom-right alignment puts on query 0's diagonal (key
  max(Lk - Lq, 0)): every query at or after it sees it causally, and so does a local
  window around it. The tests check that their tolerance fails on this mask.
  """
  _, lq, lk, *_ = SHAPES[shape]
  return jnp.asarray(np.arange(lk) != max(lk - lq, 0))[None, None, None, :]


# ----------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,causal,masking", [
    ("gqa_odd", False, "none"), ("gqa_odd", True, "padding"), ("mha_square", True, "none"),
    ("mha_square", False, "full"), ("mqa_long_q", True, "full"),
])
def test_values_float32(impl, kind, shape, causal, masking):
  if kind == "linear" and masking == "full":
    masking = "padding"  # linear attention takes key-padding masks only (tested below)
  q, k, v = make_inputs(shape)
  mask = {"none": None, "padding": padding_mask(shape), "full": full_mask(shape)}[masking]
  opts = KIND_OPTIONS[kind]
  impl_opts = {"block_k": 16} if impl == "chunked" else {}
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=causal, impl=impl,
                         **opts, **impl_opts)
  assert got.shape == q.shape[:3] + v.shape[3:] and got.dtype == q.dtype
  want = np_attend(q, k, v, kind, mask=mask, is_causal=causal, **opts)
  assert_close(got, want, kind, opts)


@pytest.mark.parametrize("kind,opts", EXTRA_VARIANTS)
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_option_variants(kind, opts, impl):
  q, k, v = make_inputs("gqa_odd", seed=3)
  impl_opts = {"block_k": 8} if impl == "chunked" else {}
  got = attention.attend(q, k, v, kind=kind, is_causal=True, impl=impl, **opts, **impl_opts)
  assert_close(got, np_attend(q, k, v, kind, is_causal=True, **opts), kind, opts)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_values_bfloat16(impl, kind):
  q, k, v = make_inputs("gqa_odd", seed=4, dtype=jnp.bfloat16)
  opts = KIND_OPTIONS[kind]
  impl_opts = {"block_k": 16} if impl == "chunked" else {}
  got = attention.attend(q, k, v, kind=kind, is_causal=True, impl=impl, **opts, **impl_opts)
  assert got.dtype == jnp.bfloat16
  # The reference sees the same bf16-rounded inputs, in float64.
  want = np_attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), kind,
                   is_causal=True, **opts)
  assert_close(got.astype(jnp.float32), want, kind, opts, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "linear"])
def test_bias_is_added_to_logits(kind):
  q, k, v = make_inputs("mha_square", seed=5)
  bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 2, 16, 16)), jnp.float32)
  for impl, extra in (("xla", {}), ("chunked", {"block_k": 4})):
    got = attention.attend(q, k, v, kind=kind, bias=bias, impl=impl, **KIND_OPTIONS[kind],
                           **extra)
    want = np_attend(q, k, v, kind, bias=bias, **KIND_OPTIONS[kind])
    assert_close(got, want, kind, KIND_OPTIONS[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_weights_match_reference_and_compose_to_attend(kind):
  q, k, v = make_inputs("gqa_odd", seed=7)
  opts = KIND_OPTIONS[kind]
  mask = padding_mask("gqa_odd")
  w = attention.weights(q, k, kind=kind, mask=mask, is_causal=True, **opts)
  assert w.shape == (2, 4, 37, 53) and w.dtype == jnp.float32
  assert_close(w, np_weights(q, k, kind, mask=mask, is_causal=True, **opts), kind, opts)
  composed = attention.apply_weights(w, v, kind=kind, **opts)
  direct = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, **opts)
  assert_close(composed, direct, kind, opts)


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind,opts", [(k, KIND_OPTIONS[k]) for k in KINDS] + EXTRA_VARIANTS)
def test_tolerances_reject_an_off_by_one_mask(kind, opts, out_dtype):
  """The tolerance rule is not so loose that a mask hiding one key would pass (NumPy only)."""
  q, k, v = make_inputs("gqa_odd", seed=3)
  mask = padding_mask("gqa_odd")
  want = np_attend(q, k, v, kind, mask=mask, is_causal=True, **opts)
  wrong = np_attend(q, k, v, kind, mask=mask & off_by_one_mask("gqa_odd"), is_causal=True,
                    **opts)
  with pytest.raises(AssertionError):
    assert_close(wrong, want, kind, opts, out_dtype)


# ----------------------------------------------------------------------------------------------
# Gradients: JAX's VJP against central differences of the float64 reference.
# ----------------------------------------------------------------------------------------------
def directional_fd(fn, args, directions, eps=1e-5):
  plus = fn(*[a + eps * d for a, d in zip(args, directions)])
  minus = fn(*[a - eps * d for a, d in zip(args, directions)])
  return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind,opts", [(k, KIND_OPTIONS[k]) for k in KINDS] + EXTRA_VARIANTS[:3])
def test_gradients_against_float64_finite_differences(impl, kind, opts):
  q, k, v = make_inputs("mqa_long_q", seed=8)
  mask = padding_mask("mqa_long_q")
  impl_opts = {"block_k": 4} if impl == "chunked" else {}
  rng = np.random.default_rng(9)
  cot = rng.normal(size=q.shape[:3] + v.shape[3:])
  dirs = [rng.normal(size=x.shape) for x in (q, k, v)]

  def loss(q, k, v):
    out = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, impl=impl, **opts,
                           **impl_opts)
    return jnp.sum(out * cot)

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  terms = [np.asarray(g, np.float64) * d for g, d in zip(grads, dirs)]
  got = sum(float(np.sum(t)) for t in terms)
  x64 = [np.asarray(x, np.float64) for x in (q, k, v)]

  def fd(m):
    ref = lambda *a: float(np.sum(np_attend(*a, kind, mask=m, is_causal=True, **opts) * cot))
    return directional_fd(ref, x64, dirs)

  # The magnitude of a directional derivative is that of the terms it sums.
  tol = tolerance(None, kind, opts, magnitude=sum(float(np.sum(np.abs(t))) for t in terms))
  np.testing.assert_allclose(got, fd(mask), **tol)
  # The same tolerance rejects the gradient of a mask that is off by one key.
  wrong = fd(mask & off_by_one_mask("mqa_long_q"))
  assert abs(got - wrong) > tol["atol"] + tol["rtol"] * abs(wrong)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_and_xla_gradients_agree(kind):
  q, k, v = make_inputs("gqa_odd", seed=10)
  opts = KIND_OPTIONS[kind]
  # A fixed random cotangent: the VJP is linear in it, so it tests the same map as any loss.
  # (A loss like sum(sin(out)) would feed the outputs' rounding error into the cotangent,
  # amplified by |out|, ~50 for polynomial: error of the test, not of attention.)
  cot = jnp.asarray(np.random.default_rng(11).normal(size=q.shape[:3] + v.shape[3:]),
                    jnp.float32)

  def grads(impl, mask=None, **extra):
    f = lambda q, k, v: jnp.sum(cot * attention.attend(
        q, k, v, kind=kind, mask=mask, is_causal=True, impl=impl, **opts, **extra))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  want = grads("xla")
  for name, a, b in zip("qkv", want, grads("chunked", block_k=16)):
    assert_close(b, a, kind, opts), name
  # The same tolerance rejects gradients of a mask that is off by one key.
  wrong = grads("xla", mask=off_by_one_mask("gqa_odd"))
  for a, b in zip(want, wrong):
    with pytest.raises(AssertionError):
      assert_close(b, a, kind, opts)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("b,length,h,hkv,d", [(4, 64, 2, 2, 64), (2, 128, 4, 2, 8)])
def test_bfloat16_gradients_run_where_xla_cpu_falls_back_to_its_generic_dot(
    kind, impl, b, length, h, hkv, d):
  # At these shapes XLA CPU computed dk = dS^T q (and dv) with its generic dot, which has
  # no bf16 x bf16 -> f32 and failed at run time; the small test shapes never reach it.
  rng = np.random.default_rng(12)
  normal = lambda heads: jnp.asarray(rng.normal(size=(b, length, heads, d)), jnp.bfloat16)
  q, k, v, cot = normal(h), normal(hkv), normal(hkv), normal(h)

  def grads(q, k, v):
    f = lambda q, k, v: jnp.sum(cot.astype(jnp.float32) * attention.attend(
        q, k, v, kind=kind, is_causal=True, impl=impl).astype(jnp.float32))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  want = grads(*(x.astype(jnp.float32) for x in (q, k, v)))
  for name, got, ref in zip("qkv", grads(q, k, v), want):
    assert got.dtype == jnp.bfloat16, name
    # bf16 rounds the inputs' cotangents, dS and the weights: a few 2^-8 of the magnitude.
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0,
                               atol=2e-2 * float(jnp.max(jnp.abs(ref))), err_msg=name)


# ----------------------------------------------------------------------------------------------
# Masking edge cases and numerical safety.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(impl, kind):
  q, k, v = make_inputs("mha_square", seed=11)
  if kind == "linear":
    # Batch row 0 has no visible key at all.
    mask = jnp.zeros((1, 1, 1, 16), bool)
    dead = (slice(None),)
  else:
    mask = jnp.ones((1, 2, 16, 16), bool).at[:, :, 3, :].set(False)
    dead = (slice(None), 3)
  impl_opts = {"block_k": 4} if impl == "chunked" else {}
  f = lambda q, k, v: attention.attend(q, k, v, kind=kind, mask=mask, impl=impl,
                                       **KIND_OPTIONS[kind], **impl_opts)
  out = f(q, k, v)
  assert np.all(np.asarray(out)[dead] == 0.0)
  assert np.all(np.isfinite(out))
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masking,causal", [("none", False), ("mask", False), ("none", True)])
def test_chunked_single_key(kind, masking, causal):
  """Lk = 1 (e.g. a one-token cache): k and v's key axis has size 1 without broadcasting."""
  rng = np.random.default_rng(20)
  b, lq, h, hkv, d, dv = 2, 5, 4, 2, 8, 4
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((b, lq, h, d), (b, 1, hkv, d), (b, 1, hkv, dv)))
  mask = None
  if masking == "mask" and kind == "linear":
    mask = jnp.asarray([True, False])[:, None, None, None]  # batch row 1 sees no key
  elif masking == "mask":
    mask = jnp.asarray(rng.random((b, h, lq, 1)) < 0.5)  # some rows see the key, some none
  opts = KIND_OPTIONS[kind]
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=causal, impl="chunked",
                         **opts)
  assert got.shape == (b, lq, h, dv)
  assert_close(got, np_attend(q, k, v, kind, mask=mask, is_causal=causal, **opts), kind, opts)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_keys_get_exactly_zero_weight(kind):
  q, k, _ = make_inputs("mha_square", seed=12)
  mask = full_mask("mha_square") if kind != "linear" else padding_mask("mha_square")
  w = attention.weights(q, k, kind=kind, mask=mask, **KIND_OPTIONS[kind])
  assert np.all(np.asarray(w)[~np.broadcast_to(np.asarray(mask), w.shape)] == 0.0)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind", KINDS)
def test_huge_bfloat16_logits_stay_finite(impl, kind):
  q, k, v = make_inputs("mha_square", seed=13, dtype=jnp.bfloat16)
  q, k = q * 300, k * 300  # logits ~ 1e5
  mask = padding_mask("mha_square")
  impl_opts = {"block_k": 8} if impl == "chunked" else {}
  f = lambda q, k, v: attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True,
                                       impl=impl, **KIND_OPTIONS[kind], **impl_opts)
  assert np.all(np.isfinite(np.asarray(f(q, k, v), np.float32)))
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_local_window_and_dilation_pattern():
  q, k, _ = make_inputs("mha_square", seed=15)
  w = np.asarray(attention.weights(q, k, kind="local", window=2, dilation=3))
  i, j = np.nonzero(w[0, 0] > 0)
  delta = i - j
  assert np.all(np.abs(delta) <= 6) and np.all(delta % 3 == 0)
  assert set(np.unique(delta)) == {-6, -3, 0, 3, 6}


def test_linear_attention_memory_is_linear_in_length():
  """Compiled linear attention grows O(L) in temporaries and never holds an [Lq, Lk] matrix."""
  def temp_bytes(length, causal):
    q = jnp.zeros((1, length, 1, 16))
    f = jax.jit(lambda q, k, v: attention.attend(q, k, v, kind="linear", is_causal=causal))
    mem = f.lower(q, q, q).compile().memory_analysis()
    if mem is None:
      pytest.skip("this jaxlib reports no memory analysis")
    return mem.temp_size_in_bytes

  for causal in (False, True):
    small, large = temp_bytes(1024, causal), temp_bytes(2048, causal)
    assert large < 2048 * 2048 * 4 / 2, (causal, large)  # far below one f32 score matrix
    assert large <= 2.5 * max(small, 1), (causal, small, large)  # linear, not quadratic


def test_chunked_holds_one_score_tile():
  """Peak temporary memory of chunked sigmoid stays far below one [Lq, Lk] f32 matrix (the
  materialised weights; impl="xla" itself runs sigmoid in tiles too)."""
  q = jnp.zeros((1, 2048, 1, 32))
  kv = jnp.zeros((1, 2048, 1, 32))
  dense = jax.jit(lambda q, k, v: attention.apply_weights(
      attention.weights(q, k, kind="sigmoid"), v, kind="sigmoid"))
  chunk = jax.jit(lambda q, k, v: attention.attend(q, k, v, kind="sigmoid", impl="chunked",
                                                  block_k=128))
  m_dense = dense.lower(q, kv, kv).compile().memory_analysis()
  m_chunk = chunk.lower(q, kv, kv).compile().memory_analysis()
  if m_dense is None or m_chunk is None:
    pytest.skip("this jaxlib reports no memory analysis")
  assert m_dense.temp_size_in_bytes >= 2048 * 2048 * 4
  assert m_chunk.temp_size_in_bytes < m_dense.temp_size_in_bytes / 8


def test_one_trace_per_shape():
  q, k, v = make_inputs("gqa_odd")
  f = jax.jit(chex.assert_max_traces(
      lambda q, k, v: attention.attend(q, k, v, kind="sigmoid", impl="chunked", block_k=16),
      n=1))
  f(q, k, v)
  f(q + 1, k, v)  # same shapes: no retrace
  with pytest.raises(AssertionError):
    f(q[:1], k[:1], v[:1])  # a new shape is the second trace, which the guard reports


# ----------------------------------------------------------------------------------------------
# sigmoid_bias: the default, scalars of any float type, per-head arrays, traced and learned.
# ----------------------------------------------------------------------------------------------
SIGMOID_BIAS_KINDS = [("sigmoid", {}), ("local", {"window": 5, "base": "sigmoid"})]
# Per-head bias shapes for gqa_odd (B = 2, H = 4 query heads, Hkv = 2).
SIGMOID_BIAS_SHAPES = {"H": (4,), "BH11": (2, 4, 1, 1), "1H11": (1, 4, 1, 1),
                       "B111": (2, 1, 1, 1)}


def sigmoid_bias_array(shape, seed=21):
  # Distinct per head (also within a GQA group), around the default -log(53) = -4.
  return jnp.asarray(np.random.default_rng(seed).normal(-3.0, 1.5, size=shape), jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_sigmoid_default_bias_is_minus_log_length(impl):
  assert attention.default_sigmoid_bias(53) == -math.log(53)
  q, k, v = make_inputs("gqa_odd", seed=14)
  impl_opts = {"block_k": 16} if impl == "chunked" else {}
  run = lambda **o: attention.attend(q, k, v, kind="sigmoid", impl=impl, **o, **impl_opts)
  default = run()
  np.testing.assert_array_equal(default, run(sigmoid_bias=attention.default_sigmoid_bias(53)))
  assert not np.allclose(default, run(sigmoid_bias=0.0))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kind,opts", SIGMOID_BIAS_KINDS)
@pytest.mark.parametrize("form", sorted(SIGMOID_BIAS_SHAPES))
def test_sigmoid_bias_per_head_values(form, kind, opts, impl):
  q, k, v = make_inputs("gqa_odd", seed=22)
  mask = full_mask("gqa_odd")
  sb = sigmoid_bias_array(SIGMOID_BIAS_SHAPES[form])
  impl_opts = {"block_k": 16} if impl == "chunked" else {}
  got = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, impl=impl,
                         sigmoid_bias=sb, **opts, **impl_opts)
  want = np_attend(q, k, v, kind, mask=mask, is_causal=True, sigmoid_bias=np.asarray(sb),
                   **opts)
  assert_close(got, want, kind, opts)


@pytest.mark.parametrize("kind,opts", SIGMOID_BIAS_KINDS)
def test_sigmoid_bias_gradient(kind, opts):
  """d loss / d sigmoid_bias[H]: xla, chunked and float64 central differences agree."""
  q, k, v = make_inputs("gqa_odd", seed=23)
  mask = full_mask("gqa_odd")
  sb_H = sigmoid_bias_array((4,))
  cot = np.random.default_rng(24).normal(size=q.shape[:3] + v.shape[3:])

  def grad(impl, **impl_opts):
    f = lambda sb: jnp.sum(cot * attention.attend(
        q, k, v, kind=kind, mask=mask, is_causal=True, impl=impl, sigmoid_bias=sb, **opts,
        **impl_opts))
    return jax.grad(f)(sb_H)

  def ref(sb):
    return float(np.sum(cot * np_attend(q, k, v, kind, mask=mask, is_causal=True,
                                        sigmoid_bias=sb, **opts)))

  sb64, eps = np.asarray(sb_H, np.float64), 1e-5
  fd = np.array([(ref(sb64 + eps * e) - ref(sb64 - eps * e)) / (2 * eps) for e in np.eye(4)])
  g_xla, g_chunked = grad("xla"), grad("chunked", block_k=16)
  assert g_xla.shape == (4,) and g_xla.dtype == jnp.float32
  assert_close(g_xla, fd, kind, opts)
  assert_close(g_chunked, fd, kind, opts)
  assert_close(g_chunked, g_xla, kind, opts)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_sigmoid_bias_traced_under_jit(impl):
  q, k, v = make_inputs("gqa_odd", seed=25)
  impl_opts = {"block_k": 16} if impl == "chunked" else {}
  for shape in ((), (4,)):
    traces = []

    @jax.jit
    def f(sb):
      traces.append(sb)
      return attention.attend(q, k, v, kind="sigmoid", impl=impl, sigmoid_bias=sb, **impl_opts)

    for seed in (26, 27):
      sb = sigmoid_bias_array(shape, seed)
      want = np_attend(q, k, v, "sigmoid", sigmoid_bias=np.asarray(sb))
      assert_close(f(sb), want, "sigmoid")
    # One trace for both values: the bias is an argument, not a constant baked into the program.
    assert len(traces) == 1 and isinstance(traces[0], jax.core.Tracer)


@pytest.mark.parametrize("sb", [
    np.float32(0.5), np.float16(0.5), np.float64(0.5), np.asarray(0.5, np.float32),
    jnp.asarray(0.5), jnp.asarray(0.5, jnp.bfloat16), 1 / 2,
], ids=["np.float32", "np.float16", "np.float64", "np-0d", "jnp-0d", "jnp-0d-bf16", "float"])
def test_sigmoid_bias_scalars_of_any_float_type(sb):
  assert attention.check_options("sigmoid", "xla", sigmoid_bias=sb)[0]["sigmoid_bias"] is sb
  q, k, v = make_inputs("gqa_odd", seed=28)
  want = attention.attend(q, k, v, kind="sigmoid", sigmoid_bias=0.5)
  np.testing.assert_array_equal(attention.attend(q, k, v, kind="sigmoid", sigmoid_bias=sb), want)


@pytest.mark.parametrize("kind,sb,pattern", [
    ("sigmoid", "0.5", r"kind='sigmoid': sigmoid_bias must be None \(= -log\(Lk\)\) or a real "
     r"number.*got '0.5' of type str"),
    ("sigmoid", [0.1, 0.2], r"got \[0.1, 0.2\] of type list\. For per-head values pass an array"),
    ("sigmoid", True, r"got True of type bool"),
    ("sigmoid", np.zeros(4, bool), r"got an array of dtype bool"),
    ("sigmoid", jnp.zeros((4, 3)), r"sigmoid_bias has shape \(4, 3\); it must be"),
    ("sigmoid", jnp.zeros((1, 4, 37, 1)), r"shape \(1, 4, 37, 1\).*belongs in `bias`"),
    ("local", "big", r"kind='local': sigmoid_bias must be None"),
])
def test_sigmoid_bias_junk_is_rejected_at_config_time(kind, sb, pattern):
  with pytest.raises(ValueError, match=pattern):
    attention.check_options(kind, "chunked", sigmoid_bias=sb)


@pytest.fixture
def fake_kernel(monkeypatch):
  """Replaces `kernels.flash_attention` (what impl="pallas" calls) by a recorder."""
  calls = []

  def flash_attention(q, k, v, **kwargs):
    calls.append(kwargs)
    return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)

  monkeypatch.setattr(kernels, "flash_attention", flash_attention)
  return calls


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
@pytest.mark.parametrize("shape,pattern", [
    ((3,), r"sigmoid_bias has shape \(3,\) but q has num_heads=4 and batch=2; pass shape \[4\]"),
    ((2,), r"shape \(2,\) but q has num_heads=4"),  # [Hkv] is not [H]: biases are per query head
    ((3, 4, 1, 1), r"shape \(3, 4, 1, 1\).*pass shape broadcastable to \[2, 4, 1, 1\]"),
])
def test_sigmoid_bias_wrong_shape_is_rejected_at_call_time(impl, shape, pattern, fake_kernel):
  # Without q there is no H to check against: the config-time check lets the shape through.
  attention.check_options("sigmoid", impl, sigmoid_bias=jnp.zeros(shape))
  with pytest.raises(ValueError, match=pattern):
    _call(kind="sigmoid", impl=impl, sigmoid_bias=jnp.zeros(shape))
  assert not fake_kernel  # the fused kernel was never called with it


def test_pallas_passes_sigmoid_bias_through_unchanged(fake_kernel):
  q, k, v = make_inputs("gqa_odd", seed=29)
  for sb in (None, -2.0, np.float32(-2.0), sigmoid_bias_array((4,)),
             sigmoid_bias_array((2, 4, 1, 1))):
    attention.attend(q, k, v, kind="sigmoid", impl="pallas", sigmoid_bias=sb)
    assert fake_kernel[-1]["sigmoid_bias"] is sb and fake_kernel[-1]["kind"] == "sigmoid"

  def traced(sb):
    out = attention.attend(q, k, v, kind="sigmoid", impl="pallas", sigmoid_bias=sb)
    assert fake_kernel[-1]["sigmoid_bias"] is sb  # the tracer itself, not a concrete copy
    return out

  jax.jit(traced)(sigmoid_bias_array((4,)))


# ----------------------------------------------------------------------------------------------
# Where attend deliberately differs from jax.nn.dot_product_attention (see attend's docstring).
# ----------------------------------------------------------------------------------------------
def test_causal_alignment_against_jax_dot_product_attention():
  # Lq == Lk: both align the same way.
  q, k, v = make_inputs("mha_square", seed=30)
  assert_close(attention.attend(q, k, v, is_causal=True),
               jax.nn.dot_product_attention(q, k, v, is_causal=True), "softmax")
  # Lq < Lk (decoding with a cache; GQA): bottom-right here, top-left in jax.
  q, k, v = make_inputs("gqa_odd", seed=30)
  q, k = q[..., :8], k[..., :8]  # jax wants head_dim == value_dim
  _, lq, lk, *_ = SHAPES["gqa_odd"]
  i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
  bottom_right = jnp.asarray(j <= i + (lk - lq))[None, None]
  top_left = jnp.asarray(j <= i)[None, None]
  ours = attention.attend(q, k, v, is_causal=True)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert_close(ours, jax.nn.dot_product_attention(q, k, v, mask=bottom_right), "softmax")
  assert_close(theirs, attention.attend(q, k, v, mask=top_left), "softmax")
  # And they really differ: jax's query 0 sees only key 0, ours sees keys 0..Lk-Lq.
  assert_close(theirs[:, 0], jnp.repeat(v[:, 0], 2, axis=1), "softmax")
  assert np.max(np.abs(np.asarray(ours) - np.asarray(theirs))) > 0.1


def test_fully_masked_row_zeros_where_jax_returns_mean_of_v():
  q, k, v = make_inputs("mha_square", seed=31)  # H == Hkv
  mask = jnp.ones((1, 2, 16, 16), bool).at[:, :, 3, :].set(False)
  ours = np.asarray(attention.attend(q, k, v, mask=mask))
  theirs = np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask))
  live = np.arange(16) != 3
  assert_close(ours[:, live], theirs[:, live], "softmax")
  assert np.all(ours[:, 3] == 0.0)
  # jax fills masked logits with a finite large negative number: uniform weights over all keys.
  assert_close(theirs[:, 3], np.mean(np.asarray(v, np.float64), axis=1), "softmax")


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, what was seen and what was expected.
# ----------------------------------------------------------------------------------------------
def _call(**over):
  q, k, v = make_inputs("gqa_odd")
  args = dict(q=q, k=k, v=v)
  args.update(over)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return attention.attend(q, k, v, **args)


@pytest.mark.parametrize("over,pattern", [
    (dict(q=jnp.zeros((2, 37, 16))), r"q must have rank 4.*\(2, 37, 16\)"),
    (dict(k=jnp.zeros((3, 53, 2, 16))), r"batch dimension.*\(3, 53, 2, 16\)"),
    (dict(k=jnp.zeros((2, 53, 2, 8))), r"head_dim"),
    (dict(k=jnp.zeros((2, 53, 3, 16)), v=jnp.zeros((2, 53, 3, 8))),
     r"num_heads of q \(4\) must be a multiple of num_kv_heads of k \(3\)"),
    (dict(v=jnp.zeros((2, 50, 2, 8))), r"v must match k.*\(2, 50, 2, 8\)"),
    (dict(kind="sigmod"),
     r"Unknown attention kind 'sigmod'; registered kinds: \['entmax', 'gaussian'"),
    (dict(impl="cuda"), r"Unknown attention impl 'cuda'; expected one of \['xla'"),
    (dict(kind="softmax", sigmoid_bias=1.0), r"kind='softmax'.*\['sigmoid_bias'\].*accepts"),
    (dict(kind="sigmoid", block_k=8), r"kind='sigmoid' with impl='xla' does not take.*block_k"),
    (dict(mask=jnp.ones((37, 53), bool)), r"mask must have rank 4.*\(37, 53\)"),
    (dict(mask=jnp.ones((2, 4, 36, 53), bool)), r"mask must.*broadcastable.*\(2, 4, 36, 53\)"),
    (dict(mask=jnp.ones((2, 1, 1, 53), jnp.float32)), r"mask must be boolean"),
    (dict(bias=jnp.ones((2, 1, 1, 52))), r"bias must.*broadcastable.*\(2, 1, 1, 52\)"),
    (dict(kind="linear", bias=jnp.zeros((1, 1, 1, 53))), r"kind='linear' has no pairwise"),
    (dict(kind="linear", mask=jnp.ones((2, 4, 37, 53), bool)), r"key-padding masks"),
    (dict(kind="relu", relu_normalization="l2"), r"relu_normalization='l2' is not one of"),
    (dict(kind="local", window=0), r"window must be a positive int"),
    (dict(impl="chunked", block_k=0), r"block_k must be a positive int"),
    (dict(impl="pallas", kind="relu"), r"impl='pallas' supports kinds"),
    (dict(impl="pallas", kind="sigmoid", mask=jnp.ones((2, 1, 1, 53), bool)),
     r"impl='pallas' takes no mask"),
    (dict(q=jnp.zeros((2, 37, 4, 16), jnp.int32)), r"q must be a floating-point"),
    (dict(scale=jnp.ones(3)), r"scale must be a scalar"),
])
def test_bad_input_raises_clear_error(over, pattern):
  with pytest.raises(ValueError, match=pattern):
    _call(**over)


def test_registering_a_duplicate_kind_is_an_error():
  with pytest.raises(ValueError, match="already registered"):
    attention.register_kind(attention.KINDS["sigmoid"])


def test_check_options_names_the_kinds_pallas_supports():
  supported = attention.impl_kinds("pallas")
  assert supported and "relu" not in supported
  with pytest.raises(ValueError, match=re.escape(
      f"impl='pallas' supports kinds {list(supported)}; got kind='relu'")):
    attention.check_options("relu", "pallas")


@pytest.mark.parametrize("kind,impl,options", [
    ("sigmoid", "xla", {}),
    ("sigmoid", "xla", {"sigmoid_bias": np.float32(-1.0)}),
    ("sigmoid", "xla", {"sigmoid_bias": "big"}),
    ("sigmoid", "xla", {"block_k": 8}),
    ("softmax", "xla", {"sigmoid_bias": 1.0}),
    ("relu", "xla", {"relu_normalization": "l2"}),
    ("polynomial", "chunked", {"degree": 2, "block_k": 8}),
    ("local", "chunked", {"window": 0}),
    ("sigmoid", "chunked", {"block_k": 0}),
    ("sigmoid", "chunked", {"block_k": 2.0}),
    ("sigmoid", "pallas", {"block_q": 16, "sigmoid_bias": -1.0}),
    ("softmax", "pallas", {"window": 3}),
    ("relu", "pallas", {}),
    ("linear", "pallas", {}),
    ("sigmoid", "cuda", {}),
    ("sigmod", "xla", {}),
])
def test_check_options_accepts_and_rejects_as_attend_does(kind, impl, options, fake_kernel):
  def outcome(fn):
    try:
      fn()
    except ValueError as e:
      return str(e)
    return "accepted"

  config_time = outcome(lambda: attention.check_options(kind, impl, **options))
  call_time = outcome(lambda: _call(kind=kind, impl=impl, **options))
  assert config_time == call_time


# ----------------------------------------------------------------------------------------------
# The flash-style custom_vjp (attention/blockwise.py) that xla (one block) and chunked (block_k)
# run for the kinds it covers, and impl="auto".
# ----------------------------------------------------------------------------------------------
BLOCKWISE_VARIANTS = [(k, KIND_OPTIONS[k]) for k in KINDS
                      if blockwise.supports(attention.KINDS[k], {**attention.KINDS[k].options,
                                                                 **KIND_OPTIONS[k]})]
BLOCKWISE_VARIANTS += [("local", {"window": 3, "base": "sigmoid"}),
                       ("relu", {"relu_normalization": None})]


def test_blockwise_covers_softmax_and_sigmoid_and_refuses_row_normalisers():
  covered = {k for k, _ in BLOCKWISE_VARIANTS}
  assert {"softmax", "sigmoid", "relu", "gaussian", "local"} <= covered
  for kind in ("softplus", "polynomial", "linear"):
    mech = attention.KINDS[kind]
    assert not blockwise.supports(mech, mech.options)
    with pytest.raises(ValueError, match="cannot run kind"):
      blockwise.attend(*make_inputs("mha_square"), mech, mech.options, mask=None, bias=None,
                       is_causal=False, scale=1.0, block_k=4)


@pytest.mark.parametrize("impl,block_k", [("xla", None), ("chunked", 8), ("chunked", 53)])
@pytest.mark.parametrize("kind,opts", BLOCKWISE_VARIANTS)
def test_blockwise_values_and_gradients_against_float64(kind, opts, impl, block_k):
  """Odd lengths (53 keys = 6 blocks of 8, padded), GQA, a full mask, causal, a key-varying
  bias: values, and the directional derivative in q, k, v AND the bias, against float64."""
  shape = "gqa_odd"
  q, k, v = make_inputs(shape, seed=31)
  mask = full_mask(shape)
  b, lq, lk, h, *_ = SHAPES[shape]
  rng = np.random.default_rng(32)
  bias = jnp.asarray(rng.normal(size=(1, h, lq, lk)), jnp.float32)
  impl_opts = {} if block_k is None else {"block_k": block_k}
  call = lambda q, k, v, bias: attention.attend(q, k, v, kind=kind, mask=mask, bias=bias,
                                                is_causal=True, impl=impl, **opts, **impl_opts)
  x64 = [np.asarray(x, np.float64) for x in (q, k, v, bias)]
  ref = lambda q, k, v, bias: np_attend(q, k, v, kind, mask=mask, is_causal=True, bias=bias,
                                        **opts)
  assert_close(call(q, k, v, bias), ref(*x64), kind, opts)

  cot = rng.normal(size=q.shape[:3] + v.shape[3:])
  dirs = [rng.normal(size=x.shape) for x in x64]
  grads = jax.grad(lambda *a: jnp.sum(call(*a) * cot), argnums=(0, 1, 2, 3))(q, k, v, bias)
  terms = [np.asarray(g, np.float64) * d for g, d in zip(grads, dirs)]
  got = sum(float(np.sum(t)) for t in terms)
  want = directional_fd(lambda *a: float(np.sum(ref(*a) * cot)), x64, dirs)
  tol = tolerance(None, kind, opts, magnitude=sum(float(np.sum(np.abs(t))) for t in terms))
  np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind,opts", BLOCKWISE_VARIANTS)
def test_chunked_custom_vjp_equals_xla(kind, opts, dtype):
  """chunked (5 blocks of 4 keys, padded) against xla: values and gradients, including a
  per-head sigmoid bias where the kind takes one; float32 tight, bfloat16 loose."""
  q, k, v = make_inputs("mqa_long_q", seed=33, dtype=dtype)
  mask = padding_mask("mqa_long_q")
  learned = ({"sigmoid_bias": jnp.asarray([-1.0, -2.0, 0.5], dtype)}
             if "sigmoid_bias" in attention.KINDS[kind].options else {})

  def loss(impl, q, k, v, learned):
    impl_opts = {"block_k": 4} if impl == "chunked" else {}
    out = attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True, impl=impl,
                           **{**opts, **learned}, **impl_opts)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))("xla", q, k, v, learned)
  got, got_grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))("chunked", q, k, v, learned)
  rel = 2e-5 if dtype == jnp.float32 else 2e-2
  for g, w in zip(jax.tree.leaves((got, got_grads)), jax.tree.leaves((want, want_grads))):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(g, w, atol=rel * max(np.max(np.abs(w)), 1e-3), rtol=0)


AUTO_PLATFORM_CASES = [
    # platform, kind, kv_len, masked, expected
    ("gpu", "sigmoid", 16, False, "pallas"),
    ("tpu", "softmax", 16, False, "pallas"),
    ("gpu", "sigmoid", 16, True, "xla"),        # the kernel takes no mask arrays
    ("gpu", "relu", 16, False, "xla"),          # nor kinds other than its own
    ("gpu", "relu", api.AUTO_CHUNKED_MIN_KV_LEN, False, "chunked"),
    ("cpu", "sigmoid", 16, False, "xla"),
    ("cpu", "softmax", api.AUTO_CHUNKED_MIN_KV_LEN, True, "chunked"),
]


@pytest.mark.parametrize("platform,kind,kv_len,masked,expected", AUTO_PLATFORM_CASES)
def test_auto_picks_by_platform_kind_and_length(monkeypatch, platform, kind, kv_len, masked,
                                                expected):
  monkeypatch.setattr(api, "platform", lambda: platform)
  q = jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float32)
  k = jax.ShapeDtypeStruct((1, kv_len, 2, 8), jnp.float32)
  mask = jnp.ones((1, 1, 1, kv_len), bool) if masked else None
  assert api.auto_impl(kind, q, k, k, mask=mask) == expected


def test_auto_and_pallas_read_the_mask_rule_from_the_capability_table(monkeypatch):
  """The kernels' "no mask or bias arrays" is stated once (capabilities.py) and read there."""
  monkeypatch.setattr(api, "platform", lambda: "gpu")
  q = jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float32)
  mask = jnp.ones((1, 1, 1, 16), bool)
  k = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
  assert api.auto_impl("sigmoid", q, k, k, mask=mask) == "xla"
  monkeypatch.setattr(capabilities, "TAKES_MASK_AND_BIAS_ARRAYS", True)
  assert api.auto_impl("sigmoid", q, k, k, mask=mask) == "pallas"


@pytest.mark.parametrize("platform,kind,kv_len,masked,expected",
                         [c for c in AUTO_PLATFORM_CASES if c[2] == 16])
def test_auto_equals_the_impl_it_picks(monkeypatch, platform, kind, kv_len, masked, expected):
  """Same values as the picked impl (the kernel in interpret mode here), also under vmap."""
  monkeypatch.setattr(api, "platform", lambda: platform)
  q, k, v = make_inputs("mha_square", seed=34)
  mask = padding_mask("mha_square") if masked else None
  call = lambda impl, q: attention.attend(q, k, v, kind=kind, mask=mask, is_causal=True,
                                          impl=impl)
  np.testing.assert_array_equal(call("auto", q), call(expected, q))
  q_stack = jnp.stack([q, 2 * q])
  np.testing.assert_array_equal(jax.vmap(lambda x: call("auto", x))(q_stack),
                                jax.vmap(lambda x: call(expected, x))(q_stack))


def test_auto_takes_no_tuning_options():
  with pytest.raises(ValueError, match="impl='auto' does not take.*block_k"):
    attention.attend(*make_inputs("mha_square"), kind="softmax", impl="auto", block_k=8)
