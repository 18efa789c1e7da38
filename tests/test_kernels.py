"""attnlab.kernels.flash_attention against an independent float64 NumPy reference and attend(xla).

On CPU every kernel runs in Pallas interpret mode (GPU-style and TPU interpret
mode) at small shapes, with small blocks so that several query/key blocks, the
causal skipping and the padding are all exercised. Tests marked gpu/tpu run the
native kernels and are skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools

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


# ------------------------------------------------------------------ NumPy float64 reference
def np_attention(q, k, v, w, *, kind, scale, bias, mask):
  """Float64 forward and analytic backward of loss = sum(out * w).

  q [B, Lq, H, D]; k [B, Lk, Hkv, D]; v [B, Lk, Hkv, Dv]; mask bool [B, Lq, Lk].
  Returns out, dq, dk, dv. Fully masked rows give 0 (and zero gradients).
  """
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  h, hkv = q.shape[2], k.shape[2]
  group = h // hkv
  ke, ve = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  m = mask[:, None]  # [B, 1, Lq, Lk]
  s = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
  if kind == "sigmoid":
    p = np.where(m, 1.0 / (1.0 + np.exp(-(s + bias))), 0.0)
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
  return out, dq, dk, dv


def np_mask(lq, lk, batch, is_causal, q_seg, kv_seg):
  mask = np.ones((batch, lq, lk), bool)
  if is_causal:
    mask &= np.tril(np.ones((lq, lk), bool), k=lk - lq)[None]
  if q_seg is not None:
    mask &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
  return mask


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


CASES = [
    Case("full_odd"),
    Case("causal_gqa_lq_lt_lk", q_len=37, kv_len=50, heads=4, kv_heads=2, is_causal=True),
    # Lq > Lk: the first Lq - Lk rows see no key at all (zero output, zero gradient).
    Case("causal_lq_gt_lk_mqa", q_len=53, kv_len=37, heads=2, kv_heads=1, is_causal=True),
    # Packed sequences plus a query segment absent from the keys (fully masked rows);
    # head dims 40/24 are padded by the kernels.
    Case("segments_causal_padded_dims", batch=2, q_len=45, kv_len=45, head_dim=40,
         value_dim=24, is_causal=True, segments=True),
    Case("bf16_causal_gqa", q_len=53, kv_len=53, heads=4, kv_heads=2, is_causal=True,
         dtype="bfloat16"),
]

# Small tiles so that every case spans several blocks (TPU block_k is at least 128: a
# longer case below covers several TPU key blocks).
BLOCKS = {"gpu": dict(block_q=16, block_k=16), "tpu": dict(block_q=16, block_k=128)}
TOL = {"float32": dict(atol=2e-5, rtol=1e-5), "bfloat16": dict(atol=2e-2, rtol=2e-2)}


def make_inputs(case: Case, seed: int = 0):
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
  return q, k, v, w, q_seg, kv_seg


def kernel_value_and_grads(q, k, v, w, **kwargs):
  def loss(q, k, v):
    out = flash_attention(q, k, v, **kwargs)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


def reference(case, kind, q, k, v, w, q_seg, kv_seg):
  mask = np_mask(case.q_len, case.kv_len, case.batch, case.is_causal, q_seg, kv_seg)
  as_f32 = lambda x: np.asarray(x.astype(jnp.float32))
  return np_attention(as_f32(q), as_f32(k), as_f32(v), as_f32(w), kind=kind,
                      scale=case.head_dim ** -0.5, bias=-np.log(case.kv_len), mask=mask)


def assert_close(got, want, tol, what):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  np.testing.assert_allclose(got, want, err_msg=what, **tol)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_numpy_float64_values_and_grads(case, kind, backend):
  q, k, v, w, q_seg, kv_seg = make_inputs(case)
  got = kernel_value_and_grads(q, k, v, w, kind=kind, is_causal=case.is_causal,
                               q_segment_ids=q_seg, kv_segment_ids=kv_seg, backend=backend,
                               interpret=True, **BLOCKS[backend])
  want = reference(case, kind, q, k, v, w, q_seg, kv_seg)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == q.dtype, f"{name} dtype {g.dtype} != input dtype {q.dtype}"
    assert_close(g, r, TOL[case.dtype], f"{backend}/{kind}/{case.name}: {name}")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_matches_attend_xla_with_equivalent_mask(kind, backend):
  """Several TPU key blocks (Lk > 128), causal + segment ids vs attend(impl='xla', mask=...)."""
  case = Case("long", batch=1, q_len=150, kv_len=200, heads=2, kv_heads=1, head_dim=64,
              is_causal=True, segments=True)
  q, k, v, w, q_seg, kv_seg = make_inputs(case, seed=1)
  blocks = dict(block_q=32, block_k=64) if backend == "gpu" else dict(block_q=64, block_k=128)
  got = kernel_value_and_grads(q, k, v, w, kind=kind, is_causal=True, q_segment_ids=q_seg,
                               kv_segment_ids=kv_seg, backend=backend, interpret=True, **blocks)
  seg_mask = (q_seg[:, None, :, None] == kv_seg[:, None, None, :])  # [B, 1, Lq, Lk]

  def xla_loss(q, k, v):
    out = attention.attend(q, k, v, kind=kind, is_causal=True, mask=seg_mask, impl="xla")
    return jnp.sum(out * w), out

  (_, out), grads = jax.value_and_grad(xla_loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, (out, *grads)):
    assert_close(g, np.asarray(r, np.float64), TOL["float32"], f"{backend}/{kind}: {name}")


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_attend_pallas_dispatch_matches_xla(kind):
  q, k, v, w, _, _ = make_inputs(Case("dispatch", q_len=40, kv_len=40, heads=4, kv_heads=2))
  kw = dict(kind=kind, is_causal=True)
  if kind == "sigmoid":
    kw["sigmoid_bias"] = -2.0  # a non-default bias reaches the kernel
  loss = lambda impl: lambda q, k, v: jnp.sum(attention.attend(q, k, v, impl=impl, **kw) * w)
  pallas = jax.value_and_grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
  xla = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(pallas[0], xla[0], rtol=1e-5)
  for g, r in zip(pallas[1], xla[1]):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-5)


def test_default_blocks_and_fully_masked_rows_are_zero():
  """Default tiles; rows that see no key give exact zeros with finite, zero gradients."""
  case = Case("masked_rows", q_len=20, kv_len=9, is_causal=True)  # rows 0..10 see no key
  q, k, v, w, _, _ = make_inputs(case)
  for kind in ("sigmoid", "softmax"):
    out, dq, dk, dv = kernel_value_and_grads(q, k, v, w, kind=kind, is_causal=True)
    assert np.all(np.asarray(out[:, :11]) == 0.0) and np.all(np.asarray(dq[:, :11]) == 0.0)
    for x in (out, dq, dk, dv):
      assert np.all(np.isfinite(np.asarray(x)))
    want = reference(case, kind, q, k, v, w, None, None)
    for name, g, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
      assert_close(g, r, TOL["float32"], f"default blocks/{kind}: {name}")


def test_explicit_scale_and_bias_reach_the_kernel():
  case = Case("scale_bias", q_len=24, kv_len=24)
  q, k, v, w, _, _ = make_inputs(case)
  out = flash_attention(q, k, v, kind="sigmoid", scale=0.3, sigmoid_bias=1.5)
  want = np_attention(q, k, v, w, kind="sigmoid", scale=0.3, bias=1.5,
                      mask=np.ones((1, 24, 24), bool))[0]
  assert_close(out, want, TOL["float32"], "explicit scale/bias")


# ------------------------------------------------------------------- causal block ranges
@pytest.mark.parametrize("q_len,kv_len,bq,bk", [(64, 64, 16, 16), (37, 53, 16, 32),
                                                (53, 37, 32, 16), (40, 200, 8, 128),
                                                (200, 40, 64, 16)])
def test_causal_block_ranges_are_exact(q_len, kv_len, bq, bk):
  """Kernels visit exactly the blocks with a visible pair, and skip masking only where all are."""
  cfg = common.KernelConfig(
      kind="sigmoid", backend="gpu", interpret=True, scale=1.0, sigmoid_bias=0.0, is_causal=True,
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


def test_traced_bias_raises():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="sigmoid_bias must be a concrete Python number"):
    jax.jit(lambda b: flash_attention(q, k, v, sigmoid_bias=b))(1.0)


# ---------------------------------------------------------------- native (GPU / TPU) runs
NATIVE_CASES = [
    Case("native_full", batch=2, q_len=1000, kv_len=1000, heads=4, kv_heads=4, head_dim=64),
    Case("native_causal_gqa", batch=1, q_len=1000, kv_len=1000, heads=4, kv_heads=2,
         head_dim=128, is_causal=True),
    Case("native_segments", batch=2, q_len=777, kv_len=777, heads=2, kv_heads=2, head_dim=64,
         is_causal=True, segments=True),
    Case("native_bf16_causal", batch=2, q_len=1024, kv_len=1024, heads=4, kv_heads=2,
         head_dim=128, is_causal=True, dtype="bfloat16"),
    Case("native_bf16_odd", batch=1, q_len=37, kv_len=600, heads=2, kv_heads=1, head_dim=64,
         dtype="bfloat16"),
]


def _native(case, kind, backend):
  q, k, v, w, q_seg, kv_seg = make_inputs(case)
  got = kernel_value_and_grads(q, k, v, w, kind=kind, is_causal=case.is_causal,
                               q_segment_ids=q_seg, kv_segment_ids=kv_seg, backend=backend,
                               interpret=False)
  want = reference(case, kind, q, k, v, w, q_seg, kv_seg)
  # Native float32 dots may reorder sums over 1000 keys: slightly looser than interpret.
  tol = TOL[case.dtype] if case.dtype == "bfloat16" else dict(atol=1e-4, rtol=1e-4)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(g, r, tol, f"native {backend}/{kind}/{case.name}: {name}")


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
  kernels to machine code still needs the hardware (the gpu/tpu-marked tests).
  """
  export = pytest.importorskip("jax.export")
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax has no abstract devices for cross-platform Pallas lowering")
  monkeypatch.setattr(common, "resolve_backend", lambda b, i: (b, False))  # lower, not run
  q = jax.ShapeDtypeStruct((2, 1000, 4, 80), dtype)
  k = jax.ShapeDtypeStruct((2, 1100, 2, 80), dtype)
  q_seg, kv_seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32), jax.ShapeDtypeStruct((2, 1100),
                                                                                   jnp.int32)

  def fwd_bwd(q, k, v, q_seg, kv_seg):
    attend = lambda q, k, v: flash_attention(q, k, v, kind=kind, is_causal=True, backend=backend,
                                             q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, pullback = jax.vjp(attend, q, k, v)
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
        q, k, k, q_seg, kv_seg)
  target = "xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  assert exported.mlir_module().count(target) == 3  # forward, dK/dV, dQ
