"""attnlab.kernels.decode_attention (split-key decoding) against a float64 NumPy reference and
attend(impl="xla", q_offset=...), and the pallas models' decoding through it.

On CPU both backends run in Pallas interpret mode (GPU-style and TPU) at tiny shapes: GPU
16-key tiles, so a cache of 50 slots is 4 tiles (the last one padded), TPU 128-key tiles
(its minimum), so a cache of 300 slots is 3 tiles, shared out among the splits. The
cache slots past the valid length hold large random values: they must get no weight.
The decoding position is traced, so one compilation serves every position tested.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import attention
from attnlab.attention import api
from attnlab.kernels import capabilities, common, decode_attention
from attnlab.models import Transformer, TransformerConfig
from attnlab.models import decode as dec

PLATFORM = jax.default_backend()
ON_GPU = PLATFORM in ("gpu", "cuda", "rocm")
ON_TPU = PLATFORM == "tpu"

pytestmark = pytest.mark.usefixtures("fast_xla_compile")

HEAD_DIM = 32
# (cache slots, key tile) per backend: several tiles, the last one padded.
SIZES = {"gpu": (50, 16), "tpu": (300, 128)}
TOL = {"float32": dict(atol=2e-5, rtol=1e-5), "bfloat16": dict(atol=2e-2, rtol=2e-2)}


def np_decode(q, k, v, offset, *, kind, scale, bias):
  """Float64 causal attention of queries at offset.. over the keys: query i sees j <= offset + i.

  bias: sigmoid's, a number or [H]. A row that sees no key gives 0.
  """
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  ke, ve = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  lq, lk = q.shape[1], k.shape[1]
  visible = np.arange(lk)[None, :] <= offset + np.arange(lq)[:, None]  # [Lq, Lk]
  s = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
  if kind == "sigmoid":
    b = np.asarray(bias, np.float64).reshape(1, -1, 1, 1) if np.ndim(bias) else bias
    p = np.where(visible, 1.0 / (1.0 + np.exp(-(s + b))), 0.0)
  else:
    s = np.where(visible, s, -np.inf)
    row_max = s.max(-1, keepdims=True)
    e = np.where(visible, np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", p, ve)


def make_inputs(q_len, kv_len, heads, kv_heads, dtype="float32", seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(2, q_len, heads, HEAD_DIM))
  k = rng.normal(size=(2, kv_len, kv_heads, HEAD_DIM))
  v = rng.normal(size=(2, kv_len, kv_heads, HEAD_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def with_garbage(x, valid_len, seed):
  """x with its slots from valid_len on overwritten by large random values (a stale cache)."""
  noise = 30.0 * np.random.default_rng(seed).normal(size=x.shape)
  slots = (np.arange(x.shape[1]) >= valid_len)[None, :, None, None]
  return jnp.where(slots, jnp.asarray(noise, x.dtype), x)


@functools.partial(jax.jit, static_argnames=("kind", "num_splits", "backend"))
def kernel(q, k, v, offset, bias, *, kind, num_splits, backend):
  return decode_attention(q, k, v, offset, kind=kind, sigmoid_bias=bias, num_splits=num_splits,
                          block_k=SIZES[backend][1], backend=backend, interpret=True)


@functools.partial(jax.jit, static_argnames=("kind",))
def xla(q, k, v, offset, bias, *, kind):
  options = dict(sigmoid_bias=bias) if kind == "sigmoid" else {}
  with jax.default_matmul_precision("highest"):
    return attention.attend(q, k, v, kind=kind, impl="xla", is_causal=True, q_offset=offset,
                            **options)


def check(got, want, dtype, what):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  np.testing.assert_allclose(got, want, err_msg=what, **TOL[dtype])


# (q_len, heads, kv_heads, dtype): GQA (H=4 on 2) and MQA (2 on 1), one token and a chunk of
# three, float32 tight and bfloat16 loose.
CASES = [(1, 4, 2, "float32"), (3, 4, 2, "float32"), (1, 2, 1, "float32"),
         (3, 2, 1, "float32"), (3, 4, 2, "bfloat16")]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("q_len,heads,kv_heads,dtype", CASES)
def test_matches_numpy_float64_and_attend_xla(kind, q_len, heads, kv_heads, dtype, backend):
  kv_len = SIZES[backend][0]
  q, k, v = make_inputs(q_len, kv_len, heads, kv_heads, dtype)
  # Sigmoid: one bias per query head around the default (a kernel reading the wrong head's
  # scalar would be caught); softmax takes none.
  bias = (jnp.asarray(-np.log(kv_len) + np.linspace(-1, 1, heads), jnp.float32)
          if kind == "sigmoid" else None)
  # The first position (the first split alone has keys), one inside a tile, and the last.
  for offset in (0, kv_len // 2 - 4, kv_len - q_len):
    kk, vv = with_garbage(k, offset + q_len, 1), with_garbage(v, offset + q_len, 2)
    want = np_decode(q, kk, vv, offset, kind=kind, scale=HEAD_DIM ** -0.5,
                     bias=None if bias is None else np.asarray(bias))
    run = functools.partial(kernel, q, kk, vv, jnp.int32(offset), bias, kind=kind,
                            backend=backend)
    one, split = run(num_splits=1), run(num_splits=3)
    what = f"{backend}/{kind} Lq={q_len} H={heads}/{kv_heads} {dtype} offset={offset}"
    assert one.shape == q.shape and one.dtype == q.dtype, what
    check(one, want, dtype, f"{what}, 1 split")
    check(split, want, dtype, f"{what}, 3 splits")
    np.testing.assert_allclose(np.asarray(split, np.float32), np.asarray(one, np.float32),
                               err_msg=f"{what}: 3 splits vs 1", **TOL[dtype])
    if dtype == "float32":
      check(split, np.asarray(xla(q, kk, vv, jnp.int32(offset), bias, kind=kind)), dtype,
            f"{what}: vs attend(xla)")


def test_defaults_and_attend_dispatch():
  """Default tiles, splits and sigmoid bias (-log of the cache size) through attend(pallas);
  a cache that no split size divides (37 slots) and more splits than tiles."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(1, 2, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 37, 2, 16)), jnp.float32) for _ in range(2))
  for kind in ("sigmoid", "softmax"):
    want = np_decode(q, k, v, 30, kind=kind, scale=0.25, bias=-np.log(37))
    check(attention.attend(q, k, v, kind=kind, impl="pallas", is_causal=True,
                           q_offset=jnp.int32(30)), want, "float32", f"{kind} defaults")
    check(decode_attention(q, k, v, 30, kind=kind, num_splits=64), want, "float32",
          f"{kind} 64 splits")


