"""The Mosaic GPU kernels (`flash_attention(backend="mgpu")`) against the float64 NumPy reference.

On CPU they run in Mosaic GPU's interpret mode, which simulates the producer and consumer
warpgroups, shared memory, TMA copies and barriers: a slot freed too early or a barrier
waited on twice would show here as a wrong value or a hang. Cases span several query and
key tiles (64-row warpgroup blocks against 128- and 64-key tiles), padding of lengths and
head dims, causal skipping with Lq < Lk and Lq > Lk, GQA and MQA, and the traced sigmoid
bias with its gradient. The lowering test lowers forward and backward for an abstract
Hopper GPU; the gpu-marked test runs them natively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from test_kernels import TOL, Case, check_against_reference, kernel_value_and_grads
from test_kernels import make_inputs, reference

from attnlab.kernels import common
from attnlab.kernels import flash_attention
from attnlab.kernels import flash_mgpu

PLATFORM = jax.default_backend()
ON_GPU = PLATFORM in ("gpu", "cuda")

pytestmark = pytest.mark.usefixtures("fast_xla_compile")
runs_kernels = pytest.mark.skipif(
    flash_mgpu.interpret_params() is None and not ON_GPU,
    reason=f"jax {jax.__version__} has no complete Mosaic GPU interpret mode (jax >= 0.12.1)")

# float16: wgmma's other input type; its 10-bit mantissa is 8x finer than bfloat16's.
F16_TOL = dict(atol=4e-3, rtol=4e-3)

CASES = [
    Case("full_odd_padded_dim", q_len=37, kv_len=37, head_dim=32, dtype="bfloat16",
         bias="scalar"),
    # Several 128-key tiles, a partly padded last tile, three pipeline slots.
    Case("causal_gqa_lq_lt_lk", q_len=150, kv_len=300, heads=4, kv_heads=2, head_dim=64,
         is_causal=True, dtype="bfloat16", bias="per_head"),
    # Lq > Lk: the first rows see no key (zero output and gradient); the second consumer
    # warpgroup sees more tiles than the first, which only frees them.
    Case("causal_lq_gt_lk_mqa", q_len=200, kv_len=70, heads=2, kv_heads=1, head_dim=64,
         is_causal=True, dtype="float16"),
    Case("d128_full_rank4_bias", batch=2, q_len=130, kv_len=130, heads=1, kv_heads=1,
         head_dim=128, dtype="bfloat16", bias="rank4"),
]


def _check(case: Case, kind: str, **options):
  x = make_inputs(case)
  if kind == "softmax":
    x = x._replace(bias=None)
  # Off a GPU not under an outer jit: jax's Mosaic GPU interpreter simulates warpgroups with
  # blocking host callbacks, and inside a larger jitted program on a 2-core machine it can
  # wait forever (jax's own interpret tests run one kernel at a time).
  got = kernel_value_and_grads(x, jit=ON_GPU, kind=kind, is_causal=case.is_causal,
                               backend="mgpu", interpret=not ON_GPU, **options)
  tol = F16_TOL if case.dtype == "float16" else TOL[case.dtype]
  check_against_reference(got, reference(case, kind, x), x, case, kind,
                          f"mgpu/{kind}/{case.name}", tol)


@runs_kernels
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_numpy_float64_values_and_grads(case, kind):
  _check(case, kind, num_stages=3 if case.name == "causal_gqa_lq_lt_lk" else None)


@runs_kernels
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_explicit_64_key_tiles(kind):
  """block_k=64 (the head-dim-256 default) through forward and backward."""
  _check(Case("blocks64", q_len=130, kv_len=200, heads=2, kv_heads=2, head_dim=64,
              is_causal=True, dtype="bfloat16", bias="per_head"), kind, block_q=64,
         block_k=64)


def test_blocks_and_padding_are_whole_programs():
  assert flash_mgpu.default_blocks(1000, 1000, 128, jnp.bfloat16) == (64, 128, 64, 64)
  assert flash_mgpu.default_blocks(1000, 1000, 256, jnp.bfloat16) == (64, 64, 64, 64)
  # Two consumer warpgroups of 64 rows per program, forward and backward alike.
  assert flash_mgpu.length_multiples(64, 128, 64, 64) == (128, 128)
  assert flash_mgpu.padded_head_dim(40) == 64 and flash_mgpu.padded_head_dim(80) == 128
  assert common.length_multiples(128, 64, 64, 64) == (128, 64)


def _qkv(dtype=jnp.bfloat16, length=64):
  x = jnp.zeros((1, length, 2, 64), dtype)
  return x, x, x


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "bfloat16 or float16"),  # float32 inputs below
    (dict(q_segment_ids=jnp.zeros((1, 64), jnp.int32),
          kv_segment_ids=jnp.zeros((1, 64), jnp.int32)), "segment ids"),
    (dict(num_warps=4), "num_warps is a Triton option"),
    (dict(block_k=96), "multiple of 64"),
])
def test_bad_options_name_the_fix(kwargs, match):
  dtype = jnp.float32 if not kwargs else jnp.bfloat16
  with pytest.raises(ValueError, match=match):
    flash_attention(*_qkv(dtype), backend="mgpu", interpret=True, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only 'pass interpret=True' error")
def test_native_mgpu_on_cpu_names_the_fix():
  with pytest.raises(ValueError, match="interpret=True"):
    flash_attention(*_qkv(), backend="mgpu")


@pytest.mark.parametrize("kind,head_dim", [("sigmoid", 128), ("softmax", 64)])
def test_forward_and_backward_lower_for_hopper(kind, head_dim, monkeypatch):
  """Forward, dQ and dK/dV lower to three Mosaic GPU custom calls for CUDA without a GPU.

  Lowering runs Mosaic GPU's own passes (layouts of every register array, the shapes
  wgmma and TMA accept); compiling to SASS still needs the device (the gpu-marked test).
  The bias is a traced per-head array, so the d bias row sums lower too.
  """
  export = pytest.importorskip("jax.export")
  monkeypatch.setattr(common, "resolve_backend", lambda b, i: (b, False))  # lower, not run
  q = jax.ShapeDtypeStruct((2, 1000, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1100, 2, head_dim), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((4,), jnp.float32)

  def fwd_bwd(q, k, v, bias):
    attend = lambda q, k, v, bias: flash_attention(q, k, v, kind=kind, sigmoid_bias=bias,
                                                   is_causal=True, backend="mgpu")
    out, pullback = jax.vjp(attend, q, k, v, bias)
    return out, pullback(out)

  exported = export.export(jax.jit(fwd_bwd), platforms=["cuda"])(q, k, k, bias)
  assert exported.mlir_module().count("stablehlo.custom_call @mosaic_gpu") == 3


NATIVE_CASES = [
    Case("native_causal_gqa", batch=2, q_len=1024, kv_len=1024, heads=4, kv_heads=2,
         head_dim=128, is_causal=True, dtype="bfloat16", bias="per_head"),
    Case("native_odd_d64", q_len=37, kv_len=600, heads=2, kv_heads=1, head_dim=64,
         dtype="bfloat16", bias="rank4"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason=f"needs a Hopper GPU; platform is {PLATFORM}")
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: c.name)
def test_native_mgpu_kernel_matches_reference(case, kind):
  _check(case, kind)


# ------------------------------------------------------------- the measured default backend
FAKE_TABLE = {"devices": {"NVIDIA H100 80GB HBM3": {
    "sigmoid/bfloat16/d64/causal": {"backend": "mgpu", "block_k": 64, "num_stages": 3},
    "softmax/bfloat16/d64/causal": {"backend": "gpu"},
}}}


@pytest.fixture
def fake_gpu(monkeypatch):
  """A GPU platform of a chosen device kind, the fake table, and the KernelConfig each
  flash_attention call would run (the kernel itself is not run)."""
  from attnlab.kernels import flash as flash_module
  from attnlab.kernels import tuned
  seen = []
  monkeypatch.setattr(common, "on_gpu", lambda: True)
  monkeypatch.setattr(common, "resolve_backend", lambda b, i: (b or "gpu", True))
  monkeypatch.setattr(tuned, "load_table", lambda: FAKE_TABLE)
  monkeypatch.setattr(flash_module.sharded, "call",
                      lambda fn, q, k, v, *rest: (seen.append(rest[-1]), q)[1])
  kind = {"value": "NVIDIA H100 80GB HBM3"}
  monkeypatch.setattr(tuned, "device_kind", lambda: kind["value"])
  return seen, kind


def test_default_backend_is_the_measured_winner(fake_gpu):
  seen, device = fake_gpu
  q = jnp.zeros((1, 100, 2, 64), jnp.bfloat16)
  flash_attention(q, q, q, kind="sigmoid", is_causal=True)
  assert (seen[-1].backend, seen[-1].block_k, seen[-1].num_stages) == ("mgpu", 64, 3)
  flash_attention(q, q, q, kind="sigmoid", is_causal=True, block_k=128)  # explicit wins
  assert (seen[-1].backend, seen[-1].block_k) == ("mgpu", 128)
  flash_attention(q, q, q, kind="softmax", is_causal=True)  # measured: Triton was faster
  assert seen[-1].backend == "gpu"
  flash_attention(q, q, q, kind="sigmoid", is_causal=False)  # shape class not measured
  assert seen[-1].backend == "gpu"
  q32 = q.astype(jnp.float32)  # the table says mgpu, but it takes no float32
  flash_attention(q32, q32, q32, kind="sigmoid", is_causal=True)
  assert seen[-1].backend == "gpu"
  device["value"] = "NVIDIA A100-SXM4-80GB"  # a device never measured
  flash_attention(q, q, q, kind="sigmoid", is_causal=True)
  assert seen[-1].backend == "gpu"


def test_committed_table_is_well_formed():
  from attnlab.kernels import tuned
  table = tuned.load_table()
  for device, classes in table["devices"].items():
    for key, entry in classes.items():
      kind, dtype, dim, mask = key.split("/")
      assert tuned.shape_class(kind, dtype, int(dim[1:]), mask == "causal") == key, device
      assert entry["backend"] in common.BACKENDS
      assert set(entry) - {"backend", *tuned.TUNED_OPTIONS} <= {"ms", "triton_ms", "lengths"}
