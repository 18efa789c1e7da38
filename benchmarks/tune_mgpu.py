"""Tunes the Mosaic GPU kernel's tiles against the Triton kernel and writes the table
`flash_attention` reads for its default backend (attnlab/kernels/tuned_gpu.json).

    # On a Hopper GPU (bf16; batch * L = --tokens, heads = --model-dim / D):
    python benchmarks/tune_mgpu.py --out-table attnlab/kernels/tuned_gpu.json \
        --out benchmarks/results/tune_mgpu_<device>.md
    # CPU: interpret mode at tiny shapes, only to prove the script runs (no table written
    # unless --out-table is given):
    python benchmarks/tune_mgpu.py --quick

For every shape class (kind sigmoid/softmax, head dim, causal/full) and length it measures
forward+backward (median of --repeats after a compiling call) of the Triton kernel with its
defaults and of the Mosaic GPU kernel at each configuration of --configs (block_k and
num_stages; 64 query rows per warpgroup, two consumer warpgroups). A class's winner is the
backend (and configuration) with the lowest median time over the lengths; the table
records it with both times. The table is merged by device kind: other devices' entries
are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

from timing import compile_once, median_ms  # benchmarks/timing.py

from attnlab.kernels import flash_attention
from attnlab.kernels import tuned

ON_GPU = jax.default_backend() in ("gpu", "cuda")


def configs(spec: str) -> list[dict[str, int]]:
  """"128x2,64x3" -> [{"block_k": 128, "num_stages": 2}, {"block_k": 64, "num_stages": 3}]."""
  out = []
  for item in spec.split(","):
    block_k, stages = item.split("x")
    out.append({"block_k": int(block_k), "num_stages": int(stages)})
  return out


def fwd_bwd_ms(options: dict, q, k, v, do, kind: str, causal: bool, repeats: int) -> float:
  def step(q, k, v, do):
    out, pullback = jax.vjp(lambda q, k, v: flash_attention(q, k, v, kind=kind,
                                                            is_causal=causal, **options),
                            q, k, v)
    return out, pullback(do)
  # Off a GPU the kernels are interpreted, and Mosaic GPU's interpreter can hang inside a
  # larger jitted step on few cores: there the step runs eagerly (its time means nothing).
  fn = compile_once(step, (q, k, v, do))[0] if ON_GPU else step
  return median_ms(fn, (q, k, v, do), repeats)


def measure_class(args, kind: str, d: int, causal: bool) -> list[dict]:
  """One row per (length, backend configuration): its time, or the error it raised."""
  dtype = jnp.dtype(args.dtype)
  interpret = {} if ON_GPU else {"interpret": True}
  candidates = [("gpu", {"backend": "gpu", **interpret})] + [
      (f"mgpu k{c['block_k']} s{c['num_stages']}", {"backend": "mgpu", **c, **interpret})
      for c in configs(args.configs)]
  rows = []
  for length in args.lengths:
    b, h = max(1, args.tokens // length), max(1, args.model_dim // d)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, (b, length, h, d), dtype) for key in keys)
    for name, options in candidates:
      row = {"kind": kind, "head_dim": d, "causal": causal, "length": length, "impl": name,
             "options": options}
      try:
        row["ms"] = fwd_bwd_ms(options, q, k, v, do, kind, causal, args.repeats)
      except Exception as e:  # pylint: disable=broad-except
        # Shared memory overflow, an unsupported shape: reported, never a winner.
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


def winner(rows: list[dict]) -> dict | None:
  """The table entry for one class: the candidate with the lowest median time over the
  lengths (only candidates measured at every length compete), with Triton's for context."""
  by_impl: dict[str, list[dict]] = {}
  for r in rows:
    by_impl.setdefault(r["impl"], []).append(r)
  lengths = {r["length"] for r in rows}
  medians = {impl: statistics.median(r["ms"] for r in rs) for impl, rs in by_impl.items()
             if all("ms" in r for r in rs) and {r["length"] for r in rs} == lengths}
  if "gpu" not in medians:
    return None
  best = min(medians, key=medians.get)
  options = by_impl[best][0]["options"]
  return {"backend": options["backend"],
          **{k: options[k] for k in tuned.TUNED_OPTIONS if k in options},
          "ms": round(medians[best], 4), "triton_ms": round(medians["gpu"], 4),
          "lengths": sorted(lengths)}


def format_row(r: dict) -> str:
  mask = "causal" if r["causal"] else "full"
  lead = f"| {r['kind']:7} | {r['head_dim']:4} | {mask:6} | {r['length']:6} | {r['impl']:14} |"
  return f"{lead} {r['error']} |" if "error" in r else f"{lead} {r['ms']:9.3f} |"


def merge_table(path: pathlib.Path, device: str, entries: dict[str, dict]) -> dict:
  table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
  table.setdefault("devices", {})[device] = entries
  table["about"] = ("Written by benchmarks/tune_mgpu.py on a GPU: per device kind and shape "
                    "class, the backend whose forward+backward was faster (median over the "
                    "measured lengths) and its tiles; unlisted devices and classes keep "
                    "the Triton kernel.")
  path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
  return table


def run(args) -> dict[str, dict]:
  header = [f"# Mosaic GPU tuning, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"jax {jax.__version__}, device {tuned.device_kind()}, dtype {args.dtype}, "
            f"repeats {args.repeats}, tokens {args.tokens}, model dim {args.model_dim}",
            "forward+backward median ms; `gpu` = the Triton kernel with its defaults", "",
            "| kind    |    D | mask   |      L | impl           |        ms |",
            "|---------|------|--------|--------|----------------|-----------|"]
  print("\n".join(header), flush=True)
  lines, entries = list(header), {}
  for kind in args.kinds:
    for d in args.head_dims:
      for causal in args.masks:
        rows = measure_class(args, kind, d, causal)
        lines += [format_row(r) for r in rows]
        best = winner(rows)
        if best is not None:
          entries[tuned.shape_class(kind, args.dtype, d, causal)] = best
  winners = ["", "## winners", "```json", json.dumps(entries, indent=2, sort_keys=True), "```"]
  print("\n".join(winners))  # the rows were printed as they were measured
  lines += winners
  if args.out:
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
  if args.out_table:
    merge_table(pathlib.Path(args.out_table), tuned.device_kind(), entries)
  return entries


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(x) for x in s.split(",")]
  parser.add_argument("--kinds", type=lambda s: s.split(","), default=["sigmoid", "softmax"])
  parser.add_argument("--lengths", type=ints, default=[4096, 16384])
  parser.add_argument("--head-dims", type=ints, default=[64, 128])
  parser.add_argument("--masks", type=lambda s: [m == "causal" for m in s.split(",")],
                      default=[True, False], help="comma list of causal,full")
  parser.add_argument("--configs", default="128x2,128x3,64x2,64x4",
                      help="Mosaic GPU candidates, block_k x num_stages")
  parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // L")
  parser.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // D")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes in interpret mode (the default off a GPU)")
  parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
  parser.add_argument("--out-table", default=None,
                      help="merge the winners into this JSON (attnlab/kernels/tuned_gpu.json)")
  args = parser.parse_args(argv)
  if args.quick or not ON_GPU:
    args.lengths, args.head_dims, args.masks = [128], [64], [True]
    args.tokens, args.model_dim, args.repeats = 128, 64, 1
    args.configs = "128x2,64x3"
  return args


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main(sys.argv[1:])