# ---------------------------------------------------------------- the models decode with it
def lm(kind, impl):
  cfg = TransformerConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, vocab_size=11,
                          max_len=20, positions="rope", attention=kind, attention_impl=impl)
  return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_pallas_model_decodes_like_its_xla_twin(kind):
  """Prefill of 4 tokens and single-token steps run the decode kernel (interpreted on CPU);
  the logits are the xla-impl model's (same parameters)."""
  pallas, twin = lm(kind, "pallas"), lm(kind, "xla")
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 12), 0, 11)
  impl = dec.decode_impl(pallas)
  assert impl.impl == "pallas" and impl.for_tokens(1, 8).impl == "pallas"
  assert impl.for_tokens(capabilities.DECODE_MAX_Q_LEN + 1, 8).impl == "auto"  # long prompts
  graphdef, params = nnx.split(pallas)
  step = jax.make_jaxpr(lambda p, s: dec.step(graphdef, p, tokens_BL[:, :1], s, impl))
  assert "pallas_call" in str(step(params, dec.init_cache(pallas, 2)))

  def cached(model):
    state = dec.init_cache(model, 2)
    logits, state = dec.decode_step(model, tokens_BL[:, :4], state)
    out = [logits]
    for t in range(4, tokens_BL.shape[1]):
      logits, state = dec.decode_step(model, tokens_BL[:, t:t + 1], state)
      out.append(logits)
    return np.concatenate(out, axis=1)

  with jax.default_matmul_precision("highest"):
    want = cached(twin)
  np.testing.assert_allclose(cached(pallas), want, atol=2e-5, rtol=2e-5)


