"""attnlab.kernels.flash_attention against an independent float64 NumPy reference and attend(xla).

On CPU every kernel runs in Pallas interpret mode (GPU-style and TPU interpret
mode) at small shapes, with small blocks so that several query/key blocks, the
causal skipping and the padding are all exercised. Each case also fixes a form of
`sigmoid_bias` (default, traced scalar, per head, [B, H, 1, 1]), so the bias and its
gradient ride along with compilations the tests need anyway. Tests marked gpu/tpu
run the native kernels and are skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import attention
from attnlab.kernels import common
from attnlab.kernels import flash_attention

PLATFORM = jax.default_backend()
ON_GPU = PLATFORM in ("gpu", "cuda", "rocm")
ON_TPU = PLATFORM == "tpu"

# Values are checked, not speed: XLA's optimisation passes only cost compile time here.
pytestmark = pytest.mark.usefixtures("fast_xla_compile")


# ------------------------------------------------------------------ NumPy float64 reference
def np_attention(q, k, v, w, *, kind, scale, bias, mask):
  """Float64 forward and analytic backward of loss = sum(out * w).

  q [B, Lq, H, D]; k [B, Lk, Hkv, D]; v [B, Lk, Hkv, Dv]; mask bool [B, Lq, Lk];
  bias (sigmoid only) a number or an array broadcastable to [B, H, 1, 1].
  Returns out, dq, dk, dv, dbias [B, H] and |dS| summed like dbias (the scale of
  dbias's rounding error). Fully masked rows give 0 (and zero gradients).
  """
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  h, hkv = q.shape[2], k.shape[2]
  group = h // hkv
  ke, ve = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  m = mask[:, None]  # [B, 1, Lq, Lk]
  s = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
  if kind == "sigmoid":
    p = np.where(m, 1.0 / (1.0 + np.exp(-(s + np.asarray(bias, np.float64)))), 0.0)
  else:
    s_m = np.where(m, s, -np.inf)
    row_max = s_m.max(-1, keepdims=True)
    e = np.where(m, np.exp(s_m - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = e / np.where(denom == 0, 1.0, denom)
  out = np.einsum("bhqk,bkhd->bqhd", p, ve)
  dp = np.einsum("bqhd,bkhd->bhqk", w, ve)
  if kind == "sigmoid":
    ds = dp * p * (1.0 - p)
  else:
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
  dke = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  dve = np.einsum("bhqk,bqhd->bkhd", p, w)
  dk = dke.reshape(*k.shape[:2], hkv, group, k.shape[3]).sum(3)
  dv = dve.reshape(*v.shape[:2], hkv, group, v.shape[3]).sum(3)
  return out, dq, dk, dv, ds.sum((2, 3)), np.abs(ds).sum((2, 3))


def np_mask(lq, lk, batch, is_causal, q_seg, kv_seg):
  mask = np.ones((batch, lq, lk), bool)
  if is_causal:
    mask &= np.tril(np.ones((lq, lk), bool), k=lk - lq)[None]
  if q_seg is not None:
    mask &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
  return mask


def sum_to_shape(x_BH, shape):
  """What autodiff does to d bias [B, H]: sum it back to the shape the bias was given in."""
  if len(shape) == 0:
    return x_BH.sum()
  if len(shape) == 1:
    return x_BH.sum(0) if shape[0] > 1 else x_BH.sum().reshape(1)
  return x_BH.sum(axis=tuple(i for i in (0, 1) if shape[i] == 1), keepdims=True).reshape(shape)


# -------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int = 1
  q_len: int = 37
  kv_len: int = 37
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 32
  value_dim: int | None = None
  is_causal: bool = False
  segments: bool = False
  dtype: str = "float32"
  # sigmoid_bias form: "default" (None = -log(Lk): constant, no d bias work), "scalar"
  # (0-d), "per_head" ([H]) or "rank4" ([B, H, 1, 1]); arrays are traced and differentiated.
  bias: str = "default"


CASES = [
    Case("full_odd", bias="scalar"),
    Case("causal_gqa_lq_lt_lk", q_len=37, kv_len=50, heads=4, kv_heads=2, is_causal=True,
         bias="per_head"),
    # Lq > Lk: the first Lq - Lk rows see no key at all (zero output, zero gradient).
    Case("causal_lq_gt_lk_mqa", q_len=53, kv_len=37, heads=2, kv_heads=1, is_causal=True),
    # Packed sequences plus a query segment absent from the keys (fully masked rows);
    # head dims 40/24 are padded by the kernels; a different bias per batch row.
    Case("segments_causal_padded_dims", batch=2, q_len=45, kv_len=45, head_dim=40,
         value_dim=24, is_causal=True, segments=True, bias="rank4"),
    Case("bf16_causal_gqa", q_len=53, kv_len=53, heads=4, kv_heads=2, is_causal=True,
         dtype="bfloat16", bias="per_head"),
]

# Small tiles so that every case spans several blocks (TPU block_k is at least 128: a
# longer case below covers several TPU key blocks).
BLOCKS = {"gpu": dict(block_q=16, block_k=16), "tpu": dict(block_q=16, block_k=128)}
TOL = {"float32": dict(atol=2e-5, rtol=1e-5), "bfloat16": dict(atol=2e-2, rtol=2e-2)}
# d bias sums Lq * Lk terms of dS of both signs: its error scales with sum |dS|, and
# its dtype (the bias's) rounds it once.
BIAS_TOL = {"float32": dict(scaled=1e-5, rtol=1e-5), "bfloat16": dict(scaled=1e-3, rtol=1e-2)}


class Inputs(NamedTuple):
  q: jax.Array
  k: jax.Array
  v: jax.Array
  w: jax.Array  # loss = sum(out * w)
  q_seg: jax.Array | None
  kv_seg: jax.Array | None
  bias: Any  # sigmoid_bias as the case gives it


def make_inputs(case: Case, seed: int = 0) -> Inputs:
  rng = np.random.default_rng(seed)
  dv = case.value_dim or case.head_dim
  dtype = jnp.dtype(case.dtype)
  q = jnp.asarray(rng.normal(size=(case.batch, case.q_len, case.heads, case.head_dim)), dtype)
  k = jnp.asarray(rng.normal(size=(case.batch, case.kv_len, case.kv_heads, case.head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(case.batch, case.kv_len, case.kv_heads, dv)), dtype)
  w = jnp.asarray(rng.normal(size=(case.batch, case.q_len, case.heads, dv)), dtype)
  q_seg = kv_seg = None
  if case.segments:
    # Three packed sequences per row; segment 7 exists only among the queries.
    q_seg = np.repeat(np.arange(3), -(-case.q_len // 3))[None, :case.q_len].repeat(case.batch, 0)
    kv_seg = np.repeat(np.arange(3), -(-case.kv_len // 3))[None, :case.kv_len].repeat(
        case.batch, 0)
    q_seg[0, :5] = 7
    kv_seg[-1, -4:] = 1  # rows differ across the batch
    q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
  # Biases around the default -log(Lk), different per head (and batch row), so a
  # kernel that read the wrong (batch, head) scalar would be caught.
  bias_shape = {"default": None, "scalar": (), "per_head": (case.heads,),
                "rank4": (case.batch, case.heads, 1, 1)}[case.bias]
  bias = None
  if bias_shape is not None:
    bias = jnp.asarray(-np.log(case.kv_len) + rng.normal(size=bias_shape), dtype)
  return Inputs(q, k, v, w, q_seg, kv_seg, bias)


def kernel_value_and_grads(x: Inputs, *, jit: bool = True, **kwargs):
  """(out, dq, dk, dv, dbias) of loss = sum(out * w) under jit (`jit=False`: op by op, each
  kernel still compiled whole); the bias, if an array, is a traced, differentiated
  argument (dbias None otherwise)."""
  traced_bias = x.bias is not None

  def loss(q, k, v, *bias):
    out = flash_attention(q, k, v, sigmoid_bias=bias[0] if bias else x.bias, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * x.w.astype(jnp.float32)), out

  argnums = (0, 1, 2, 3) if traced_bias else (0, 1, 2)
  args = (x.q, x.k, x.v, x.bias) if traced_bias else (x.q, x.k, x.v)
  step = jax.value_and_grad(loss, argnums=argnums, has_aux=True)
  (_, out), grads = (jax.jit(step) if jit else step)(*args)
  return (out, *grads) if traced_bias else (out, *grads, None)


def reference(case: Case, kind: str, x: Inputs, scale: float | None = None):
  """np_attention on the same (dtype-rounded) inputs; the bias as the kernel must read it."""
  mask = np_mask(case.q_len, case.kv_len, case.batch, case.is_causal, x.q_seg, x.kv_seg)
  as_f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))
  bias = -np.log(case.kv_len) if x.bias is None else as_f32(x.bias)
  if np.ndim(bias) == 1:  # [H]: one bias per query head
    bias = bias[None, :, None, None]
  return np_attention(as_f32(x.q), as_f32(x.k), as_f32(x.v), as_f32(x.w), kind=kind,
                      scale=case.head_dim ** -0.5 if scale is None else scale, bias=bias,
                      mask=mask)


def assert_close(got, want, tol, what):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  np.testing.assert_allclose(got, want, err_msg=what, **tol)


def check_against_reference(got, want, x: Inputs, case: Case, kind: str, what: str,
                            tol: dict | None = None):
  """out, dq, dk, dv (in the inputs' dtype) and, for a traced sigmoid bias, d bias."""
  tol = tol or TOL[case.dtype]
  for name, g, r in zip(("out", "dq", "dk", "dv"), got[:4], want[:4]):
    assert g.dtype == x.q.dtype, f"{what}: {name} dtype {g.dtype} != input dtype {x.q.dtype}"
    assert_close(g, r, tol, f"{what}: {name}")
  if kind != "sigmoid" or x.bias is None:
    return
  dbias = got[4]
  assert dbias.shape == x.bias.shape and dbias.dtype == x.bias.dtype, (
      f"{what}: d bias {dbias.shape} {dbias.dtype} != bias {x.bias.shape} {x.bias.dtype}")
  shape = x.bias.shape
  want_db, scale_db = sum_to_shape(want[4], shape), sum_to_shape(want[5], shape)
  btol = BIAS_TOL[case.dtype]
  assert_close(dbias, want_db, dict(atol=btol["scaled"] * float(np.max(scale_db)),
                                    rtol=btol["rtol"]), f"{what}: d sigmoid_bias")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_numpy_float64_values_and_grads(case, kind, backend):
  x = make_inputs(case)
  if kind == "softmax":  # softmax takes no sigmoid_bias (and a per-row constant is a no-op)
    x = x._replace(bias=None)
  got = kernel_value_and_grads(x, kind=kind, is_causal=case.is_causal, q_segment_ids=x.q_seg,
                               kv_segment_ids=x.kv_seg, backend=backend, interpret=True,
                               **BLOCKS[backend])
  check_against_reference(got, reference(case, kind, x), x, case, kind,
                          f"{backend}/{kind}/{case.name}")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_matches_attend_xla_with_equivalent_mask(kind, backend):
  """Several TPU key blocks (Lk > 128), causal + segment ids vs attend(impl='xla', mask=...).

  Sigmoid with a per-head bias: d bias sums dS row sums over several key blocks.
  """
  case = Case("long", batch=1, q_len=150, kv_len=200, heads=2, kv_heads=1, head_dim=64,
              is_causal=True, segments=True, bias="per_head" if kind == "sigmoid" else "default")
  x = make_inputs(case, seed=1)
  blocks = dict(block_q=32, block_k=64) if backend == "gpu" else dict(block_q=64, block_k=128)
  got = kernel_value_and_grads(x, kind=kind, is_causal=True, q_segment_ids=x.q_seg,
                               kv_segment_ids=x.kv_seg, backend=backend, interpret=True,
                               **blocks)
  seg_mask = (x.q_seg[:, None, :, None] == x.kv_seg[:, None, None, :])  # [B, 1, Lq, Lk]

  def xla_loss(q, k, v, bias):
    out = attention.attend(q, k, v, kind=kind, is_causal=True, mask=seg_mask, impl="xla",
                           **(dict(sigmoid_bias=bias) if kind == "sigmoid" else {}))
    return jnp.sum(out * x.w), out

  (_, out), grads = jax.value_and_grad(xla_loss, argnums=(0, 1, 2, 3), has_aux=True)(
      x.q, x.k, x.v, x.bias)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, (out, *grads)):
    assert_close(g, np.asarray(r, np.float64), TOL["float32"], f"{backend}/{kind}: {name}")
  if kind == "sigmoid":  # attend(xla) and the kernel agree on d bias too ...
    assert_close(got[4], np.asarray(grads[3], np.float64), dict(rtol=1e-4, atol=1e-4),
                 f"{backend}/{kind}: d sigmoid_bias vs attend(xla)")
    # ... and both are near the float64 one, within the error a sum of 30k dS terms can have.
    check_against_reference(got, reference(case, kind, x), x, case, kind, f"{backend}/long")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_attend_pallas_dispatch_matches_xla(kind):
  """attend(impl='pallas') end to end, a learnable per-head sigmoid bias included."""
  case = Case("dispatch", q_len=40, kv_len=40, heads=4, kv_heads=2, bias="per_head")
  x = make_inputs(case)
  kw = dict(kind=kind, is_causal=True)
  args = (x.q, x.k, x.v)
  if kind == "sigmoid":
    args += (x.bias,)  # [H], differentiated below like a model parameter

  def loss(impl):
    def f(q, k, v, *bias):
      extra = dict(sigmoid_bias=bias[0]) if bias else {}
      return jnp.sum(attention.attend(q, k, v, impl=impl, **kw, **extra) * x.w)
    return f

  argnums = tuple(range(len(args)))
  pallas = jax.value_and_grad(loss("pallas"), argnums=argnums)(*args)
  # The kernels multiply float32 in full precision; XLA's default on GPU is TF32
  # (about 1e-3 relative), which the reference must not use.
  with jax.default_matmul_precision("highest"):
    xla = jax.value_and_grad(loss("xla"), argnums=argnums)(*args)
  np.testing.assert_allclose(pallas[0], xla[0], rtol=1e-5)
  for name, g, r in zip(("dq", "dk", "dv", "d sigmoid_bias"), pallas[1], xla[1]):
    assert g.shape == r.shape, name
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5, err_msg=name)


