"""Fused attention kernels side by side: FlashSigmoid vs FlashAttention-2 (ours, same tiling),
jax's own Pallas flash attention, jax.nn.dot_product_attention (cuDNN on GPU) and the XLA
reference — forward and forward+backward, one table per run.

    # GPU / TPU (bf16; batch * L = --tokens, heads = --model-dim / D):
    python benchmarks/attention_kernels.py --lengths 1024,4096,16384 --head-dims 64,128
    # CPU: interpret mode at tiny shapes, only to prove the script runs (automatic on CPU):
    python benchmarks/attention_kernels.py --quick

Columns: median time (ms) over --repeats runs after a compiling warm-up; TFLOP/s with
attention FLOPs = 4·B·H·Lq·Lk·D forward (halved when causal) and 3.5× that for
forward+backward; XLA's compiled temporaries (MiB, per implementation) and, on GPU, the
process peak from device.memory_stats() after that implementation ran (monotonic);
speedups of flash-sigmoid over flash-softmax (ours) and over cuDNN (time ratio
reference / sigmoid, > 1 means sigmoid is faster). `flash-sigmoid +dbias` passes the
bias as a per-head array traced under jit (as a learned bias is), so its backward
also computes d bias (the dQ kernel's dS row sums): its `f+b x` column is that
cost. Interpret-mode (CPU) times say nothing about kernel speed.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import statistics
import sys
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from timing import median_ms  # benchmarks/timing.py

from attnlab import attention
from attnlab.kernels import flash_attention

PLATFORM = jax.default_backend()
ON_GPU = PLATFORM in ("gpu", "cuda", "rocm")
ON_TPU = PLATFORM == "tpu"


def _jax_pallas_softmax(interpret: bool) -> Callable | None:
  """jax's own Pallas flash attention (softmax) for this platform, if importable."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      if ON_TPU:
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa  # pylint: disable=g-import-not-at-top

        def run(q, k, v, causal):
          t = lambda x: jnp.swapaxes(x, 1, 2)  # it takes [B, H, L, D]
          return t(tpu_fa.flash_attention(t(q), t(k), t(v), causal=causal,
                                          sm_scale=q.shape[-1] ** -0.5))
        return run
      from jax.experimental.pallas.ops.gpu import attention as gpu_fa  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None

  def run(q, k, v, causal):
    return gpu_fa.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal,
                      interpret=interpret)
  return run


def _traced_bias(q: jax.Array, k: jax.Array) -> jax.Array:
  """The default -log(Lk) as a per-head [H] array: built inside jit it is traced, like a
  learned bias, so the kernels' backward computes its gradient."""
  return jnp.full((q.shape[2],), -math.log(k.shape[1]), jnp.float32)


def implementations(interpret: bool, xla_max_len: int, length: int, gqa: bool):
  """name -> fn(q, k, v, causal) -> out (None where unavailable, with the reason)."""
  ours = dict(interpret=True) if interpret else {}
  impls: dict[str, Callable | str] = {
      "flash-sigmoid (ours)": lambda q, k, v, c: flash_attention(q, k, v, kind="sigmoid",
                                                                 is_causal=c, **ours),
      "flash-sigmoid +dbias": lambda q, k, v, c: flash_attention(
          q, k, v, kind="sigmoid", sigmoid_bias=_traced_bias(q, k), is_causal=c, **ours),
      "flash-softmax (ours)": lambda q, k, v, c: flash_attention(q, k, v, kind="softmax",
                                                                 is_causal=c, **ours),
  }
  jax_pallas = _jax_pallas_softmax(interpret)
  impls["jax pallas softmax"] = (
      "not importable" if jax_pallas is None else
      "no GQA support" if gqa else jax_pallas)
  sdpa_impl = "cudnn" if ON_GPU else "xla"
  impls[f"jax.nn.dpa ({sdpa_impl})"] = lambda q, k, v, c: jax.nn.dot_product_attention(
      q, k, v, is_causal=c, implementation=sdpa_impl)
  for kind in ("sigmoid", "softmax"):
    impls[f"{kind} xla (attend)"] = (
        f"skipped: L > --xla-max-len {xla_max_len}" if length > xla_max_len else
        (lambda kind: lambda q, k, v, c: attention.attend(q, k, v, kind=kind, is_causal=c,
                                                          impl="xla"))(kind))
  return impls