def test_auto_picks_the_decode_kernel_only_where_it_has_run_natively(monkeypatch):
  q, k = jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 64, 2, 16))
  long_q = jnp.zeros((1, capabilities.DECODE_MAX_Q_LEN + 1, 4, 16))
  # Today no backend: auto decodes with the jnp paths everywhere (the training kernel's
  # choice, without a q_offset, is unchanged).
  assert capabilities.DECODE_AUTO_BACKENDS == ()
  for platform in ("cpu", "gpu", "tpu"):
    monkeypatch.setattr(api, "platform", lambda p=platform: p)
    assert api.auto_impl("sigmoid", q, k, k, q_offset=3) == "xla", platform
    assert api.auto_impl("sigmoid", q, k, k) == ("xla" if platform == "cpu" else "pallas")
  # Once a backend is listed, auto picks the kernel there, within its limits only.
  monkeypatch.setattr(capabilities, "DECODE_AUTO_BACKENDS", ("gpu", "tpu"))
  for platform, want in (("cpu", "xla"), ("gpu", "pallas"), ("tpu", "pallas")):
    monkeypatch.setattr(api, "platform", lambda p=platform: p)
    assert api.auto_impl("sigmoid", q, k, k, q_offset=3) == want, platform
    assert api.auto_impl("softmax", long_q, k, k, q_offset=3) == "xla", platform
    assert api.auto_impl("relu", q, k, k, q_offset=3) == "xla", platform


# ---------------------------------------------------------------------------- bad input
def _qkv(lq=1, lk=32, h=4, hkv=2, d=16, dtype=jnp.float32):
  return (jnp.zeros((1, lq, h, d), dtype), jnp.zeros((1, lk, hkv, d), dtype),
          jnp.zeros((1, lk, hkv, d), dtype))


@pytest.mark.parametrize("args,kwargs,match", [
    (_qkv(lq=capabilities.DECODE_MAX_Q_LEN + 1, lk=40), {}, "at most 16 queries per call"),
    (_qkv(d=512), {}, "head dims up to 256"),
    (_qkv(), dict(q_offset=1.5), "q_offset must be an integer scalar"),
    (_qkv(), dict(q_offset=jnp.zeros((1,), jnp.int32)), "q_offset must be an integer scalar"),
    (_qkv(), dict(kind="relu"), "kind must be one of"),
    (_qkv(), dict(num_splits=0), "num_splits must be a positive int"),
    (_qkv(), dict(block_k=24), "power of two >= 16"),
    (_qkv(), dict(backend="tpu", block_k=64, interpret=True), "multiple of 128"),
    (_qkv(), dict(backend="cuda"), "backend must be one of"),
    (_qkv(dtype=jnp.int32), {}, "unsupported dtype"),
    (_qkv(h=3, hkv=2), {}, "multiple of num_kv_heads"),
    (_qkv(), dict(num_warps=3), "num_warps must be one of"),
])
def test_bad_inputs_raise(args, kwargs, match):
  kwargs = {"q_offset": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    decode_attention(*args, kwargs.pop("q_offset"), **kwargs)


def test_attend_pallas_with_q_offset_refuses_segment_ids():
  q, k, v = _qkv()
  seg = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match="decode kernel.*takes no q_segment_ids"):
    attention.attend(q, k, v, kind="softmax", impl="pallas", is_causal=True, q_offset=2,
                     q_segment_ids=seg, kv_segment_ids=jnp.zeros((1, 32), jnp.int32))

# ------------------------------------------------------------- native (GPU / TPU) runs
NATIVE = dict(argnames="kind,dtype,q_len", argvalues=[
    (kind, dtype, q_len) for kind in ("sigmoid", "softmax")
    for dtype in ("float32", "bfloat16") for q_len in (1, 4)])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason=f"needs a GPU; platform is {PLATFORM}")
