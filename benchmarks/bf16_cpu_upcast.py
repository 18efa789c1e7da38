"""What the CPU-only float32 upcast of the bf16 backward's dk/dv products costs.

    python benchmarks/bf16_cpu_upcast.py [--lengths 1024,2048] [--repeats 15]

XLA CPU's generic dot has no bf16 x bf16 -> f32, so on CPU `attention.matmul.einsum_f32`
upcasts the two backward products that XLA may hand to it (dk, dv; see its docstring).
This compares, side by side in one run, bf16 forward+backward of `attend(impl="xla")`
under three rules: that default, no upcast (fails at run time at some shapes: printed as
an error), and upcasting every product. Repeats are interleaved across the rules so that
load on a shared machine hits them alike; medians; ratios against "no upcast".
"""

from __future__ import annotations

import argparse
import platform
import statistics
from unittest import mock

import jax
import jax.numpy as jnp

from timing import call_seconds, compile_once  # benchmarks/timing.py

from attnlab import attention
from attnlab.attention import matmul

RULES = {
    "dk/dv upcast (default)": matmul.upcasts_16bit,
    "no upcast": lambda contracts_leading_axes: False,
    "every product upcast": lambda contracts_leading_axes: True,
}
BASELINE = "no upcast"


def compile_fwd_bwd(kind: str, rule, args):
  """fwd+bwd of bf16 attention, traced and compiled while `rule` decides the upcasts."""
  def fwd_bwd(q, k, v, do):
    out, pullback = jax.vjp(lambda q, k, v: attention.attend(q, k, v, kind=kind, impl="xla"),
                            q, k, v)
    return pullback(do)

  with mock.patch.object(matmul, "upcasts_16bit", rule):
    return compile_once(fwd_bwd, args)


def measure_rules(kind: str, args, repeats: int) -> dict[str, dict]:
  runnable, rows = {}, {}
  for name, rule in RULES.items():
    compiled, mib = compile_fwd_bwd(kind, rule, args)
    try:
      jax.block_until_ready(compiled(*args))  # warm-up; the failing rule fails here
    except Exception as e:  # noqa: BLE001  (reported in the table, not hidden)
      rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"}
      continue
    runnable[name], rows[name] = compiled, {"mib": mib, "times": []}
  for _ in range(repeats):
    for name, compiled in runnable.items():
      rows[name]["times"].append(call_seconds(compiled, args))
  for row in rows.values():
    if "times" in row:
      row["ms"] = 1e3 * statistics.median(row.pop("times"))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  print(f"# attnlab bf16_cpu_upcast | jax {jax.__version__} | {jax.devices()[0].platform} | "
        f"{platform.processor() or platform.machine()} | B={args.batch} H={args.heads} "
        f"D={args.head_dim} bfloat16 fwd+bwd, impl=xla, median of {args.repeats} interleaved")
  header = (f"{'L':>5} | {'kind':<7} | {'rule':<24} | {'f+b ms':>8} | {'temp MiB':>8} | "
            f"{'t / no upcast':>13} | {'mem / no upcast':>15}")
  print(header)
  print("-" * len(header))
  for length in (int(x) for x in args.lengths.split(",")):
    keys = jax.random.split(jax.random.key(length), 4)
    shape = (args.batch, length, args.heads, args.head_dim)
    qkv_do = tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    for kind in ("softmax", "sigmoid"):
      rows = measure_rules(kind, qkv_do, args.repeats)
      base = rows[BASELINE]
      for name, r in rows.items():
        if "error" in r:
          print(f"{length:>5} | {kind:<7} | {name:<24} | {r['error']}", flush=True)
          continue
        ratio = (lambda key: f"{r[key] / base[key]:.2f}" if key in base else "n/a")
        print(f"{length:>5} | {kind:<7} | {name:<24} | {r['ms']:>8.1f} | {r['mib']:>8.1f} | "
              f"{ratio('ms'):>13} | {ratio('mib'):>15}", flush=True)


if __name__ == "__main__":
  main()