def test_default_blocks_and_fully_masked_rows_are_zero():
  """Default tiles; rows that see no key give exact zeros with finite, zero gradients."""
  case = Case("masked_rows", q_len=20, kv_len=9, is_causal=True)  # rows 0..10 see no key
  x = make_inputs(case)
  for kind in ("sigmoid", "softmax"):
    got = kernel_value_and_grads(x, kind=kind, is_causal=True)
    out, dq = got[:2]
    assert np.all(np.asarray(out[:, :11]) == 0.0) and np.all(np.asarray(dq[:, :11]) == 0.0)
    check_against_reference(got, reference(case, kind, x), x, case, kind,
                            f"default blocks/{kind}")


def test_bias_of_any_real_type_and_explicit_scale_reach_the_kernel():
  """Python, NumPy and 0-d jax scalars of several dtypes give the same bias (1.5 is exact)."""
  case = Case("scale_bias", q_len=24, kv_len=24)
  x = make_inputs(case)
  want = reference(case, "sigmoid", x._replace(bias=jnp.float32(1.5)), scale=0.3)[0]
  for bias in (1.5, np.float16(1.5), np.float64(1.5), jnp.asarray(1.5, jnp.bfloat16),
               jnp.asarray([1.5])):
    out = flash_attention(x.q, x.k, x.v, kind="sigmoid", scale=0.3, sigmoid_bias=bias)
    assert_close(out, want, TOL["float32"], f"explicit scale, bias {bias!r}")