@pytest.mark.parametrize(**NATIVE)
def test_native_gpu_kernel_matches_reference(kind, dtype, q_len):
  _native(kind, dtype, q_len)


@pytest.mark.tpu
@pytest.mark.skipif(not ON_TPU, reason=f"needs a TPU; platform is {PLATFORM}")
@pytest.mark.parametrize(**NATIVE)
def test_native_tpu_kernel_matches_reference(kind, dtype, q_len):
  _native(kind, dtype, q_len)


def _native(kind, dtype, q_len):
  """The native kernel, default tiles and splits: a 3000-slot cache (padded to whole
  tiles), GQA 8 on 2, D = 128, stale slots past the valid length."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, q_len, 8, 128)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(2, 3000, 2, 128)), dtype) for _ in range(2))
  step = jax.jit(functools.partial(decode_attention, kind=kind))
  for offset in (0, 1234, 3000 - q_len):
    kk, vv = with_garbage(k, offset + q_len, 1), with_garbage(v, offset + q_len, 2)
    want = np_decode(q, kk, vv, offset, kind=kind, scale=128 ** -0.5, bias=-np.log(3000))
    # Native float32 dots may reorder sums over 3000 keys: slightly looser than interpret.
    tol = TOL[dtype] if dtype == "bfloat16" else dict(atol=1e-4, rtol=1e-4)
    got = np.asarray(jnp.asarray(step(q, kk, vv, jnp.int32(offset)), jnp.float32))
    np.testing.assert_allclose(got, want, err_msg=f"{kind} {dtype} offset={offset}", **tol)


# ------------------------------------------------- native lowering (no device needed)
def _lower_for(backend, device_kind, platform, custom_call, q_shape, k_shape, kind, dtype,
               monkeypatch):
  """The MLIR module of the decode kernel exported for an abstract device of `device_kind`,
  with the safety check for `custom_call` (the Triton or Mosaic kernel) disabled."""
  export = pytest.importorskip("jax.export")
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax has no abstract devices for cross-platform Pallas lowering")
  monkeypatch.setattr(common, "resolve_backend", lambda b, i: (backend, False))  # lower, not run
  q = jax.ShapeDtypeStruct(q_shape, dtype)
  k = jax.ShapeDtypeStruct(k_shape, dtype)
  offset = jax.ShapeDtypeStruct((), jnp.int32)

  def step(q, k, v, offset):
    return decode_attention(q, k, v, offset, kind=kind, sigmoid_bias=None)

  try:
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                         platform=backend)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  except TypeError as e:  # older jax: a different abstract-device API
    pytest.skip(f"this jax cannot build an abstract {device_kind}: {e}")
  checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(
        q, k, k, offset)
  return exported.mlir_module()


@pytest.mark.parametrize("kind,dtype", [("sigmoid", jnp.bfloat16), ("softmax", jnp.float32)])
def test_native_gpu_kernel_lowers(kind, dtype, monkeypatch):
  """The decode kernel lowers to Triton for an abstract H200 (block shapes, the scalar
  offset block, tanh.approx), as tests/test_kernels.py checks the training kernels; running
  it natively needs the GPU (benchmarks/gpu_check.sh)."""
  module = _lower_for("gpu", "NVIDIA H200", "cuda", "__gpu$xla.gpu.triton", (2, 1, 8, 80),
                      (2, 1000, 2, 80), kind, dtype, monkeypatch)
  assert module.count("xla.gpu.triton") == 1


@pytest.mark.parametrize("kind,dtype", [("sigmoid", jnp.bfloat16), ("softmax", jnp.float32)])
def test_native_tpu_kernel_lowers(kind, dtype, monkeypatch):
  """The decode kernel lowers to Mosaic for an abstract TPU (scalar prefetch, the column
  blocks of the [B, Lk, Hkv * D] cache view, the (8, 128) tiling)."""
  module = _lower_for("tpu", "TPU v5 lite", "tpu", "tpu_custom_call", (2, 3, 8, 128),
                      (2, 1000, 2, 128), kind, dtype, monkeypatch)
  assert module.count("tpu_custom_call") == 1
