"""Fused attention kernels side by side: FlashSigmoid vs FlashAttention-2 (ours, same tiling),
jax's own Pallas flash attention (Triton, gone from jax 0.12.1; and the FlashAttention-3-style
Mosaic GPU one, Hopper only, which takes no softmax scale: its row scales q first, one
elementwise op), jax.nn.dot_product_attention (cuDNN on GPU) and the XLA
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
cost. Interpret-mode (CPU) times say nothing about kernel speed. `--plot chart.png` adds a
bar chart of TFLOP/s per implementation and shape.

As a library (colab/03_flash_sigmoid_kernel.ipynb, with benchmarks/ on sys.path):
`run(parse_args([...]))` prints the table and returns it as records (`speed_rows`),
`plot_tflops(rows, title=chart_title(args))` draws the chart, and
`reference_errors(kind, length=...)` says how far the kernel is from the jnp reference,
values and gradients.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import statistics
import sys
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from timing import compile_once, median_ms  # benchmarks/timing.py

from attnlab import attention
from attnlab.kernels import capabilities
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


def _is_hopper() -> bool:
  return ON_GPU and getattr(jax.devices()[0], "compute_capability", "").startswith("9.")


def _mgpu_dtype(dtype) -> bool:
  """Whether Mosaic GPU's attention kernels (ours and jax's) take this input dtype."""
  return jnp.dtype(dtype).name in capabilities.MGPU_DTYPES


def _jax_mgpu_softmax(dtype) -> Callable | str:
  """jax's FlashAttention-3-style softmax on Pallas's Mosaic GPU backend (Hopper only; bf16
  or f16; lengths a multiple of its 128-key blocks), or the reason it cannot run here."""
  if not _is_hopper():
    return "needs a Hopper GPU (Mosaic GPU)"
  if not _mgpu_dtype(dtype):
    return "bf16/f16 only"
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "not importable"

  def run(q, k, v, causal):
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                         causal=causal)
    return attention_mgpu.attention(q * q.shape[-1] ** -0.5, k, v, config)
  return run


def _mgpu_unavailable(interpret: bool, dtype) -> str | None:
  """Why our Mosaic GPU kernels cannot run in this table, or None."""
  if not _mgpu_dtype(dtype):
    return "bf16/f16 only"
  if interpret:
    # Its interpreter simulates warpgroups with blocking host callbacks and, inside a
    # larger jitted step on few cores, can hang; tests/test_kernels_mgpu.py runs it eagerly.
    return "interpret mode: checked by tests/test_kernels_mgpu.py, not timed"
  return None if _is_hopper() else "needs a Hopper GPU (Mosaic GPU)"


def _traced_bias(q: jax.Array, k: jax.Array) -> jax.Array:
  """The default -log(Lk) as a per-head [H] array: built inside jit it is traced, like a
  learned bias, so the kernels' backward computes its gradient."""
  return jnp.full((q.shape[2],), -math.log(k.shape[1]), jnp.float32)


def implementations(interpret: bool, xla_max_len: int, length: int, gqa: bool,
                    dtype=jnp.bfloat16):
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
  # The Mosaic GPU kernels (warp-specialised, TMA, wgmma): on a Hopper GPU only.
  mgpu_reason = _mgpu_unavailable(interpret, dtype)
  for kind in ("sigmoid", "softmax"):
    impls[f"flash-{kind} mgpu"] = mgpu_reason or (lambda kind: lambda q, k, v, c: flash_attention(
        q, k, v, kind=kind, is_causal=c, backend="mgpu", **ours))(kind)
  jax_pallas = _jax_pallas_softmax(interpret)
  impls["jax pallas softmax"] = (
      "not importable" if jax_pallas is None else
      "no GQA support" if gqa else jax_pallas)
  impls["jax mgpu softmax"] = _jax_mgpu_softmax(dtype)
  sdpa_impl = "cudnn" if ON_GPU else "xla"
  impls[f"jax.nn.dpa ({sdpa_impl})"] = lambda q, k, v, c: jax.nn.dot_product_attention(
      q, k, v, is_causal=c, implementation=sdpa_impl)
  for kind in ("sigmoid", "softmax"):
    impls[f"{kind} xla (attend)"] = (
        f"skipped: L > --xla-max-len {xla_max_len}" if length > xla_max_len else
        (lambda kind: lambda q, k, v, c: attention.attend(q, k, v, kind=kind, is_causal=c,
                                                          impl="xla"))(kind))
  return impls


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


REFERENCE = "flash-sigmoid (ours)"  # the speedup columns divide by this implementation's time
# The bar chart's implementations (those measured): the two fused kernels, cuDNN's softmax
# (GPU) and jax's own Pallas flash softmax (Triton on GPU, Mosaic on TPU).
CHART_IMPLS = ("flash-sigmoid (ours)", "flash-softmax (ours)", "flash-sigmoid mgpu",
               "flash-softmax mgpu", "jax.nn.dpa (cudnn)", "jax mgpu softmax")