def test_traced_bias_under_jit_is_data_not_a_recompile():
  """A traced bias runs (no concretisation error) and new values reuse the compiled kernel."""
  case = Case("traced_bias", q_len=24, kv_len=24, heads=2)
  x = make_inputs(case)
  traces = []

  @jax.jit
  def attend(bias):
    traces.append(1)
    return flash_attention(x.q, x.k, x.v, kind="sigmoid", sigmoid_bias=bias)

  for value in (-1.0, 0.25):
    bias = jnp.asarray([value, value - 1.0])  # [H]
    want = reference(case, "sigmoid", x._replace(bias=bias))[0]
    assert_close(attend(bias), want, TOL["float32"], f"traced bias {value}")
  assert len(traces) == 1, f"traced {len(traces)} times for two bias values of one shape"


# ------------------------------------------------------------------- causal block ranges
@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(64, 64, 16, 16), (37, 53, 16, 32),
                                                (53, 37, 32, 16), (40, 200, 8, 128),
                                                (200, 40, 64, 16)])
def test_causal_block_ranges_are_exact(q_len, kv_len, bq, bk):
  """Kernels visit exactly the blocks with a visible pair, and skip masking only where all are."""
  cfg = common.KernelConfig(
      kind="sigmoid", backend="gpu", interpret=True, scale=1.0, bias_grad=False, is_causal=True,
      q_len=q_len, kv_len=kv_len, q_len_padded=common.round_up(q_len, bq),
      kv_len_padded=common.round_up(kv_len, bk), block_q=bq, block_k=bk, block_q_bwd=bq,
      block_k_bwd=bk, num_heads=1, num_kv_heads=1, fast_tanh=False)
  n_q, n_k = cfg.q_len_padded // bq, cfg.kv_len_padded // bk
  rows, cols = np.arange(cfg.q_len_padded), np.arange(cfg.kv_len_padded)
  visible = (cols[None, :] <= rows[:, None] + kv_len - q_len) & (cols[None, :] < kv_len)
  tiles = visible.reshape(n_q, bq, n_k, bk)
  any_visible, all_visible = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
  for i, j in itertools.product(range(n_q), range(n_k)):
    end = int(common.kv_blocks_end(i, cfg, bq, bk))
    unmasked_end = int(common.kv_blocks_unmasked_end(i, cfg, bq, bk, False))
    start = int(common.q_blocks_start(j, cfg, bq, bk))
    unmasked_start = int(common.q_blocks_unmasked_start(j, cfg, bq, bk, False))
    # Rows past q_len are padding: visiting them is harmless (zero dO), so the dK/dV
    # range may include them; it must never miss a real row.
    real_rows_visible = tiles[i, : max(0, min(bq, q_len - i * bq)), j].any()
    assert (j < end) == any_visible[i, j], (i, j, end)
    assert (j < unmasked_end) <= all_visible[i, j], (i, j, unmasked_end)
    if real_rows_visible:
      assert start <= i, (i, j, start)
    assert (i >= unmasked_start) <= all_visible[i, j], (i, j, unmasked_start)
    if j < n_k - 1 or kv_len == cfg.kv_len_padded:  # unpadded blocks: the ranges are tight
      assert (j < unmasked_end) == all_visible[i, j], (i, j, unmasked_end)