def compile_once(fn, args):
  """One compilation serves both the timing and XLA's memory analysis."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  return compiled, (float("nan") if mem is None else mem.temp_size_in_bytes / 2**20)


def device_peak_mib() -> float:
  stats = jax.devices()[0].memory_stats() if ON_GPU else None
  return float("nan") if not stats else stats.get("peak_bytes_in_use", 0) / 2**20


def measure(fn, q, k, v, do, causal: bool, repeats: int) -> dict[str, float]:
  def fwd_bwd(q, k, v, do):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, causal), q, k, v)
    return out, pullback(do)

  fwd, fwd_tmp = compile_once(lambda q, k, v: fn(q, k, v, causal), (q, k, v))
  result = {"fwd_ms": median_ms(fwd, (q, k, v), repeats), "fwd_tmp": fwd_tmp}
  fwd_bwd, result["fwdbwd_tmp"] = compile_once(fwd_bwd, (q, k, v, do))
  result["fwdbwd_ms"] = median_ms(fwd_bwd, (q, k, v, do), repeats)
  result["fwdbwd_peak"] = device_peak_mib()
  return result


def attention_flops(b, h, lq, lk, d, causal) -> float:
  return 4.0 * b * h * lq * lk * d * (0.5 if causal else 1.0)


def run(args) -> None:
  # Lines go to the --out file as they are produced: a run cut short by a timeout keeps
  # every row it finished.
  out = open(args.out, "w") if args.out else io.StringIO()

  def emit(line=""):
    print(line, file=out, flush=True)
    print(line, flush=True)

  interpret = args.interpret
  dtype = jnp.dtype(args.dtype)
  emit(f"# attention kernels benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  emit(f"jax {jax.__version__}, platform {PLATFORM}, device {jax.devices()[0].device_kind}, "
       f"dtype {dtype.name}, interpret={interpret}, repeats={args.repeats}")
  emit(f"shapes: B = max(1, {args.tokens} // L), H = {args.model_dim} // D, "
       f"Hkv = H // {args.gqa}; lengths {args.lengths}; head dims {args.head_dims}")
  emit("units: ms = median wall time; TF/s = attention TFLOP/s (GF/s on CPU); tmp = XLA "
       "temporaries MiB; peak = process peak MiB (GPU only, monotonic)")
  if interpret:
    emit("NOTE: Pallas kernels run in INTERPRET mode here: their times are meaningless; this "
         "run only proves the script works.")
  header = (f"| {'L':>6} | {'D':>4} | {'mask':6} | {'impl':24} | {'fwd ms':>9} | {'fwd TF/s':>8} "
            f"| {'f+b ms':>9} | {'f+b TF/s':>8} | {'fwd tmp':>8} | {'f+b tmp':>8} "
            f"| {'peak':>8} | {'fwd x':>6} | {'f+b x':>6} |")
  emit()
  emit("speedup columns `fwd x` / `f+b x` = time(this impl) / time(flash-sigmoid) in the same row group")
  emit(header)
  emit("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  unit = 1e12 if (ON_GPU or ON_TPU) else 1e9
  summary = []
  key = jax.random.PRNGKey(0)
  for length in args.lengths:
    for d in args.head_dims:
      b, h = max(1, args.tokens // length), max(1, args.model_dim // d)
      hkv = max(1, h // args.gqa)
      kq, kk, kv, kd = jax.random.split(key, 4)
      q = jax.random.normal(kq, (b, length, h, d), dtype)
      k = jax.random.normal(kk, (b, length, hkv, d), dtype)
      v = jax.random.normal(kv, (b, length, hkv, d), dtype)
      do = jax.random.normal(kd, (b, length, h, d), dtype)
      for causal in args.masks:
        flops = attention_flops(b, h, length, length, d, causal)
        rows = {}
        for name, fn in implementations(interpret, args.xla_max_len, length,
                                        hkv != h).items():
          if isinstance(fn, str):
            rows[name] = fn
            continue
          try:
            rows[name] = measure(fn, q, k, v, do, causal, args.repeats)
          except Exception as e:  # pylint: disable=broad-except
            # A missing cuDNN, an OOM, an unsupported shape: report it in the table.
            rows[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        ref = rows.get("flash-sigmoid (ours)")
        for name, r in rows.items():
          mask = "causal" if causal else "full"
          if isinstance(r, str):
            emit(f"| {length:>6} | {d:>4} | {mask:6} | {name:24} | {r} |")
            continue
          ratio = lambda key: (r[key] / ref[key]) if isinstance(ref, dict) else float("nan")
          emit(f"| {length:>6} | {d:>4} | {mask:6} | {name:24} | {r['fwd_ms']:9.3f} "
               f"| {flops / r['fwd_ms'] / 1e-3 / unit:8.2f} | {r['fwdbwd_ms']:9.3f} "
               f"| {3.5 * flops / r['fwdbwd_ms'] / 1e-3 / unit:8.2f} | {r['fwd_tmp']:8.1f} "
               f"| {r['fwdbwd_tmp']:8.1f} | {r['fwdbwd_peak']:8.0f} | {ratio('fwd_ms'):6.2f} "
               f"| {ratio('fwdbwd_ms'):6.2f} |")
          if isinstance(ref, dict) and name != "flash-sigmoid (ours)":
            summary.append((length, d, mask, name, ratio("fwd_ms"), ratio("fwdbwd_ms")))
  emit()
  emit("## flash-sigmoid speedup (time of reference / time of flash-sigmoid; > 1 = sigmoid faster)")
  for ref_name in ("flash-softmax (ours)", "jax.nn.dpa (cudnn)" if ON_GPU else "jax.nn.dpa (xla)"):
    picked = [s for s in summary if s[3] == ref_name]
    if picked:
      fwd = statistics.median(s[4] for s in picked)
      fb = statistics.median(s[5] for s in picked)
      emit(f"vs {ref_name}: median over {len(picked)} shapes: forward x{fwd:.3f}, "
           f"forward+backward x{fb:.3f}")
  out.close()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(x) for x in s.split(",")]
  parser.add_argument("--lengths", type=ints, default=[1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=ints, default=[64, 128])
  parser.add_argument("--masks", type=lambda s: [m == "causal" for m in s.split(",")],
                      default=[True, False], help="comma list of causal,full")
  parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // L")
  parser.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // D")
  parser.add_argument("--gqa", type=int, default=1, help="query heads per kv head")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--xla-max-len", type=int, default=8192,
                      help="skip the materialising XLA reference above this length")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes in interpret mode (the default on CPU)")
  parser.add_argument("--out", default=None, help="also write the table to this file")
  args = parser.parse_args(argv)
  args.interpret = not (ON_GPU or ON_TPU)
  if args.quick or args.interpret:
    args.lengths = [x for x in args.lengths if x <= 256] or [128, 256]
    args.head_dims = [64]
    args.tokens, args.model_dim, args.repeats = 256, 128, min(args.repeats, 3)
  return args


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main(sys.argv[1:])
