"""Forward and forward+backward time and memory of the jnp attention implementations.

    python benchmarks/attention_cpu.py [--lengths 512,1024,2048,4096] [--repeats 5]
        [--rows core|mechanisms|all]

`core`: softmax and sigmoid in each impl, non-causal and causal. `mechanisms`: the other
families (non-causal), against the same dpa rows: the input-dependent sparse kinds
(sparsemax, entmax, top-k materialised; top-k also streamed by chunked) and the O(L)
forms (linear, InLine, SOFT), whose memory must grow linearly in L where dpa's grows
quadratically (the "f+b MiB" column; "mem/xla" compares against the kind's own xla row,
so it is 1 for kinds with no chunked row).

Prints one table: median wall time (ms) of forward and forward+backward, XLA's
compiled peak memory (temporaries + outputs, MiB) for forward and fwd+bwd, and
ratios of time and memory against `jax.nn.dot_product_attention` (XLA softmax) and
of memory against impl="xla" of the same kind — all measured side by side in one run.
CPU timings are noisy on shared machines: trust the ratios, not the absolute ms.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

from timing import median_ms  # benchmarks/timing.py

from attnlab import attention
from attnlab.attention import chunked


# The families beside sigmoid and softmax, each with its default options, in the impls it
# runs (`attention.kind_impls`): the materialised sparse kinds, streamed top-k, O(L) forms.
MECHANISM_ROWS = (("sparsemax", "xla"), ("entmax", "xla"), ("topk", "xla"),
                  ("topk", "chunked"), ("linear", "xla"), ("inline", "xla"), ("soft", "xla"))


def implementations(block_k: int, rows: str = "core"):
  """name -> attention function (q, k, v) -> out, D=64: the core rows (non-causal, then
  causal) and/or the other mechanisms' (non-causal), each set with its dpa reference."""
  impls = {}
  for causal in (False, True) if rows != "mechanisms" else (False,):
    tag = " causal" if causal else ""
    impls[f"jax.nn.dpa (xla softmax){tag}"] = (lambda c: lambda q, k, v:
        jax.nn.dot_product_attention(q, k, v, implementation="xla", is_causal=c))(causal)
    if rows == "mechanisms":
      break
    for kind in ("softmax", "sigmoid"):
      for impl in ("xla", "chunked") if not causal else ("auto",):
        impls[f"{kind} {impl}{tag}"] = _attend(kind, impl, block_k, causal)
  if rows in ("mechanisms", "all"):
    for kind, impl in MECHANISM_ROWS:
      impls[f"{kind} {impl}"] = _attend(kind, impl, block_k, False)
  return impls


def _attend(kind: str, impl: str, block_k: int, causal: bool):
  opts = {"block_k": block_k} if impl == "chunked" else {}
  return lambda q, k, v: attention.attend(q, k, v, kind=kind, impl=impl, is_causal=causal,
                                          **opts)


def peak_mib(jitted, args) -> float:
  mem = jitted.lower(*args).compile().memory_analysis()
  if mem is None:
    return float("nan")
  return (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20


def measure(fn, args, repeats: int) -> dict[str, float]:
  """Times and compiled peaks of fn's forward and of its forward+backward."""
  fwd = jax.jit(fn)
  # The backward is pulled back from a random output cotangent, as in training: the gradient
  # of sum(out) is an all-ones constant cotangent, which XLA may fold into the backward.
  do = jax.random.normal(jax.random.key(0), jax.eval_shape(fn, *args).shape, jnp.float32)

  def fwd_bwd(q, k, v, do):
    out, pullback = jax.vjp(fn, q, k, v)
    return pullback(do.astype(out.dtype))

  fwd_bwd = jax.jit(fwd_bwd)
  bf16 = tuple(x.astype(jnp.bfloat16) for x in args)
  return {"fwd_ms": median_ms(fwd, args, repeats),
          "fwdbwd_ms": median_ms(fwd_bwd, (*args, do), repeats),
          "fwd_mib": peak_mib(fwd, args), "fwdbwd_mib": peak_mib(fwd_bwd, (*args, do)),
          "bf16_fwdbwd_ms": median_ms(fwd_bwd, (*bf16, do), repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="512,1024,2048,4096")
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--block-k", type=int, default=chunked.DEFAULT_BLOCK_K)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rows", choices=("core", "mechanisms", "all"), default="core")
  args = parser.parse_args()

  print(f"# attnlab attention_cpu benchmark | jax {jax.__version__} | "
        f"{jax.devices()[0].platform} x{jax.device_count()} | {platform.processor() or platform.machine()} | "
        f"B={args.batch} H={args.heads} D={args.head_dim} float32 (bf16 column: bf16 inputs), "
        f"chunked block_k={args.block_k}, median of {args.repeats}")
  header = (f"{'L':>5} | {'implementation':<33} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | "
            f"{'fwd MiB':>8} | {'f+b MiB':>8} | {'fwd t/dpa':>9} | {'f+b t/dpa':>9} | "
            f"{'fwd m/dpa':>9} | {'f+b m/dpa':>9} | "
            f"{'fwd mem/xla':>11} | {'f+b mem/xla':>11} | {'bf16 f+b t/dpa':>14}")
  print(header)
  print("-" * len(header))
  impls = implementations(args.block_k, args.rows)
  for length in (int(x) for x in args.lengths.split(",")):
    key_q, key_k, key_v = jax.random.split(jax.random.key(length), 3)
    shape = (args.batch, length, args.heads, args.head_dim)
    qkv = tuple(jax.random.normal(k_, shape, jnp.float32) for k_ in (key_q, key_k, key_v))
    rows = {name: measure(fn, qkv, args.repeats) for name, fn in impls.items()}
    for name, r in rows.items():
      kind = name.split()[0]
      # Causal rows against causal dpa and the kind's causal self; the others as before.
      ref = rows["jax.nn.dpa (xla softmax)" + (" causal" if name.endswith("causal") else "")]
      dense = r if name.endswith("causal") else rows.get(f"{kind} xla", r)
      print(f"{length:>5} | {name:<33} | {r['fwd_ms']:>8.1f} | {r['fwdbwd_ms']:>10.1f} | "
            f"{r['fwd_mib']:>8.1f} | {r['fwdbwd_mib']:>8.1f} | "
            f"{r['fwd_ms'] / ref['fwd_ms']:>9.2f} | {r['fwdbwd_ms'] / ref['fwdbwd_ms']:>9.2f} | "
            f"{r['fwd_mib'] / ref['fwd_mib']:>9.2f} | {r['fwdbwd_mib'] / ref['fwdbwd_mib']:>9.2f} | "
            f"{r['fwd_mib'] / dense['fwd_mib']:>11.3f} | {r['fwdbwd_mib'] / dense['fwdbwd_mib']:>11.3f} | "
            f"{r['bf16_fwdbwd_ms'] / ref['bf16_fwdbwd_ms']:>14.2f}", flush=True)


if __name__ == "__main__":
  main()