# ---------------------------------------------------------------------------- bad input
def _qkv(lq=16, lk=16, h=2, hkv=2, d=16, dtype=jnp.float32):
  return (jnp.zeros((1, lq, h, d), dtype), jnp.zeros((1, lk, hkv, d), dtype),
          jnp.zeros((1, lk, hkv, d), dtype))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="relu"), "kind must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="gpu", block_q=24, interpret=True), "power of two >= 16"),
    (dict(backend="gpu", block_k=8, interpret=True), "power of two >= 16"),
    (dict(backend="tpu", block_q=12, interpret=True), "multiple of 8"),
    (dict(backend="tpu", block_k=64, interpret=True), "multiple of 128"),
    (dict(block_q=16.0), "must be an int"),
    (dict(num_warps=3), "num_warps must be one of"),
    (dict(num_stages=0), "num_stages must be a positive int"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    flash_attention(*_qkv(), **kwargs)


@pytest.mark.skipif(ON_GPU or ON_TPU, reason="checks the CPU-only 'pass interpret=True' error")
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_native_backend_on_cpu_names_the_fix(backend):
  with pytest.raises(ValueError, match="pass interpret=True"):
    flash_attention(*_qkv(), backend=backend, interpret=False)
  with pytest.raises(ValueError, match="pass interpret=True"):
    flash_attention(*_qkv(), backend=backend)


def test_bad_arrays_raise():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unsupported dtype"):
    flash_attention(*_qkv(dtype=jnp.int32))
  with pytest.raises(ValueError, match="share a dtype"):
    flash_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="rank 4"):
    flash_attention(q[0], k, v)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    flash_attention(*_qkv(h=3, hkv=2))
  with pytest.raises(ValueError, match="must match k"):
    flash_attention(q, k, v[:, :8])
  with pytest.raises(ValueError, match="k must be"):
    flash_attention(q, k[..., :8], v)
  seg = jnp.zeros((1, 16), jnp.int32)
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    flash_attention(q, k, v, q_segment_ids=seg)
  with pytest.raises(ValueError, match=r"kv_segment_ids must have shape"):
    flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg[:, :8])
  with pytest.raises(ValueError, match="integer array"):
    flash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg.astype(jnp.float32))