def random_inputs(key: jax.Array, b: int, length: int, h: int, hkv: int, d: int, dtype):
  """q, k, v and an output cotangent do, standard normal, [B, L, heads, D]."""
  kq, kk, kv, kd = jax.random.split(key, 4)
  return (jax.random.normal(kq, (b, length, h, d), dtype),
          jax.random.normal(kk, (b, length, hkv, d), dtype),
          jax.random.normal(kv, (b, length, hkv, d), dtype),
          jax.random.normal(kd, (b, length, h, d), dtype))


def speed_rows(args) -> Iterator[dict[str, Any]]:
  """The table as data: one record per (length, head dim, mask, implementation).

  `args` as `parse_args` returns them. Every record has "length", "head_dim", "mask"
  ("causal" / "full") and "impl"; a measured one adds `measure`'s fields, "fwd_tflops"
  and "fwdbwd_tflops" (attention TFLOP/s, see the module docstring) and the speedups
  "fwd_x" / "fwdbwd_x" (time / time of `REFERENCE`); one that was not measured adds
  "note" (unavailable, skipped, or the error it raised). Records come group by group as
  each (length, head dim, mask) group is measured.
  """
  dtype = jnp.dtype(args.dtype)
  for length in args.lengths:
    for d in args.head_dims:
      b, h = max(1, args.tokens // length), max(1, args.model_dim // d)
      hkv = max(1, h // args.gqa)
      q, k, v, do = random_inputs(jax.random.PRNGKey(0), b, length, h, hkv, d, dtype)
      for causal in args.masks:
        flops = attention_flops(b, h, length, length, d, causal)
        results = {}
        for name, fn in implementations(args.interpret, args.xla_max_len, length,
                                        hkv != h, dtype).items():
          if isinstance(fn, str):
            results[name] = fn
            continue
          try:
            results[name] = measure(fn, q, k, v, do, causal, args.repeats)
          except Exception as e:  # pylint: disable=broad-except
            # A missing cuDNN, an OOM, an unsupported shape: report it in the table.
            results[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        ref = results.get(REFERENCE)
        for name, r in results.items():
          row = {"length": length, "head_dim": d, "mask": "causal" if causal else "full",
                 "impl": name}
          if isinstance(r, str):
            yield {**row, "note": r}
            continue
          ratio = lambda key: (r[key] / ref[key]) if isinstance(ref, dict) else float("nan")
          yield {**row, **r, "fwd_tflops": flops / r["fwd_ms"] / 1e9,
                 "fwdbwd_tflops": 3.5 * flops / r["fwdbwd_ms"] / 1e9,
                 "fwd_x": ratio("fwd_ms"), "fwdbwd_x": ratio("fwdbwd_ms")}


def format_row(r: dict[str, Any]) -> str:
  """One line of the markdown table (TF/s columns in GFLOP/s off an accelerator)."""
  lead = f"| {r['length']:>6} | {r['head_dim']:>4} | {r['mask']:6} | {r['impl']:24} |"
  if "note" in r:
    return f"{lead} {r['note']} |"
  scale = 1.0 if (ON_GPU or ON_TPU) else 1e3
  return (f"{lead} {r['fwd_ms']:9.3f} | {r['fwd_tflops'] * scale:8.2f} | {r['fwdbwd_ms']:9.3f} "
          f"| {r['fwdbwd_tflops'] * scale:8.2f} | {r['fwd_tmp']:8.1f} | {r['fwdbwd_tmp']:8.1f} "
          f"| {r['fwdbwd_peak']:8.0f} | {r['fwd_x']:6.2f} | {r['fwdbwd_x']:6.2f} |")


def run(args) -> list[dict[str, Any]]:
  """Prints the table (and writes it to args.out, args.plot); returns `speed_rows`."""
  # Lines go to the --out file as they are produced: a run cut short by a timeout keeps
  # every row it finished.
  out = open(args.out, "w") if args.out else io.StringIO()

  def emit(line=""):
    print(line, file=out, flush=True)
    print(line, flush=True)

  emit(f"# attention kernels benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
  emit(f"jax {jax.__version__}, platform {PLATFORM}, device {jax.devices()[0].device_kind}, "
       f"dtype {jnp.dtype(args.dtype).name}, interpret={args.interpret}, repeats={args.repeats}")
  emit(f"shapes: B = max(1, {args.tokens} // L), H = {args.model_dim} // D, "
       f"Hkv = H // {args.gqa}; lengths {args.lengths}; head dims {args.head_dims}")
  emit("units: ms = median wall time; TF/s = attention TFLOP/s (GF/s on CPU); tmp = XLA "
       "temporaries MiB; peak = process peak MiB (GPU only, monotonic)")
  if args.interpret:
    emit("NOTE: Pallas kernels run in INTERPRET mode here: their times are meaningless; this "
         "run only proves the script works.")
  header = (f"| {'L':>6} | {'D':>4} | {'mask':6} | {'impl':24} | {'fwd ms':>9} | {'fwd TF/s':>8} "
            f"| {'f+b ms':>9} | {'f+b TF/s':>8} | {'fwd tmp':>8} | {'f+b tmp':>8} "
            f"| {'peak':>8} | {'fwd x':>6} | {'f+b x':>6} |")
  emit()
  emit("speedup columns `fwd x` / `f+b x` = time(this impl) / time(flash-sigmoid) in the same row group")
  emit(header)
  emit("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  rows = []
  for row in speed_rows(args):
    rows.append(row)
    emit(format_row(row))
  emit()
  cudnn = "jax.nn.dpa (cudnn)" if ON_GPU else "jax.nn.dpa (xla)"
  emit("## sigmoid speedups (time of reference / time of the sigmoid kernel; > 1 = sigmoid "
       "faster; median over shapes)")
  for fast, ref in (("flash-sigmoid (ours)", "flash-softmax (ours)"),
                    ("flash-sigmoid (ours)", cudnn),
                    ("flash-sigmoid mgpu", "flash-softmax mgpu"),
                    ("flash-sigmoid mgpu", cudnn),
                    ("flash-sigmoid mgpu", "flash-sigmoid (ours)")):
    ratios = speedups(rows, fast, ref)
    if ratios:
      emit(f"{fast} vs {ref}: over {len(ratios)} shapes: forward "
           f"x{statistics.median(r[0] for r in ratios):.3f}, forward+backward "
           f"x{statistics.median(r[1] for r in ratios):.3f}")
  out.close()
  if args.plot:
    plot_tflops(rows, title=chart_title(args)).savefig(args.plot, dpi=100, bbox_inches="tight")
  return rows


def speedups(rows: list[dict[str, Any]], fast: str, ref: str) -> list[tuple[float, float]]:
  """(forward, forward+backward) time ratios ref / fast, one per shape where both ran."""
  key = lambda r: (r["length"], r["head_dim"], r["mask"])
  timed = {(r["impl"], key(r)): r for r in rows if "note" not in r}
  return [(timed[(ref, k)]["fwd_ms"] / r["fwd_ms"], timed[(ref, k)]["fwdbwd_ms"] / r["fwdbwd_ms"])
          for (impl, k), r in timed.items() if impl == fast and (ref, k) in timed]


def chart_title(args) -> str:
  """The device and dtype, and a warning in interpret mode."""
  return (f"{jax.devices()[0].device_kind}, {args.dtype}"
          + (": INTERPRET mode, times mean nothing" if args.interpret else ""))


def plot_tflops(rows: list[dict[str, Any]], *, impls: tuple[str, ...] = CHART_IMPLS,
                title: str = ""):
  """Bar chart of attention TFLOP/s, forward and forward+backward, per implementation
  (those of `impls` that were measured) and shape group; returns the matplotlib Figure.

  A group is labelled by its length, and by head dim and mask where the rows hold more
  than one of them.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  measured = [r for r in rows if "fwd_tflops" in r and r["impl"] in impls]
  names = [name for name in impls if any(r["impl"] == name for r in measured)]
  varies = [f for f in ("head_dim", "mask") if len({r[f] for r in measured}) > 1]
  groups = list(dict.fromkeys((r["length"], r["head_dim"], r["mask"]) for r in measured))
  label = lambda g: "\n".join([f"L={g[0]}"] + [f"D={g[1]}"] * ("head_dim" in varies)
                              + [g[2]] * ("mask" in varies))
  width = 0.8 / max(1, len(names))
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), squeeze=False)
  for ax, field, what in zip(axes[0], ("fwd_tflops", "fwdbwd_tflops"),
                             ("forward", "forward + backward")):
    for i, name in enumerate(names):
      values = {(r["length"], r["head_dim"], r["mask"]): r[field]
                for r in measured if r["impl"] == name}
      xs = [j + (i - (len(names) - 1) / 2) * width for j, g in enumerate(groups) if g in values]
      ax.bar(xs, [values[g] for g in groups if g in values], width, label=name)
    ax.set_xticks(range(len(groups)), [label(g) for g in groups])
    ax.set_ylabel("attention TFLOP/s")
    ax.set_title(what)
  axes[0][0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def reference_errors(kind: str, *, length: int, head_dim: int = 64, heads: int = 2,
                     batch: int = 1, is_causal: bool = True, seed: int = 0) -> dict[str, float]:
  """How far the fused kernel is from the jnp reference, float32, default sigmoid bias.

  `attend(impl="pallas")` (interpret mode off an accelerator) against
  `attend(impl="xla")` computed in full float32 precision (XLA's default on GPU is
  TF32, which the kernels do not use). Returns max |kernel - reference| / max
  |reference| for "out" and the gradients "dq", "dk", "dv" of <out, do>.
  """
  q, k, v, do = random_inputs(jax.random.PRNGKey(seed), batch, length, heads, heads, head_dim,
                              jnp.float32)
  attend = lambda impl: lambda q, k, v: attention.attend(q, k, v, kind=kind, impl=impl,
                                                          is_causal=is_causal)
  got, pullback = jax.vjp(attend("pallas"), q, k, v)
  got = (got, *pullback(do))
  with jax.default_matmul_precision("highest"):
    want, pullback = jax.vjp(attend("xla"), q, k, v)
    want = (want, *pullback(do))
  return {name: float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
          for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}


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
  parser.add_argument("--plot", default=None, help="also save the TFLOP/s bar chart here (PNG)")
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