@pytest.mark.parametrize("bias,match", [
    (jnp.zeros((3,)), r"shape \(3,\); .* pass a scalar, \[2\]"),  # H = 2
    (jnp.zeros((2, 2)), r"shape \(2, 2\)"),  # [B, H] is ambiguous: rank 4 says which is which
    (jnp.zeros((1, 2, 16, 1)), r"broadcastable to \[1, 2, 1, 1\]"),  # varies over queries
    (jnp.zeros((2,), bool), "real-valued"),
    ("-1", "must be None"),
])
def test_bad_sigmoid_bias_raises(bias, match):
  with pytest.raises(ValueError, match=match):
    flash_attention(*_qkv(), kind="sigmoid", sigmoid_bias=bias)


# ---------------------------------------------------------------- native (GPU / TPU) runs
NATIVE_CASES = [
    Case("native_full", batch=2, q_len=1000, kv_len=1000, heads=4, kv_heads=4, head_dim=64),
    Case("native_causal_gqa", batch=1, q_len=1000, kv_len=1000, heads=4, kv_heads=2,
         head_dim=128, is_causal=True, bias="per_head"),
    Case("native_segments", batch=2, q_len=777, kv_len=777, heads=2, kv_heads=2, head_dim=64,
         is_causal=True, segments=True),
    Case("native_bf16_causal", batch=2, q_len=1024, kv_len=1024, heads=4, kv_heads=2,
         head_dim=128, is_causal=True, dtype="bfloat16"),
    Case("native_bf16_odd", batch=1, q_len=37, kv_len=600, heads=2, kv_heads=1, head_dim=64,
         dtype="bfloat16", bias="rank4"),
]


def _native(case, kind, backend):
  x = make_inputs(case)
  if kind == "softmax":
    x = x._replace(bias=None)
  got = kernel_value_and_grads(x, kind=kind, is_causal=case.is_causal, q_segment_ids=x.q_seg,
                               kv_segment_ids=x.kv_seg, backend=backend, interpret=False)
  # Native float32 dots may reorder sums over 1000 keys: slightly looser than interpret.
  tol = TOL[case.dtype] if case.dtype == "bfloat16" else dict(atol=1e-4, rtol=1e-4)
  check_against_reference(got, reference(case, kind, x), x, case, kind,
                          f"native {backend}/{kind}/{case.name}", tol)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason=f"needs a GPU; platform is {PLATFORM}")
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: c.name)
def test_native_gpu_kernel_matches_reference(case, kind):
  _native(case, kind, "gpu")


@pytest.mark.tpu
@pytest.mark.skipif(not ON_TPU, reason=f"needs a TPU; platform is {PLATFORM}")
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: c.name)
def test_native_tpu_kernel_matches_reference(case, kind):
  _native(case, kind, "tpu")


# ------------------------------------------------- native lowering (no device needed)
@pytest.mark.parametrize("backend,platform,device_kind", [("gpu", "cuda", "NVIDIA H200"),
                                                          ("tpu", "tpu", "TPU v5 lite")])
@pytest.mark.parametrize("kind,dtype", [("sigmoid", jnp.bfloat16), ("softmax", jnp.float32)])
def test_native_kernels_lower(backend, platform, device_kind, kind, dtype, monkeypatch):
  """Forward and both backward kernels lower to Triton / Mosaic for an abstract H200 / TPU.

  Cross-platform export runs the real Pallas lowering (block-shape rules, Triton ops
  such as tanh.approx, Mosaic layouts) without the device; compiling the lowered
  kernels to machine code still needs the hardware (the gpu/tpu-marked tests). The
  sigmoid bias is a differentiated per-head array, so the bias blocks and the dQ
  kernel's dS row sums lower too.
  """
  export = pytest.importorskip("jax.export")
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax has no abstract devices for cross-platform Pallas lowering")
  monkeypatch.setattr(common, "resolve_backend", lambda b, i: (b, False))  # lower, not run
  q = jax.ShapeDtypeStruct((2, 1000, 4, 80), dtype)
  k = jax.ShapeDtypeStruct((2, 1100, 2, 80), dtype)
  q_seg, kv_seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32), jax.ShapeDtypeStruct((2, 1100),
                                                                                   jnp.int32)
  bias = jax.ShapeDtypeStruct((4,), jnp.float32)

  def fwd_bwd(q, k, v, q_seg, kv_seg, bias):
    attend = lambda q, k, v, bias: flash_attention(
        q, k, v, kind=kind, sigmoid_bias=bias, is_causal=True, backend=backend,
        q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, pullback = jax.vjp(attend, q, k, v, bias)
    return out, pullback(out)

  try:
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                         platform="gpu" if backend == "gpu" else "tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  except TypeError as e:  # older jax: a different abstract-device API
    pytest.skip(f"this jax cannot build an abstract {device_kind}: {e}")
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in ("__gpu$xla.gpu.triton", "tpu_custom_call")]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(
        q, k, k, q_seg, kv_seg, bias)
  target = "xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  assert exported.mlir_module().count(target) == 3  # forward, dK/dV, dQ
